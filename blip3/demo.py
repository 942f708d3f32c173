"""`blip3 demo`: the whole recipe on the embedded default — offline, on a CPU, in minutes.

    world      a seeded synthetic vision-language world, written in the real data formats
    stage 0    a tiny SigLIP trained contrastively on the world's captions; frozen from then on
    pretrain   captions, interleaved documents, OCR and grounding (next-token loss on text)
    (tags)     with `--tags`: a second pre-training stage on tag lists ('Shapes: star green, circle red.')
    sft        single-image conversations
    multi      interleaved multi-image conversations
    dpo        preference pairs (faithful vs hallucinated), LoRA, reference = adapter disabled
    safety     refusals on hazard images mixed with SFT data, LoRA
    evaluate   every stage from SFT on, on the held-out test split -> report.md / report.json / plots
    examples   a few test images with their questions, answered by the final model

Each training stage is a recipe in `configs/demo/` run by the same trainer as the real recipes; the
demo only supplies the paths. `--quick` runs the inference path alone (seconds), `profile="smoke"`
a tiny version of everything (the test suite runs it).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table

from blip3.processing.processor import Blip3Processor

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "demo"


@dataclass
class Profile:
    """How big each part of the demo is: `full` for `make demo`, `smoke` for the test suite."""

    world_sizes: str = "demo"
    stage0_steps: int | None = None  # None: Stage0Settings' own
    recipes: dict[str, str] = field(default_factory=dict)  # stage -> recipe overrides ("train.steps=...")
    eval_limit_per_task: int | None = 60  # test questions per task and stage (None: all; POPE: all, `UNLIMITED`)
    eval_batch_size: int = 32


PROFILES = {
    "full": Profile(),
    "smoke": Profile(
        world_sizes="smoke",
        stage0_steps=3,
        recipes={
            stage: ["train.steps=2", "data.micro_batch_size=2"]
            for stage in ("pretrain", "tags", "sft", "multi", "dpo", "safety")
        },
        eval_limit_per_task=2,
        eval_batch_size=4,
    ),
}

STAGES = ("pretrain", "sft", "multi", "dpo", "safety")
# `blip3 demo --tags`: 900 steps on tag lists after pre-training, which teach the model to find an object by
# its shape (colour questions need it); SFT then replays them, each naming an absent pair too. Not in the
# default run: 2-3 min here, and both of its demos paid for the colour gain elsewhere (on 1,500 test
# questions per task after SFT, seeds 0 / 1: colour +20 / +9 points, large text -17 / -11, boxes -5 / -6;
# docs/demo-findings.md).
WITH_TAGS = ("pretrain", "tags", "sft", "multi", "dpo", "safety")
# Evaluated on the test split: every stage from SFT on. The pre-trained model has never seen a chat turn and
# answers none of the questions (0 % on every task when it was evaluated); its validation loss says more.
EVALUATED = ("sft", "multi", "dpo", "safety")
RECIPES = {
    "pretrain": "pretrain",
    "tags": "pretrain-tags",
    "sft": "sft",
    "multi": "sft-multi-image",
    "dpo": "dpo",
    "safety": "safety",
}
WORLD_MIXTURES = {
    "pretrain": "pretrain",
    "tags": "tags",
    "sft": "sft",
    "multi": "multi_image_sft",
    "dpo": "dpo",
    "safety": "safety",
}
EVAL_FILES = ("single", "multi", "pope", "safety")
# POPE, the hallucination probe, is asked in full: its three categories (random, popular, adversarial), 150
# absent objects. The per-task limit would keep the random category's first 60 questions, 30 absent objects,
# which measure a hallucination rate to about ±16 points.
UNLIMITED = frozenset({"pope"})


@dataclass
class DemoPaths:
    root: Path  # the model's own folders: init, stages, report
    shared: Path | None = None  # where the world and stage 0 live (default: root; the ablation shares them)

    @property
    def world(self) -> Path:
        return (self.shared or self.root) / "world"

    @property
    def init(self) -> Path:
        return self.root / "init"

    @property
    def stage0(self) -> Path:
        return (self.shared or self.root) / "stage0"

    def stage(self, name: str) -> Path:
        return self.root / "stages" / name

    def final_checkpoint(self, name: str) -> Path:
        from blip3.training.checkpoint import latest_checkpoint

        checkpoint = latest_checkpoint(self.stage(name))
        if checkpoint is None:
            raise FileNotFoundError(f"stage {name!r} has no checkpoint in {self.stage(name)}")
        return checkpoint

    @property
    def report(self) -> Path:
        return self.root / "report"


# ---------------------------------------------------------------------------------------------------
# the steps


def build_world(
    paths: DemoPaths, profile: Profile, seed: int, console: Console, tags: bool = False, keep: bool = False
) -> dict:
    """The run's world: reused if it was built for the same seed and sizes, else (re)built; with `keep`, a
    world built for other settings is an error instead (a shared world another run trained on is kept)."""
    from dataclasses import asdict

    from blip3.synthetic.world import WorldSpec
    from blip3.synthetic.write import build_world

    sizes = world_sizes(profile, tags)
    manifest_file = paths.world / "manifest.json"
    if manifest_file.is_file():
        manifest = json.loads(manifest_file.read_text())
        if manifest.get("seed") == seed and manifest.get("sizes") == asdict(sizes):
            console.print(f"world: reusing {paths.world}")
            return {**manifest, "reused": True}
        if keep:
            raise ValueError(
                f"{paths.world} was built for another seed or other sizes (with or without `--tags`) than this run's "
                f"(seed {seed}, tags {'on' if tags else 'off'}); it is left as it is"
            )
        shutil.rmtree(paths.world)
    return build_world(paths.world, sizes, WorldSpec(), seed=seed)


def world_sizes(profile: Profile, tags: bool):
    """The profile's world, with the tag lists only where the tags stage will read them."""
    from dataclasses import replace

    from blip3.synthetic.write import WorldSizes

    sizes = WorldSizes.smoke() if profile.world_sizes == "smoke" else WorldSizes.demo()
    return sizes if tags else replace(sizes, tags=0)


