"""LoRA adapters through peft, injected in place: the model stays a `Blip3ForConditionalGeneration`.

A recipe turns LoRA on with a `model.lora` section (`LoraSettings`); every other weight is frozen:

    model:
      init: runs/sft/checkpoints/step-002000      # the base: a checkpoint folder (ours or official)
      train: []                                   # nothing trains in full beside the adapters
      lora:
        rank: 64                                  # ≈2.6 % of Phi-3-mini's LM parameters (the paper: ~2.5 %)
        alpha: 64
        dropout: 0.05
        language_model: [qkv_proj, o_proj, gate_up_proj, down_proj]   # Phi-3's fused projections
        token_sampler: []                         # e.g. [to_q, to_kv, to_out, fc1, fc2, projection]

Each tower's list names module suffixes inside that tower; every name must match at least one linear
layer there (Phi-3 has no `q_proj`: its attention projection is the fused `qkv_proj`).

Why in place (`peft.functional.inject_adapter_in_model`) and not a `PeftModel` wrapper: the trainer,
FSDP2's per-layer wrapping, the sampler guard and `generate` all address `model.model.language_model`;
with the LoRA layers injected the model keeps its class, attribute paths and forward, so one training
loop serves full fine-tuning and LoRA. (transformers' own adapter integration needs peft ≥ 0.22; we pin
0.21.) peft still does the work: the LoRA layers, their forward, merge/unmerge, the state-dict keys.

Out of reach, on purpose:
- the LM head and the input embedding: they are the decoupled modules (`modeling/text.py`) and the
  fused loss reads `lm_head.weight` directly, so an adapter there would never be trained;
- the vision tower: `Blip3Model.encode_tiles` runs it under `torch.no_grad()` (frozen in every stage,
  REFERENCE §1.7), so an adapter there would receive no gradient.

Adapters are written in PEFT's own format — `adapter_config.json` + `adapter_model.safetensors`, keys
`base_model.model.<module>.lora_{A,B}.weight` — so `peft.PeftModel.from_pretrained(base, folder)` opens
them as well; `base_model_name_or_path` names the base checkpoint. `load_adapted(folder)` gives the
base with the adapter, `export_merged` a plain checkpoint (ours or the official layout) with the
adapter folded into the weights.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig
from peft.functional import get_peft_model_state_dict, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file, save_file
from torch import nn

ADAPTER = "default"  # peft's adapter name; it appears in parameter names, never in saved files
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # what PeftModel puts before module names in saved keys

# Where each tower lives inside `Blip3ForConditionalGeneration`, and the layers its adapters can go on.
TOWERS = {"language_model": "model.language_model", "token_sampler": "model.token_sampler"}
PHI3_PROJECTIONS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
SAMPLER_LINEARS = ("to_q", "to_kv", "to_out", "fc1", "fc2", "projection")


@dataclass
class LoraSettings:
    """The `model.lora` section of a recipe."""

    rank: int = 64  # our choice: 2.63 % of xgen-mm-phi3-mini's LM parameters with the default targets
    alpha: float = 64.0  # our choice: scaling alpha / rank = 1
    dropout: float = 0.05  # our choice
    language_model: list[str] = field(default_factory=lambda: list(PHI3_PROJECTIONS))
    token_sampler: list[str] = field(default_factory=list)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> LoraSettings:
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if "vision_tower" in unknown:
            raise ValueError(
                "model.lora.vision_tower: the vision tower runs under torch.no_grad (Blip3Model.encode_tiles), "
                "so adapters there would never train; choose from language_model and token_sampler"
            )
        if unknown:
            raise ValueError(f"unknown field(s) {sorted(unknown)} in model.lora; known: {sorted(known)}")
        settings = cls(**values)
        if settings.rank < 1:
            raise ValueError(f"model.lora.rank must be at least 1, got {settings.rank}")
        if not 0.0 <= settings.dropout < 1.0:
            raise ValueError(f"model.lora.dropout must be in [0, 1), got {settings.dropout}")
        for tower in TOWERS:
            names = getattr(settings, tower)
            if isinstance(names, str) or not all(isinstance(n, str) and n for n in names):
                raise ValueError(f"model.lora.{tower} must be a list of module names, got {names!r}")
        if not settings.language_model and not settings.token_sampler:
            raise ValueError("model.lora targets no module: name some in language_model and/or token_sampler")
        return settings

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def target_pattern(self) -> str:
        """peft's `target_modules` as one regex, matched in full against module names of the model."""
        alternatives = [
            rf"{re.escape(TOWERS[tower])}\.(?:.*\.)?(?:{'|'.join(re.escape(n) for n in names)})"
            for tower in TOWERS
            if (names := getattr(self, tower))
        ]
        return "|".join(f"(?:{a})" for a in alternatives)

    def peft_config(self) -> LoraConfig:
        return LoraConfig(
            r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=self.target_pattern()
        )


# ---------------------------------------------------------------------------------------------------
# adding, finding, switching off


