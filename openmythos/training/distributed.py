"""Multi-process training on PyTorch's own stack: torchrun launches, DDP replicates. The model
code knows nothing of this: parallelism, activation checkpointing and compilation are applied
from outside (the torchtitan pattern), in `parallelize`.

Ranks stay consistent without extra communication: every rank draws the global batch's windows
and depths from identically seeded generators and keeps its own slice, so each step has one
depth everywhere and no window is used twice; the MoE load is all-reduced before the
balancing-bias update, so the bias stays identical on every rank.
"""

from __future__ import annotations

import datetime
import os
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from openmythos.model import OpenMythos


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_type: str, timeout_s: float = 600.0) -> DistEnv:
    """Join the process group torchrun describes in the environment (gloo on CPU, nccl on GPU)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise ValueError("dist.strategy='ddp' needs a torchrun launch "
                         "(torchrun --nproc_per_node=N -m openmythos.cli train ...)")
    env = DistEnv(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                  int(os.environ.get("LOCAL_RANK", 0)))
    if device_type == "cuda":
        torch.cuda.set_device(env.local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_s))
    return env


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def parallelize(model: OpenMythos, strategy: str, *, activation_checkpointing: bool = False,
                compile: bool = False) -> nn.Module:
    """Apply activation checkpointing, then compile, then DDP; returns the module to call."""
    if activation_checkpointing:
        model.enable_activation_checkpointing()
    if compile:
        model.compile_blocks()
    if strategy == "ddp":
        device_ids = [torch.cuda.current_device()] if model.embed.weight.is_cuda else None
        # with halting off the ACT unit gets no gradient, so some parameters may be unused
        return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=True)
    return model


def no_gradient_sync(module: nn.Module, inner_step: bool) -> AbstractContextManager:
    """Skip DDP's gradient all-reduce on the inner micro-steps of gradient accumulation."""
    if inner_step and isinstance(module, DistributedDataParallel):
        return module.no_sync()
    return nullcontext()
