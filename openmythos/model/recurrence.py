"""The recurrent core: one shared block looped T times with input injection
h <- A*h + B*e + block(norm(h + loop_emb(t) + e)), a depth-wise LoRA and ACT halting.

- Injection: a diagonal linear time-invariant system (as in Parcae, Prairie et al. 2025),
  A = exp(-dt * exp(log_A)) so that every entry of A lies in [0, 1) and rho(A) < 1 (0 only once
  the rate dt * exp(log_A) passes ~104, where fp32's exp underflows: that channel forgets its state).
- Halting: Adaptive Computation Time (Graves 2016). A position halts once its cumulative halting
  probability crosses act_threshold and takes the remainder as its weight; the last loop assigns
  the remainder to every position still running, so the weights always sum to exactly 1.
  Alternatively a KL exit (Huginn, Geiping et al. 2025): a position stops once the next-token
  distribution read from its state moves less than kl_threshold between successive loops.
- Compute: halted positions are dropped from the row set, so later loops never touch them.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from openmythos.config import MythosConfig
from openmythos.model.attention import Context
from openmythos.model.block import TransformerBlock
from openmythos.model.cache import RollingKV
from openmythos.model.layers import RMSNorm, compute_dtype

B_INIT = 0.1  # a small injection at init: the loop starts near the block's own update, e scaled down


class _Injection(nn.Module):
    """h <- A*h + B*e + out with diagonal A and B (D,) from `coefficients`, which the loop
    computes once per call and hands to every loop, instead of rebuilding them at each one."""

    def coefficients(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def forward(self, h: torch.Tensor, e: torch.Tensor, out: torch.Tensor,
                coefficients: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        a, b = self.coefficients(h.dtype) if coefficients is None else coefficients
        return torch.addcmul(torch.addcmul(out, a, h), b, e)


class LTIInjection(_Injection):
    def __init__(self, dim: int, discretisation: str = "euler"):
        super().__init__()
        self.discretisation = discretisation
        self.log_A = nn.Parameter(torch.empty(dim))
        self.log_dt = nn.Parameter(torch.empty(1))
        self.B = nn.Parameter(torch.empty(dim))

    def init_weights(self) -> None:
        nn.init.zeros_(self.log_A)
        nn.init.zeros_(self.log_dt)
        nn.init.constant_(self.B, B_INIT)

    def _log_rate(self, dtype: torch.dtype, x_max: float = 20.0) -> torch.Tensor:
        # exp(-exp(x)) rounds to exactly 1.0 once exp(x) drops under the dtype's spacing below 1,
        # so bound x from below in log space: A <= 1 - eps(dtype) < 1 for any parameter values
        # (eps is the spacing above 1, twice the one below: a margin)
        x_min = math.log(-math.log1p(-torch.finfo(dtype).eps))
        # and from above, where exp(x) > 4.8e8 and A is exactly 0 in any dtype already (its
        # gradient stays finite); summed in the compute dtype (in bf16 parameters' own, the sum
        # alone put A ~1e-3 off)
        c = compute_dtype(dtype)
        return (self.log_dt.to(c) + self.log_A.to(c)).clamp(x_min, x_max)

    def decay(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A, in compute_dtype(dtype), bounded so that it stays strictly below 1 once cast to `dtype`."""
        return torch.exp(-torch.exp(self._log_rate(dtype)))

    def gain(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        dt = self.log_dt.to(compute_dtype(dtype)).clamp(-20.0, 20.0).exp()  # finite for any parameter value
        if self.discretisation == "euler":
            return dt * self.B.to(dt.dtype)
        # zero-order hold: (1 - A) / A_c * B with A_c = exp(log_A) = z / dt; expm1 keeps it exact.
        # The gain is dt / z past A's bound too (capped at e^20 it read dt B / e^20: 150x too large
        # at a rate of e^25); from e^40 on it is under 2e-9 B for any dt <= e^20, and z^2 finite
        z = torch.exp(self._log_rate(dtype, x_max=40.0))
        return dt * (-torch.expm1(-z) / z) * self.B.to(dt.dtype)

    def coefficients(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return self.decay(dtype).to(dtype), self.gain(dtype).to(dtype)


class FreeInjection(_Injection):
    """Ablation: an unconstrained learned diagonal A (rho(A) may exceed 1)."""

    def __init__(self, dim: int):
        super().__init__()
        self.A = nn.Parameter(torch.empty(dim))
        self.B = nn.Parameter(torch.empty(dim))

    def init_weights(self) -> None:
        nn.init.constant_(self.A, math.exp(-1.0))  # the LTI injection's A at init
        nn.init.constant_(self.B, B_INIT)

    def decay(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.A.to(compute_dtype(dtype))

    def coefficients(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return self.A.to(dtype), self.B.to(dtype)


class AdditiveInjection(_Injection):
    """Ablation: a plain residual recurrence, A = 1."""

    def __init__(self, dim: int):
        super().__init__()
        self.B = nn.Parameter(torch.empty(dim))

    def init_weights(self) -> None:
        nn.init.constant_(self.B, B_INIT)

    def decay(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.ones_like(self.B, dtype=compute_dtype(dtype))

    def coefficients(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.ones_like(self.B, dtype=dtype), self.B.to(dtype)


def build_injection(cfg: MythosConfig) -> _Injection:
    if cfg.injection == "lti":
        return LTIInjection(cfg.dim, cfg.discretisation)
    return {"free": FreeInjection, "additive": AdditiveInjection}[cfg.injection](cfg.dim)


class DepthLoRA(nn.Module):
    """Low-rank delta shared by all loops, with a per-loop scale that tells iterations apart.
    Past the trained depth the last scale is reused."""

    def __init__(self, dim: int, rank: int, max_loops: int):
        super().__init__()
        self.down = nn.Linear(dim, rank, bias=False)
        self.B = nn.Parameter(torch.empty(rank, dim))
        self.scale = nn.Embedding(max_loops, rank)

    def init_weights(self, std: float = 0.02) -> None:
        nn.init.normal_(self.down.weight, std=std)
        nn.init.normal_(self.B, std=std)
        nn.init.normal_(self.scale.weight, std=std)

    def loop_scale(self, t: int) -> torch.Tensor:
        return self.scale.weight[min(t, self.scale.num_embeddings - 1)]

    def forward(self, x: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        """t: the loop index, or its scale row (rank,) from loop_scale(t)."""
        s = self.loop_scale(t) if isinstance(t, int) else t
        return (self.down(x) * s) @ self.B


def loop_embedding(t: int, dim: int, width: int, like: torch.Tensor) -> torch.Tensor:
    """Sinusoidal embedding of the loop index on the first `width` of `dim` channels."""
    # torch.compile traces the function itself (a constant in the graph), not the cache around it
    build = _loop_embedding.__wrapped__ if torch.compiler.is_compiling() else _loop_embedding
    return build(t, dim, width, like.dtype, like.device)


@functools.lru_cache(maxsize=1024)  # (loop, dtype, device) keys: a bound, not a working set
def _loop_embedding(t: int, dim: int, width: int, dtype: torch.dtype,
                    device: torch.device) -> torch.Tensor:
    # a constant of (t, dim, width): built once, not at every loop of every call, and never as an
    # inference tensor (a first call under inference_mode), which training could not save
    with torch.inference_mode(False):
        exact = compute_dtype(dtype)
        freqs = 10000.0 ** (-torch.arange(0, width, 2, device=device, dtype=exact) / width)
        emb = torch.zeros(dim, device=device, dtype=exact)
        emb[:width] = torch.cat([(t * freqs).sin(), (t * freqs).cos()])
        return emb.to(dtype)


class ACTHalting(nn.Module):
    def __init__(self, dim: int, max_loops: int, threshold: float):
        super().__init__()
        self.halt = nn.Linear(dim, 1)
        self.max_loops = max_loops
        self.threshold = threshold  # init_weights' alone: a run may halt at another (with_exit)

    def init_weights(self) -> None:
        """One halting probability p0 everywhere at init, so that every token runs the trained
        depth L before it learns to stop early (a random init halts after ~2 loops and makes
        depth meaningless): L * p0 reaches the threshold and (L - 1) * p0 stays below it. p0 =
        1/L (the L states averaged uniformly) where the threshold allows it, from 1 - 1/(2L) up
        to 0.999 (below by at least half a step, above by 1 - threshold); else threshold /
        (L - 0.5) (half a step either side), kept below 1 for a finite bias (so at L = 1 a
        threshold above 1 - 1e-6 does not halt at init)."""
        L, threshold = self.max_loops, self.threshold
        p0 = 1 / L if 1 - 0.5 / L <= threshold <= 0.999 else threshold / (L - 0.5)
        p0 = min(p0, 1 - 1e-6)
        nn.init.zeros_(self.halt.weight)
        nn.init.constant_(self.halt.bias, math.log(p0) - math.log1p(-p0))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        # in fp32 under autocast too: a bf16 logit rounds by more than init_weights' half-step
        # margin from L ~ 40 and halts early
        with torch.autocast(h.device.type, enabled=False):
            exact = compute_dtype(h.dtype)
            logit = F.linear(h.to(exact), self.halt.weight.to(exact), self.halt.bias.to(exact))
        return torch.sigmoid(logit).squeeze(-1)


def _slot(slots: list | None, t: int):
    """Loop t's cache slot: slots[t % len(slots)] (a ring when shorter than the depth)."""
    return None if slots is None else slots[t % len(slots)]


def _take(x: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    return x if rows is None else x[rows]


def _put(x: torch.Tensor, rows: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
    return value if rows is None else x.index_put((rows,), value)


def _constant_where(mask: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """x, detached where mask (broadcast over x's trailing dims) is True."""
    if mask is None:
        return x
    return torch.where(mask.view(*mask.shape, *[1] * (x.dim() - mask.dim())), x.detach(), x)


def _real_tokens(ctx: Context, N: int, device: torch.device) -> torch.Tensor:
    """The flat indices of a call's real tokens: a packed call's, else all N."""
    return ctx.tokens if ctx.tokens is not None else torch.arange(N, device=device)


def _of_looping_sequences(rows: torch.Tensor, ctx: Context, N: int, T: int) -> torch.Tensor:
    """The real tokens (flat indices) of the sequences that `rows`, the live tokens, belong to."""
    real = _real_tokens(ctx, N, rows.device)
    looping = torch.zeros(N // T, dtype=torch.bool, device=rows.device).index_fill_(0, rows // T, True)
    return real[looping[real // T]]


def _add(x: torch.Tensor, rows: torch.Tensor | None, value: torch.Tensor | int) -> torch.Tensor:
    if rows is None:
        return x + value
    if isinstance(value, int):
        value = torch.full_like(rows, value, dtype=x.dtype)
    return x.index_add(0, rows, value)


class RecurrentBlock(nn.Module):
    def __init__(self, cfg: MythosConfig):
        super().__init__()
        self.cfg = cfg
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.block = TransformerBlock(cfg, use_moe=True)
        self.injection = build_injection(cfg)
        self.act = ACTHalting(cfg.dim, cfg.max_loop_iters, cfg.act_threshold)
        self.lora = DepthLoRA(cfg.dim, cfg.lora_rank, cfg.max_loop_iters)
        # opt-in, set from outside (OpenMythos.enable_activation_checkpointing / compile_blocks)
        self.checkpoint_loops = False
        self.compiled_step: Callable | None = None

    def _step(self, h_t: torch.Tensor, e_t: torch.Tensor, emb_t: torch.Tensor,
              scale_t: torch.Tensor, coefficients: tuple[torch.Tensor, torch.Tensor],
              kv_in: list[torch.Tensor] | None, ctx: Context, slot, rows: torch.Tensor | None):
        """One loop on the live rows: h_t, e_t (n, D) -> the new h_t (n, D).

        A pure function of its inputs, so that activation checkpointing can rerun it and
        torch.compile traces one graph for every loop: the loop index enters only through its
        embedding emb_t (D,) and LoRA scale scale_t (rank,), the injection's A and B (built once
        per call) come in as `coefficients`, the rolling keys come in as kv_in
        and go out as kv_out, and the MoE statistics are returned rather than appended to ctx.
        """
        D = h_t.shape[-1]
        x = self.norm(h_t + emb_t + e_t)
        if rows is None:  # dense layout while every row is live
            x = x.view(ctx.B, ctx.T, D)
        kv = RollingKV(kv_in) if slot is None else slot
        local = ctx.fork()
        y = self.block(x, local, kv, rows).reshape(-1, D)
        h_t = self.injection(h_t, e_t, y + self.lora(y, scale_t), coefficients)
        kv_out = kv.tensors if slot is None else None
        return h_t, kv_out, local.expert_loads[0], local.aux_losses[0]

    def _run_step(self, t, h_t, e_t, coefficients, kv_in, ctx, slot, rows):
        emb_t = loop_embedding(t, h_t.shape[-1], self.cfg.loop_embed_dim, h_t)
        args = (h_t, e_t, emb_t, self.lora.loop_scale(t), coefficients,
                # a dense loop (rows None) rewrites every rolling key and never reads kv_in:
                # do not keep it alive
                kv_in if rows is not None else None, ctx, slot, rows)
        step = self.compiled_step or self._step
        if self.checkpoint_loops and slot is None and torch.is_grad_enabled():
            h_t, kv_out, load, aux = checkpoint(step, *args, use_reentrant=False)
        else:
            h_t, kv_out, load, aux = step(*args)
        ctx.expert_loads.append(load)
        ctx.aux_losses.append(aux)
        return h_t, kv_out

    def forward(self, h: torch.Tensor, e: torch.Tensor, ctx: Context, n_loops: int | torch.Tensor,
                slots: list | None = None, backprop_loops: int | None = None,
                readout: Callable[[torch.Tensor], torch.Tensor] | None = None):
        """h, e: (B, T, D). n_loops: an int, or a (B,) tensor of per-sequence depths.
        slots: the cache's loop slots; loop t uses slots[t % len(slots)] (a ring when shorter).
        readout: state (n, D) -> logits (n, V), for the KL exit.

        Returns the halting-weighted output (B, T, D), loops run per position (B, T) and the
        mean ACT ponder cost (Graves' N + R).
        """
        B, T, D = h.shape
        N = B * T
        h, e = h.reshape(N, D), e.reshape(N, D)
        if isinstance(n_loops, int):
            depth, limit = n_loops, None
        else:
            limit = n_loops.to(h.device).repeat_interleave(T)  # (N,)
            depth = int(limit.max())
        act, kl = self.cfg.halting == "act", self.cfg.halting == "kl"
        if kl and readout is None:
            raise ValueError("halting='kl' needs a readout from states to logits")
        first_grad = depth - backprop_loops if backprop_loops else 0
        grad_from = None  # per-sequence depths: each row backpropagates through its own last loops
        if backprop_loops and limit is not None:
            grad_from = limit - backprop_loops
            first_grad = int(grad_from.min())
        coefficients = self.injection.coefficients(h.dtype)
        packed = ctx.tokens is not None  # only the real tokens of a packed call run
        if not (act or kl or limit is not None or packed):
            return self._fixed_depth(h, e, ctx, depth, first_grad, coefficients, slots)
        if not (act or kl):
            depths = [depth] * B if limit is None else n_loops.tolist()
            if packed:  # a row without a new token runs no loop
                ends = ctx.packed.ends
                depths = [d if end > prev else 0 for d, prev, end in zip(depths, [0, *ends[:-1]], ends, strict=True)]
            if all(a >= b for a, b in zip(depths, depths[1:], strict=False)):
                return self._deepest_first(h, e, ctx, depths, slots, coefficients, backprop_loops)
            if slots is None and not packed:  # no cache rows to keep in place: sort, run, put back
                index = torch.tensor(sorted(range(B), key=lambda i: -depths[i]), device=h.device)

                def sort(x: torch.Tensor) -> torch.Tensor:
                    return x.view(B, T, D)[index].view(N, D)
                out, steps, ponder = self._deepest_first(sort(h), sort(e), ctx.take(index), sorted(depths, reverse=True),
                                                         slots, coefficients, backprop_loops)
                inverse = index.argsort()  # the inverse permutation
                return out[inverse], steps[inverse], ponder
        return self._halting_loop(h, e, ctx, n_loops, depth, limit, first_grad, grad_from, coefficients,
                                  slots, readout)

    def _fixed_depth(self, h: torch.Tensor, e: torch.Tensor, ctx: Context, depth: int, first_grad: int,
                     coefficients: tuple[torch.Tensor, torch.Tensor], slots: list | None):
        """Every row runs exactly `depth` loops: no bookkeeping and no host syncs at all."""
        B, T, D = ctx.B, ctx.T, h.shape[-1]
        kv = None  # the rolling keys of the previous loop, without a cache
        for t in range(depth):
            with torch.no_grad() if t < first_grad else nullcontext():
                h, kv = self._run_step(t, h, e, coefficients, kv, ctx, _slot(slots, t), None)
        self._fill_deeper(slots, depth - 1, depth, ctx)
        steps = torch.full((B, T), depth, device=h.device, dtype=torch.long)
        return h.view(B, T, D), steps, torch.zeros((), device=h.device, dtype=compute_dtype(h.dtype))

    def _halting_loop(self, h: torch.Tensor, e: torch.Tensor, ctx: Context, n_loops: int | torch.Tensor,
                      depth: int, limit: torch.Tensor | None, first_grad: int, grad_from: torch.Tensor | None,
                      coefficients: tuple[torch.Tensor, torch.Tensor], slots: list | None,
                      readout: Callable[[torch.Tensor], torch.Tensor] | None):
        """The general loop: rows leave as they halt (ACT, the KL exit) or reach their own depth
        (`limit`, (N,)), and later loops run on the live rows alone, gathered by index."""
        B, T, D = ctx.B, ctx.T, h.shape[-1]
        N = B * T
        act, kl = self.cfg.halting == "act", self.cfg.halting == "kl"
        kv = None  # the rolling keys of the previous loop, without a cache
        prev_logp = None  # (N, V) log-probabilities read at the previous loop, for the KL exit
        exact = compute_dtype(h.dtype)  # ACT's sums, whatever the default dtype
        out = torch.zeros(N, D, device=h.device, dtype=exact if act else h.dtype)
        cum = torch.zeros(N, device=h.device, dtype=exact)
        ponder = torch.zeros(N, device=h.device, dtype=exact)
        steps = torch.zeros(N, device=h.device, dtype=torch.long)
        live = _real_tokens(ctx, N, h.device)
        rows = ctx.tokens  # None: every row is live, with no gathers at all

        for t in range(depth):
            with torch.no_grad() if t < first_grad else nullcontext():
                h_t, e_t = _take(h, rows), _take(e, rows)
                if slots is not None and t > 0 and rows is not None:
                    # halted rows keep their latest entry in this loop's slot, for the rows still
                    # looping to attend to; in a ring past its first lap, only those of sequences
                    # still looping (the others' slots hold what they wrote this call, and a
                    # sequence's cache must not depend on how deep the others in its batch run)
                    fill = ctx.tokens if t < len(slots) else _of_looping_sequences(rows, ctx, N, T)
                    _slot(slots, t).copy_new_tokens(_slot(slots, t - 1), ctx.start, T, ctx.cols, fill)
                h_t, kv = self._run_step(t, h_t, e_t, coefficients, kv, ctx, _slot(slots, t), rows)
                early = None  # rows whose backprop window starts after this loop
                if grad_from is not None and torch.is_grad_enabled():
                    early = _take(grad_from, rows) > t
                    h_t, kv = self._before_window(early, grad_from.view(B, T)[:, 0] > t, h_t, kv, ctx)

                stop = torch.full_like(steps if rows is None else rows, t == depth - 1, dtype=torch.bool)
                if limit is not None:
                    stop |= _take(limit, rows) == t + 1
                if act:
                    p, c = _constant_where(early, self.act(h_t)), _take(cum, rows)
                    stop |= c + p >= self.cfg.act_threshold
                    w = torch.where(stop, 1.0 - c, p)
                    out = _add(out, rows, w.unsqueeze(-1) * h_t.to(exact))
                    cum = _put(cum, rows, c + p)
                    ponder = _put(ponder, rows, torch.where(stop, t + 1 + (1.0 - c), 0.0))
                else:
                    if kl:
                        logp = _constant_where(early, torch.log_softmax(readout(h_t).to(exact), dim=-1))
                        if t > 0:
                            # KL(p_t || p_{t-1}): the prediction stopped moving, so stop looping
                            drift = (logp.exp() * (logp - _take(prev_logp, rows))).sum(-1)
                            stop |= (drift < self.cfg.kl_threshold) & (t + 1 >= self.cfg.min_loops)
                        if prev_logp is None and rows is not None:  # a packed call: on the grid
                            prev_logp = logp.new_zeros(N, logp.shape[-1])
                        prev_logp = _put(prev_logp, rows, logp)
                    out = out.index_put((live[stop],), h_t[stop])
                h = _put(h, rows, h_t)
                steps = _add(steps, rows, 1)

            if bool(stop.all()):
                break
            if bool(stop.any()):
                live = live[~stop]
                rows = live
        self._fill_halted(slots, steps.view(B, T), n_loops, t, ctx)
        return out.to(h.dtype).view(B, T, D), steps.view(B, T), ponder.mean()

    @staticmethod
    def _before_window(early: torch.Tensor, early_seqs: torch.Tensor, h_t: torch.Tensor,
                       kv: list[torch.Tensor] | None, ctx: Context):
        """Truncated backprop with per-sequence depths: the rows (and sequences) whose window
        starts after this loop hand on nothing to backpropagate through, as they would alone:
        their state, rolling keys and (via _constant_where) halting probability and readout
        enter later loops as constants. The loop's balance loss, one scalar over every row it
        ran, cannot be split, so a loop that ran such rows leaves it out."""
        if not bool(early.any()):
            return h_t, kv
        if kv is not None:
            kv = [_constant_where(early_seqs.view(-1, *[1] * (x.dim() - 1)), x) for x in kv]
        ctx.aux_losses[-1] = ctx.aux_losses[-1].detach()
        return _constant_where(early.unsqueeze(-1), h_t), kv

    def _deepest_first(self, h: torch.Tensor, e: torch.Tensor, ctx: Context, depths: list[int],
                       slots: list | None, coefficients: tuple[torch.Tensor, torch.Tensor],
                       backprop_loops: int | None = None):
        """Per-sequence depths that never grow along the batch (the serving engine keeps its rows
        so): the sequences still looping at loop t are the first b of the batch, so each loop runs
        densely on that prefix (h[:b * T], the first b rows of ctx and of the cache), with no
        gathers, while the finished ones carry their entries into the loop's slot as they would
        on the compacted path. A packed call runs on its real tokens alone, where row b's tokens
        follow row b - 1's: the prefix is then the first ctx.packed.ends[b - 1] tokens.
        backprop_loops: each sequence backpropagates through its own last loops, as alone: the
        windows start later for deeper rows, so the rows before theirs are a prefix too, whose
        states leave the loop detached (a loop where every row is before its window runs without
        gradients), as in _halting_loop."""
        B, T, D = ctx.B, ctx.T, h.shape[-1]
        tokens = ctx.tokens
        ends = [T * (b + 1) for b in range(B)] if tokens is None else ctx.packed.ends
        if tokens is not None:
            h, e = h[tokens], e[tokens]
        starts = [d - (backprop_loops or d) for d in depths]  # each row's first loop with gradients
        kv = None
        for t in range(depths[0]):
            b = sum(d > t for d in depths)
            n = ends[b - 1]
            early = sum(s > t for s in starts[:b])  # rows whose window starts after this loop
            if slots is not None and 0 < t < len(slots) and b < B:  # finished: their latest entry
                cols = None if ctx.cols is None else ctx.cols[b:]
                rest = None if tokens is None else tokens[n:] - b * T
                _slot(slots, t).narrow(b, B - b).copy_new_tokens(_slot(slots, t - 1).narrow(b, B - b), ctx.start, T,
                                                          cols, rest)
            live = _slot(slots, t) if slots is None or b == B else _slot(slots, t).narrow(0, b)
            sub = ctx.narrow(b)
            with torch.no_grad() if early == b else nullcontext():
                h_t, kv = self._run_step(t, h[:n], e[:n], coefficients, kv, sub, live, sub.tokens)
            if 0 < early < b and torch.is_grad_enabled():
                h_t = torch.cat((h_t[:ends[early - 1]].detach(), h_t[ends[early - 1]:]))
                ctx.aux_losses[-1] = ctx.aux_losses[-1].detach()  # one scalar over every row run
            h = h_t if b == B else torch.cat((h_t, h[n:]))
        self._fill_deeper(slots, depths[0] - 1, depths[0], ctx)
        steps = torch.tensor(depths, device=h.device).repeat_interleave(T)
        if tokens is not None:  # back on the (B, T) grid, where padding ran no loops
            h = h.new_zeros(B * T, D).index_copy_(0, tokens, h)
            steps = torch.zeros_like(steps).index_copy_(0, tokens, steps[tokens])
        return h.view(B, T, D), steps.view(B, T), torch.zeros((), device=h.device, dtype=compute_dtype(h.dtype))

    @staticmethod
    def _fill_halted(slots: list | None, steps: torch.Tensor, n_loops: int | torch.Tensor, t: int,
                     ctx: Context) -> None:
        """_fill_deeper once a loop that lets tokens halt is over (after loop t), for each sequence
        as if it had run alone: its own loop would have ended at its last loop s and filled loops
        s + 1 .. s + min(R - 1, max(d, R) - 1 - s), d its depth. The loop above already filled
        these at every loop below R, so what is left starts past both s and min(t, R - 1). Filled
        by the batch's last loop and depth instead, a ring would overwrite entries that a sequence
        wrote this call with ones of another loop, depending on how deep the others ran."""
        if slots is None:
            return
        R, (B, T) = len(slots), steps.shape
        ran = (steps.amax(1) - 1).tolist()  # -1: a row with no real token in a packed call
        depths = [n_loops] * B if isinstance(n_loops, int) else n_loops.tolist()
        spans = [(max(s, min(t, R - 1)) + 1, s + min(R - 1, max(d, R) - 1 - s)) if s >= 0 else (1, 0)
                 for s, d in zip(ran, depths, strict=True)]
        real = _real_tokens(ctx, B * T, steps.device)
        for u in range(1, t + R):  # every span lies in [1, t + R - 1]
            filled = [a <= u <= b for a, b in spans]
            if any(filled):
                rows = real[torch.tensor(filled, device=real.device)[real // T]]
                slots[u % R].copy_new_tokens(slots[(u - 1) % R], ctx.start, T, ctx.cols, rows)

    @staticmethod
    def _fill_deeper(slots: list | None, t: int, depth: int, ctx: Context) -> None:
        """After the last loop run, t, give the new tokens' entries in the slots of the loops not
        run (up to the cache's depth, or up to `depth` for a ring) their latest entry."""
        if slots is None:
            return
        last = max(depth, len(slots)) - 1
        for deeper in range(t + 1, t + 1 + min(len(slots) - 1, last - t)):
            slots[deeper % len(slots)].copy_new_tokens(slots[(deeper - 1) % len(slots)], ctx.start,
                                                      ctx.T, ctx.cols, ctx.tokens)