def write_initial_model(paths: DemoPaths, vision_token_mode: str = "anyres-patch") -> None:
    """The model's configuration (no weights: the first stage starts from fresh ones) and its processor."""
    from blip3.synthetic.config import tiny_world_config
    from blip3.synthetic.tokenizer import load_world_tokenizer

    tokenizer = load_world_tokenizer(paths.world)
    config = tiny_world_config(tokenizer, vision_token_mode=vision_token_mode)
    paths.init.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(paths.init)
    Blip3Processor.from_config(config, tokenizer).save_pretrained(paths.init)


def train_stage0(paths: DemoPaths, profile: Profile, seed: int, reuse: bool = False) -> dict:
    """Stage 0's metrics; with `reuse`, those of a tower already trained in `paths.stage0` with the same
    settings (marked `"reused": True`) instead of training it again."""
    from dataclasses import asdict

    from blip3.config import Blip3Config
    from blip3.synthetic.stage0 import Stage0Settings, train_stage0

    settings = Stage0Settings(seed=seed)
    if profile.stage0_steps is not None:
        settings.steps = profile.stage0_steps
    metrics_file = paths.stage0 / "metrics.json"
    if reuse and metrics_file.is_file() and (paths.stage0 / "vision_tower" / "config.json").is_file():
        metrics = json.loads(metrics_file.read_text())
        if metrics.get("settings") == json.loads(json.dumps(asdict(settings))):
            return {**metrics, "reused": True}
    return train_stage0(paths.world, paths.stage0, settings, Blip3Config.from_pretrained(paths.init))


