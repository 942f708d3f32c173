"""The training engine end to end on tiny models: learning, exact resume after SIGKILL, DDP, FSDP2, bad data."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from blip3 import load_pretrained
from blip3.data.testing import write_caption_shards, write_json, write_malformed_corpus
from blip3.training.config import load_config
from blip3.training.logs import read_metrics
from blip3.training.trainer import train
from conftest import build_test_tokenizer

REPO = Path(__file__).resolve().parents[1]
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A tokenizer folder, caption shards and a small colour-question SFT set, written once."""
    root = tmp_path_factory.mktemp("training")
    build_test_tokenizer().save_pretrained(root / "tokenizer")
    write_caption_shards(root / "captions", num_shards=2, samples_per_shard=12, image_size=[(64, 48), (40, 80)])
    rng = np.random.default_rng(0)
    records = []
    (root / "images").mkdir()
    for index in range(48):
        colour = list(COLOURS)[index % 3]
        size = [(60, 40), (30, 30), (90, 30)][index % 3]
        noise = rng.integers(-20, 20, (size[1], size[0], 3))
        pixels = np.clip(np.array(COLOURS[colour]) + noise, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / "images" / f"{index}.png")
        records.append(
            {
                "id": str(index),
                "image": f"images/{index}.png",
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat colour is the image?"},
                    {"from": "gpt", "value": f"It is {colour}."},
                ],
            }
        )
    write_json(root / "colours.json", records)
    mixture = {
        "sources": [
            {
                "name": "colours",
                "type": "llava",
                "format": "conversation",
                "path": str(root / "colours.json"),
                "weight": 3,
            },
            {
                "name": "captions",
                "type": "webdataset",
                "format": "caption",
                "path": str(root / "captions"),
                "weight": 1,
            },
        ]
    }
    (root / "mixture.yaml").write_text(yaml.safe_dump(mixture))
    return root


def recipe(workspace: Path, run_dir: Path, **sections) -> Path:
    """A tiny-preset recipe over the workspace's mixture, with `sections` merged in."""
    config = {
        "model": {"init": "tiny", "tokenizer": str(workspace / "tokenizer")},
        "data": {"mixture": str(workspace / "mixture.yaml"), "micro_batch_size": 4, "streams_per_rank": 2},
        "optim": {"lr": 3e-3, "warmup_steps": 2, "schedule": "cosine", "grad_clip": 1.0},
        "train": {"steps": 8, "seed": 0, "output_dir": str(run_dir), "keep_last": 2},
    }
    for section, values in sections.items():
        config[section].update(values)
    path = run_dir.parent / f"{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def train_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"}


def blip3_command(*args: str, processes: int = 1) -> list[str]:
    if processes == 1:
        return [sys.executable, "-m", "blip3.cli", *args]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    return [*torchrun, "-m", "blip3.cli", *args]


