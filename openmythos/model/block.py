"""The pre-norm transformer block shared by the prelude, the coda and the looped block."""

from __future__ import annotations

import torch
from torch import nn

from openmythos.config import MythosConfig
from openmythos.model.attention import Context, GQAttention, MLAttention
from openmythos.model.layers import RMSNorm, SwiGLU
from openmythos.model.moe import MoE


class TransformerBlock(nn.Module):
    def __init__(self, cfg: MythosConfig, use_moe: bool = False):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = MLAttention(cfg) if cfg.attn_type == "mla" else GQAttention(cfg)
        self.ffn = MoE(cfg) if use_moe else SwiGLU(cfg.dim, cfg.ffn_dim)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, ctx: Context, kv=None,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, T, D) dense, or (n, D) rows of the flattened grid when `rows` is given."""
        x = x + self.drop(self.attn(self.attn_norm(x), ctx, kv, rows))
        h = self.ffn_norm(x)
        if isinstance(self.ffn, MoE):
            out, load, aux = self.ffn(h.reshape(-1, h.shape[-1]))
            ctx.expert_loads.append(load)
            ctx.aux_losses.append(aux)
            out = out.view_as(h)
        else:
            out = self.ffn(h)
        return x + self.drop(out)
