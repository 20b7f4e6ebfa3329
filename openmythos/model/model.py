"""OpenMythos: a Recurrent-Depth Transformer (Geiping et al. 2025, "Scaling up Test-Time Compute
with Latent Reasoning"; Parcae, Prairie et al. 2025).

embed -> prelude (dense blocks, once) -> recurrent block (looped, MoE, ACT) -> coda (dense blocks,
once) -> RMSNorm -> LM head tied to the embedding.

Build on the meta device and call `init_weights()` after `to_empty()`; a model built on a real
device initialises itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from openmythos.config import MythosConfig, is_int
from openmythos.generation import (
    eval_mode,
    generate,
    speculative_generate,
    speculative_stream,
    stream,
)
from openmythos.model.attention import Context, PackedRows
from openmythos.model.block import TransformerBlock
from openmythos.model.cache import KVCache
from openmythos.model.layers import RMSNorm, compute_dtype, rope_angles
from openmythos.model.moe import MoE
from openmythos.model.recurrence import RecurrentBlock

IGNORE_INDEX = -100  # a target that leaves its position out of the loss, as in torch and transformers
LOSS_CHUNK = 256  # rows of the head's logits alive at once in the training loss
EXIT_FIELDS = ("halting", "act_threshold", "kl_threshold", "min_loops")  # the exit rule (OpenMythos.with_exit)


def _head_loss(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # the cast inside: each chunk's weight gradient comes back in the weight's (fp32) dtype, so
    # the sum over chunks never runs in bf16
    logits = x @ weight.to(x.dtype).T
    return F.cross_entropy(logits.to(compute_dtype(logits.dtype)), targets, reduction="none",
                           ignore_index=IGNORE_INDEX)


def _chunked_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """F.linear_cross_entropy's chunking for torch before 2.13 (the GPU image's 2.11): each chunk's
    logits are recomputed in the backward pass instead of kept, so one chunk's exist at a time.
    x in the head's dtype, weight the fp32 parameter."""
    chunks = zip(x.split(LOSS_CHUNK), targets.split(LOSS_CHUNK), strict=True)
    return torch.cat([checkpoint(_head_loss, xc, weight, tc, use_reentrant=False) for xc, tc in chunks])


def check_targets(targets: torch.Tensor, shape: tuple[int, int], vocab_size: int, name: str = "targets") -> None:
    """Targets (or labels) for ids of `shape`: int64 ids in [0, vocab_size) or IGNORE_INDEX, at
    least one kept. One host sync."""
    if not isinstance(targets, torch.Tensor) or targets.dtype != torch.long or tuple(targets.shape) != tuple(shape):
        got = f"{targets.dtype} {tuple(targets.shape)}" if isinstance(targets, torch.Tensor) else type(targets).__name__
        raise ValueError(f"{name} must be an int64 tensor of shape {tuple(shape)}, got {got}")
    kept = targets != IGNORE_INDEX
    lo, hi = torch.aminmax(torch.where(kept, targets, 0))
    lo, hi, n_kept = torch.stack([lo, hi, kept.sum()]).tolist()  # one host sync for all three
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"{name} contains token id {lo if lo < 0 else hi}, outside [0, vocab_size="
                         f"{vocab_size}) (use {IGNORE_INDEX} to leave a position out)")
    if not n_kept:
        raise ValueError(f"{name} leave every position out ({IGNORE_INDEX})")


def token_correlation(x: torch.Tensor) -> torch.Tensor:
    """The mean cosine similarity between the states of distinct positions of each sequence in
    x (B, T, D), T > 1, averaged over sequences: from the sum of unit vectors, whose squared norm
    is T plus every ordered pair's cosine, in O(B T D)."""
    T = x.shape[1]
    unit = F.normalize(x.detach().float(), dim=-1)
    return ((unit.sum(1).square().sum(-1) - unit.square().sum((1, 2))) / (T * (T - 1))).mean()


