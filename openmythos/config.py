"""MythosConfig: one serialisable dataclass for every OpenMythos model, plus named presets and
analytic counts (parameters, active parameters, FLOPs per token, KV-cache bytes per token).

Field names and defaults match the earlier public OpenMythos package (open-mythos 0.5.0), so its
configs load unchanged and build a model with the same parameter count. New behaviour lives in
new fields whose defaults are documented next to them.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch

ATTN_TYPES = ("mla", "gqa")
ROUTER_SCORES = ("softmax", "sigmoid")
INJECTIONS = ("lti", "free", "additive")
DISCRETISATIONS = ("euler", "zoh")
HALTINGS = ("act", "kl", "none")
KV_CACHE_POLICIES = ("per_loop", "ring")


# MythosConfig fields added after the first saved configs (HF exports): a field added later goes
# here, with a default that gives the model the older saves describe
ADDED_SINCE_FIRST_SAVE = frozenset({"kv_cache_policy", "kv_cache_ring"})


@dataclass
class MythosConfig:
    # vocabulary and widths
    vocab_size: int = 32000
    dim: int = 2048
    max_seq_len: int = 4096
    max_output_tokens: int = 4096  # kept so that open-mythos configs load; nothing reads it
    dropout: float = 0.0
    norm_eps: float = 1e-6
    # attention
    attn_type: str = "mla"
    n_heads: int = 16
    n_kv_heads: int = 4  # GQA only
    kv_lora_rank: int = 512  # MLA: the cached latent
    q_lora_rank: int = 1536  # MLA: 0 projects queries directly, without a latent (the earlier
    # package builds zero-width latent layers for 0 instead, so its parameter count differs there)
    qk_rope_head_dim: int = 64
    qk_nope_head_dim: int = 128
    v_head_dim: int = 128
    rope_theta: float = 500000.0
    # dense blocks
    prelude_layers: int = 2
    coda_layers: int = 2
    # moe (the looped block's FFN)
    n_experts: int = 64
    n_shared_experts: int = 2
    n_experts_per_tok: int = 4
    expert_dim: int = 512
    router_score: str = "softmax"
    router_bias_rate: float = 1e-3  # step size of the aux-loss-free balancing bias update
    balance_loss_weight: float = 0.0  # optional Switch-style auxiliary loss, off by default
    # recurrence
    max_loop_iters: int = 16
    injection: str = "lti"  # "lti": A = exp(-dt*exp(log_A)), rho(A) < 1; "free"/"additive" for ablations
    discretisation: str = "euler"  # how B is discretised: "euler" (dt*B) or "zoh" (exact hold)
    lora_rank: int = 16
    loop_embed_fraction: int = 8  # the loop-index embedding covers dim // loop_embed_fraction channels
    # halting
    halting: str = "act"  # "act" (Graves 2016), "kl" (exit on converged predictions) or "none"
    act_threshold: float = 0.99
    kl_threshold: float = 5e-4  # "kl": stop once KL(p_t || p_t-1) of the readout drops below this
    min_loops: int = 1  # "kl": never stop before this many loops
    # inference cache. "per_loop": a KV slot per loop, exact. "ring": kv_cache_ring slots, loop t
    # reads and writes slot t % kv_cache_ring, so the cache stops growing with depth; a new token
    # then sees each earlier token's entry from that token's latest loop in the slot, not from loop
    # t (Huginn's ring buffer). A prompt prefilled in one call is exact under both (the engine
    # takes a prompt whole then; transformers' prefill_chunk_size is refused).
    kv_cache_policy: str = "per_loop"
    kv_cache_ring: int = 2

    def __post_init__(self) -> None:
        positive = (
            "vocab_size", "dim", "max_seq_len", "max_output_tokens", "n_heads", "n_kv_heads",
            "qk_rope_head_dim", "v_head_dim", "n_experts", "n_experts_per_tok", "expert_dim",
            "max_loop_iters", "lora_rank", "loop_embed_fraction", "kv_lora_rank",
        )
        for name in positive:
            _check(_is_field_int(getattr(self, name)) and getattr(self, name) > 0, name,
                   getattr(self, name), "must be a positive integer")
        for name in ("prelude_layers", "coda_layers", "n_shared_experts", "q_lora_rank",
                     "qk_nope_head_dim"):
            _check(_is_field_int(getattr(self, name)) and getattr(self, name) >= 0, name,
                   getattr(self, name), "must be a non-negative integer")
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "float":  # compared below: a string would fail with a bare TypeError
                _check(isinstance(value, (int, float)) and not isinstance(value, bool)
                       and math.isfinite(value), f.name, value, "must be a finite number")
        _choice(self, "attn_type", ATTN_TYPES)
        _choice(self, "router_score", ROUTER_SCORES)
        _choice(self, "injection", INJECTIONS)
        _choice(self, "discretisation", DISCRETISATIONS)
        _choice(self, "halting", HALTINGS)
        _choice(self, "kv_cache_policy", KV_CACHE_POLICIES)
        _check(_is_field_int(self.kv_cache_ring) and self.kv_cache_ring > 0, "kv_cache_ring", self.kv_cache_ring,
               "must be a positive integer")
        _check(self.dim % self.n_heads == 0, "dim", self.dim,
               f"must be divisible by n_heads={self.n_heads}")
        if self.attn_type == "gqa":
            _check(self.n_heads % self.n_kv_heads == 0, "n_kv_heads", self.n_kv_heads,
                   f"must divide n_heads={self.n_heads}")
            _check(self.head_dim % 2 == 0, "dim", self.dim,
                   f"gives an odd head_dim={self.head_dim}; RoPE needs an even one")
        _check(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim", self.qk_rope_head_dim,
               "must be even for RoPE")
        _check(self.n_experts_per_tok <= self.n_experts, "n_experts_per_tok",
               self.n_experts_per_tok, f"must be <= n_experts={self.n_experts}")
        _check(0.0 < self.act_threshold <= 1.0, "act_threshold", self.act_threshold,
               "must lie in (0, 1]")
        _check(self.kl_threshold > 0, "kl_threshold", self.kl_threshold, "must be positive")
        _check(_is_field_int(self.min_loops) and self.min_loops >= 1, "min_loops", self.min_loops,
               "must be a positive integer")
        _check(0.0 <= self.dropout < 1.0, "dropout", self.dropout, "must lie in [0, 1)")
        _check(self.rope_theta > 0, "rope_theta", self.rope_theta, "must be positive")
        _check(self.router_bias_rate >= 0, "router_bias_rate", self.router_bias_rate,
               "must be >= 0")
        _check(self.balance_loss_weight >= 0, "balance_loss_weight", self.balance_loss_weight,
               "must be >= 0")
        _check(self.norm_eps > 0, "norm_eps", self.norm_eps, "must be positive")
        _check(self.loop_embed_dim % 2 == 0, "loop_embed_fraction", self.loop_embed_fraction,
               f"gives an odd loop-embedding width {self.loop_embed_dim} for dim={self.dim}")
        _check(self.loop_embed_dim > 0, "loop_embed_fraction", self.loop_embed_fraction,
               f"leaves no channel for the loop-index embedding at dim={self.dim} (at most {self.dim // 2})")

    # derived sizes
    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_dim(self) -> int:
        return self.dim * 4 // 3

    @property
    def shared_expert_dim(self) -> int:
        return self.expert_dim * self.n_experts_per_tok

    @property
    def loop_embed_dim(self) -> int:
        return self.dim // self.loop_embed_fraction

    def kv_cache_loop_slots(self, n_loops: int) -> int:
        """Cache slots of the looped block for a cache built for n_loops loops."""
        return n_loops if self.kv_cache_policy == "per_loop" else min(self.kv_cache_ring, n_loops)

    # serialisation
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MythosConfig:
        if not isinstance(d, dict):
            raise ValueError(f"MythosConfig.from_dict needs a dict of fields, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            import difflib

            hints = [
                f"{k!r}" + (f" (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(k, known, 1)) else "")
                for k in unknown
            ]
            raise ValueError(f"MythosConfig: unknown field(s) {', '.join(hints)}")
        return cls(**d)

    @classmethod
    def from_saved(cls, saved: dict[str, Any], where: str) -> MythosConfig:
        """The model config in a file a save wrote beside other keys (an HF config.json): a save
        writes every field, so a missing one, which today's default would silently stand in for,
        is refused; except the fields added since the first saves, which take their defaults
        (those give the model the older saves describe)."""
        names = [f.name for f in fields(cls)]
        missing = [name for name in names if name not in saved and name not in ADDED_SINCE_FIRST_SAVE]
        if missing:
            raise ValueError(f"{where} lacks the model field(s) {missing}: a save writes every "
                             "field, so the file was cut or edited")
        return cls(**{name: saved[name] for name in names if name in saved})

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> MythosConfig:
        if not isinstance(name, str):
            raise ValueError(f"preset must be a name, one of {sorted(PRESETS)}; got {name!r}")
        key = name.removeprefix("mythos_")
        if key not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls.from_dict({**PRESETS[key], **overrides})

    def replace(self, **changes: Any) -> MythosConfig:
        return dataclasses.replace(self, **changes)

    # counts
    def attn_params(self) -> int:
        d, h = self.dim, self.n_heads
        if self.attn_type == "gqa":
            kv = self.n_kv_heads * self.head_dim
            return d * d + 2 * d * kv + d * d
        qk = self.qk_nope_head_dim + self.qk_rope_head_dim
        if self.q_lora_rank:
            q = d * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * h * qk
        else:
            q = d * h * qk
        kv = d * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank
        kv += self.kv_lora_rank * h * (self.qk_nope_head_dim + self.v_head_dim)
        return q + kv + h * self.v_head_dim * self.dim

    def _attn_matmul_params(self) -> int:
        """attn_params less MLA's two latent norms' weights, which multiply no matrix."""
        norms = (self.q_lora_rank + self.kv_lora_rank) if self.attn_type == "mla" else 0
        return self.attn_params() - norms

    def _dense_block_params(self) -> int:
        return 2 * self.dim + self.attn_params() + 3 * self.dim * self.ffn_dim

    def _expert_params(self) -> int:
        return 3 * self.dim * self.expert_dim

    def _recurrent_params(self, routed_experts: int) -> int:
        d = self.dim
        moe = d * self.n_experts + routed_experts * self._expert_params()
        moe += self.n_shared_experts * 3 * d * self.shared_expert_dim
        block = 2 * d + self.attn_params() + moe
        injection = {"lti": 2 * d + 1, "free": 2 * d, "additive": d}[self.injection]
        halting = d + 1
        lora = 2 * d * self.lora_rank + self.max_loop_iters * self.lora_rank
        return block + injection + halting + lora + d  # + the pre-block norm

    def num_params(self) -> int:
        """Exact parameter count of `OpenMythos(self)` (the LM head is tied to the embedding)."""
        dense = (self.prelude_layers + self.coda_layers) * self._dense_block_params()
        return self.vocab_size * self.dim + dense + self._recurrent_params(self.n_experts) + self.dim

    def active_params_per_token(self) -> int:
        """Parameters one token touches in one pass: all but the routed experts it is not sent to."""
        return self.num_params() - (self.n_experts - self.n_experts_per_tok) * self._expert_params()

    def flops_per_token(self, n_loops: int | None = None, seq_len: int | None = None,
                        backward: bool = True) -> int:
        """Matmul FLOPs per token (2 per multiply-add), x3 with `backward` for a training step.

        Counts every linear layer a token passes through (the looped block n_loops times) plus the
        LM head and causal attention at `seq_len` (mean context seq_len / 2); embeddings, norms and
        elementwise work are left out, as in the PaLM / nanoGPT convention.
        """
        n_loops = _count("n_loops", self.max_loop_iters if n_loops is None else n_loops)
        seq_len = _count("seq_len", self.max_seq_len if seq_len is None else seq_len)
        d = self.dim
        dense_mm = self._attn_matmul_params() + 3 * d * self.ffn_dim
        loop_mm = (self._attn_matmul_params() + d * self.n_experts
                   + self.n_experts_per_tok * self._expert_params()
                   + self.n_shared_experts * 3 * d * self.shared_expert_dim
                   + 2 * d * self.lora_rank + (d if self.halting == "act" else 0))
        if self.attn_type == "gqa":
            qk, v = self.head_dim, self.head_dim
        else:
            qk, v = self.qk_nope_head_dim + self.qk_rope_head_dim, self.v_head_dim
        attn_per_layer = self.n_heads * (qk + v) * seq_len  # 2 * (S/2) * H * (qk + v)
        layers = self.prelude_layers + self.coda_layers
        fwd = 2 * (layers * dense_mm + n_loops * loop_mm + self.vocab_size * d)
        fwd += (layers + n_loops) * attn_per_layer
        # the KL exit reads the vocabulary at every loop to decide, with no gradient through it
        exit_readout = 2 * n_loops * self.vocab_size * d if self.halting == "kl" else 0
        return fwd * (3 if backward else 1) + exit_readout

    def kv_cache_bytes_per_token(self, n_loops: int | None = None,
                                 dtype: torch.dtype = torch.bfloat16) -> int:
        """Bytes the KV cache holds per token: one entry per dense layer and per loop slot (one
        per loop, or at most kv_cache_ring with the ring policy)."""
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"dtype must be a torch.dtype, got {dtype!r}")
        n_loops = self.kv_cache_loop_slots(_count("n_loops", self.max_loop_iters if n_loops is None else n_loops))
        if self.attn_type == "gqa":
            per_layer = 2 * self.n_kv_heads * self.head_dim
        else:
            per_layer = self.kv_lora_rank + self.qk_rope_head_dim
        layers = self.prelude_layers + self.coda_layers + n_loops
        return layers * per_layer * torch.empty((), dtype=dtype).element_size()


def is_int(value: Any) -> bool:
    """An integer argument (a Python or numpy one), not a bool (which would pass as 0 or 1)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
    """A number argument torch takes as a scalar (a Python or numpy int or float), not a bool."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def check_threads(threads: int, name: str) -> None:
    """A thread count for torch.set_num_threads on this machine: past its cores threads only wait
    on each other, and far past them torch crashes (a segfault) creating them."""
    cores = os.cpu_count() or 1
    if threads > cores:
        raise ValueError(f"{name}={threads} is more than this machine's {cores} cores: use at most "
                         f"{cores}, or 0 for torch's default")


def _is_field_int(value: Any) -> bool:
    """A config field's integer: a Python int, not a bool nor a numpy integer (which JSON
    cannot write)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _count(name: str, value: Any) -> int:
    """An accounting method's loop count or sequence length: a positive integer."""
    if not (is_int(value) and value >= 1):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _check(ok: bool, name: str, value: Any, why: str) -> None:
    if not ok:
        raise ValueError(f"MythosConfig.{name}={value!r} {why}")


