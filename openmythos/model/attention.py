"""Attention: grouped-query attention (Ainslie et al. 2023) and Multi-head Latent Attention
(DeepSeek-V2, 2024), both on `F.scaled_dot_product_attention`.

Shapes: B batch, T new tokens, S visible keys (cached prefix + new), H query heads, n compacted
rows. A layer takes either dense x (B, T, D) or compacted rows x (n, D) with `rows` indexing the
flattened (B*T) grid: the looped block passes only tokens that have not halted. Projections run
on the rows; only the score/softmax core sees a (B', T) grid, restricted to the B' sequences that
still have active tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from openmythos.config import MythosConfig
from openmythos.model.cache import KVSlot
from openmythos.model.layers import RMSNorm, apply_rope


@dataclass
class Context:
    """Everything about one forward call that every layer shares."""

    B: int
    T: int
    start: int  # cache column of the first new token (0 without a cache)
    cos: torch.Tensor  # (B, T, rope_dim // 2) fp32
    sin: torch.Tensor
    mask: torch.Tensor | None  # (B, 1, T, S) bool, True = may attend; None = see is_causal
    is_causal: bool
    dropout: float = 0.0
    expert_loads: list[torch.Tensor] = field(default_factory=list)  # (E,) per MoE call
    aux_losses: list[torch.Tensor] = field(default_factory=list)

    def rope(self, rows: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if rows is None:
            return self.cos, self.sin
        return self.cos.flatten(0, 1)[rows], self.sin.flatten(0, 1)[rows]


class _Attention(nn.Module):
    """Shared plumbing: route rows to the (B', T) grid, call SDPA, route back."""

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: Context,
                rows: torch.Tensor | None, scale: float) -> torch.Tensor:
        """q: (B, T, H, d) or (n, H, d); k, v: (B, S, Hk, d). Returns q's layout with v's dim."""
        mask, is_causal = ctx.mask, ctx.is_causal
        if rows is not None:
            b, t = rows // ctx.T, rows % ctx.T
            # only sequences with a live token enter the score core; in decode this is exact
            seqs, b = torch.unique(b, return_inverse=True)
            grid = q.new_zeros(len(seqs), ctx.T, *q.shape[1:])
            q = grid.index_put((b, t), q)
            k, v = k[seqs], v[seqs]
            if mask is not None:
                mask = mask[seqs]
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
            dropout_p=ctx.dropout if self.training else 0.0, is_causal=is_causal, scale=scale,
        ).transpose(1, 2)
        return out if rows is None else out[b, t]


class GQAttention(_Attention):
    def __init__(self, cfg: MythosConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, ctx: Context, kv, rows: torch.Tensor | None = None):
        lead = x.shape[:-1]
        cos, sin = ctx.rope(rows)
        q = apply_rope(self.wq(x).view(*lead, self.n_heads, self.head_dim), cos, sin)
        k = apply_rope(self.wk(x).view(*lead, self.n_kv_heads, self.head_dim), cos, sin)
        v = self.wv(x).view(*lead, self.n_kv_heads, self.head_dim)
        if kv is not None:
            k, v = kv.update([k, v], ctx.start, ctx.T, rows)
        groups = self.n_heads // self.n_kv_heads
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=2), v.repeat_interleave(groups, dim=2)
        out = self._attend(q, k, v, ctx, rows, self.head_dim ** -0.5)
        return self.wo(out.flatten(-2))