@dataclass
class MythosOutput:
    logits: torch.Tensor | None  # (B, T, vocab); None when `targets` asked for the loss instead
    aux_loss: torch.Tensor  # MoE balance loss (0 unless cfg.balance_loss_weight > 0)
    ponder_loss: torch.Tensor  # ACT ponder cost N + R, mean over positions
    loops: torch.Tensor  # (B, T) loops run per position
    expert_load: torch.Tensor  # (E,) tokens routed to each expert, summed over loops
    state_norm: torch.Tensor  # mean L2 norm of the recurrent output state
    loss: torch.Tensor | None = None  # mean cross-entropy against `targets`, when given
    # mean cosine similarity between the recurrent output states of a sequence's distinct
    # positions (Parcae's collapse telemetry: near 1, the positions carry one state); computed on
    # whole sequences (no cache, two positions or more), else None
    token_corr: torch.Tensor | None = None


class OpenMythos(nn.Module):
    def __init__(self, cfg: MythosConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.prelude = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.prelude_layers))
        self.recurrent = RecurrentBlock(cfg)
        self.coda = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.coda_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.compiled_decode: Callable | None = None  # set by compile_decode()
        if self.embed.weight.device.type != "meta":
            self.init_weights()

    def init_weights(self, std: float = 0.02) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        for m in self.modules():  # modules with their own init override the generic one
            if m is not self and hasattr(m, "init_weights"):
                m.init_weights()

    @property
    def moe(self) -> MoE:
        return self.recurrent.block.ffn

    def new_cache(self, batch_size: int, max_len: int | None = None,
                  n_loops: int | None = None, packed: bool = False) -> KVCache:
        p = self.embed.weight
        return KVCache(self.cfg, batch_size, self.cfg.max_seq_len if max_len is None else max_len, n_loops,
                       dtype=p.dtype, device=p.device, packed=packed)

    def readout(self, h: torch.Tensor) -> torch.Tensor:
        """Logits read directly from a looped state (the coda skipped): the KL exit's probe. A
        state of another floating dtype (fp32 states of a bf16 model, say) is read in the model's."""
        if not (isinstance(h, torch.Tensor) and h.is_floating_point() and h.shape[-1:] == (self.cfg.dim,)):
            got = f"{tuple(h.shape)} {h.dtype}" if isinstance(h, torch.Tensor) else type(h).__name__
            raise ValueError(f"readout takes looped states (..., dim={self.cfg.dim}) of a floating "
                             f"dtype, got {got}")
        return self.norm(h.to(self.embed.weight.dtype)) @ self.embed.weight.T

    def with_exit(self, **fields: Any) -> OpenMythos:
        """The same weights under another exit rule, e.g. the KL exit (which reads the trained
        head) on a model trained without halting. ACT needs its halting unit trained, so only a
        model trained with it switches to it. A new plain model with the weights copied, on this
        one's device, in its embedding's dtype and its train/eval mode; compilation, activation
        checkpointing and frozen parameters are not carried over (and a sharded model must be
        gathered first)."""
        other = sorted(set(fields) - set(EXIT_FIELDS))
        if other:
            raise ValueError(f"with_exit changes only {EXIT_FIELDS}, got {other}")
        halting = fields.get("halting", self.cfg.halting)
        if halting == "act" and self.cfg.halting != "act":
            raise ValueError(f"halting='act' needs a halting unit trained with it; this model was trained with "
                             f"halting={self.cfg.halting!r} (its unit is untrained: every token would run "
                             f"max_loop_iters): use halting='kl'")
        for name, rule in (("act_threshold", "act"), ("kl_threshold", "kl"), ("min_loops", "kl")):
            if name in fields and halting != rule:
                raise ValueError(f"{name} applies to halting={rule!r}, but the rule is halting={halting!r} "
                                 f"(set halting={rule!r} too)")
        p = self.embed.weight
        with torch.device("meta"):  # no init: it would draw from the global RNG and fill memory once more
            model = OpenMythos(self.cfg.replace(**fields))
        model = model.to(dtype=p.dtype).to_empty(device=p.device)
        model.load_state_dict(self.state_dict())
        return model.train(self.training)

    def enable_activation_checkpointing(self, enabled: bool = True) -> OpenMythos:
        """Recompute each loop iteration in the backward pass instead of keeping its activations:
        training memory then holds one loop's activations plus each loop's input state, so it
        grows by about a state per loop instead of a whole block's activations per loop.
        The prelude and coda are not checkpointed. Returns self."""
        self.recurrent.checkpoint_loops = enabled
        return self

    def compile_blocks(self, **compile_kwargs) -> OpenMythos:
        """Opt-in torch.compile: every prelude/coda block, and the loop body (norm, block,
        injection, LoRA) as one graph shared by all loops. The loop itself, halting and the
        cache bookkeeping stay in Python, so depth and early exits never cause a recompile.
        Returns self; the outputs match the eager model's (tests/test_perf_features.py)."""
        for layer in [*self.prelude, *self.coda]:
            layer.compile(**compile_kwargs)
        self.recurrent.compiled_step = torch.compile(self.recurrent._step, **compile_kwargs)
        return self

    def compile_decode(self, **compile_kwargs) -> OpenMythos:
        """Opt-in torch.compile of the whole decode step as one graph (gpt-fast style): every
        forward call with a cache, one token per row, an int depth and no gradients runs it, so
        the ~150 operator dispatches per loop become a few fused kernels. Needs halting="none":
        ACT and the KL exit decide on the host whether to run the next loop. Each depth and
        shape compiles on first use (after a second shape, torch makes the shape dynamic); the
        prompt's prefill stays eager. On the CPU, inductor emits a C++ wrapper (cpp_wrapper)
        unless `options` or `mode` say otherwise. Returns self; tokens match the eager model's
        (tests/test_perf_features.py)."""
        if self.cfg.halting != "none":
            raise ValueError(f"compile_decode needs halting='none' (a fixed depth per call), "
                             f"got halting={self.cfg.halting!r}")
        cpu_inductor = (self.embed.weight.device.type == "cpu" and "mode" not in compile_kwargs
                        and compile_kwargs.get("backend", "inductor") == "inductor")
        if cpu_inductor:  # C++ instead of Python between the kernels: less host time per step
            compile_kwargs["options"] = {"cpp_wrapper": True, **compile_kwargs.get("options", {})}
        self.compiled_decode = torch.compile(self._decode, **compile_kwargs)
        return self

    def update_router_bias(self, expert_load: torch.Tensor) -> None:
        self.moe.update_bias(expert_load)

    @torch.no_grad()
    def loop_states(self, input_ids: torch.Tensor, n_loops: int | None = None) -> torch.Tensor:
        """(n_loops, B, T, D): the looped state after each loop, with every loop run for every
        token (halting off) in eval mode, for a logit lens (`readout(states[t])`: loop t's logits read before
        the coda) or the recurrence's convergence (`(states[1:] - states[:-1]).norm(dim=-1)`).
        For the call, the looped block runs halting off and eager: not while another thread
        runs the model."""
        B, T = self._check_inputs(input_ids, None, None)[:2]
        depth = self.check_loops(n_loops, B, None)
        if not is_int(depth):
            raise ValueError("loop_states runs one depth for every sequence: n_loops must be an int")
        states = []  # the injection's output is the state after each loop
        recurrent = self.recurrent
        hook = recurrent.injection.register_forward_hook(lambda _m, _args, h: states.append(h))
        # for this call, every loop for every token, on the eager step: a graph compiled before
        # the hook existed would not call it (and a copy of the model without halting would cost
        # its memory again)
        saved = recurrent.cfg, recurrent.compiled_step
        recurrent.cfg, recurrent.compiled_step = recurrent.cfg.replace(halting="none"), None
        try:
            with eval_mode(self):  # no dropout: the states a generation reads
                self(input_ids, n_loops=depth, logits_to_keep=1)
        finally:
            hook.remove()
            recurrent.cfg, recurrent.compiled_step = saved
        return torch.stack(states).view(depth, B, T, -1)

    @torch.no_grad()
    def spectral_radius(self) -> float:
        """rho(A) of the injection: the largest |A_i|, < 1 for the LTI injection."""
        return float(self.recurrent.injection.decay(self.embed.weight.dtype).abs().max())

    def forward(self, input_ids: torch.Tensor, n_loops: int | torch.Tensor | None = None,
                cache: KVCache | None = None, attention_mask: torch.Tensor | None = None,
                backprop_loops: int | None = None, targets: torch.Tensor | None = None,
                head_dtype: torch.dtype | None = None, logits_to_keep: int = 0) -> MythosOutput:
        """input_ids (B, T) int64. attention_mask (B, T): 1 for tokens, 0 for (left) padding.
        n_loops: an int (default cfg.max_loop_iters, may exceed it) or a (B,) tensor of depths.
        backprop_loops: only the last k loops get gradients (truncated backprop through depth).
        targets (B, T) int64: return the mean cross-entropy as `loss` and no logits, computed in
        chunks of rows so that the (B*T, vocab) logits never exist (torch's chunked
        linear_cross_entropy: with a bf16 head 2.5x faster than fp32 logits + cross_entropy on
        an AMX CPU core, benchmarks/head_loss.py; and the memory of a vocab-wide head, 100k
        entries in the large presets, stays one chunk's).
        head_dtype: the output head's matmuls in this dtype (e.g. bf16 on a CPU with bf16
        matrix units, where the vocab-wide head is the largest matmul of a step).
        logits_to_keep: the head runs on the last k positions only (0: every position), as in
        transformers; a prefill that samples the next token needs 1."""
        B, T, packed = self._check_inputs(input_ids, cache, attention_mask)
        if not is_int(logits_to_keep) or logits_to_keep < 0:
            raise ValueError(f"logits_to_keep must be a non-negative integer (0 keeps every position), "
                             f"got {logits_to_keep!r}")
        if targets is not None:
            if logits_to_keep:
                raise ValueError(f"logits_to_keep={logits_to_keep} with targets: the loss covers every position")
            check_targets(targets, (B, T), self.cfg.vocab_size)
        n_loops = self.check_loops(n_loops, B, cache)
        if head_dtype is not None and not (isinstance(head_dtype, torch.dtype) and head_dtype.is_floating_point):
            raise ValueError(f"head_dtype must be a floating-point torch.dtype, got {head_dtype!r}")
        if backprop_loops is not None and (not is_int(backprop_loops) or backprop_loops < 1):
            raise ValueError(f"backprop_loops must be a positive integer or None, got {backprop_loops!r}")
        if (self.compiled_decode is not None and cache is not None and T == 1 and attention_mask is None
                and isinstance(n_loops, int) and targets is None and not torch.is_grad_enabled()):
            return self.compiled_decode(input_ids, n_loops, cache, head_dtype)
        ctx = self._context(input_ids, cache, attention_mask, packed)
        return self._forward(input_ids, ctx, n_loops, cache, backprop_loops, targets, head_dtype,
                             logits_to_keep)

    def _decode(self, input_ids: torch.Tensor, n_loops: int, cache: KVCache,
                head_dtype: torch.dtype | None) -> MythosOutput:
        """One new token per row, attending over the cache's whole preallocated length through
        its `valid` mask: every shape is fixed and nothing reads a value back to the host, so
        torch.compile traces the whole step (prelude, every loop, coda, head) as one graph
        (compile_decode). Rows may hold different lengths (each writes at its own column)."""
        B = input_ids.shape[0]
        cols = cache.lengths.clone()
        cache.valid[torch.arange(B, device=cols.device), cols] = True
        cos, sin = self._rope(cache.next_pos.unsqueeze(1))
        cache.next_pos += 1
        # start = max_len - 1: the slots hand back their whole buffer, masked by `valid`
        ctx = Context(B, 1, start=cache.max_len - 1, cos=cos, sin=sin, mask=cache.valid.view(B, 1, 1, -1),
                      is_causal=False, dropout=0.0, cols=cols)
        return self._forward(input_ids, ctx, n_loops, cache, None, None, head_dtype)

    def _forward(self, input_ids: torch.Tensor, ctx: Context, n_loops: int | torch.Tensor,
                 cache: KVCache | None, backprop_loops: int | None, targets: torch.Tensor | None,
                 head_dtype: torch.dtype | None, logits_to_keep: int = 0) -> MythosOutput:
        B, T = input_ids.shape
        x, rows = self.embed(input_ids), ctx.tokens  # rows: a packed call's real tokens
        if rows is not None:
            x = x.flatten(0, 1)[rows]
        for i, layer in enumerate(self.prelude):
            x = layer(x, ctx, cache.prelude[i] if cache else None, rows)
        if rows is not None:  # the recurrence takes the (B, T) grid and runs on ctx.tokens
            x = x.new_zeros(B * T, x.shape[-1]).index_copy(0, rows, x).view(B, T, -1)
        x, loops, ponder = self.recurrent(x, x, ctx, n_loops, cache.loop_slots if cache else None,
                                          backprop_loops, self.readout)
        if rows is not None:
            x = x.flatten(0, 1)[rows]
        state_norm = x.detach().float().norm(dim=-1).mean()
        corr = token_correlation(x) if cache is None and rows is None and T > 1 else None
        for i, layer in enumerate(self.coda):
            x = layer(x, ctx, cache.coda[i] if cache else None, rows)
        if rows is not None:  # padding positions read a zero state
            x = x.new_zeros(B * T, x.shape[-1]).index_copy(0, rows, x).view(B, T, -1)
            cache.lengths.index_add_(0, rows // T, torch.ones_like(rows))
        elif cache is not None:
            cache.lengths += T
        x, logits, loss = self.norm(x[:, -logits_to_keep:] if logits_to_keep else x), None, None
        if targets is not None:
            loss = self._loss(x, targets, head_dtype)
        elif head_dtype is not None:
            logits = x.to(head_dtype) @ self.embed.weight.to(head_dtype).T
        else:
            logits = x @ self.embed.weight.T
        return MythosOutput(logits, torch.stack(ctx.aux_losses).sum(), ponder, loops,
                            torch.stack(ctx.expert_loads).sum(0), state_norm, loss, corr)

    def _loss(self, x: torch.Tensor, targets: torch.Tensor, head_dtype: torch.dtype | None):
        """The mean cross-entropy of targets checked by check_targets."""
        # the head runs in head_dtype, else in the weight's dtype, whatever an outer autocast says
        dtype = head_dtype or self.embed.weight.dtype
        x = x.to(dtype)
        # 256-row chunks were the fastest on a CPU core. acc_dtype named: with a policy named,
        # torch resolves it to the input dtype, running the shift, exp-sum and log (and
        # "balanced"'s sums over chunks) in bf16 or fp16: the loss ~4e-4 off, NaN in fp16 once a
        # flat distribution's exp-sum passes 65504. Per-token losses, averaged in fp32: the op
        # returns its input's dtype, and one bf16 scalar would round the loss by ~0.4 %
        with torch.autocast(x.device.type, enabled=False):
            if hasattr(F, "linear_cross_entropy"):
                chunks = nn.LinearCrossEntropyOptions(batch_chunk_size=LOSS_CHUNK, acc_policy="balanced",
                                                      acc_dtype=compute_dtype(dtype))
                losses = F.linear_cross_entropy(x.flatten(0, 1), self.embed.weight.to(dtype), targets.flatten(),
                                                reduction="none", ignore_index=IGNORE_INDEX, options=chunks)
            else:
                losses = _chunked_cross_entropy(x.flatten(0, 1), self.embed.weight, targets.flatten())
        losses = losses.to(compute_dtype(losses.dtype))
        return losses.sum() / (targets != IGNORE_INDEX).sum()  # the mean over the positions kept

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rope_dim = self.cfg.head_dim if self.cfg.attn_type == "gqa" else self.cfg.qk_rope_head_dim
        return rope_angles(positions, rope_dim, self.cfg.rope_theta, compute_dtype(self.embed.weight.dtype))

    def _context(self, input_ids: torch.Tensor, cache: KVCache | None,
                 attention_mask: torch.Tensor | None, packed: bool) -> Context:
        B, T = input_ids.shape
        device = input_ids.device
        new_valid = (torch.ones(B, T, dtype=torch.bool, device=device) if attention_mask is None
                     else attention_mask.to(device=device, dtype=torch.bool))
        base = cache.next_pos if cache else torch.zeros(B, dtype=torch.long, device=device)
        positions = base.unsqueeze(1) + (new_valid.long().cumsum(1) - 1).clamp(min=0)
        if packed:
            return self._packed_context(cache, new_valid, positions)
        start, cols = 0, None
        if cache is not None:
            shortest, start = cache.lengths.aminmax()
            start = int(start)
            if int(shortest) != start:  # ragged rows (the serving engine): one token each
                cols = cache.lengths.clone()
        padded = attention_mask is not None and not bool(new_valid.all())
        if cache is not None:
            if cols is None:
                cache.valid[:, start:start + T] = new_valid
            else:
                cache.valid[torch.arange(B, device=device), cols] = new_valid[:, 0]
            cache.next_pos += new_valid.sum(1)
            cache.has_padding |= padded
            padded = cache.has_padding
            valid = cache.valid[:, :start + T]
        else:
            valid = new_valid
        S = start + T
        mask, is_causal = None, start == 0 and T > 1
        if cols is not None:  # each row sees its own written columns and its new token
            mask, is_causal = valid.unsqueeze(1).unsqueeze(1), False
        elif padded or (start > 0 and T > 1):
            q_idx = torch.arange(start, S, device=device).unsqueeze(1)
            k_idx = torch.arange(S, device=device).unsqueeze(0)
            # a padding query may see only itself: a row with no visible key would give NaN
            mask = (k_idx <= q_idx) & (valid.unsqueeze(1) | (k_idx == q_idx))
            mask, is_causal = mask.unsqueeze(1), False
        cos, sin = self._rope(positions)
        return Context(B, T, start=start, cos=cos, sin=sin, mask=mask, is_causal=is_causal,
                       dropout=self.cfg.dropout, cols=cols)

    @staticmethod
    def _packs(cache: KVCache | None, T: int, attention_mask: torch.Tensor | None) -> bool:
        """Whether the call runs packed: several new tokens per row, into ragged rows or with
        left padding into a packed cache."""
        if cache is None or T == 1:
            return False
        ragged = int(cache.lengths.min()) != cache.length
        return ragged or (cache.packed and attention_mask is not None and not bool(attention_mask.all()))

    def _packed_context(self, cache: KVCache, new_valid: torch.Tensor,
                        positions: torch.Tensor) -> Context:
        """A call that writes only its real tokens, each row after its own written columns: row
        b's n_b tokens, left-padded to T, go to columns lengths[b] .. lengths[b] + n_b - 1. The
        layers run on the real tokens alone (ctx.tokens), as compacted rows, so a step can decode
        one token for some rows and prefill a chunk of prompt for others."""
        B, T = new_valid.shape
        rising = (new_valid[:, 1:] < new_valid[:, :-1]).any(1)
        if bool(rising.any()):
            raise ValueError(f"attention_mask must be left padding (0s, then 1s, in every row) when rows hold "
                             f"different lengths or the cache is packed; row {int(rising.nonzero()[0])} is not")
        n = new_valid.sum(1)
        if not bool(n.any()):
            raise ValueError("attention_mask marks no real token: a packed call needs at least one")
        longest = int((cache.lengths + n).max())
        if longest > cache.max_len:
            raise ValueError(f"cache overflow: a row would hold {longest} tokens > cache "
                             f"max_len={cache.max_len}")
        cols = cache.lengths - (T - n)  # the column of grid position 0 (padding writes nothing)
        tokens = new_valid.flatten().nonzero().squeeze(1)
        b, t = tokens // T, tokens % T
        cache.valid[b, cols[b] + t] = True
        cache.next_pos += n
        start = int(cols.max())  # start + T = the longest row's new length
        q_col = cols.unsqueeze(1) + torch.arange(T, device=cols.device)
        k_idx = torch.arange(start + T, device=cols.device)
        mask = (k_idx <= q_col.unsqueeze(-1)) & cache.valid[:, None, :start + T]  # (B, T, S)
        mask |= ~new_valid.unsqueeze(-1) & (k_idx == 0)  # padding sees a key: no NaN in its row
        cos, sin = self._rope(positions)
        return Context(B, T, start=start, cos=cos, sin=sin, mask=mask.unsqueeze(1), is_causal=False,
                       dropout=self.cfg.dropout, cols=cols, tokens=tokens,
                       packed=PackedRows.build(n.tolist(), T, cols.device))

    def _check_inputs(self, input_ids, cache, attention_mask) -> tuple[int, int, bool]:
        """Returns B, T and whether the call runs packed."""
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"input_ids must hold int64 (or int32) token ids, got dtype {input_ids.dtype}")
        if attention_mask is not None and not isinstance(attention_mask, torch.Tensor):
            raise TypeError(f"attention_mask must be a torch.Tensor, got {type(attention_mask).__name__}")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (batch, seq_len), got {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        if B == 0 or T == 0:
            raise ValueError(f"input_ids must be non-empty, got shape {tuple(input_ids.shape)}")
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= self.cfg.vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"input_ids contains token id {bad}, outside [0, vocab_size={self.cfg.vocab_size})")
        if attention_mask is not None and tuple(attention_mask.shape) != (B, T):
            raise ValueError(f"attention_mask must have shape {(B, T)} like the new input_ids, "
                             f"got {tuple(attention_mask.shape)}")
        if (attention_mask is not None and attention_mask.dtype != torch.bool
                and not bool(((attention_mask == 0) | (attention_mask == 1)).all())):
            # an additive mask (0 keep, -inf drop) would otherwise be read inverted, silently
            bad = attention_mask[(attention_mask != 0) & (attention_mask != 1)].flatten()[0].item()
            raise ValueError(f"attention_mask must hold 1 for a token and 0 for padding, got a value {bad!r}")
        if cache is None and attention_mask is not None and not bool(attention_mask.any()):
            # e.g. an additive mask's "keep everything", read as all padding: every token would see
            # only itself (with a cache, a chunk of a left-padded prompt may be padding alone)
            raise ValueError("attention_mask marks no real token: it must hold 1 for a token and 0 for padding")
        if cache is not None:
            if cache.batch_size != B:
                raise ValueError(f"cache was built for batch_size={cache.batch_size}, input_ids has batch {B}")
            p = self.embed.weight
            want = KVCache.layout_of(self.cfg, p.dtype, p.device)
            if cache.layout != want:
                field = next(k for k in want if cache.layout.get(k) != want[k])
                raise ValueError(f"cache was built for another model: its {field} is {cache.layout.get(field)!r}, "
                                 f"this model's {want[field]!r} (build it with model.new_cache)")
        if self._packs(cache, T, attention_mask):
            return B, T, True  # each row's own length is checked by _packed_context
        start = cache.length if cache is not None else 0
        if start + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {start + T} (cached {start} + new {T}) exceeds "
                             f"max_seq_len={self.cfg.max_seq_len}")
        if cache is not None and start + T > cache.max_len:
            raise ValueError(f"cache overflow: {start} cached + {T} new tokens > cache max_len={cache.max_len}")
        return B, T, False

    def check_loops(self, n_loops, B: int, cache: KVCache | None = None) -> int | torch.Tensor:
        """n_loops for a batch of B: None (the default depth), a positive integer, or a (B,)
        integer tensor of positive depths; returned as a Python int or the tensor."""
        if n_loops is None:
            n_loops = self.cfg.max_loop_iters
        if isinstance(n_loops, torch.Tensor):
            if n_loops.dtype not in (torch.int64, torch.int32) or n_loops.shape != (B,) or int(n_loops.min()) < 1:
                raise ValueError(f"n_loops as a tensor must be ({B},) positive integers, got {n_loops!r}")
            deepest = int(n_loops.max())
        elif is_int(n_loops) and n_loops >= 1:  # numpy integers too
            n_loops = deepest = int(n_loops)
        else:
            raise ValueError(f"n_loops must be a positive integer, got {n_loops!r}")
        if cache is not None and deepest > cache.n_loops:
            raise ValueError(f"n_loops={deepest} exceeds the cache's n_loops={cache.n_loops} slots")
        return n_loops

    # model.generate(input_ids, max_new_tokens, n_loops=..., temperature=..., ...): the functions
    # of openmythos.generation, as methods
    generate = generate
    stream = stream
    speculative_generate = speculative_generate
    speculative_stream = speculative_stream
