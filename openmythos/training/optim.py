"""Optimizers and the learning-rate schedule.

- "adamw": AdamW with decoupled weight decay on weight matrices only.
- "muon": Muon (Jordan et al. 2024) on the hidden weight matrices, AdamW on everything else
  (embeddings and the tied head, norms, biases, the injection, vectors). Muon's update is scaled by
  0.2 * sqrt(max(rows, cols)) so that its RMS matches AdamW's (Liu et al. 2025, "Muon is Scalable
  for LLM Training"): the same learning rate and weight decay serve both halves.

The schedule is linear warmup, then a cosine decay or warmup-stable-decay's constant rate and
cooldown, over the steps or over the time budget when that ends the run first (`lr_at`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.optim.adamw import adamw

from openmythos.model.recurrence import AdditiveInjection, FreeInjection, LTIInjection
from openmythos.training.config import OptimConfig

# decaying the injection pulls log_A and log_dt to 0, every channel's A towards e^-1, and B
# towards 0: it would erase the learned memory time scales instead of regularising them (Parcae
# trains A, dt, B without decay)
_NO_DECAY_MODULES = (nn.Embedding, LTIInjection, FreeInjection, AdditiveInjection)
# quintic Newton-Schulz coefficients from Jordan et al.: steepest slope at zero, 5 steps suffice
_NS_COEFFS = (3.4445, -4.7750, 2.0315)


def param_groups(model: nn.Module, weight_decay: float, muon: bool = False) -> list[dict]:
    """Weight decay on weight matrices (and stacked expert tensors); none on norms, biases,
    embeddings (the tied LM head included) or the injection's A/dt/B. With `muon`, the decayed
    matrices that are real matrices (both sides > 1) form a third group, flagged for Muon."""
    decay, no_decay, ortho = [], [], []
    for module in model.modules():
        for _, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            if isinstance(module, _NO_DECAY_MODULES) or p.ndim < 2:
                no_decay.append(p)
            elif muon and min(p.shape[-2:]) > 1:
                ortho.append(p)
            else:
                decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "muon": False},
              {"params": no_decay, "weight_decay": 0.0, "muon": False}]
    if muon:
        groups.append({"params": ortho, "weight_decay": weight_decay, "muon": True})
    return [g for g in groups if g["params"]]


def has_fast_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls beat fp32 here: a bf16 GPU, or a CPU with AMX tiles. AVX512-BF16
    alone does not: on a Xeon without AMX, the head and Newton-Schulz ran at 0.55-0.6x their fp32
    speed in bf16 (benchmarks/head_loss.py, optimizer.py), and elsewhere the CPU emulates bf16."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    # private, hence getattr: a torch without the probe counts as no AMX
    return device.type == "cpu" and getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()


def orthogonalise(g: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Approximately U V^T of g = U S V^T over the last two dims (stacked experts each get their
    own), by Newton-Schulz iteration in `dtype`: singular values land in about [0.7, 1.2]."""
    a, b, c = _NS_COEFFS
    x = g.to(dtype)
    tall = x.shape[-2] > x.shape[-1]
    if tall:  # iterate on the smaller Gram matrix
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=1e-7)
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.mT if tall else x


def fused_groups(state_dict: dict) -> dict:
    """An optimizer state dict whose groups run AdamW fused. One saved before every AdamW update
    was fused holds another flag (None, torch's single-tensor loop on the CPU) or none, and torch
    reads the saved flag to decide whether step counts move to the parameters' device (a step
    count on the CPU fails the fused kernel on a GPU)."""
    return {**state_dict, "param_groups": [{**g, "fused": True} for g in state_dict["param_groups"]]}


