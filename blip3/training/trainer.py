"""The training loop shared by every stage of the recipe (pre-training, SFT, multi-image SFT, DPO, safety).

    setup      processes, seeds, run folder, logs
    model      preset or checkpoint (+ an optional stage-0 vision tower), which parts train (or LoRA adapters)
    wrap       none / DDP / FSDP2; AdamW; warm-up + cosine (or linear/constant) schedule
    data       the mixture loader (its position is checkpoint state) and a validation loader
    resume     the newest complete checkpoint: weights, optimizer, schedule, data position, RNG
    loop       micro-batches -> loss normalised by the global number of target tokens -> clip -> step
    finish     final checkpoint, loss-curve PNG

The loss of one optimizer step is the mean cross-entropy over every supervised token of the global
batch (all micro-batches, all ranks): each micro-batch's summed loss is divided by that total, so one
process and N processes with the same global batch compute the same loss and gradients.

`train.objective: dpo` swaps the micro-batch loss for DPO on preference pairs (`blip3.training.dpo`),
normalised the same way by the global number of pairs; everything else (optimizer, schedule,
checkpoints, resume, logs, DDP/FSDP2) is this loop. `model.lora` trains LoRA adapters only
(`blip3.training.lora`); their checkpoints hold the adapter instead of the whole model.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm
from transformers import AutoTokenizer, get_scheduler

from blip3.config import preset
from blip3.data.collate import model_inputs
from blip3.data.loader import build_loader
from blip3.factory import load_pretrained, load_processor
from blip3.modeling.model import Blip3ForConditionalGeneration, supervised_targets
from blip3.processing.processor import Blip3Processor
from blip3.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from blip3.training.config import TrainConfig
from blip3.training.distributed import (
    Distributed,
    init_distributed,
    maybe_skip_gradient_sync,
    shutdown,
    unwrap,
    wrap_model,
)
from blip3.training.dpo import DPOObjective, DPOSettings
from blip3.training.logs import RunLog, plot_losses
from blip3.training.lora import LoraSettings, apply_lora, is_adapter_folder, lora_share

TRAINABLE_PARTS = ("token_sampler", "language_model", "lm_head")


@dataclass
class RunResult:
    run_dir: Path
    final_checkpoint: Path
    last_loss: float
    steps: int


# ---------------------------------------------------------------------------------------------------
# model


def build_model(config: TrainConfig) -> tuple[Blip3ForConditionalGeneration, Blip3Processor]:
    """The model to train and its processor: a preset with a tokenizer, or a checkpoint folder."""
    section = config.model
    if is_adapter_folder(section.init):  # a LoRA checkpoint: its base with the adapter merged in
        model, processor = load_pretrained(section.init, dtype=torch.float32)
        if section.tokenizer:
            processor = load_processor(section.tokenizer, model.config)
    elif Path(section.init, "config.json").is_file():
        has_weights = any(Path(section.init).glob("*.safetensors"))
        if has_weights:
            model = Blip3ForConditionalGeneration.from_pretrained(section.init, dtype=torch.float32)
        else:  # a folder with only a config: fresh weights of that shape
            from blip3.config import Blip3Config

            model = Blip3ForConditionalGeneration(Blip3Config.from_pretrained(section.init))
        processor = load_processor(section.tokenizer or section.init, model.config)
    else:
        if section.tokenizer is None:
            raise ValueError(f"model.init={section.init!r} is a preset: give model.tokenizer (a tokenizer folder)")
        model_config = preset(section.init, **section.overrides)
        processor = Blip3Processor.from_config(model_config, AutoTokenizer.from_pretrained(section.tokenizer))
        model = Blip3ForConditionalGeneration(model_config)
    if section.language_model:
        load_language_model(model, section.language_model)
    if section.vision_tower:
        load_vision_tower(model, section.vision_tower)
    if section.lora is None:
        select_trainable(model, section.train)
    else:
        apply_model_lora(model, section)
    if section.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, processor


def load_language_model(model: Blip3ForConditionalGeneration, path: str) -> None:
    """A pretrained causal LM (e.g. microsoft/Phi-3-mini-4k-instruct) into the LM and its head.

    The LM's own embedding and head rows load as they are; the added tokens' rows and the head's bias
    keep their fresh initialisation, as when the original code wrapped a pretrained Phi-3.
    """
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    body = {k.removeprefix("model."): v for k, v in lm.state_dict().items() if k.startswith("model.")}
    missing, unexpected = model.model.language_model.load_state_dict(body, strict=False)
    fresh = {"embed_tokens.additional_embedding.weight"}
    if unexpected or set(missing) - fresh:
        raise ValueError(f"{path} does not fit the language model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    with torch.no_grad():
        model.lm_head.weight.copy_(lm.get_output_embeddings().weight)


def load_vision_tower(model: Blip3ForConditionalGeneration, path: str) -> None:
    """Weights of a stage-0 SigLIP vision tower (a `SiglipVisionModel` folder) into the frozen tower."""
    from transformers import SiglipVisionModel

    tower = SiglipVisionModel.from_pretrained(path, dtype=torch.float32)
    model.model.vision_tower.load_state_dict(tower.state_dict(), strict=True)


def select_trainable(model: Blip3ForConditionalGeneration, parts: list[str]) -> None:
    """Train exactly `parts`; the vision tower stays frozen in every stage (REFERENCE §1.7)."""
    unknown = set(parts) - set(TRAINABLE_PARTS)
    if unknown:
        frozen = " (the vision tower is always frozen)" if "vision_tower" in unknown else ""
        raise ValueError(f"cannot train {sorted(unknown)}{frozen}; choose from {TRAINABLE_PARTS}")
    modules = {
        "token_sampler": model.model.token_sampler,
        "language_model": model.model.language_model,
        "lm_head": model.lm_head,
    }
    model.requires_grad_(False)
    for part in parts:
        modules[part].requires_grad_(True)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("model.train selects no parameters to train")


def apply_model_lora(model: Blip3ForConditionalGeneration, section) -> None:
    """LoRA adapters as `model.lora` says; they are all that trains (so the adapter-off model is the base)."""
    if section.train:
        raise ValueError(
            f"model.lora is set: set model.train: [] (got {section.train}); with LoRA only the adapters train, "
            "so switching them off gives back the base model (the DPO reference)"
        )
    if not (Path(section.init, "config.json").is_file() or is_adapter_folder(section.init)):
        raise ValueError(
            f"model.lora adapts trained weights: model.init must be a checkpoint folder, got {section.init!r}"
        )
    apply_lora(model, LoraSettings.from_dict(section.lora), base=str(Path(section.init).resolve()))


def build_optimizer(model: torch.nn.Module, config: TrainConfig, sharded: bool) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    optim = config.optim
    # weight decay on every trainable tensor, as the original; fused kernel unless the params are DTensors
    return torch.optim.AdamW(
        params, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, weight_decay=optim.weight_decay, fused=not sharded
    )


# ---------------------------------------------------------------------------------------------------
# data


def build_train_loader(config: TrainConfig, processor: Blip3Processor, distributed: Distributed, mixture=None):
    data = config.data
    mixture = mixture if mixture is not None else data.mixture
    if mixture is None:
        raise ValueError("data.mixture is required (a mixture YAML path or an inline mixture)")
    return build_loader(
        mixture,
        processor,
        batch_size=data.micro_batch_size,
        seed=config.train.seed,
        rank=distributed.rank,
        world_size=distributed.world_size,
        num_workers=data.num_workers,
        streams_per_rank=data.streams_per_rank,
        max_length=data.max_length,
        overlong=data.overlong,
        max_images=data.max_images,
        length_grouping=data.length_grouping,
        epochs=data.epochs if mixture is data.mixture else None,
    )


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


# ---------------------------------------------------------------------------------------------------
# the loop


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def autocast(precision: str, device: torch.device):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if precision != "fp32":
        raise ValueError(f"train.precision must be fp32 or bf16, got {precision!r}")
    return contextlib.nullcontext()


def unused_sampler_guard(model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor | float:
    """0 × the sampler's parameters for a micro-batch without images.

    The sampler then still takes part in backward (with zero gradients), so DDP's gradient reduction and
    FSDP's reduce-scatter see every trainable parameter on every rank, whatever mix of text-only and
    image samples each rank drew.
    """
    if batch.get("pixel_values") is not None:
        return 0.0
    sampler = unwrap(model).model.token_sampler
    return sum(p.sum() for p in sampler.parameters() if p.requires_grad) * 0.0


def train(
    config: TrainConfig,
    resume: bool | str = False,
    on_eval: Callable[[Blip3ForConditionalGeneration, Blip3Processor, int], dict[str, float]] | None = None,
) -> RunResult:
    """Run `config` to `train.steps` optimizer steps; `resume=True` continues from the newest checkpoint."""
    distributed = init_distributed()
    run_dir = Path(config.train.output_dir)
    try:
        return _train(config, distributed, run_dir, resume, on_eval)
    finally:
        shutdown(distributed)


def _train(config, distributed, run_dir, resume, on_eval) -> RunResult:
    # -- setup
    run_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(config.train.seed)
    log = RunLog(run_dir, enabled=distributed.is_main)
    if distributed.is_main:
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))

    # -- model, optimizer, schedule
    model, processor = build_model(config)
    model.to(distributed.device).train()
    sharded = config.train.strategy == "fsdp"
    wrapped = wrap_model(model, config.train.strategy, distributed, bf16=config.train.precision == "bf16")
    optimizer = build_optimizer(wrapped, config, sharded)
    scheduler = get_scheduler(
        _schedule_name(config.optim.schedule),
        optimizer,
        num_warmup_steps=config.optim.warmup_steps,
        num_training_steps=config.train.steps,
        scheduler_specific_kwargs=_schedule_kwargs(config.optim),
    )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    dpo = build_objective(config, model, processor)

    # -- data
    loader = build_train_loader(config, processor, distributed)
    if loader.plan.preference != (dpo is not None):
        raise ValueError(
            f"train.objective={config.train.objective!r} but the mixture holds "
            f"{'preference pairs' if loader.plan.preference else 'no preference pairs'}"
        )
    step, tokens_seen = 0, 0

    # -- resume
    checkpoint = _resume_point(run_dir, resume)
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, wrapped, optimizer, distributed)
        scheduler.load_state_dict(state["scheduler"])
        loader.load_state_dict(state["data_position"])
        step, tokens_seen = state["step"], state["tokens_seen"]
        if distributed.is_main:
            tqdm.write(f"resumed from {checkpoint} at step {step}")

    if distributed.is_main:
        start = {"kind": "start", "step": step, "trainable_parameters": trainable, "parameters": total}
        if config.model.lora is not None:
            share = lora_share(model)
            start["lora"] = share.to_dict()
            tqdm.write(share.describe())
        log.write(start)
    progress = tqdm(
        total=config.train.steps, initial=step, desc=f"train {run_dir.name}", disable=not distributed.is_main
    )
    batches = iter(loader)
    last_loss = math.nan
    started, tokens_at_start = time.perf_counter(), tokens_seen

    # -- loop
    while step < config.train.steps:
        micro_batches = list(itertools.islice(batches, config.train.grad_accum))
        if not distributed.all_true(bool(micro_batches)):  # data.epochs read to the end (on some rank)
            break
        if dpo is None:
            last_loss, global_targets, extra = _sft_micro_batches(config, wrapped, model, micro_batches, distributed)
        else:
            last_loss, global_targets, extra = _dpo_micro_batches(config, dpo, wrapped, micro_batches, distributed)
        grad_norm = (
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip).item()
            if config.optim.grad_clip
            else math.nan
        )
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += int(global_targets)
        progress.update(1)
        progress.set_postfix(loss=f"{last_loss:.4f}")

        if distributed.is_main and step % config.train.log_every == 0:
            elapsed = time.perf_counter() - started
            log.write(
                {
                    "kind": "train",
                    "step": step,
                    "loss": last_loss,
                    "lr": scheduler.get_last_lr()[0],
                    "grad_norm": grad_norm,
                    "target_tokens": int(global_targets),
                    "tokens_seen": tokens_seen,
                    "elapsed_s": elapsed,
                    "target_tokens_per_s": (tokens_seen - tokens_at_start) / elapsed,
                    "skipped": dict(loader.skipped),
                    **extra,
                }
            )
        if config.train.eval_every and step % config.train.eval_every == 0:
            _evaluate(config, wrapped, model, processor, distributed, log, step, on_eval, dpo)
        if config.train.save_every and step % config.train.save_every == 0 and step < config.train.steps:
            _save(run_dir, step, wrapped, optimizer, scheduler, loader, tokens_seen, distributed, processor, config)

    # -- finish
    progress.close()
    final = _save(run_dir, step, wrapped, optimizer, scheduler, loader, tokens_seen, distributed, processor, config)
    counts = _data_counts(loader, distributed)  # collective: every rank takes part
    if distributed.is_main:
        log.write({"kind": "end", "step": step, "loss": last_loss, **counts})
        log.close()
        if (run_dir / "metrics.jsonl").is_file():
            plot_losses(run_dir / "metrics.jsonl", run_dir / "loss.png")
    return RunResult(run_dir, final, last_loss, step)


def _sft_micro_batches(config, wrapped, model, micro_batches, distributed) -> tuple[float, float, dict]:
    """Forward + backward of one step's micro-batches; (mean token loss, global target tokens, {})."""
    local_targets = sum(
        int(supervised_targets(b["labels"], model.config.ignored_label_ids).sum()) for b in micro_batches
    )
    global_targets = distributed.sum(local_targets)
    # each rank's gradient is averaged over ranks by DDP/FSDP: scale the normaliser to match
    normaliser = max(global_targets, 1) / distributed.world_size
    step_loss = 0.0
    for index, batch in enumerate(micro_batches):
        batch = to_device(model_inputs(batch), distributed.device)
        last = index == len(micro_batches) - 1
        with maybe_skip_gradient_sync(wrapped, skip=not last), autocast(config.train.precision, distributed.device):
            out = wrapped(**batch, num_items_in_batch=normaliser)
            loss = out.loss + unused_sampler_guard(wrapped, batch)
        loss.backward()
        step_loss += out.loss.detach().item() * normaliser  # this micro-batch's summed token loss
    return distributed.sum(step_loss) / max(global_targets, 1), global_targets, {}