def finished_stage(run_dir: Path, config) -> Path | None:
    """The final checkpoint of a stage already trained in `run_dir` with this very recipe, if there is one."""
    from blip3.training.checkpoint import STEP_DIR, latest_checkpoint

    saved, checkpoint = run_dir / "config.yaml", latest_checkpoint(run_dir)
    if not saved.is_file() or checkpoint is None or int(STEP_DIR.match(checkpoint.name)[1]) != config.train.steps:
        return None
    # through YAML, as the trainer saved it: tuples and lists compare equal
    same_recipe = yaml.safe_load(saved.read_text()) == yaml.safe_load(yaml.safe_dump(config.to_dict()))
    return checkpoint if same_recipe else None


def stage0_summary(metrics: dict) -> str:
    """One line: what the tower learned (retrieval, and text tiles read, per text size)."""
    from blip3.synthetic.stage0 import text_sizes

    reads = metrics["text_retrieval"]
    return (
        f"retrieval top-1 {metrics['retrieval']['top1']:.1%} (untrained {metrics['retrieval_before']['top1']:.1%})"
        + (f"; text tiles -> their string {reads['top1']:.1%}{text_sizes(metrics)}" if reads else "")
    )


def stage_config(stage: str, paths: DemoPaths, profile: Profile, seed: int, stages: tuple[str, ...] = STAGES):
    """The stage's recipe (`configs/demo/<stage>.yaml`) with the demo's paths filled in; it starts from the
    final checkpoint of the stage before it in `stages`."""
    from blip3.training.config import load_config

    position = stages.index(stage)
    previous = stages[position - 1] if position > 0 else None
    overrides = [
        f"model.init={paths.init if previous is None else paths.final_checkpoint(previous)}",
        f"data.mixture={paths.world / (WORLD_MIXTURES[stage] + '.yaml')}",
        f"train.output_dir={paths.stage(stage)}",
        f"train.seed={seed}",
    ]
    if previous is None:
        overrides.append(f"model.vision_tower={paths.stage0 / 'vision_tower'}")
    config = load_config(CONFIGS / f"{RECIPES[stage]}.yaml", overrides + profile.recipes.get(stage, []))
    validation = yaml.safe_load((paths.world / f"{WORLD_MIXTURES[stage]}.yaml").read_text()).get("validation")
    if validation and config.train.eval_every:
        config.data.validation = {"sources": validation}
        for source in config.data.validation["sources"]:  # the world's paths are relative to its folder
            source["path"] = str(paths.world / source["path"])
            if "image_root" in source:
                source["image_root"] = str(paths.world / source["image_root"])
    return config


def evaluate_stage(
    stage: str, paths: DemoPaths, profile: Profile, files: tuple[str, ...] = EVAL_FILES, label: str | None = None
) -> Any:
    """Every test question of the world's `files` (up to `eval_limit_per_task` per task, POPE's all) on the
    stage's final model (a LoRA stage's adapter is merged into its base on loading)."""
    from blip3.evaluation import evaluate, load_synthetic
    from blip3.factory import load_pretrained

    model, processor = load_pretrained(paths.final_checkpoint(stage))
    items = []
    for name in files:
        limit = None if name in UNLIMITED else profile.eval_limit_per_task
        items += _limit(load_synthetic(paths.world / "eval" / "test" / f"{name}.json"), limit)
    label = label or stage
    results = evaluate(
        model.eval(), processor, items, batch_size=profile.eval_batch_size, label=label, benchmark="synthetic world"
    )
    results.save(paths.report / f"{label}.json")
    return results


def _limit(items: list, per_task: int | None) -> list:
    if per_task is None:
        return items
    seen: dict[str, int] = {}
    kept = []
    for item in items:
        seen[item.task] = seen.get(item.task, 0) + 1
        if seen[item.task] <= per_task:
            kept.append(item)
    return kept


# ---------------------------------------------------------------------------------------------------
# the whole run


