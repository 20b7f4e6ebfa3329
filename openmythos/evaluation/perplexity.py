"""Validation loss (nats/token), bits per byte, and loss as a function of test-time depth.

Bits per byte divides out the tokenizer: nats/token / ln 2 / (UTF-8 bytes per token), so runs
with different vocabularies (a local BPE, GPT-2's, raw bytes) compare on one scale.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from openmythos.data import PackedTokens
from openmythos.generation import eval_mode
from openmythos.model import OpenMythos


def bits_per_byte(loss_nats: float, bytes_per_token: float) -> float:
    """nats/token -> bits/byte. Callers pass the split's mean bytes per token, also for a subset
    of its windows (max_tokens), whose own mean differs slightly (a few tenths of a percent)."""
    return loss_nats / math.log(2) / bytes_per_token


def perplexity(loss_nats: float) -> float:
    # exp overflows a float past ~709.78 nats: a diverged run reports a huge finite perplexity
    return math.exp(min(loss_nats, 700))


def autocast(device_type: str, dtype: torch.dtype | None) -> AbstractContextManager:
    """Mixed precision for the forward pass, or nothing for dtype None (fp32)."""
    return nullcontext() if dtype is None else torch.autocast(device_type, dtype=dtype)


def eval_batches(tokens: PackedTokens, seq_len: int, batch_size: int, max_tokens: int = 0,
                 rank: int = 0, world_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(x, y) batches that score every target of the split once or, with max_tokens, about
    max_tokens targets in windows spread evenly over it: a cheaper subset that still samples
    every part of a split whose documents differ (a prefix would see only the first few)."""
    if not isinstance(tokens, PackedTokens):
        raise TypeError(f"tokens must be a PackedTokens (openmythos.data), got {type(tokens).__name__}")
    if len(tokens) < 2:
        raise ValueError(f"a split of {len(tokens)} token(s) holds no target to score")
    n_windows = (len(tokens) - 1) // seq_len
    if not max_tokens or n_windows * seq_len <= max_tokens:
        yield from tokens.iter_eval_batches(batch_size, seq_len, rank=rank, world_size=world_size)
        return
    picked = np.linspace(0, n_windows - 1, max(1, max_tokens // seq_len)).round().astype(np.int64)
    starts = (picked * seq_len)[rank::world_size]
    for i in range(0, len(starts), batch_size):
        yield tokens.windows(starts[i:i + batch_size], seq_len)


def scored_targets(tokens: PackedTokens, seq_len: int, max_tokens: int = 0) -> int:
    """How many targets evaluate_loss scores: whole windows, so with max_tokens a multiple of
    the window (at least one), and every target once the windows cover no more than that."""
    seq_len = min(seq_len, len(tokens) - 1)
    return sum(y.numel() for _, y in eval_batches(tokens, seq_len, 64, max_tokens))


@torch.no_grad()
def evaluate(model: OpenMythos, tokens: PackedTokens, seq_len: int, batch_size: int,
             n_loops: int | None = None, max_tokens: int = 0, autocast_dtype: torch.dtype | None = None,
             rank: int = 0, world_size: int = 1) -> tuple[float, float]:
    """Mean next-token cross-entropy in nats, and the mean loops run per token (fewer than
    n_loops where halting stops tokens early), over consecutive windows that score every target
    once. Ranks score disjoint windows; under torch.distributed the sums are all-reduced."""
    seq_len = min(seq_len, len(tokens) - 1)  # a validation file shorter than one window
    device = model.embed.weight.device
    total = torch.zeros(3, dtype=torch.float64, device=device)  # summed loss, target count, loops
    with eval_mode(model):
        for x, y in eval_batches(tokens, seq_len, batch_size, max_tokens, rank, world_size):
            x, y = x.to(device), y.to(device)
            with autocast(device.type, autocast_dtype):
                out = model(x, n_loops=n_loops)
            total[0] += F.cross_entropy(out.logits.float().flatten(0, 1), y.flatten(), reduction="sum")
            total[1] += y.numel()
            total[2] += out.loops.sum()
    if world_size > 1:
        dist.all_reduce(total)
    return float(total[0] / total[1]), float(total[2] / total[1])


def evaluate_loss(model: OpenMythos, tokens: PackedTokens, seq_len: int, batch_size: int,
                  **kwargs) -> float:
    """The mean loss of `evaluate` (kwargs: its own)."""
    return evaluate(model, tokens, seq_len, batch_size, **kwargs)[0]


def loss_per_depth(model: OpenMythos, tokens: PackedTokens, depths: Sequence[int],
                   **kwargs) -> dict[int, float]:
    """Validation loss at each test-time depth n_loops; kwargs go to `evaluate_loss`."""
    return {n: evaluate_loss(model, tokens, n_loops=n, **kwargs) for n in depths}


def depth_table(losses: dict[int, float], bytes_per_token: float | None = None,
                loops: dict[int, float] | None = None) -> str:
    """A plain-text table: n_loops, loss (nats/token), perplexity and, given bytes/token, bpb;
    given the loops run per token at each depth, those too."""
    header = f"{'n_loops':>7}  {'loss':>7}  {'ppl':>9}" + ("  bits/byte" if bytes_per_token else "")
    lines = [header + ("  loops run" if loops else "")]
    for n, loss in losses.items():
        row = f"{n:>7}  {loss:>7.4f}  {perplexity(loss):>9.2f}"
        if bytes_per_token:
            row += f"  {bits_per_byte(loss, bytes_per_token):>9.4f}"
        if loops:
            row += f"  {loops[n]:>9.2f}"
        lines.append(row)
    return "\n".join(lines)
