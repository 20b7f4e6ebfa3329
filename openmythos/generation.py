"""Sampling and generation with the KV cache: greedy / temperature / top-k / top-p, per-sequence
EOS, prompts of different lengths in one batch (left-padded), and a streaming variant."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator, Sequence

import torch

# below this, a temperature samples the argmax, its limit: dividing fp32 logits by it would
# overflow them into inf and NaN probabilities
GREEDY_BELOW = 1e-5


def is_greedy(temperature: float) -> bool:
    return temperature < GREEDY_BELOW


def is_int(value) -> bool:
    """An integer (a Python or numpy one), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 means greedy), got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k <= 0):
        raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"top_p must lie in (0, 1], got {top_p!r}")


def sample(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
           top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) -> token ids (B,); greedy below GREEDY_BELOW."""
    check_sampling(temperature, top_k, top_p)
    if is_greedy(temperature):
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:  # top_k past the vocab keeps everything
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token once the mass before it already reaches top_p; the best token always stays
        drop = probs.cumsum(-1) - probs >= top_p
        drop[:, 0] = False  # also for a top_p that rounds to 0 in fp32
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _left_pad(input_ids, attention_mask, pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(input_ids, torch.Tensor):
        return input_ids, attention_mask
    if not input_ids or not all(isinstance(p, Sequence) and len(p) for p in input_ids):
        raise ValueError("input_ids as a list must hold non-empty token-id lists")
    bad = next((t for p in input_ids for t in p if not is_int(t)), None)
    if bad is not None:
        raise ValueError(f"input_ids as a list must hold integer token ids, got {bad!r}")
    width = max(len(p) for p in input_ids)
    ids = torch.full((len(input_ids), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros(len(input_ids), width, dtype=torch.long, device=device)
    for i, p in enumerate(input_ids):
        ids[i, width - len(p):] = torch.as_tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    return ids, mask


@torch.no_grad()
def stream(model, input_ids, max_new_tokens: int, n_loops: int | None = None,
           temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
           eos_token_id: int | None = None, generator: torch.Generator | None = None,
           attention_mask: torch.Tensor | None = None, pad_token_id: int = 0) -> Iterator[torch.Tensor]:
    """Yields the next token of every sequence, (B,), one step at a time.

    input_ids: a (B, T) tensor (with an optional left-padding attention_mask) or a list of
    token-id lists of different lengths. A sequence that produced eos_token_id keeps yielding it.
    """
    check_sampling(temperature, top_k, top_p)
    if not is_int(max_new_tokens) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    vocab = model.cfg.vocab_size
    for name, value in (("pad_token_id", pad_token_id), ("eos_token_id", eos_token_id)):
        if value is not None and not (is_int(value) and 0 <= value < vocab):
            raise ValueError(f"{name} must be a token id in [0, {vocab}), got {value!r}")
    device = model.embed.weight.device
    if attention_mask is not None and not isinstance(input_ids, torch.Tensor):
        raise ValueError("attention_mask goes with a tensor of input_ids: for a list of prompts "
                         "the padding mask is built from their lengths")
    ids, mask = _left_pad(input_ids, attention_mask, pad_token_id, device)
    if ids.dim() != 2:
        raise ValueError(f"input_ids must have shape (batch, seq_len), got {tuple(ids.shape)}")
    if isinstance(mask, torch.Tensor) and mask.shape == ids.shape and bool((mask[:, 1:] < mask[:, :-1]).any()):
        raise ValueError("attention_mask must be left padding (0s, then 1s, in every row): a row's "
                         "next token follows its last position")
    B, T = ids.shape
    total = T + max_new_tokens
    if total > model.cfg.max_seq_len:
        raise ValueError(f"prompt length {T} + max_new_tokens {max_new_tokens} = {total} exceeds "
                         f"max_seq_len={model.cfg.max_seq_len}")
    n_loops = model.check_loops(n_loops, B)
    was_training = model.training
    model.eval()
    try:
        cache = model.new_cache(B, total, n_loops if isinstance(n_loops, int) else int(n_loops.max()))
        logits = model(ids.to(device), n_loops=n_loops, cache=cache, attention_mask=mask,
                       logits_to_keep=1).logits
        done = torch.zeros(B, dtype=torch.bool, device=device)
        for step in range(max_new_tokens):
            token = sample(logits[:, -1], temperature, top_k, top_p, generator)
            if eos_token_id is not None:
                token = token.masked_fill(done, eos_token_id)
                done |= token == eos_token_id
            yield token
            if step + 1 == max_new_tokens or bool(done.all()):
                return
            logits = model(token.unsqueeze(1), n_loops=n_loops, cache=cache).logits
    finally:
        model.train(was_training)


def generate(model, input_ids, max_new_tokens: int, n_loops: int | torch.Tensor | None = None,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             eos_token_id: int | None = None, generator: torch.Generator | None = None,
             attention_mask: torch.Tensor | None = None, pad_token_id: int = 0) -> torch.Tensor:
    """Returns (B, T + new) token ids: the (left-padded) prompt followed by the new tokens. Rows
    that stopped early are filled with eos_token_id; generation ends when every row has stopped.
    The arguments are stream's."""
    new = list(stream(model, input_ids, max_new_tokens, n_loops, temperature, top_k, top_p,
                      eos_token_id, generator, attention_mask, pad_token_id))
    device = model.embed.weight.device
    ids, _ = _left_pad(input_ids, attention_mask, pad_token_id, device)
    return torch.cat([ids.to(device), torch.stack(new, dim=1)], dim=1)
