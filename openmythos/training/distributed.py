"""Multi-process training on PyTorch's own stack: torchrun launches, DDP replicates, FSDP2
(`fully_shard`) shards. The model code knows nothing of this: parallelism, activation
checkpointing and compilation are applied from outside (the torchtitan pattern), in `parallelize`.

Ranks stay consistent without extra communication: every rank draws the global batch's windows
and depths from identically seeded generators and keeps its own slice, so each step has one
depth everywhere and no window is used twice; the MoE load is all-reduced before the
balancing-bias update, so the bias (a buffer, never sharded) stays identical on every rank.

FSDP2 units: each prelude and coda block, the recurrent block, then the root (embedding, final
norm, tied head). The recurrent block is one unit although its parameters are used on every
loop: `RecurrentBlock.forward` runs all the loops inside one call, so its parameters are
all-gathered once per forward however deep the loop goes, and ranks that halt after different
depths (ACT, KL exit) still issue the same collectives. `dist.reshard_recurrent` picks whether
that unit frees its gathered parameters between forward and backward; docs/distributed.md has
the measurement behind the default (keep them: one all-gather per micro-step instead of two).
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

from openmythos.model import OpenMythos
from openmythos.training.config import DistConfig


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_type: str, strategy: str = "ddp", timeout_s: float = 600.0) -> DistEnv:
    """Join the process group torchrun describes in the environment (gloo on CPU, nccl on GPU)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise ValueError(f"dist.strategy={strategy!r} needs a torchrun launch "
                         "(torchrun --nproc_per_node=N -m openmythos.cli train ...), but RANK and "
                         "WORLD_SIZE are not set; train in this one process with "
                         "--dist.strategy none (a checkpoint of N processes resumes in one with "
                         "--train.batch_size N times as large: the same global batch)")
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


def parallelize(model: OpenMythos, cfg: DistConfig, *, device: torch.device,
                param_dtype: torch.dtype | None = None) -> nn.Module:
    """Activation checkpointing, then compile, then DDP or FSDP2; returns the module to call.

    For "fsdp" the model must come from the meta device: it is sharded there and only each
    rank's shards are materialised on `device` (initialised by `init_weights`; load real
    weights with `broadcast_full_weights` or a checkpoint). `param_dtype` (bf16) all-gathers the
    parameters in that dtype for compute while the sharded master weights, the optimizer and
    the gradient reduction stay fp32.
    """
    if cfg.activation_checkpointing:
        model.enable_activation_checkpointing()
    if cfg.compile:
        model.compile_blocks()
    if cfg.strategy == "ddp":
        device_ids = [torch.cuda.current_device()] if device.type == "cuda" else None
        # with halting off the ACT unit gets no gradient, so some parameters may be unused
        return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=True)
    if cfg.strategy == "fsdp":
        if model.embed.weight.device.type != "meta":
            raise ValueError("dist.strategy='fsdp' shards a model built on the meta device "
                             f"(with torch.device('meta')), got one on {model.embed.weight.device}")
        # no input casting: it would rebuild the Context each block appends its MoE load and aux
        # loss to, losing them; autocast (run.dtype) sets the compute dtype instead
        mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32,
                                  cast_forward_inputs=False)
        for block in [*model.prelude, *model.coda]:
            fully_shard(block, mp_policy=mp)
        # FSDP2 warns of wrong gradients when a sharded module returns a view, on which an
        # in-place op would skip its pre-backward hook: the looped state is its (N, D) rows viewed
        # as (B, T, D). Nothing writes to it in place, but a copy (one pass over the state) ends
        # the view and the warning; this hook runs before fully_shard's, registered after it
        model.recurrent.register_forward_hook(lambda module, args, out: (out[0].clone(), *out[1:]))
        fully_shard(model.recurrent, mp_policy=mp, reshard_after_forward=cfg.reshard_recurrent)
        fully_shard(model, mp_policy=mp)  # the root: embedding, final norm and the tied head
        model.to_empty(device=device)
        model.init_weights()
    return model


def broadcast_full_weights(model: nn.Module, full: dict[str, torch.Tensor]) -> None:
    """Rank 0's full state dict (the other ranks pass {}) into every rank's shards."""
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True,
                                                               broadcast_from_rank0=True))


def no_gradient_sync(module: nn.Module, inner_step: bool) -> AbstractContextManager:
    """Skip the gradient all-reduce (DDP) or reduce-scatter (FSDP2) on the inner micro-steps of
    gradient accumulation; the last micro-step synchronises the accumulated gradients."""
    if not inner_step:
        return nullcontext()
    if isinstance(module, DistributedDataParallel):
        return module.no_sync()
    if isinstance(module, FSDPModule):
        return _fsdp_no_sync(module)
    return nullcontext()


@contextmanager
def _fsdp_no_sync(module: FSDPModule) -> Iterator[None]:
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


@contextmanager
def gathered(module: nn.Module, reshard_recurrent: bool) -> Iterator[None]:
    """Every FSDP2 unit all-gathered once and kept whole until the block exits, so that ranks may
    run different numbers of forward passes inside it (evaluation splits that do not divide
    evenly, sampling that stops at EOS) without waiting on each other's collectives."""
    if not isinstance(module, FSDPModule):
        yield
        return
    units = [m for m in module.modules() if isinstance(m, FSDPModule)]
    module.set_reshard_after_forward(False)
    for unit in units:
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
        for unit in units:
            if unit is not module:  # the root keeps its own (False): it is needed in backward
                unit.set_reshard_after_forward(
                    reshard_recurrent if unit is getattr(module, "recurrent", None) else True,
                    recurse=False)


def any_rank(flags: list[bool], env: DistEnv, device: torch.device) -> list[bool]:
    """Each flag, true if it is true on any rank."""
    if env.world_size == 1:
        return flags
    t = torch.tensor(flags, dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def global_max(value: float, env: DistEnv, device: torch.device) -> float:
    """The largest of one value per rank: rho(A) from a sharded A is each rank's local max."""
    if env.world_size == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def per_rank(value: float, env: DistEnv, device: torch.device) -> list[float]:
    """One value from each rank, on every rank (per-rank throughput for rank 0's log)."""
    if env.world_size == 1:
        return [value]
    t = torch.zeros(env.world_size, dtype=torch.float64, device=device)
    t[env.rank] = value
    dist.all_reduce(t)
    return t.tolist()
