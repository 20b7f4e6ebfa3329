"""AdamW with decoupled weight decay on matrices only, and a warmup + cosine learning rate."""

from __future__ import annotations

import math

import torch
from torch import nn

from openmythos.model.recurrence import AdditiveInjection, FreeInjection, LTIInjection
from openmythos.training.config import OptimConfig

# decaying the injection pulls A towards 1 (log_A, log_dt -> 0) and B towards 0: it would fight
# the recurrence's stability instead of regularising it (Parcae trains A, dt, B without decay)
_NO_DECAY_MODULES = (nn.Embedding, LTIInjection, FreeInjection, AdditiveInjection)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weight matrices (and stacked expert tensors); none on norms, biases,
    embeddings (the tied LM head included) or the injection's A/dt/B."""
    decay, no_decay = [], []
    for module in model.modules():
        for _, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            skip = isinstance(module, _NO_DECAY_MODULES) or p.ndim < 2
            (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    device_type = next(model.parameters()).device.type
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr,
                             betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             fused=device_type == "cuda" or None)


def lr_at(step: int, cfg: OptimConfig) -> float:
    """Linear warmup to cfg.lr over warmup_steps, then cosine decay to lr * min_lr_ratio at
    cfg.steps. A pure function of the step, so resuming needs no scheduler state."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)