class MLAttention(_Attention):
    """MLA. The cache holds the normalised latent c_kv and one shared RoPE key per token.

    Naive path (training, prefill): up-project every cached latent to per-head keys and values.
    Absorbed path (decode): fold W_UK into the query and W_UV into the output, so attention runs
    directly on the latent and nothing is up-projected per cached token.
    """

    def __init__(self, cfg: MythosConfig):
        super().__init__()
        self.n_heads, self.rank = cfg.n_heads, cfg.kv_lora_rank
        self.nope, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        q_dim = cfg.n_heads * (self.nope + self.rope_dim)
        if cfg.q_lora_rank:
            self.q_down = nn.Linear(cfg.dim, cfg.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.norm_eps)
            self.q_up = nn.Linear(cfg.q_lora_rank, q_dim, bias=False)
        else:
            self.q_proj = nn.Linear(cfg.dim, q_dim, bias=False)
        self.kv_down = nn.Linear(cfg.dim, self.rank + self.rope_dim, bias=False)
        self.kv_norm = RMSNorm(self.rank, cfg.norm_eps)
        self.kv_up = nn.Linear(self.rank, cfg.n_heads * (self.nope + self.v_dim), bias=False)
        self.wo = nn.Linear(cfg.n_heads * self.v_dim, cfg.dim, bias=False)
        self.scale = (self.nope + self.rope_dim) ** -0.5
        self.absorb: bool | None = None  # None: decide per call from the cost model below

    def _queries(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "q_proj"):
            return self.q_proj(x)
        return self.q_up(self.q_norm(self.q_down(x)))

    def _use_absorbed(self, T: int, cached: bool) -> bool:
        if self.absorb is not None:
            return self.absorb
        # Absorbed saves up-projecting S latents (S*r*(nope+v) per head) but widens each score
        # from nope+v to 2r dims (T*S*(2r-nope-v)); it wins when T < r(nope+v) / (2r-nope-v).
        r, nv = self.rank, self.nope + self.v_dim
        return cached and T * max(2 * r - nv, 1) < r * nv

    def forward(self, x: torch.Tensor, ctx: Context, kv, rows: torch.Tensor | None = None):
        lead = x.shape[:-1]
        cos, sin = ctx.rope(rows)
        q = self._queries(x).view(*lead, self.n_heads, self.nope + self.rope_dim)
        q_nope, q_rope = q.split([self.nope, self.rope_dim], dim=-1)
        q_rope = apply_rope(q_rope, cos, sin)
        c_kv, k_rope = self.kv_down(x).split([self.rank, self.rope_dim], dim=-1)
        c_kv = self.kv_norm(c_kv)
        k_rope = apply_rope(k_rope.unsqueeze(-2), cos, sin).squeeze(-2)
        absorbed = self._use_absorbed(ctx.T, isinstance(kv, KVSlot))
        if kv is not None:
            c_kv, k_rope = kv.update([c_kv, k_rope], ctx.start, ctx.T, rows)
        if absorbed:
            out = self._absorbed(q_nope, q_rope, c_kv, k_rope, ctx, rows)
        else:
            out = self._naive(q_nope, q_rope, c_kv, k_rope, ctx, rows)
        return self.wo(out.flatten(-2))

    def _naive(self, q_nope, q_rope, c_kv, k_rope, ctx, rows):
        B, S = c_kv.shape[:2]
        k_nope, v = self.kv_up(c_kv).view(B, S, self.n_heads, self.nope + self.v_dim).split(
            [self.nope, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_rope.unsqueeze(2).expand(B, S, self.n_heads, self.rope_dim)], -1)
        q = torch.cat([q_nope, q_rope], dim=-1)
        return self._attend(q, k, v, ctx, rows, self.scale)

    def _absorbed(self, q_nope, q_rope, c_kv, k_rope, ctx, rows):
        w = self.kv_up.weight.view(self.n_heads, self.nope + self.v_dim, self.rank)
        w_uk, w_uv = w[:, :self.nope], w[:, self.nope:]
        q = torch.cat([torch.einsum("...hn,hnr->...hr", q_nope, w_uk), q_rope], dim=-1)
        k = torch.cat([c_kv, k_rope], dim=-1).unsqueeze(2).expand(-1, -1, self.n_heads, -1)
        v = c_kv.unsqueeze(2).expand(-1, -1, self.n_heads, -1)
        out = self._attend(q, k, v, ctx, rows, self.scale)
        return torch.einsum("...hr,hvr->...hv", out, w_uv)