def apply_lora(
    model: nn.Module, settings: LoraSettings, base: str | None = None, low_cpu_mem_usage: bool = False
) -> LoraConfig:
    """Freeze `model` and inject LoRA adapters (trainable) where `settings` says; returns peft's config.

    `base` is recorded as the adapter's base checkpoint (default: where the model was loaded from);
    `low_cpu_mem_usage` creates the adapters on the meta device (for counting parameters without memory).
    """
    if has_lora(model):
        raise ValueError("the model already carries a LoRA adapter")
    for tower, prefix in TOWERS.items():
        linears = _linear_names(model, prefix)
        for suffix in getattr(settings, tower):
            if suffix not in linears:
                raise ValueError(
                    f"model.lora.{tower}: no linear layer named {suffix!r} in {prefix} (its linear layers: {sorted(linears)})"
                )
    config = settings.peft_config()
    config.base_model_name_or_path = base or getattr(model, "name_or_path", None) or None
    model.requires_grad_(False)
    inject_adapter_in_model(config, model, adapter_name=ADAPTER, low_cpu_mem_usage=low_cpu_mem_usage)
    model.train(model.training)  # the new dropout layers follow the model's mode
    return config


def _linear_names(model: nn.Module, prefix: str) -> set[str]:
    return {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if name.startswith(prefix + ".") and isinstance(module, nn.Linear)
    }


def has_lora(model: nn.Module) -> bool:
    return ADAPTER in (getattr(model, "peft_config", None) or {})


def lora_config(model: nn.Module) -> LoraConfig:
    if not has_lora(model):
        raise ValueError("the model carries no LoRA adapter")
    return model.peft_config[ADAPTER]


def _tuner_layers(model: nn.Module) -> list[BaseTunerLayer]:
    layers = [module for module in model.modules() if isinstance(module, BaseTunerLayer)]
    if not layers:
        raise ValueError("the model carries no LoRA adapter")
    return layers


@contextmanager
def disable_adapter(model: nn.Module) -> Iterator[None]:
    """The base model inside the block: every adapter is bypassed (the DPO reference, with no second copy).

    peft's switch also flips the adapters' `requires_grad`; the flags are put back as they were, so the
    optimizer's view of what trains never changes.
    """
    layers = _tuner_layers(model)
    was_disabled = [layer.disable_adapters for layer in layers]
    trainable = [(p, p.requires_grad) for p in model.parameters()]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer, disabled in zip(layers, was_disabled):
            layer.enable_adapters(not disabled)
        for parameter, flag in trainable:
            parameter.requires_grad_(flag)


# ---------------------------------------------------------------------------------------------------
# how much trains


@dataclass(frozen=True)
class LoraShare:
    adapter_parameters: dict[str, int]  # per tower
    language_model_parameters: int  # the LM with its embedding and head (what `blip3 info` reports)
    model_parameters: int  # the whole model without the adapters

    @property
    def language_model_share(self) -> float:
        """The LM's adapter parameters over the LM's own parameters (the paper's "~2.5 % of the LLM")."""
        return self.adapter_parameters.get("language_model", 0) / self.language_model_parameters

    @property
    def trainable(self) -> int:
        return sum(self.adapter_parameters.values())

    def describe(self) -> str:
        towers = ", ".join(f"{tower} {count:,}" for tower, count in self.adapter_parameters.items() if count)
        return (
            f"LoRA: {self.trainable:,} trainable parameters ({towers}); the language model's adapters are "
            f"{self.language_model_share:.2%} of its {self.language_model_parameters:,} parameters, all adapters "
            f"{self.trainable / self.model_parameters:.2%} of the model's {self.model_parameters:,}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "adapter_parameters": dict(self.adapter_parameters),
            "language_model_parameters": self.language_model_parameters,
            "model_parameters": self.model_parameters,
            "language_model_share": self.language_model_share,
        }


def lora_share(model: nn.Module) -> LoraShare:
    """Adapter parameters per tower against the LM's and the model's own (works on the meta device)."""
    adapters = {tower: 0 for tower in TOWERS}
    base_total = base_lm = 0
    for name, parameter in model.named_parameters():
        if "lora_" in name:
            tower = next(t for t, prefix in TOWERS.items() if name.startswith(prefix + "."))
            adapters[tower] += parameter.numel()
            continue
        base_total += parameter.numel()
        if name.startswith(TOWERS["language_model"] + ".") or name.startswith("lm_head."):
            base_lm += parameter.numel()
    return LoraShare(adapters, base_lm, base_total)


def share_for_preset(preset_name: str, settings: LoraSettings) -> LoraShare:
    """The share `settings` gives on a named preset, computed on the meta device (nothing allocated)."""
    from blip3.config import preset
    from blip3.modeling.model import Blip3ForConditionalGeneration

    with torch.device("meta"):
        model = Blip3ForConditionalGeneration(preset(preset_name))
    apply_lora(model, settings, low_cpu_mem_usage=True)
    return lora_share(model)


# ---------------------------------------------------------------------------------------------------
# files