def _dpo_micro_batches(config, dpo, wrapped, micro_batches, distributed) -> tuple[float, float, dict]:
    """The same for preference pairs: (mean DPO loss, global response tokens, per-pair means of the statistics)."""
    global_pairs = distributed.sum(sum(dpo.num_pairs(b) for b in micro_batches))
    normaliser = max(global_pairs, 1) / distributed.world_size  # as above, in pairs
    sums: Counter[str] = Counter()
    for index, batch in enumerate(micro_batches):
        last = index == len(micro_batches) - 1
        with maybe_skip_gradient_sync(wrapped, skip=not last), autocast(config.train.precision, distributed.device):
            loss, stats = dpo.micro_step(wrapped, batch, normaliser, distributed.device)
            loss = loss + unused_sampler_guard(wrapped, batch["chosen"])
        loss.backward()
        sums.update(stats)
    totals = {name: distributed.sum(value) for name, value in sums.items()}
    targets = totals.pop("target_tokens")
    means = {name: value / max(global_pairs, 1) for name, value in totals.items()}
    return means.pop("loss"), targets, {"pairs": int(global_pairs), **means}


def build_objective(config: TrainConfig, model, processor) -> DPOObjective | None:
    """None for the next-token loss; the DPO micro-batch loss for `train.objective: dpo`."""
    objective = config.train.objective
    if objective == "sft":
        if config.train.dpo:
            raise ValueError("train.dpo is set but train.objective is 'sft'")
        return None
    if objective != "dpo":
        raise ValueError(f"train.objective must be sft or dpo, got {objective!r}")
    if config.model.lora is None:
        raise ValueError("train.objective=dpo takes its reference from the adapter-disabled model: set model.lora")
    return DPOObjective(DPOSettings.from_dict(config.train.dpo), processor.pad_token_id)