def run(command: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


# -- one process -------------------------------------------------------------------------------------


def test_a_short_run_learns_and_leaves_logs_plots_and_a_loadable_checkpoint(workspace, tmp_path):
    config = load_config(
        recipe(
            workspace,
            tmp_path / "run",
            optim={"lr": 1e-2},
            train={"steps": 12, "eval_every": 6},
            data={"validation": str(workspace / "mixture.yaml")},
        )
    )
    result = train(config)
    losses = train_losses(result.run_dir)
    assert len(losses) == 12
    # from ln(32015) ≈ 10.4 nats: the tiny LM (16-d) first learns which few tokens the answers use
    assert np.mean([losses[s] for s in (10, 11, 12)]) < np.mean([losses[s] for s in (1, 2, 3)]) - 1.0
    records = read_metrics(result.run_dir / "metrics.jsonl")
    assert [r["step"] for r in records if r["kind"] == "validation"] == [6, 12]
    start = next(r for r in records if r["kind"] == "start")
    assert 0 < start["trainable_parameters"] < start["parameters"]  # the vision tower is frozen
    assert (result.run_dir / "loss.png").stat().st_size > 10_000
    assert any((result.run_dir / "tensorboard").iterdir())
    model, processor = load_pretrained(result.final_checkpoint)
    assert processor.image_token_id == model.config.image_token_id


def test_sigkill_at_a_random_step_then_resume_gives_identical_losses(workspace, tmp_path):
    steps = 8
    reference = tmp_path / "reference"
    run(blip3_command("train", str(recipe(workspace, reference, train={"steps": steps}))))
    expected = train_losses(reference)

    interrupted = tmp_path / "interrupted"
    path = recipe(workspace, interrupted, train={"steps": steps, "save_every": 1})
    kill_after = random.Random().randint(2, steps - 2)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    process = subprocess.Popen(
        blip3_command("train", str(path)), env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        if (interrupted / "metrics.jsonl").is_file() and max(train_losses(interrupted), default=0) >= kill_after:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)  # wherever it is, a checkpoint save included
    process.wait()
    assert max(train_losses(interrupted)) < steps, "the run ended before it could be killed"

    run(blip3_command("train", str(path), "--resume"))
    resumed = {}
    for record in read_metrics(interrupted / "metrics.jsonl"):
        if record["kind"] == "train":
            resumed[record["step"]] = record["loss"]  # a step logged twice keeps the resumed run's value
    assert resumed == expected  # bit-identical, fp32 on CPU


def test_a_malformed_corpus_trains_to_the_end_with_every_bad_item_counted(tmp_path, workspace):
    corpus = write_malformed_corpus(tmp_path / "corpus")
    (tmp_path / "mixture.yaml").write_text(yaml.safe_dump(corpus.mixture))
    config = load_config(
        recipe(
            workspace,
            tmp_path / "run",
            data={
                "mixture": str(tmp_path / "mixture.yaml"),
                "max_length": corpus.max_length,
                "epochs": 1,
                "micro_batch_size": 4,
            },
            train={"steps": 10_000},
        )
    )
    result = train(config)
    end = next(r for r in read_metrics(result.run_dir / "metrics.jsonl") if r["kind"] == "end")
    assert corpus.num_bad >= 30
    assert end["data"]["skipped"] == corpus.expected_skipped("drop_turns")
    used = corpus.expected_used("drop_turns")
    assert sum(end["data"]["used"].values()) == len(used)
    assert result.steps < 10_000  # it stopped at the end of the epoch


# -- several processes -------------------------------------------------------------------------------


@pytest.mark.slow
def test_ddp_on_two_processes_reproduces_the_single_process_losses(workspace, tmp_path):
    # one process: 2 streams, 2 micro-batches per step; two processes: 1 stream each, 1 micro-batch each.
    # Stream g is the same function of (seed, g, 2 streams) in both, so every step sees the same global batch.
    single = tmp_path / "single"
    run(blip3_command("train", str(recipe(workspace, single, train={"steps": 5, "grad_accum": 2}))))
    ddp = tmp_path / "ddp"
    path = recipe(workspace, ddp, data={"streams_per_rank": 1}, train={"steps": 5, "strategy": "ddp"})
    run(blip3_command("train", str(path), processes=2))
    expected, actual = train_losses(single), train_losses(ddp)
    assert expected.keys() == actual.keys()
    for step in expected:
        assert abs(expected[step] - actual[step]) < 1e-5, (step, expected[step], actual[step])


@pytest.mark.slow
def test_fsdp2_trains_checkpoints_and_resumes_exactly(workspace, tmp_path):
    full = tmp_path / "full"
    full_recipe = recipe(
        workspace, full, data={"streams_per_rank": 1}, optim={"warmup_steps": 4}, train={"steps": 4, "strategy": "fsdp"}
    )
    run(blip3_command("train", str(full_recipe), processes=2))
    part = tmp_path / "part"
    # warm-up over all 4 steps: the learning rates of the 2-step first leg do not depend on its shorter length
    optim = {"warmup_steps": 4}
    path = recipe(
        workspace,
        part,
        data={"streams_per_rank": 1},
        optim=optim,
        train={"steps": 4, "strategy": "fsdp", "save_every": 2},
    )
    run(blip3_command("train", str(path), "train.steps=2", processes=2))  # stops after the step-2 checkpoint
    run(blip3_command("train", str(path), "--resume", processes=2))
    resumed = {}
    for record in read_metrics(part / "metrics.jsonl"):
        if record["kind"] == "train":
            resumed[record["step"]] = record["loss"]
    assert resumed == train_losses(full)
    model, _ = load_pretrained(part / "checkpoints" / "step-000004")
    assert sum(p.numel() for p in model.parameters()) == 1_675_779
    state = json.loads((part / "checkpoints" / "step-000004" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and len(state["data_positions"]) == 2