def adapter_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor] | None = None) -> dict:
    """The adapter's tensors under PEFT's saved names (from `state_dict` if given, e.g. gathered from FSDP)."""
    state = get_peft_model_state_dict(model, state_dict=dict(state_dict) if state_dict is not None else None)
    return {PEFT_PREFIX + key: value.detach().contiguous() for key, value in state.items()}


def save_adapter(model: nn.Module, folder: str | Path, state_dict: Mapping[str, torch.Tensor] | None = None) -> Path:
    """Write the adapter alone (PEFT's format) into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lora_config(model).save_pretrained(str(folder))
    save_file(adapter_state_dict(model, state_dict), folder / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    return folder


def is_adapter_folder(folder: str | Path) -> bool:
    return (Path(folder) / ADAPTER_CONFIG).is_file() and (Path(folder) / ADAPTER_WEIGHTS).is_file()


def read_adapter_config(folder: str | Path) -> LoraConfig:
    raw = json.loads((Path(folder) / ADAPTER_CONFIG).read_text())
    if raw.get("peft_type") != "LORA":
        raise ValueError(f"{folder}/{ADAPTER_CONFIG} is not a LoRA adapter (peft_type {raw.get('peft_type')!r})")
    return LoraConfig.from_pretrained(str(folder))


def adapter_parameters_from_file(model: nn.Module, folder: str | Path) -> dict[str, torch.Tensor]:
    """The adapter weights of `folder` under the model's own parameter names (for `load_state_dict` or
    torch's distributed `set_model_state_dict`); the names must match the model's adapters one to one."""
    saved = load_file(Path(folder) / ADAPTER_WEIGHTS)
    # peft saves `<module>.lora_A.<adapter>.weight` as `<module>.lora_A.weight` (its adapter name removed)
    names = {
        PEFT_PREFIX + name.replace(f".{ADAPTER}.", "."): name for name, _ in model.named_parameters() if "lora_" in name
    }
    missing, unexpected = sorted(set(names) - set(saved)), sorted(set(saved) - set(names))
    if missing or unexpected:
        raise ValueError(
            f"{folder} does not fit the model's adapter: missing {missing[:4]} ({len(missing)}), "
            f"unexpected {unexpected[:4]} ({len(unexpected)})"
        )
    return {names[key]: value for key, value in saved.items()}


def load_adapter(model: nn.Module, folder: str | Path) -> nn.Module:
    """The adapter of `folder` onto `model`: injected from its config first if the model has none."""
    if not has_lora(model):
        config = read_adapter_config(folder)
        model.requires_grad_(False)
        inject_adapter_in_model(config, model, adapter_name=ADAPTER)
        model.train(model.training)
    state = adapter_parameters_from_file(model, folder)
    reference = next(p for n, p in model.named_parameters() if "lora_" in n)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name in state:
                parameter.copy_(state[name].to(device=reference.device, dtype=parameter.dtype))
    return model


def load_adapted(folder: str | Path, base: str | Path | None = None, **model_kwargs):
    """(model with the adapter, processor) from an adapter folder; the base from its config or `base`."""
    from blip3.factory import has_tokenizer, load_pretrained, load_processor

    base = base or read_adapter_config(folder).base_model_name_or_path
    if not base:
        raise ValueError(f"{folder}/{ADAPTER_CONFIG} names no base checkpoint: pass base=")
    model, processor = load_pretrained(base, **model_kwargs)
    load_adapter(model, folder)
    if has_tokenizer(folder):
        processor = load_processor(folder, model.config)
    return model, processor


# ---------------------------------------------------------------------------------------------------
# merging


def merge_adapter(model: nn.Module) -> None:
    """Fold the adapters into their base weights (the LoRA layers stay, switched to merged)."""
    for layer in _tuner_layers(model):
        layer.merge()


def unmerge_adapter(model: nn.Module) -> None:
    """Take the adapters back out of the base weights."""
    for layer in _tuner_layers(model):
        layer.unmerge()


def merge_and_unload(model: nn.Module) -> nn.Module:
    """The model with its adapters folded in and the LoRA layers replaced by their base layers (in place)."""
    return _unload(model, merge=True)


def unload(model: nn.Module) -> nn.Module:
    """The base model again: the LoRA layers replaced by their base layers, adapters dropped (in place)."""
    return _unload(model, merge=False)


def _unload(model: nn.Module, merge: bool) -> nn.Module:
    for name, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]:
        if merge:
            layer.merge()
        elif layer.merged:
            layer.unmerge()
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer.get_base_layer())
    del model.peft_config
    return model


def export_merged(
    folder: str | Path, out: str | Path, official: bool = False, base: str | Path | None = None
) -> nn.Module:
    """Write the base + adapter of `folder` as one plain checkpoint: ours (with the processor) or the
    official xGen-MM layout (with the tokenizer, as the released folders)."""
    from blip3.interop.xgenmm import save_official

    model, processor = load_adapted(folder, base=base)
    merge_and_unload(model)
    if official:
        save_official(model, out)
        processor.tokenizer.save_pretrained(out)
    else:
        model.save_pretrained(out)
        processor.save_pretrained(out)
    return model