def _data_counts(loader, distributed: Distributed) -> dict[str, Any]:
    """Samples used and skipped (by reason and source) over all ranks."""
    from blip3.data.mixture import DataCounts

    merged = DataCounts.merge(distributed.gather(loader.counts.to_dict()))
    return {"data": merged.to_dict()}


def _save(run_dir, step, wrapped, optimizer, scheduler, loader, tokens_seen, distributed, processor, config) -> Path:
    state = {"scheduler": scheduler.state_dict(), "tokens_seen": tokens_seen, "data_position": loader.state_dict()}
    return save_checkpoint(
        run_dir, step, wrapped, optimizer, state, distributed, processor=processor, keep_last=config.train.keep_last
    )


def _resume_point(run_dir: Path, resume: bool | str) -> Path | None:
    if not resume:
        return None
    if isinstance(resume, str) and resume not in ("auto", "latest"):
        return Path(resume)
    return latest_checkpoint(run_dir)


@torch.no_grad()
def _evaluate(config, wrapped, model, processor, distributed, log, step, on_eval, dpo=None) -> None:
    """Validation loss over a fixed set of batches (the same ones every time), plus any caller metrics."""
    record: dict[str, Any] = {"kind": "validation", "step": step}
    if config.data.validation is not None and dpo is not None:
        wrapped.eval()
        loader = build_train_loader(config, processor, distributed, mixture=config.data.validation)
        sums: Counter[str] = Counter()
        for _, batch in zip(range(config.train.eval_batches), loader):
            with autocast(config.train.precision, distributed.device):
                _, stats = dpo.micro_step(wrapped, batch, 1.0, distributed.device)
            sums.update(stats, pairs=dpo.num_pairs(batch))
        totals = {name: distributed.sum(value) for name, value in sums.items()}
        pairs = max(totals.pop("pairs"), 1)
        record.update({name: value / pairs for name, value in totals.items() if name != "target_tokens"})
        wrapped.train()
    elif config.data.validation is not None:
        wrapped.eval()
        loader = build_train_loader(config, processor, distributed, mixture=config.data.validation)
        total, targets = 0.0, 0
        for _, batch in zip(range(config.train.eval_batches), loader):
            count = int(supervised_targets(batch["labels"], model.config.ignored_label_ids).sum())
            batch = to_device(model_inputs(batch), distributed.device)
            with autocast(config.train.precision, distributed.device):
                out = wrapped(**batch, num_items_in_batch=1.0, return_logits=False)
            total += out.loss.item()
            targets += count
        record["loss"] = distributed.sum(total) / max(distributed.sum(targets), 1)
        wrapped.train()
    if on_eval is not None:
        record.update(on_eval(unwrap(wrapped), processor, step))
    if distributed.is_main:
        log.write(record)


def _schedule_name(schedule: str) -> str:
    names = {"cosine": "cosine_with_min_lr", "linear": "linear", "constant": "constant_with_warmup"}
    if schedule not in names:
        raise ValueError(f"optim.schedule must be one of {sorted(names)}, got {schedule!r}")
    return names[schedule]


def _schedule_kwargs(optim) -> dict[str, Any]:
    return {"min_lr_rate": optim.min_lr_ratio} if optim.schedule == "cosine" else {}
