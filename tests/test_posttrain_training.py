"""DPO and safety fine-tuning through the training engine (`blip3 train`), on the synthetic world."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from blip3 import Blip3Processor, load_pretrained
from blip3.modeling.model import Blip3ForConditionalGeneration
from blip3.posttrain.testing import tiny_config, write_base_checkpoint
from blip3.synthetic import WorldSizes, build_world, load_world_tokenizer, tiny_world_config
from blip3.training.config import ModelSection, load_config
from blip3.training.dpo import DPOSettings
from blip3.training.logs import read_metrics
from blip3.training.lora import LoraSettings, export_merged, read_adapter_config, share_for_preset
from blip3.training.trainer import apply_model_lora, build_model, train

REPO = Path(__file__).resolve().parents[1]
DEMO, REAL = REPO / "configs" / "demo", REPO / "configs" / "xgen-mm-phi3-mini"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """The smoke-sized synthetic world and an untrained world model saved as the "SFT" checkpoint."""
    root = tmp_path_factory.mktemp("posttrain")
    build_world(root / "world", WorldSizes.smoke(), workers=1, progress=False)
    tokenizer = load_world_tokenizer(root / "world")
    config = tiny_world_config(tokenizer)
    write_base_checkpoint(root / "sft", config, Blip3Processor.from_config(config, tokenizer))
    return root


def demo_overrides(world: Path, stage: str, run_dir: Path, **extra) -> list[str]:
    """What `blip3 demo` fills in, plus a short run."""
    values = {
        "model.init": str(world / "sft"),
        "data.mixture": str(world / "world" / f"{stage}.yaml"),
        "data.micro_batch_size": 4,
        "train.output_dir": str(run_dir),
        "train.log_every": 1,
        **extra,
    }
    return [f"{key}={json.dumps(value) if not isinstance(value, str) else value}" for key, value in values.items()]


def records(run_dir: Path, kind: str) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == kind}


def validation_mixture(world: Path) -> str:
    mixture = yaml.safe_load((world / "world" / "dpo.yaml").read_text())["validation"]
    for source in mixture:
        source["path"] = str(world / "world" / source["path"])
        source["image_root"] = str(world / "world" / source["image_root"])
    return json.dumps({"sources": mixture})


def test_the_demo_dpo_recipe_lowers_the_dpo_loss_and_resumes_exactly_through_blip3_train(world, tmp_path):
    steps = 8
    overrides = demo_overrides(
        world,
        "dpo",
        tmp_path / "full",
        **{"train.steps": steps, "train.save_every": 4, "train.keep_last": 3, "train.eval_every": 4},
        # 4x the demo's rate, so that 8 steps visibly lower the loss
        **{"optim.lr": 2e-3, "train.dpo.sft_weight": 0.0},
        **{"data.validation": validation_mixture(world), "train.eval_batches": 2},
    )
    result = train(load_config(DEMO / "dpo.yaml", overrides))
    full = records(tmp_path / "full", "train")
    assert sorted(full) == list(range(1, steps + 1))
    assert full[1]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # a fresh adapter: policy = reference
    assert full[1]["rewards/margin"] == pytest.approx(0.0, abs=1e-6)
    assert (full[steps - 1]["loss"] + full[steps]["loss"]) / 2 < math.log(2) - 0.05
    assert full[steps]["rewards/accuracy"] > 0.5 and full[steps]["pairs"] == 4
    validation = records(tmp_path / "full", "validation")
    # held-out pairs, the same batches each time: scored with the adapter as it was at steps 4 and 8
    assert sorted(validation) == [4, 8] and {"loss", "rewards/margin", "rewards/accuracy"} <= set(validation[8])
    assert math.isfinite(validation[8]["loss"]) and validation[8]["loss"] != validation[4]["loss"]

    start = next(r for r in read_metrics(tmp_path / "full" / "metrics.jsonl") if r["kind"] == "start")
    assert start["lora"]["language_model_share"] == pytest.approx(36_864 / 1_578_313)  # reported by the run
    assert start["trainable_parameters"] == 36_864
    final = result.final_checkpoint
    assert (final / "adapter_model.safetensors").is_file() and not (final / "model.safetensors").exists()
    assert read_adapter_config(final).base_model_name_or_path == str((world / "sft").resolve())

    # resume from the step-4 checkpoint through the command line: steps 5..8 are bit-identical
    resumed_dir = tmp_path / "resumed"
    command = [sys.executable, "-m", "blip3.cli", "train", str(DEMO / "dpo.yaml")]
    command += overrides[:-1] + [
        f"train.output_dir={resumed_dir}",
        "--resume",
        str(tmp_path / "full" / "checkpoints" / "step-000004"),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "LoRA: 36,864 trainable parameters" in done.stdout + done.stderr
    resumed = records(resumed_dir, "train")
    assert sorted(resumed) == [5, 6, 7, 8]
    assert all(resumed[s]["loss"] == full[s]["loss"] for s in resumed)
    assert all(resumed[s]["rewards/margin"] == full[s]["rewards/margin"] for s in resumed)


def test_the_demo_safety_recipe_trains_a_lora_adapter_with_the_sft_objective(world, tmp_path):
    # Ungrouped batches, so that the first and the last are alike: batches grouped by length differ in loss.
    overrides = demo_overrides(
        world, "safety", tmp_path / "run", **{"train.steps": 6, "optim.lr": 5e-3, "data.length_grouping": False}
    )
    result = train(load_config(DEMO / "safety.yaml", overrides))
    losses = [r["loss"] for r in records(tmp_path / "run", "train").values()]
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.5
    assert "rewards/margin" not in records(tmp_path / "run", "train")[6]
    export_merged(result.final_checkpoint, tmp_path / "merged")
    merged, _ = load_pretrained(tmp_path / "merged")
    base, _ = load_pretrained(world / "sft")
    changed = {n for n, p in merged.state_dict().items() if not torch.equal(p, base.state_dict()[n])}
    assert changed and all(".language_model." in n and n.endswith("_proj.weight") for n in changed)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.lora=null", "model.train=[language_model]"], "set model.lora"),
        (["model.train=[language_model]"], "set model.train: \\[\\]"),
        (["train.objective=sft"], "train.dpo is set but"),
        (["train.objective=kto"], "must be sft or dpo"),
        (["model.lora.rank=0"], "rank must be at least 1"),
    ],
)
def test_post_training_recipe_mistakes_are_named(world, tmp_path, overrides, message):
    config = load_config(DEMO / "dpo.yaml", demo_overrides(world, "dpo", tmp_path / "run") + overrides)
    with pytest.raises(ValueError, match=message):
        train(config)


def test_lora_adapts_a_checkpoint_not_a_fresh_preset():
    section = ModelSection(init="tiny", train=[], lora={"rank": 4})
    with pytest.raises(ValueError, match="must be a checkpoint folder"):
        apply_model_lora(Blip3ForConditionalGeneration(tiny_config()), section)


def test_a_dpo_recipe_refuses_a_mixture_without_preference_pairs(world, tmp_path):
    overrides = demo_overrides(world, "dpo", tmp_path / "run") + [f"data.mixture={world / 'world' / 'sft.yaml'}"]
    with pytest.raises(ValueError, match="holds no preference pairs"):
        train(load_config(DEMO / "dpo.yaml", overrides))


@pytest.mark.parametrize("name", ["dpo", "dpo-noised", "safety"])
def test_the_real_recipes_hold_the_papers_settings(name, monkeypatch):
    monkeypatch.setenv("DATA", "/data")
    config = load_config(REAL / f"{name}.yaml")
    lora = LoraSettings.from_dict(config.model.lora)
    assert config.model.train == [] and config.data.epochs == (3 if name == "safety" else 1)
    assert config.train.objective == ("sft" if name == "safety" else "dpo")
    if config.train.objective == "dpo":
        DPOSettings.from_dict(config.train.dpo)
    share = share_for_preset("xgen-mm-phi3-mini-v1.5", lora).language_model_share
    assert 0.02 < share < 0.03  # "~2.5 % of the LLM's parameters"
    demo = load_config(DEMO / f"{name}.yaml")
    assert demo.model.train == [] and LoraSettings.from_dict(demo.model.lora).rank == 4


def test_build_model_with_lora_freezes_everything_but_the_adapters(world):
    config = load_config(DEMO / "dpo.yaml", [f"model.init={world / 'sft'}"])
    model, processor = build_model(config)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    assert processor.image_token_id == model.config.image_token_id


# -- several processes -------------------------------------------------------------------------------


def run_blip3(args: list[str], processes: int) -> None:
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    command = (torchrun if processes > 1 else [sys.executable]) + ["-m", "blip3.cli", "train", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_dpo_on_two_processes_reproduces_the_single_process_losses(world, tmp_path, strategy):
    # one process: 2 streams, 2 micro-batches per step; two processes: 1 stream and 1 micro-batch each
    common = {"train.steps": 4, "train.dpo.sft_weight": 0.1, "data.micro_batch_size": 2}
    single = demo_overrides(
        world, "dpo", tmp_path / "single", **common, **{"train.grad_accum": 2, "data.streams_per_rank": 2}
    )
    run_blip3([str(DEMO / "dpo.yaml"), *single], processes=1)
    multi = demo_overrides(
        world,
        "dpo",
        tmp_path / "multi",
        **common,
        **{"train.strategy": strategy, "train.save_every": 2, "train.keep_last": 2},
    )
    run_blip3([str(DEMO / "dpo.yaml"), *multi], processes=2)
    expected, actual = records(tmp_path / "single", "train"), records(tmp_path / "multi", "train")
    assert sorted(expected) == sorted(actual) == [1, 2, 3, 4]
    for step in expected:
        for key in ("loss", "rewards/margin", "target_tokens", "pairs"):
            assert abs(expected[step][key] - actual[step][key]) < 1e-5, (
                step,
                key,
                expected[step][key],
                actual[step][key],
            )

    # a resume of the two-process run from step 2 gives the same steps 3 and 4
    resumed = tmp_path / "resumed"
    overrides = [o for o in multi if not o.startswith("train.output_dir=")] + [f"train.output_dir={resumed}"]
    run_blip3(
        [str(DEMO / "dpo.yaml"), *overrides, "--resume", str(tmp_path / "multi" / "checkpoints" / "step-000002")], 2
    )
    again = records(resumed, "train")
    assert sorted(again) == [3, 4] and all(again[s]["loss"] == actual[s]["loss"] for s in again)
