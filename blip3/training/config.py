"""A training run, declared: what model, what data, how to optimise, where to write.

Recipes are YAML files (`configs/*.yaml`) with these sections; any field can be overridden on the
command line as `section.field=value` (the value is parsed as YAML: `optim.lr=3e-4`,
`train.precision=bf16`, `data.mixture=path.yaml`).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass
class ModelSection:
    init: str = "tiny"  # a preset name, or a checkpoint folder (blip3 or official xGen-MM layout)
    tokenizer: str | None = None  # a tokenizer folder, for presets (checkpoints carry their own)
    overrides: dict[str, Any] = field(default_factory=dict)  # Blip3Config fields, for presets
    vision_tower: str | None = None  # a SiglipVisionModel folder or hub id, loaded into the frozen tower
    language_model: str | None = None  # a causal LM folder or hub id (pre-training starts from Phi-3)
    train: list[str] = field(default_factory=lambda: ["token_sampler", "language_model", "lm_head"])
    gradient_checkpointing: bool = False
    lora: dict[str, Any] | None = None  # LoRA adapters instead of full training (blip3.training.lora.LoraSettings)


@dataclass
class DataSection:
    mixture: str | dict | None = None  # a mixture YAML path, or the mixture inline
    validation: str | dict | None = None  # a mixture for the periodic validation loss
    micro_batch_size: int = 4
    max_length: int | None = None  # spliced length (text + vision tokens)
    overlong: str = "drop_turns"  # or "skip"
    max_images: int = 4
    length_grouping: bool = False
    num_workers: int = 0
    streams_per_rank: int | None = None  # fixes the batch order independently of num_workers (see blip3.data)
    epochs: int | None = None  # stop at the end of this many passes over the data (else train.steps decides)


@dataclass
class OptimSection:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    schedule: str = "cosine"  # cosine | linear | constant, all after a linear warm-up
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # the schedule decays to lr × min_lr_ratio
    grad_clip: float | None = 1.0


@dataclass
class TrainSection:
    steps: int = 100  # optimizer steps
    grad_accum: int = 1  # micro-batches per optimizer step (per rank)
    precision: str = "fp32"  # fp32 | bf16 (autocast; weights and optimizer stay fp32)
    strategy: str = "auto"  # auto (ddp when distributed) | ddp | fsdp | none
    seed: int = 0
    output_dir: str = "runs/train"
    log_every: int = 1
    eval_every: int = 0  # 0: never
    eval_batches: int = 8
    save_every: int = 0  # 0: only at the end
    keep_last: int = 2
    objective: str = "sft"  # sft (next-token loss) | dpo (preference pairs; needs model.lora)
    dpo: dict[str, Any] = field(default_factory=dict)  # DPO settings (blip3.training.dpo.DPOSettings)


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TrainConfig:
        sections = {f.name: f.type for f in dataclasses.fields(cls)}
        unknown = set(raw) - set(sections)
        if unknown:
            raise ValueError(f"unknown config section(s) {sorted(unknown)}; expected {sorted(sections)}")
        built = {}
        for f in dataclasses.fields(cls):
            section_cls = f.default_factory().__class__
            values = raw.get(f.name) or {}
            known = {s.name for s in dataclasses.fields(section_cls)}
            bad = set(values) - known
            if bad:
                raise ValueError(f"unknown field(s) {sorted(bad)} in section {f.name!r}; known: {sorted(known)}")
            defaults = section_cls()
            built[f.name] = section_cls(
                **{k: _coerce(v, getattr(defaults, k), f"{f.name}.{k}") for k, v in values.items()}
            )
        return cls(**built)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _coerce(value: Any, default: Any, name: str) -> Any:
    """YAML reads `2e-5` as a string (YAML 1.1 wants `2.0e-5`): numbers are converted by the field's type."""
    if isinstance(default, float) and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"{name} must be a number, got {value!r}") from None
    return value


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """A recipe file with `section.field=value` overrides applied (values parsed as YAML).

    `${VARS}` in string values are expanded, and mixture files named relative to the recipe are
    found beside it.
    """
    raw = yaml.safe_load(Path(path).read_text()) if path else {}
    raw = _expand_vars(raw or {})
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep or "." not in key:
            raise ValueError(f"overrides look like section.field=value, got {override!r}")
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = _expand_vars(yaml.safe_load(value))
    config = TrainConfig.from_dict(raw)
    if path:
        for name in ("mixture", "validation"):
            value = getattr(config.data, name)
            if isinstance(value, str) and not Path(value).is_absolute() and (Path(path).parent / value).is_file():
                setattr(config.data, name, str(Path(path).parent / value))
    return config


def _expand_vars(value: Any) -> Any:
    if isinstance(value, str):
        return os.path.expandvars(value)
    if isinstance(value, dict):
        return {k: _expand_vars(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_vars(v) for v in value]
    return value
