"""Training checkpoints: everything a run needs to continue exactly, in safetensors and JSON only.

    <run>/checkpoints/step-000120/
        config.json, generation_config.json, model.safetensors   the model, loadable with from_pretrained
        tokenizer + processor files                               so the folder is usable on its own
        optimizer.safetensors, optimizer.json                     AdamW moments (tensors) and hyper-parameters
        rng-rank<r>.safetensors                                   each rank's torch RNG states
        trainer_state.json                                        step, scheduler, data positions, Python/numpy RNG

A LoRA run (`model.lora`) writes its adapter instead of the model — `adapter_config.json` and
`adapter_model.safetensors` in PEFT's format, naming the base checkpoint — and resumes by loading it
onto the re-built base (the frozen base weights never change, so this is exact).

A checkpoint is written into `tmp-step-…` and renamed when complete, so a run killed at any moment
leaves either the whole checkpoint or none: `--resume` takes the newest complete one. Nothing here is
ever unpickled. Sharded (FSDP2) and replicated models go through `torch.distributed.checkpoint`'s
state-dict API, which gathers full tensors for saving and re-shards them on load.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from blip3.training.distributed import Distributed, unwrap
from blip3.training.lora import adapter_parameters_from_file, has_lora, save_adapter

STEP_DIR = re.compile(r"^step-(\d+)$")
FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)
FULL_TRAINABLE = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run (temporary folders of interrupted saves are ignored)."""
    folder = checkpoint_dir(Path(run_dir))
    steps = [(int(m.group(1)), p) for p in folder.glob("step-*") if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return max(steps)[1] if steps else None


# ---------------------------------------------------------------------------------------------------
# RNG states


def rng_tensors() -> dict[str, torch.Tensor]:
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return states


def restore_rng_tensors(states: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(states["torch"])
    cuda = [states[k] for k in sorted(k for k in states if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def host_rng_state() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
    }


def restore_host_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


# ---------------------------------------------------------------------------------------------------
# optimizer state as tensors + JSON


def split_optimizer_state(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """An FQN-keyed optimizer state dict -> (`state/<fqn>/<name>` tensors, JSON-able param groups)."""
    tensors = {
        f"state/{fqn}/{name}": torch.as_tensor(value).contiguous()
        for fqn, per_param in state["state"].items()
        for name, value in per_param.items()
    }
    return tensors, state["param_groups"]


def join_optimizer_state(tensors: dict[str, torch.Tensor], groups: list[dict[str, Any]]) -> dict[str, Any]:
    state: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        _, fqn, name = key.split("/")
        state.setdefault(fqn, {})[name] = value
    for group in groups:  # JSON has no tuples; AdamW's betas were one
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
    return {"state": state, "param_groups": groups}


# ---------------------------------------------------------------------------------------------------
# save / load


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    distributed: Distributed,
    processor=None,
    keep_last: int = 2,
) -> Path:
    """Write a complete checkpoint for `step` (all ranks call this) and prune older ones."""
    folder = checkpoint_dir(run_dir)
    final, tmp = folder / f"step-{step:06d}", folder / f"tmp-step-{step:06d}"
    if distributed.is_main:
        shutil.rmtree(tmp, ignore_errors=True)  # the remains of a save that was interrupted
        tmp.mkdir(parents=True)
    distributed.barrier()

    # collective: every rank takes part in gathering the full tensors; rank 0 receives them
    lora = has_lora(unwrap(model))
    model_state = get_model_state_dict(model, options=FULL_TRAINABLE if lora else FULL)
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=FULL)
    save_file(rng_tensors(), tmp / f"rng-rank{distributed.rank}.safetensors")
    positions = distributed.gather(trainer_state.pop("data_position", None))

    if distributed.is_main:
        if lora:
            save_adapter(unwrap(model), tmp, state_dict=model_state)
        else:
            unwrap(model).save_pretrained(tmp, state_dict=model_state)
        if processor is not None:
            processor.save_pretrained(tmp)
        tensors, groups = split_optimizer_state(optimizer_state)
        save_file(tensors, tmp / "optimizer.safetensors")
        (tmp / "optimizer.json").write_text(json.dumps(groups, indent=1))
        state = {**trainer_state, "step": step, "world_size": distributed.world_size, "data_positions": positions}
        state["host_rng"] = host_rng_state()
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
        if final.exists():  # re-saving a step after a resume: the new copy replaces the old
            shutil.rmtree(final)
        tmp.rename(final)  # the checkpoint exists only once it is complete
        for old in sorted(p for p in folder.glob("step-*") if STEP_DIR.match(p.name))[:-keep_last]:
            shutil.rmtree(old)
    distributed.barrier()
    return final


def load_checkpoint(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, distributed: Distributed
) -> dict[str, Any]:
    """Restore model, optimizer and RNG states from `path`; return the trainer state (with this rank's data position)."""
    state = json.loads((path / "trainer_state.json").read_text())
    if state["world_size"] != distributed.world_size:
        raise ValueError(
            f"{path} was written by {state['world_size']} process(es), this run has {distributed.world_size}: "
            "data positions are per rank, so resume with the same number of processes"
        )
    if has_lora(unwrap(model)):  # the adapter only: the frozen base came from model.init
        adapter = adapter_parameters_from_file(unwrap(model), path)
        set_model_state_dict(model, adapter, options=StateDictOptions(full_state_dict=True, strict=False))
    else:
        weights = load_file(path / "model.safetensors")
        set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True))
    optimizer_state = join_optimizer_state(
        load_file(path / "optimizer.safetensors"), json.loads((path / "optimizer.json").read_text())
    )
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=StateDictOptions(full_state_dict=True))
    restore_rng_tensors(load_file(path / f"rng-rank{distributed.rank}.safetensors"))
    restore_host_rng_state(state.pop("host_rng"))
    state["data_position"] = state.pop("data_positions")[distributed.rank]
    return state
