"""Attention and cache parity: absorbed vs naive MLA, cached (token by token and chunked) vs
full forward, and left padding vs each sequence alone."""

import pytest
import torch
from torch.testing import assert_close

from openmythos.model.attention import MLAttention
from tests.conftest import small_model

TOL = dict(atol=1e-5, rtol=1e-5)


def incremental(model, ids, chunks, n_loops):
    cache = model.new_cache(ids.shape[0], ids.shape[1], n_loops)
    outs, pos = [], 0
    for c in chunks:
        outs.append(model(ids[:, pos:pos + c], n_loops=n_loops, cache=cache).logits)
        pos += c
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("attn_type", ["mla", "gqa"])
@pytest.mark.parametrize("chunks", [[1] * 12, [5, 1, 4, 2], [7, 5]], ids=["token", "mixed", "chunked"])
@torch.no_grad()
def test_cached_matches_full_forward(attn_type, chunks):
    model = small_model(attn_type=attn_type)
    ids = torch.randint(0, 64, (2, 12))
    assert_close(incremental(model, ids, chunks, 3), model(ids, n_loops=3).logits, **TOL)


@torch.no_grad()
def test_cached_matches_full_forward_past_trained_depth():
    model = small_model()
    ids = torch.randint(0, 64, (2, 10))
    assert_close(incremental(model, ids, [4, 1, 1, 4], 6), model(ids, n_loops=6).logits, **TOL)


@torch.no_grad()
def test_absorbed_mla_matches_naive():
    model = small_model(std=0.1)  # attention far from uniform: a wrong scale or mask shows
    ids = torch.randint(0, 64, (3, 12))
    outs = {}
    for absorb in (False, True):
        for m in model.modules():
            if isinstance(m, MLAttention):
                m.absorb = absorb
        outs[absorb] = incremental(model, ids, [6, 1, 1, 1, 3], 3)
    assert_close(outs[True], outs[False], **TOL)


def test_absorbed_is_chosen_for_decode_and_naive_for_long_prefill():
    attn = small_model().prelude[0].attn
    assert attn._use_absorbed(1, cached=True)
    assert not attn._use_absorbed(1, cached=False)
    assert not attn._use_absorbed(10_000, cached=True)


@pytest.mark.parametrize("attn_type", ["mla", "gqa"])
@torch.no_grad()
def test_left_padding_matches_each_sequence_alone(attn_type):
    model = small_model(attn_type=attn_type)
    a, b = torch.randint(0, 64, (1, 9)), torch.randint(0, 64, (1, 5))
    ids = torch.cat([a, torch.cat([torch.zeros(1, 4, dtype=torch.long), b], 1)])
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    batched = model(ids, n_loops=3, attention_mask=mask).logits
    assert_close(batched[0], model(a, n_loops=3).logits[0], **TOL)
    assert_close(batched[1, 4:], model(b, n_loops=3).logits[0], **TOL)
    assert torch.isfinite(batched).all()
    # the same through the cache: padded prefill, then decode
    cache = model.new_cache(2, 12, 3)
    model(ids, n_loops=3, cache=cache, attention_mask=mask)
    nxt = torch.randint(0, 64, (2, 1))
    step = model(nxt, n_loops=3, cache=cache).logits
    assert_close(step[1], model(torch.cat([b, nxt[1:]], 1), n_loops=3).logits[0, -1:], **TOL)


@torch.no_grad()
def test_cache_positions_are_tracked_inside():
    model = small_model()
    cache = model.new_cache(1, 16, 3)
    model(torch.randint(0, 64, (1, 5)), n_loops=3, cache=cache)
    model(torch.randint(0, 64, (1, 1)), n_loops=3, cache=cache)
    assert cache.length == 6 and cache.next_pos.tolist() == [6]


@pytest.mark.parametrize("n_kv_heads", [2, 1])
def test_attention_dropout_applies_with_one_key_head_too(n_kv_heads):
    # a single key head takes a kernel without dropout at inference; training must not take it
    model = small_model(attn_type="gqa", n_kv_heads=n_kv_heads, dropout=0.5)
    attn, ids, x = model.prelude[0].attn, torch.randint(0, 64, (1, 8)), torch.randn(1, 8, 64)
    ctx = model._context(ids, None, None, False)
    attn.eval()
    plain = attn(x, ctx, None)
    attn.train()
    assert not torch.allclose(attn(x, ctx, None), plain)