def run_demo(
    out_dir: Path, profile_name: str = "full", seed: int = 0, stages: tuple[str, ...] = STAGES, resume: bool = False
) -> dict:
    """Run everything into `out_dir`; return the evaluation summary per stage (also in report/report.json).

    `resume`: keep stage 0 and each training stage already finished in `out_dir` with the same settings, up to
    the first that is not (a run cut short goes on from there); every stage after one that trains again is
    trained again too. Evaluation and the report are always redone."""
    from blip3.evaluation.report import write_report
    from blip3.training.trainer import train

    console = Console()
    profile = PROFILES[profile_name]
    paths = DemoPaths(Path(out_dir))
    paths.root.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    def step(name: str, title: str):
        console.rule(f"[bold]{title}")
        return _Timer(timings, name)

    with step("world", "1. the synthetic world"):
        reuse = build_world(paths, profile, seed, console, tags="tags" in stages).get("reused", False) and resume
        write_initial_model(paths)
    with step("stage0", "2. stage 0: the vision tower (tiny SigLIP, sigmoid loss), then frozen"):
        metrics = train_stage0(paths, profile, seed, reuse=reuse)
        reuse = metrics.get("reused", False)
        console.print(("reusing it: " if reuse else "") + stage0_summary(metrics))
    results = []
    for number, stage in enumerate(stages, start=3):
        with step(stage, f"{number}. {stage}"):
            config = stage_config(stage, paths, profile, seed, stages)
            checkpoint = finished_stage(paths.stage(stage), config) if reuse else None
            if checkpoint is not None:
                console.print(f"{stage}: reusing {checkpoint}")
            else:
                train(config)
                reuse = False
        if stage in EVALUATED or stage == stages[-1]:  # a run cut short still reports its last stage
            with step(f"eval-{stage}", f"   evaluating {stage} on the test split"):
                results.append(evaluate_stage(stage, paths, profile))
    with step("report", "report"):
        files = write_report(results, paths.report, title="blip3 demo: the synthetic world, stage by stage")
        show_summary(results, console)
        show_examples(paths, stages[-1], console)
    (paths.report / "timings.json").write_text(json.dumps(timings, indent=1))
    console.rule(f"[bold green]demo done in {sum(timings.values()) / 60:.1f} min")
    console.print(f"report: {files['markdown']}   plots: {files['plot']}   checkpoints: {paths.root / 'stages'}")
    return {r.label: r.tasks for r in results}


class _Timer:
    def __init__(self, timings: dict[str, float], name: str):
        self.timings, self.name = timings, name

    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.timings[self.name] = time.perf_counter() - self.start


def show_summary(results: list, console: Console) -> None:
    """The primary number of each task (rows) for each stage (columns)."""
    from blip3.evaluation.report import collect

    table_data = collect(results, uncertainty=False)
    table = Table(title="test split: primary metric per task (%)", show_edge=False)
    table.add_column("task")
    table.add_column("metric")
    for stage in table_data["stages"]:
        table.add_column(stage, justify="right")
    for task, entry in sorted(table_data["tasks"].items()):
        primary = entry["primary"]
        cells = [f"{entry['scores'][s][primary]:.1f}" if s in entry["scores"] else "—" for s in table_data["stages"]]
        table.add_row(task, primary, *cells)
    console.print(table)


def show_examples(paths: DemoPaths, stage: str, console: Console, count: int = 6) -> None:
    """A few test questions answered by the final model, with the expected answers."""
    from blip3.evaluation.runner import EvalResults

    results = EvalResults.load(paths.report / f"{stage}.json")
    shown = 0
    for item in results.items:
        if shown == count:
            break
        if item.task in {"pope_random", "pope_popular", "pope_adversarial"}:
            continue
        mark = "[green]✓[/]" if item.score > 0 else "[red]✗[/]"
        question = item.prompt.replace("<image>", "").strip()
        console.print(
            f"{mark} [bold]{item.task}[/] {question!r} -> {item.prediction!r} (expected {item.references[0]!r})"
        )
        shown += 1
