"""Basic layers: RMSNorm (Zhang & Sennrich 2019), SwiGLU (Shazeer 2020) and real-valued rotary
position embeddings (RoFormer, Su et al. 2021).

RoPE is computed on the fly from integer positions in fp32 and applied in fp32, so the model
keeps exact rotations after `model.to(torch.bfloat16)` and needs no table sized by max_seq_len.

Wherever a narrow dtype would lose bits (norms, rotations, router and halting scores, the
injection's coefficients, the loss), the arithmetic runs in `compute_dtype`: fp32, or fp64 for an
fp64 model, which is then fp64 throughout (a numerical reference, `torch.autograd.gradcheck`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for the floating dtypes up to fp32, fp64 for fp64."""
    return torch.promote_types(dtype, torch.float32)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # the fused kernel does the same fp32 arithmetic below (bit for bit) in fewer passes
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # the mean of squares overflows fp16 and loses bits in bf16, so normalise in fp32
        xf = x.to(compute_dtype(x.dtype))
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.to(xf.dtype)).to(x.dtype)

    def init_weights(self) -> None:
        nn.init.ones_(self.weight)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


def rope_angles(positions: torch.Tensor, dim: int, theta: float,
                dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape positions.shape + (dim // 2,), in dtype (fp32, or fp64 for an fp64 model)."""
    inv_freq = theta ** (-torch.arange(0, dim, 2, device=positions.device, dtype=dtype) / dim)
    angles = positions.to(dtype).unsqueeze(-1) * inv_freq
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the halves of x (..., heads, dim) by angles (..., dim // 2), NeoX layout."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    x1, x2 = x.to(compute_dtype(x.dtype)).chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)
