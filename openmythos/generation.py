"""Sampling and generation with the KV cache: greedy / temperature / top-k / top-p, per-sequence
EOS, prompts of different lengths in one batch (left-padded), a streaming variant, and
self-speculative decoding (a shallow draft verified at full depth)."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from openmythos.config import is_int, is_real


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The model in eval mode for the block, then back in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)

# below this, a temperature samples the argmax, its limit: dividing fp32 logits by it would
# overflow them into inf and NaN probabilities
GREEDY_BELOW = 1e-5


def is_greedy(temperature: float) -> bool:
    return temperature < GREEDY_BELOW


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if not is_real(temperature) or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 means greedy), got {temperature!r}")
    if top_k is not None and (not is_int(top_k) or top_k <= 0):
        raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
    if top_p is not None and not (is_real(top_p) and 0 < top_p <= 1):
        raise ValueError(f"top_p must lie in (0, 1], got {top_p!r}")


def sample(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
           top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) -> token ids (B,); greedy below GREEDY_BELOW."""
    check_sampling(temperature, top_k, top_p)
    if is_greedy(temperature):
        return logits.argmax(-1)
    probs = probabilities(logits, temperature, top_k, top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def probabilities(logits: torch.Tensor, temperature: float, top_k: int | None = None,
                  top_p: float | None = None) -> torch.Tensor:
    """The distribution `sample` draws from (a temperature above GREEDY_BELOW): (B, V) fp32."""
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
    return logits.softmax(-1)


def check_left_padding(mask: torch.Tensor) -> None:
    """A batch of prompts' attention_mask (B, T): 0s then 1s in every row, whose last column is
    its last token, where generation's first new token reads."""
    if bool((mask[:, 1:] < mask[:, :-1]).any()):
        raise ValueError("attention_mask must be left padding (0s, then 1s, in every row): a row's "
                         "next token follows its last position")
    if not bool(mask[:, -1].all()):  # left padding: a row's last column is its last token
        row = int((mask[:, -1] == 0).nonzero()[0])
        raise ValueError(f"attention_mask row {row} marks no real token: every prompt needs one")


def _left_pad(input_ids, attention_mask, pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(input_ids, torch.Tensor):
        return input_ids, attention_mask
    if not isinstance(input_ids, (list, tuple)):
        raise TypeError(f"input_ids must be a (batch, seq_len) tensor or a list of token-id lists, "
                        f"got {type(input_ids).__name__}")
    if not input_ids:
        raise ValueError("input_ids as a list must hold at least one token-id list")
    bad = next((i for i, p in enumerate(input_ids) if not (isinstance(p, Sequence) and len(p))), None)
    if bad is not None:
        raise ValueError(f"input_ids[{bad}] must be a non-empty token-id list, got {input_ids[bad]!r}")
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


def _new_tokens(max_new_tokens) -> int:
    if not is_int(max_new_tokens) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    return int(max_new_tokens)  # a numpy integer too


def _check_token_ids(model, **ids: int | None) -> None:
    vocab = model.cfg.vocab_size
    for name, value in ids.items():
        if value is not None and not (is_int(value) and 0 <= value < vocab):
            raise ValueError(f"{name} must be a token id in [0, {vocab}), got {value!r}")


def _sampled_vocab(model, vocab_size: int | None) -> int:
    """How many ids may be sampled: all the model's, or the first `vocab_size` of a model whose
    vocabulary is padded past its tokenizer's (e.g. GPT-2's 50257 to 50304), whose padding ids
    no tokenizer decodes."""
    if vocab_size is None:
        return model.cfg.vocab_size
    if not (is_int(vocab_size) and 1 <= vocab_size <= model.cfg.vocab_size):
        raise ValueError(f"vocab_size must be an integer in [1, {model.cfg.vocab_size}] (the model's), "
                         f"got {vocab_size!r}")
    return int(vocab_size)


def _total_length(model, prompt_len: int, max_new_tokens: int) -> int:
    total = prompt_len + max_new_tokens
    if total > model.cfg.max_seq_len:
        raise ValueError(f"prompt length {prompt_len} + max_new_tokens {max_new_tokens} = {total} "
                         f"exceeds max_seq_len={model.cfg.max_seq_len}")
    return total


@torch.no_grad()
def stream(model, input_ids, max_new_tokens: int, n_loops: int | torch.Tensor | None = None,
           temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
           eos_token_id: int | None = None, generator: torch.Generator | None = None,
           attention_mask: torch.Tensor | None = None, pad_token_id: int = 0,
           vocab_size: int | None = None) -> Iterator[torch.Tensor]:
    """Yields the next token of every sequence, (B,), one step at a time.

    input_ids: a (B, T) tensor (with an optional left-padding attention_mask) or a list of
    token-id lists of different lengths. A sequence that produced eos_token_id keeps yielding it.
    vocab_size: sample only ids below it (the tokenizer's, for a model with a padded vocabulary).
    """
    check_sampling(temperature, top_k, top_p)
    vocab = _sampled_vocab(model, vocab_size)
    max_new_tokens = _new_tokens(max_new_tokens)
    _check_token_ids(model, pad_token_id=pad_token_id, eos_token_id=eos_token_id)
    device = model.embed.weight.device
    if attention_mask is not None and not isinstance(input_ids, torch.Tensor):
        raise ValueError("attention_mask goes with a tensor of input_ids: for a list of prompts "
                         "the padding mask is built from their lengths")
    ids, mask = _left_pad(input_ids, attention_mask, pad_token_id, device)
    if ids.dim() != 2:
        raise ValueError(f"input_ids must have shape (batch, seq_len), got {tuple(ids.shape)}")
    if isinstance(mask, torch.Tensor) and mask.shape == ids.shape:
        check_left_padding(mask)
    B, T = ids.shape
    total = _total_length(model, T, max_new_tokens)
    n_loops = model.check_loops(n_loops, B)
    with eval_mode(model):
        cache = model.new_cache(B, total, n_loops if isinstance(n_loops, int) else int(n_loops.max()))
        logits = model(ids.to(device), n_loops=n_loops, cache=cache, attention_mask=mask,
                       logits_to_keep=1).logits
        done = torch.zeros(B, dtype=torch.bool, device=device)
        for step in range(max_new_tokens):
            token = sample(logits[:, -1, :vocab], temperature, top_k, top_p, generator)
            if eos_token_id is not None:
                token = token.masked_fill(done, eos_token_id)
                done |= token == eos_token_id
            yield token
            if step + 1 == max_new_tokens or bool(done.all()):
                return
            logits = model(token.unsqueeze(1), n_loops=n_loops, cache=cache).logits


def generate(model, input_ids, max_new_tokens: int, n_loops: int | torch.Tensor | None = None,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             eos_token_id: int | None = None, generator: torch.Generator | None = None,
             attention_mask: torch.Tensor | None = None, pad_token_id: int = 0,
             vocab_size: int | None = None) -> torch.Tensor:
    """Returns (B, T + new) token ids: the (left-padded) prompt followed by the new tokens. Rows
    that stopped early are filled with eos_token_id; generation ends when every row has stopped.
    The arguments are stream's."""
    new = list(stream(model, input_ids, max_new_tokens, n_loops, temperature, top_k, top_p,
                      eos_token_id, generator, attention_mask, pad_token_id, vocab_size))
    device = model.embed.weight.device
    ids, _ = _left_pad(input_ids, attention_mask, pad_token_id, device)
    return torch.cat([ids.to(device), torch.stack(new, dim=1)], dim=1)


@torch.no_grad()
def speculative_stream(model, input_ids, max_new_tokens: int, n_loops: int | None = None,
                       draft_loops: int = 1, draft_tokens: int = 4, temperature: float = 1.0,
                       top_k: int | None = None, top_p: float | None = None,
                       eos_token_id: int | None = None, generator: torch.Generator | None = None,
                       stats: dict | None = None, vocab_size: int | None = None) -> Iterator[int]:
    """Self-speculative decoding (Huginn, Geiping et al. 2025): the model drafts `draft_tokens`
    tokens at `draft_loops` loops, then one call at `n_loops` checks them all, for one sequence.
    The output is the full-depth model's: greedy gives generate's tokens (up to float ties), and
    sampling keeps its distribution exactly (speculative sampling: a draft token x is kept with
    probability min(1, p(x) / q(x)), else the token comes from max(0, p - q), renormalised;
    Leviathan et al. 2023, Chen et al. 2023). It pays where shallow loops often agree with deep
    ones and a loop is a large share of a token's cost. Needs a cache slot per loop (not a ring
    shorter than n_loops). Yields the new tokens one by one; fills `stats` with the tokens
    drafted and accepted and the model calls (the prompt's included). vocab_size: as stream's."""
    check_sampling(temperature, top_k, top_p)
    vocab = _sampled_vocab(model, vocab_size)
    max_new_tokens = _new_tokens(max_new_tokens)
    n_loops = model.check_loops(n_loops, 1)
    if not isinstance(n_loops, int):
        raise ValueError("speculative decoding takes one n_loops for the sequence, not a tensor")
    if not (is_int(draft_loops) and 1 <= draft_loops <= n_loops):
        raise ValueError(f"draft_loops must be an integer in [1, n_loops={n_loops}], got {draft_loops!r}")
    if not (is_int(draft_tokens) and draft_tokens >= 1):
        raise ValueError(f"draft_tokens must be a positive integer, got {draft_tokens!r}")
    if model.cfg.kv_cache_loop_slots(n_loops) < n_loops:
        # a ring's chunked call is not its token-by-token decode (only a prompt is exact), so
        # checking several drafts in one call would not give the full-depth model's tokens
        raise ValueError(f"speculative decoding needs a slot per loop: kv_cache_policy="
                         f"{model.cfg.kv_cache_policy!r} keeps {model.cfg.kv_cache_ring} for "
                         f"n_loops={n_loops}")
    _check_token_ids(model, eos_token_id=eos_token_id)
    device = model.embed.weight.device
    ids, _ = _left_pad(input_ids, None, 0, device)
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise ValueError(f"speculative decoding runs one sequence: input_ids must have shape "
                         f"(1, seq_len), got {tuple(ids.shape)}")
    total = _total_length(model, ids.shape[1], max_new_tokens)
    greedy = is_greedy(temperature)
    stats = {} if stats is None else stats
    stats.update(drafted=0, accepted=0, calls=1)

    def draw(probs: torch.Tensor) -> torch.Tensor:
        return torch.multinomial(probs, 1, generator=generator).view(1)

    with eval_mode(model):
        cache = model.new_cache(1, total, n_loops)
        logits = model(ids.to(device), n_loops=n_loops, cache=cache, logits_to_keep=1).logits[:, -1, :vocab]
        token, produced = sample(logits, temperature, top_k, top_p, generator), 0
        while True:
            # `token` is decided: by the prompt, a rejection or the last verified position
            yield int(token)
            produced += 1
            if int(token) == eos_token_id or produced == max_new_tokens:
                return
            k = min(draft_tokens, max_new_tokens - produced)
            drafts, q = [], []  # the draft tokens and, when sampling, their distributions
            for _ in range(k):  # each from the one before, at draft depth
                last = drafts[-1] if drafts else token
                d_logits = model(last.view(1, 1), n_loops=draft_loops, cache=cache).logits[:, -1, :vocab]
                if greedy:
                    drafts.append(d_logits.argmax(-1))
                else:
                    q.append(probabilities(d_logits, temperature, top_k, top_p))
                    drafts.append(draw(q[-1]))
            cache.rewind(k)
            # the decided token and the drafts at full depth, in one call: p for each next position
            p_logits = model(torch.cat([token, *drafts]).view(1, -1), n_loops=n_loops,
                             cache=cache).logits[0, :, :vocab]
            stats["drafted"] += k
            stats["calls"] += k + 1
            accepted = 0
            for i, d in enumerate(drafts):
                if greedy:
                    keep = bool(d == p_logits[i].argmax())
                else:
                    p = probabilities(p_logits[i:i + 1], temperature, top_k, top_p)
                    u = torch.rand((), generator=generator, device=device)
                    keep = bool(u * q[i][0, d] < p[0, d])
                if not keep:
                    break
                accepted += 1
            stats["accepted"] += accepted
            cache.rewind(k - accepted)  # the decided token and the accepted drafts stay
            for d in drafts[:accepted]:
                yield int(d)
                produced += 1
                if int(d) == eos_token_id or produced == max_new_tokens:
                    return
            if accepted == k:  # every draft kept: the next token from the last position
                token = sample(p_logits[k:], temperature, top_k, top_p, generator)
            elif greedy:
                token = p_logits[accepted].argmax(-1, keepdim=True)
            else:  # rejected: what the target gives beyond what the draft did
                residual = (p - q[accepted]).clamp(min=0)
                token = draw(residual if float(residual.sum()) > 0 else p)


def speculative_generate(model, input_ids, max_new_tokens: int, n_loops: int | None = None,
                         draft_loops: int = 1, draft_tokens: int = 4, temperature: float = 1.0,
                         top_k: int | None = None, top_p: float | None = None,
                         eos_token_id: int | None = None, generator: torch.Generator | None = None,
                         vocab_size: int | None = None) -> tuple[torch.Tensor, dict]:
    """speculative_stream's tokens after the prompt, (1, T + new), and its counts."""
    stats: dict = {}
    new = list(speculative_stream(model, input_ids, max_new_tokens, n_loops, draft_loops,
                                  draft_tokens, temperature, top_k, top_p, eos_token_id, generator,
                                  stats, vocab_size))
    device = model.embed.weight.device
    ids, _ = _left_pad(input_ids, None, 0, device)
    return torch.cat([ids.to(device), torch.tensor([new], device=device)], dim=1), stats