def _choice(cfg: MythosConfig, name: str, allowed: tuple[str, ...]) -> None:
    value = getattr(cfg, name)
    _check(value in allowed, name, value, f"is not one of {allowed}")


def _legacy(*, dim, n_heads, n_kv_heads, max_seq_len, loops, layers, kv_lora, q_lora, rope, nope,
            n_experts, n_shared, top_k, expert_dim, lora, theta, vocab=32000,
            max_output_tokens=4096) -> dict[str, Any]:
    """A preset of the earlier package: MLA, as many prelude as coda layers, v_head_dim = nope."""
    return dict(
        vocab_size=vocab, dim=dim, n_heads=n_heads, n_kv_heads=n_kv_heads,
        max_seq_len=max_seq_len, max_loop_iters=loops, prelude_layers=layers,
        coda_layers=layers, attn_type="mla", kv_lora_rank=kv_lora, q_lora_rank=q_lora,
        qk_rope_head_dim=rope, qk_nope_head_dim=nope, v_head_dim=nope, n_experts=n_experts,
        n_shared_experts=n_shared, n_experts_per_tok=top_k, expert_dim=expert_dim,
        act_threshold=0.99, rope_theta=theta, lora_rank=lora, max_output_tokens=max_output_tokens,
    )


PRESETS: dict[str, dict[str, Any]] = {
    # trains on 2 CPU cores in minutes (the quickstart)
    "tiny": dict(
        vocab_size=8192, dim=256, n_heads=4, n_kv_heads=4, max_seq_len=256, max_loop_iters=4,
        prelude_layers=1, coda_layers=1, attn_type="mla", kv_lora_rank=64, q_lora_rank=128,
        qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32, n_experts=8,
        n_shared_experts=1, n_experts_per_tok=2, expert_dim=128, lora_rank=8,
        rope_theta=10000.0, max_output_tokens=256,
    ),
    "small": dict(
        vocab_size=16384, dim=512, n_heads=8, n_kv_heads=8, max_seq_len=1024, max_loop_iters=8,
        prelude_layers=2, coda_layers=2, attn_type="mla", kv_lora_rank=128, q_lora_rank=256,
        qk_rope_head_dim=32, qk_nope_head_dim=32, v_head_dim=64, n_experts=16,
        n_shared_experts=1, n_experts_per_tok=2, expert_dim=256, lora_rank=8,
        rope_theta=10000.0, max_output_tokens=1024,
    ),
    # the earlier package's variants, with its hyperparameters
    "1b": _legacy(dim=2048, n_heads=16, n_kv_heads=4, max_seq_len=4096, loops=16, layers=2,
                  kv_lora=256, q_lora=512, rope=32, nope=64, n_experts=64, n_shared=2, top_k=4,
                  expert_dim=2048, lora=8, theta=500_000.0),
    "3b": _legacy(dim=3072, n_heads=24, n_kv_heads=6, max_seq_len=4096, loops=16, layers=2,
                  kv_lora=384, q_lora=768, rope=32, nope=96, n_experts=64, n_shared=2, top_k=4,
                  expert_dim=4096, lora=8, theta=500_000.0),
    "10b": _legacy(dim=4096, n_heads=32, n_kv_heads=8, max_seq_len=8192, loops=24, layers=2,
                   kv_lora=512, q_lora=1024, rope=64, nope=128, n_experts=128, n_shared=2, top_k=4,
                   expert_dim=5632, lora=16, theta=500_000.0),
    "50b": _legacy(dim=6144, n_heads=48, n_kv_heads=8, max_seq_len=8192, loops=32, layers=3,
                   kv_lora=512, q_lora=1536, rope=64, nope=128, n_experts=256, n_shared=4, top_k=4,
                   expert_dim=9728, lora=32, theta=500_000.0),
    "100b": _legacy(dim=8192, n_heads=64, n_kv_heads=8, max_seq_len=1_000_000, loops=32, layers=4,
                    kv_lora=512, q_lora=2048, rope=64, nope=128, n_experts=256, n_shared=4, top_k=8,
                    expert_dim=13568, lora=64, theta=1_000_000.0, max_output_tokens=131_072),
    "500b": _legacy(dim=12288, n_heads=96, n_kv_heads=16, max_seq_len=1_000_000, loops=48, layers=4,
                    kv_lora=1024, q_lora=3072, rope=64, nope=128, n_experts=512, n_shared=8,
                    top_k=8, expert_dim=23040, lora=128, theta=1_000_000.0, vocab=100_000,
                    max_output_tokens=131_072),
    "1t": _legacy(dim=16384, n_heads=128, n_kv_heads=16, max_seq_len=1_000_000, loops=64, layers=6,
                  kv_lora=1024, q_lora=4096, rope=64, nope=128, n_experts=512, n_shared=8, top_k=8,
                  expert_dim=34560, lora=256, theta=2_000_000.0, vocab=100_000,
                  max_output_tokens=131_072),
}


def preset_names() -> list[str]:
    return list(PRESETS)
