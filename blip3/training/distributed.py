"""Process groups and model wrapping: one CPU process, DDP, or FSDP2, on plain `torch.distributed`.

Launch with `torchrun --nproc_per_node=N -m blip3.cli train ...` (or `accelerate launch`, which sets the
same environment). CPU runs use gloo, GPU runs NCCL. Give each CPU process one thread
(`OMP_NUM_THREADS=1`) or two processes fight over the cores.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class Distributed:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def sum(self, value: float | int) -> float:
        """The sum of a number over all ranks."""
        if not self.enabled:
            return value
        tensor = torch.tensor(float(value), dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return tensor.item()

    def all_true(self, flag: bool) -> bool:
        """Whether `flag` holds on every rank (ranks must agree to stop together)."""
        return self.sum(0 if flag else 1) == 0

    def gather(self, obj) -> list:
        """Every rank's `obj`, in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out


def init_distributed() -> Distributed:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Distributed(rank, world_size, local_rank, device)


def shutdown(distributed: Distributed) -> None:
    if distributed.enabled and dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(model: nn.Module, strategy: str, distributed: Distributed, bf16: bool) -> nn.Module:
    """`model` ready for data-parallel training: as is, DDP, or FSDP2 (`fully_shard` per decoder layer)."""
    if strategy == "auto":
        strategy = "ddp" if distributed.enabled else "none"
    if strategy == "none":
        return model
    if not distributed.enabled:
        raise ValueError(f"strategy {strategy!r} needs several processes (launch with torchrun)")
    if strategy == "ddp":
        device_ids = [distributed.device.index] if distributed.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    if strategy == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
        kwargs = {"mp_policy": policy} if policy is not None else {}
        # each decoder layer and the token sampler are units of their own, as the original's FSDP wrapping
        for layer in model.model.language_model.layers:
            fully_shard(layer, **kwargs)
        fully_shard(model.model.token_sampler, **kwargs)
        # `locate` (the tile-position codes) runs after the sampler's forward has resharded its weights:
        # without this it meets a sharded weight ("mixed torch.Tensor and DTensor")
        register_fsdp_forward_method(model.model.token_sampler, "locate")
        fully_shard(model, **kwargs)
        return model
    raise ValueError(f"unknown strategy {strategy!r}: auto, none, ddp or fsdp")


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


@contextmanager
def maybe_skip_gradient_sync(model: nn.Module, skip: bool):
    """No gradient all-reduce on micro-batches that only accumulate (DDP's `no_sync`, FSDP2's switch)."""
    if not skip:
        yield
    elif isinstance(model, nn.parallel.DistributedDataParallel):
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield
