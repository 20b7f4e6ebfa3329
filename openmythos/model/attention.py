"""Attention: grouped-query attention (Ainslie et al. 2023) and Multi-head Latent Attention
(DeepSeek-V2, 2024), both on `F.scaled_dot_product_attention`.

Shapes: B batch, T new tokens, S visible keys (cached prefix + new), H query heads, n compacted
rows. A layer takes either dense x (B, T, D) or compacted rows x (n, D) with `rows` indexing the
flattened (B*T) grid: the looped block passes only tokens that have not halted. Projections run
on the rows; only the score/softmax core sees a grid, (B', n_max): the B' sequences that still
have live tokens, each with its live queries packed to the left. The real tokens of a packed
call, all of them (ctx.tokens), attend in two parts instead: each row's last token, then the
others of the rows that take several (see PackedRows).

Kernels: the fused (flash) SDPA kernel wherever it applies. GQA passes its key heads unrepeated
(enable_gqa); MLA's narrower value head is zero-padded to the query/key width, which the fused
kernel needs; absorbed MLA folds the heads into query rows against the one shared latent head,
whose whole row serves as the value too (the outputs past kv_lora_rank are dropped).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from openmythos.config import MythosConfig
from openmythos.model.cache import KVSlot
from openmythos.model.layers import RMSNorm, apply_rope


@dataclass(frozen=True)
class PackedRows:
    """Where the real tokens of a packed call sit, for attention. Rows are left-padded to T, so
    each row's last token is in the grid's last column: those attend as a (B, 1) batch. The other
    tokens, of the rows taking more than one (prompts being prefilled), fill a (M, T - 1) grid
    of just those M rows, so a row decoding one token never pads out to a prompt's width."""

    ends: list[int]  # real tokens in rows 0..b, for each b: row b's follow row b - 1's
    last: torch.Tensor  # position in the token list of each nonempty row's last token
    rows: torch.Tensor | None  # those rows; None when every row has a token
    multi: torch.Tensor  # (M,) the rows with more than one token
    other: torch.Tensor  # positions of their other tokens in the token list
    cell: torch.Tensor  # each one's cell in the flattened (M, T - 1) grid
    sizes: list[tuple[int, int, int]]  # for the first b rows: (nonempty rows, M, other tokens)

    @staticmethod
    def build(counts: list[int], T: int, device: torch.device) -> PackedRows:
        ends = list(itertools.accumulate(counts))
        last, rows, multi, other, cell, sizes = [], [], [], [], [], [(0, 0, 0)]
        for b, (end, n) in enumerate(zip(ends, counts, strict=True)):
            if n:
                last.append(end - 1)
                rows.append(b)
            if n > 1:  # tokens at columns T - n .. T - 2 of grid row len(multi)
                other += range(end - n, end - 1)
                cell += range(len(multi) * (T - 1) + T - n, len(multi) * (T - 1) + T - 1)
                multi.append(b)
            sizes.append((len(rows), len(multi), len(other)))
        as_tensor = functools.partial(torch.tensor, dtype=torch.long, device=device)
        return PackedRows(ends, as_tensor(last), None if len(rows) == len(counts) else as_tensor(rows),
                          as_tensor(multi), as_tensor(other), as_tensor(cell), sizes)

    def narrow(self, b: int) -> PackedRows:
        """The first b rows."""
        n, m, k = self.sizes[b]
        return PackedRows(self.ends[:b], self.last[:n], None if self.rows is None else self.rows[:n],
                          self.multi[:m], self.other[:k], self.cell[:k], self.sizes[:b + 1])


@dataclass
class Context:
    """Everything about one forward call that every layer shares."""

    B: int
    T: int
    start: int  # cache column of the first new token (0 without a cache; the largest if ragged)
    cos: torch.Tensor  # (B, T, rope_dim // 2) fp32
    sin: torch.Tensor
    mask: torch.Tensor | None  # (B, 1, T, S) bool, True = may attend; None = see is_causal
    is_causal: bool
    dropout: float = 0.0
    cols: torch.Tensor | None = None  # (B,) each row's first new column, when rows are ragged
    tokens: torch.Tensor | None = None  # flat (B*T) indices of the real tokens of a packed call
    packed: PackedRows | None = None  # where those tokens sit
    expert_loads: list[torch.Tensor] = field(default_factory=list)  # (E,) per MoE call
    aux_losses: list[torch.Tensor] = field(default_factory=list)

    def fork(self) -> Context:
        """The same call with empty MoE statistics: one loop's block records into its own."""
        return dataclasses.replace(self, expert_loads=[], aux_losses=[])

    def narrow(self, b: int) -> Context:
        """The first b sequences of the call (sharing its MoE statistics)."""
        if b == self.B:
            return self
        mask = None if self.mask is None else self.mask[:b]
        cols = None if self.cols is None else self.cols[:b]
        tokens, packed = self.tokens, self.packed
        if packed is not None:  # row b's tokens are the next ones in the flat list
            tokens, packed = tokens[:packed.ends[b - 1]], packed.narrow(b)
        return dataclasses.replace(self, B=b, cos=self.cos[:b], sin=self.sin[:b], mask=mask, cols=cols,
                                   tokens=tokens, packed=packed)

    def take(self, order: torch.Tensor) -> Context:
        """The call's sequences in another order, order (B,) (sharing its MoE statistics)."""
        assert self.tokens is None, "the rows of a packed call cannot be reordered"

        def rows(x: torch.Tensor | None) -> torch.Tensor | None:
            return x if x is None or x.shape[0] != self.B else x[order]
        return dataclasses.replace(self, cos=rows(self.cos), sin=rows(self.sin), mask=rows(self.mask),
                                   cols=rows(self.cols))

    def rope(self, rows: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if rows is None:
            return self.cos, self.sin
        return self.cos.flatten(0, 1)[rows], self.sin.flatten(0, 1)[rows]


class _Attention(nn.Module):
    """Shared plumbing: route rows to the (B', T) grid, call SDPA, route back."""

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: Context,
                rows: torch.Tensor | None, scale: float) -> torch.Tensor:
        """q: (B, T, H, d) or (n, H, d); k, v: (B, S, Hk, d) with Hk dividing H (query head h
        reads key head h // (H / Hk)). Returns q's layout with v's dim."""
        if rows is None:
            return self._core(q, k, v, ctx.mask, ctx.is_causal, ctx.start, scale, ctx)
        if rows is ctx.tokens and ctx.packed is not None:
            return self._attend_packed(q, k, v, ctx, scale)
        # Compacted rows: pack each sequence's live queries to the left of a (B', n_max) grid,
        # B' the sequences with a live token and n_max the most live tokens in one of them, so
        # the score core shrinks with the live rows instead of staying (B, T). Rows are sorted,
        # so a sequence's rows are contiguous. In decode (T = 1) the grid is the rows themselves.
        b, t = rows // ctx.T, rows % ctx.T
        seqs, b, counts = torch.unique_consecutive(b, return_inverse=True, return_counts=True)
        j = torch.arange(len(rows), device=rows.device) - (counts.cumsum(0) - counts)[b]
        n_max = int(counts.max())
        grid = q.new_zeros(len(seqs), n_max, *q.shape[1:])
        q = grid.index_put((b, j), q)
        k, v = k[seqs], v[seqs]
        mask = None
        if ctx.mask is not None or ctx.T > 1:
            S = k.shape[1]
            if ctx.mask is not None:
                row_mask = ctx.mask[rows // ctx.T, 0, t]  # (n, S)
            else:  # causal, nothing cached before
                row_mask = torch.arange(S, device=rows.device) <= (ctx.start + t).unsqueeze(1)
            # grid cells without a query see key 0 only: a row that sees nothing would give NaN
            mask = torch.zeros(len(seqs), n_max, S, dtype=torch.bool, device=rows.device)
            mask[..., 0] = True
            mask = mask.index_put((b, j), row_mask).unsqueeze(1)
        return self._core(q, k, v, mask, False, ctx.start, scale, ctx)[b, j]

    def _attend_packed(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: Context,
                       scale: float) -> torch.Tensor:
        """Every real token of a packed call, q (n, H, d), laid out as ctx.packed says."""
        p = ctx.packed
        k_last, v_last, mask = k, v, ctx.mask[:, :, -1:]
        if p.rows is not None:  # rows without a new token sit out
            k_last, v_last, mask = k[p.rows], v[p.rows], mask[p.rows]
        one_each = not len(p.multi)  # one token per nonempty row: q is already in row order
        out_last = self._core((q if one_each else q[p.last]).unsqueeze(1), k_last, v_last, mask,
                              False, ctx.start, scale, ctx)[:, 0]
        if one_each:
            return out_last
        out = out_last.new_empty(q.shape[0], *out_last.shape[1:])
        out[p.last] = out_last
        M, T = len(p.multi), ctx.T
        grid = q.new_zeros(M * (T - 1), *q.shape[1:]).index_copy_(0, p.cell, q[p.other])
        rest = self._core(grid.view(M, T - 1, *q.shape[1:]), k[p.multi], v[p.multi],
                          ctx.mask[p.multi, :, :-1], False, ctx.start, scale, ctx)
        out[p.other] = rest.flatten(0, 1)[p.cell]
        return out

    def _core(self, q, k, v, mask, is_causal: bool, start: int, scale: float, ctx: Context):
        dropout = ctx.dropout if self.training else 0.0
        if k.shape[2] == 1 < q.shape[2] and not dropout:  # the shared-key path has no dropout
            return _sdpa_shared_kv(q, k, v, mask, is_causal, scale, start)
        return _sdpa(q, k, v, mask, is_causal, scale, dropout)


def _sdpa(q, k, v, mask, is_causal: bool, scale: float, dropout: float) -> torch.Tensor:
    """(B, T, H, d) x (B, S, Hk, d) -> (B, T, H, dv), on the fused (flash) kernels where they exist."""
    dv = v.shape[-1]
    if dv != q.shape[-1]:
        # the fused kernels want one head dim for q, k and v: zero columns of v leave the output
        # exact and cost far less than the unfused path's (T, S) score matrices
        v = F.pad(v, (0, q.shape[-1] - dv)) if dv < q.shape[-1] else v
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
        dropout_p=dropout, is_causal=is_causal, scale=scale,
        enable_gqa=q.shape[2] != k.shape[2],  # the kernel shares each key head, no copies
    ).transpose(1, 2)
    return out[..., :dv]


def _sdpa_shared_kv(q, k, v, mask, is_causal: bool, scale: float, offset: int) -> torch.Tensor:
    """Every head reads the same single key/value head (absorbed MLA, or GQA with one KV head):
    fold the heads into the query rows, (B, T, H, d) -> (B, 1, T*H, d), so the keys are read
    once, not expanded per head. offset: cache columns before the first query (for the causal
    mask). No dropout."""
    B, T, H, d = q.shape
    S = k.shape[1]
    if is_causal:
        pos = torch.arange(T, device=q.device).unsqueeze(1) + offset
        mask = (torch.arange(S, device=q.device).unsqueeze(0) <= pos).view(1, 1, T, S)
    if mask is not None:  # (B|1, 1, T, S) -> (B|1, 1, T*H, S): the heads of a query share its row
        mask = mask.unsqueeze(3).expand(-1, -1, -1, H, -1).reshape(mask.shape[0], 1, T * H, S)
    out = F.scaled_dot_product_attention(
        q.reshape(B, 1, T * H, d), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
        scale=scale)
    return out.view(B, T, H, -1)


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
            k, v = kv.update([k, v], ctx.start, ctx.T, rows, ctx.cols)
        out = self._attend(q, k, v, ctx, rows, self.head_dim ** -0.5)
        return self.wo(out.flatten(-2))


class MLAttention(_Attention):
    """MLA. The cache holds the normalised latent c_kv and one shared RoPE key per token.

    Naive path (no cache, long chunks): up-project every cached latent to per-head keys and
    values. Absorbed path (with a cache, when the cost model in _use_absorbed says so: decode and
    short chunks): fold W_UK into the query and W_UV into the output, so attention runs directly
    on the latent and nothing is up-projected per cached token.
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
        c_kv, k_rope = self.kv_down(x).split([self.rank, self.rope_dim], dim=-1)
        # one rotation for the H query heads and the shared key, as H + 1 heads
        rotated = apply_rope(torch.cat([q_rope, k_rope.unsqueeze(-2)], dim=-2), cos, sin)
        q_rope, k_rope = rotated.split([self.n_heads, 1], dim=-2)
        # the cached entry: [c_kv | k_rope], one row per token (B, S, rank + rope_dim)
        latent = torch.cat([self.kv_norm(c_kv), k_rope.squeeze(-2)], dim=-1)
        absorbed = self._use_absorbed(ctx.T, isinstance(kv, KVSlot))
        if kv is not None:
            (latent,) = kv.update([latent], ctx.start, ctx.T, rows, ctx.cols)
        if absorbed:
            out = self._absorbed(q_nope, q_rope, latent, ctx, rows)
        else:
            out = self._naive(q_nope, q_rope, latent, ctx, rows)
        return self.wo(out.flatten(-2))

    def _naive(self, q_nope, q_rope, latent, ctx, rows):
        B, S = latent.shape[:2]
        c_kv, k_rope = latent.split([self.rank, self.rope_dim], dim=-1)
        k_nope, v = self.kv_up(c_kv).view(B, S, self.n_heads, self.nope + self.v_dim).split(
            [self.nope, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_rope.unsqueeze(2).expand(B, S, self.n_heads, self.rope_dim)], -1)
        q = torch.cat([q_nope, q_rope], dim=-1)
        return self._attend(q, k, v, ctx, rows, self.scale)

    def _absorbed(self, q_nope, q_rope, latent, ctx, rows):
        w = self.kv_up.weight.view(self.n_heads, self.nope + self.v_dim, self.rank)
        w_uk, w_uv = w[:, :self.nope], w[:, self.nope:]
        q = torch.cat([torch.einsum("...hn,hnr->...hr", q_nope, w_uk), q_rope], dim=-1)
        # one key/value head shared by all query heads: the cached latent itself, read in place.
        # The value is its first `rank` columns; passing the whole row, as wide as the key, lets
        # SDPA take its fused kernel (it wants one head dim for q, k and v) instead of the math
        # fallback, and the extra outputs are dropped
        latent = latent.unsqueeze(2)
        out = self._attend(q, latent, latent, ctx, rows, self.scale)[..., :self.rank]
        return torch.einsum("...hr,hvr->...hv", out, w_uv)