class MuonAdamW(torch.optim.Optimizer):
    """Muon on param groups flagged `muon`, AdamW on the others, as one optimizer (one state
    dict, one set of param groups for the schedule). The Newton-Schulz iteration runs in
    `ns_dtype`; None: bf16 (as Jordan et al.) where bf16 matmuls beat fp32 (has_fast_bf16),
    else fp32 (on a CPU without AMX, bf16 made a tiny-preset step 1.7x slower:
    benchmarks/optimizer.py)."""

    def __init__(self, groups: list[dict], lr: float, betas: tuple[float, float], eps: float,
                 momentum: float = 0.95, ns_steps: int = 5, ns_dtype: torch.dtype | None = None):
        # fused: torch's one-kernel AdamW for the AdamW groups (as build_optimizer's AdamW); the
        # flag also tells load_state_dict to put their step counts on the parameters' device
        super().__init__(groups, dict(lr=lr, betas=betas, eps=eps, momentum=momentum,
                                      ns_steps=ns_steps, muon=False, weight_decay=0.0, fused=True))
        if ns_dtype is None:
            device = self.param_groups[0]["params"][0].device
            ns_dtype = torch.bfloat16 if has_fast_bf16(device) else torch.float32
        self.ns_dtype = ns_dtype

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(fused_groups(state_dict))

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> None:
        assert closure is None, "MuonAdamW does not re-evaluate the loss"
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if group["muon"]:
                for p in params:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                    self._muon(p, group, self.state[p])
            elif params:
                self._adamw(params, group)

    def _muon(self, p: torch.Tensor, group: dict, state: dict) -> None:
        if not state:
            state["momentum"] = torch.zeros_like(p)
        buf = state["momentum"].mul_(group["momentum"]).add_(p.grad)
        nesterov = p.grad.add(buf, alpha=group["momentum"])
        update = orthogonalise(nesterov, group["ns_steps"], self.ns_dtype).to(p.dtype)
        p.add_(update, alpha=-group["lr"] * 0.2 * math.sqrt(max(p.shape[-2:])))

    def _adamw(self, params: list[torch.Tensor], group: dict) -> None:
        """torch's own AdamW update (decoupled weight decay included) on one group."""
        states = [self.state[p] for p in params]
        for p, state in zip(params, states, strict=True):
            if not state:
                state.update(step=torch.zeros((), device=p.device), exp_avg=torch.zeros_like(p),
                             exp_avg_sq=torch.zeros_like(p))
        beta1, beta2 = group["betas"]
        adamw(params, [p.grad for p in params], [s["exp_avg"] for s in states],
              [s["exp_avg_sq"] for s in states], [], [s["step"] for s in states], amsgrad=False,
              beta1=beta1, beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"],
              eps=group["eps"], maximize=False, fused=group["fused"])


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    betas = (cfg.beta1, cfg.beta2)
    if cfg.optimizer == "muon":
        return MuonAdamW(param_groups(model, cfg.weight_decay, muon=True), cfg.lr, betas, cfg.eps,
                         cfg.muon_momentum)
    # fused: one kernel for every tensor, on the CPU too (3.6x faster than torch's CPU default, a
    # single-tensor loop, on the tiny preset: benchmarks/optimizer.py)
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=betas,
                             eps=cfg.eps, fused=True)


def lr_at(step: int, cfg: OptimConfig, elapsed_s: float = 0.0) -> float:
    """Linear warmup to cfg.lr over warmup_steps, then cfg.schedule down to lr * min_lr_ratio:
    a cosine over the rest of the run, or ("wsd") the peak rate until the last
    cooldown_fraction of the run and a 1 - sqrt cooldown over it.

    The schedule ends at cfg.steps or, with cfg.max_minutes and cfg.time_schedule, at the time
    limit when that comes first: once the elapsed training time is a larger fraction of
    max_minutes than `step` is of `steps` (the time limit will stop the run first), the decay
    follows the clock, counted in the steps that fraction of the run would be (so within a run
    the rate falls continuously and never rises again; a resume with a larger max_minutes
    stretches the schedule to the new end, which raises a decaying rate, and the trainer says
    so). A run without a time limit (max_minutes 0, or time_schedule off) is a pure function of
    the step and resumes exactly; with one, the rate follows the clock wherever the clock runs
    ahead of the steps, even for a while in a run that ends on its step count (a slow phase
    early on), and so depends on the machine's speed.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    done = step
    if cfg.time_schedule and cfg.max_minutes:
        done = max(step, cfg.steps * elapsed_s / (60 * cfg.max_minutes))
    progress = min(1.0, (done - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    if cfg.schedule == "wsd":
        cooled = (progress - (1 - cfg.cooldown_fraction)) / cfg.cooldown_fraction
        decay = 1 - math.sqrt(min(1.0, max(0.0, cooled)))
    else:
        decay = 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay)
