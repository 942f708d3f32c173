"""`blip3 ablate anyres`: the paper's vision-token ablation in miniature, on the synthetic world.

    world + stage 0        built once (or reused from a demo folder: `--shared runs/demo`)
    for each mode          base | anyres-fixed | anyres-patch (REFERENCE §1.2, `Blip3Config.vision_token_mode`)
        pretrain, sft      the demo's recipes, the same steps and seed for every mode
        evaluate           the single-image test questions (small and large text among them)
    report                 one column per mode: report.md / report.json / scores.png, and a summary table

Only the vision-token mode differs between the runs: the world, the frozen stage-0 tower, the recipes,
the data order and the evaluation items are shared, so differences come from how images become tokens.
The paper's finding to reproduce: on text too small for the squashed global view, anyres-patch beats
anyres-fixed, which beats base.
"""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from blip3.config import VISION_TOKEN_MODES

ABLATION_STAGES = ("pretrain", "sft")
SMALL_TEXT_TASKS = ("ocr_small",)


def run_anyres_ablation(
    out_dir: Path,
    profile_name: str = "full",
    seed: int = 0,
    modes: tuple[str, ...] = ("base", "anyres-fixed", "anyres-patch"),
    shared: Path | None = None,
) -> dict[str, dict]:
    """Train and evaluate each mode into `out_dir/<mode>`; returns {mode: {task: summary}}."""
    from blip3.demo import (
        PROFILES,
        DemoPaths,
        _Timer,
        build_world,
        evaluate_stage,
        stage_config,
        train_stage0,
        write_initial_model,
    )
    from blip3.evaluation.report import write_report
    from blip3.training.trainer import train

    unknown = set(modes) - set(VISION_TOKEN_MODES)
    if unknown:
        raise ValueError(f"unknown vision-token mode(s) {sorted(unknown)}; choose from {VISION_TOKEN_MODES}")
    console = Console()
    profile = PROFILES[profile_name]
    out_dir = Path(out_dir)
    shared_paths = DemoPaths(Path(shared or out_dir))
    timings: dict[str, float] = {}

    console.rule("[bold]the world and stage 0 (shared by every mode)")
    with _Timer(timings, "world"):
        build_world(shared_paths, profile, seed, console, keep=shared is not None)
    if (shared_paths.stage0 / "vision_tower" / "config.json").is_file():
        console.print(f"stage 0: reusing {shared_paths.stage0}")
    else:
        with _Timer(timings, "stage0"):
            write_initial_model(shared_paths)
            train_stage0(shared_paths, profile, seed)

    results = []
    for mode in modes:
        paths = DemoPaths(out_dir / mode, shared=shared_paths.root)
        write_initial_model(paths, vision_token_mode=mode)
        for stage in ABLATION_STAGES:
            console.rule(f"[bold]{mode}: {stage}")
            with _Timer(timings, f"{mode}/{stage}"):
                train(stage_config(stage, paths, profile, seed))
        with _Timer(timings, f"{mode}/eval"):
            results.append(evaluate_stage(ABLATION_STAGES[-1], paths, profile, files=("single",), label=mode))

    report_dir = out_dir / "report"
    files = write_report(results, report_dir, title="blip3 ablation: vision-token modes on the same budget")
    (report_dir / "timings.json").write_text(json.dumps(timings, indent=1))
    show_ablation(results, console)
    console.print(f"report: {files['markdown']}   plots: {files['plot']}")
    return {r.label: r.tasks for r in results}


def show_ablation(results: list, console: Console) -> None:
    """The primary metric per task (rows) per mode (columns), small-text tasks first, and whether the paper's
    order holds on them."""
    from blip3.evaluation.report import collect
    from blip3.evaluation.uncertainty import paired_change

    table_data = collect(results, uncertainty=False)
    modes, tasks = table_data["stages"], table_data["tasks"]

    def score(task: str, mode: str) -> float | None:
        summary = tasks[task]["scores"].get(mode)
        return None if summary is None else float(summary[tasks[task]["primary"]])

    table = Table(title="test split, single-image questions: primary metric (%)", show_edge=False)
    table.add_column("task")
    for mode in modes:
        table.add_column(mode, justify="right")
    for task in sorted(tasks, key=lambda t: (t not in SMALL_TEXT_TASKS, t)):
        table.add_row(task, *["—" if (v := score(task, m)) is None else f"{v:.1f}" for m in modes])
    console.print(table)
    order = [m for m in ("anyres-patch", "anyres-fixed", "base") if m in modes]
    for task in SMALL_TEXT_TASKS:
        scores = [score(task, m) for m in order] if task in tasks else [None]
        if len(order) > 1 and None not in scores:
            holds = all(a > b for a, b in zip(scores, scores[1:]))
            # Beyond noise: each step down the order is a change whose paired 95 % interval excludes 0.
            items = {r.label: [item for item in r.items if item.task == task] for r in results}
            steps = [paired_change(items[worse], items[better]) for better, worse in zip(order, order[1:])]
            clear = all(step["ci95"][0] > 0 for step in steps)
            verdict = (
                "[green]holds[/], beyond noise"
                if holds and clear
                else "[yellow]holds[/] on these items, within noise"
                if holds
                else "[red]does not hold[/]"
            )
            console.print(f"{task}: {' > '.join(order)} {verdict} ({', '.join(f'{s:.1f}' for s in scores)})")


def add_commands(commands) -> None:
    ablate = commands.add_parser("ablate", help="ablations on the synthetic world (the paper's, in miniature)")
    kinds = ablate.add_subparsers(dest="ablation", required=True)
    anyres = kinds.add_parser(
        "anyres", help="base vs anyres-fixed vs anyres-patch vision tokens on the same budget (small-text OCR)"
    )
    anyres.add_argument("--out", type=Path, default=Path("runs/ablate-anyres"), help="where the runs and report go")
    anyres.add_argument("--profile", choices=["full", "smoke"], default="full", help="smoke: a tiny version")
    anyres.add_argument("--seed", type=int, default=0)
    anyres.add_argument(
        "--modes", nargs="+", default=["base", "anyres-fixed", "anyres-patch"], choices=VISION_TOKEN_MODES
    )
    anyres.add_argument(
        "--shared", type=Path, default=None, help="reuse the world and stage 0 of this folder (e.g. a demo's runs/demo)"
    )
    anyres.set_defaults(
        run=lambda args: run_anyres_ablation(args.out, args.profile, args.seed, tuple(args.modes), args.shared)
    )
