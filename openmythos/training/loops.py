"""Training-depth sampling: how many loops each step (or each sequence) runs.

- "fixed": always `mean` loops.
- "poisson" (Parcae, Prairie et al. 2025): n ~ Poisson(mean).
- "lognormal-poisson" (Huginn, Geiping et al. 2025): tau ~ LogNormal(log(mean) - sigma^2/2, sigma),
  n = Poisson(tau) + 1; the heavy tail trains deep iterations now and then for little average cost.

Draws come from a generator of their own, so the data order does not depend on the depth sampler
and the sampler's state goes into checkpoints for an exact resume.
"""

from __future__ import annotations

import math

import torch

from openmythos.training.config import LoopsConfig


class LoopSampler:
    def __init__(self, cfg: LoopsConfig, seed: int):
        self.cfg = cfg
        self.generator = torch.Generator().manual_seed(seed)

    def sample(self, batch_size: int, rank: int = 0, world_size: int = 1) -> int | torch.Tensor:
        """An int depth for the micro-batch, or a (batch_size,) tensor of per-sequence depths.

        Every rank draws the global batch's depths from an identically seeded generator and keeps
        its own slice, so ranks agree on the depth of every step and every sequence.
        """
        if self.cfg.per == "batch":
            return int(self._draw(1)[0])
        return self._draw(batch_size * world_size)[rank * batch_size:(rank + 1) * batch_size]

    def _draw(self, n: int) -> torch.Tensor:
        c, g = self.cfg, self.generator
        if c.sampler == "fixed":
            depth = torch.full((n,), int(c.mean), dtype=torch.long)
        elif c.sampler == "poisson":
            depth = torch.poisson(torch.full((n,), float(c.mean)), generator=g).long()
        else:
            mu = math.log(c.mean) - c.sigma**2 / 2  # so that E[tau] = mean
            tau = torch.exp(mu + c.sigma * torch.randn(n, generator=g))
            depth = torch.poisson(tau, generator=g).long() + 1
        return depth.clamp(c.min, c.max)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"])
