"""Attention and cache parity: absorbed vs naive MLA, cached (token by token and chunked) vs
full forward, and left padding vs each sequence alone."""

import pytest
import torch
from torch.testing import assert_close

from openmythos.model.attention import MLAttention, PackedRows
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


# ---- tests from a mutation review of attention.py (each checked to fail with its mutant)


@pytest.mark.parametrize("attn_type", ["mla", "gqa"])
@torch.no_grad()
def test_every_attention_row_sees_a_key(attn_type, monkeypatch):
    """Each query row of every boolean mask handed to SDPA keeps at least one key: padding
    queries (left padding, a packed row's padding cells, the empty cells of the compacted-rows
    grid) are given a key of their own. The CPU kernel turns a row that sees nothing into
    zeros, but the fused GPU kernels give NaN there, so the outputs here cannot show it."""
    rows_without_a_key = []
    real = torch.nn.functional.scaled_dot_product_attention

    def sdpa(q, k, v, attn_mask=None, **kwargs):
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            rows_without_a_key.append(int((~attn_mask.any(-1)).sum()))
        return real(q, k, v, attn_mask=attn_mask, **kwargs)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", sdpa)

    model = small_model(attn_type=attn_type, halting="act")
    torch.nn.init.normal_(model.recurrent.act.halt.weight, std=0.5)  # tokens halt at different loops
    model.recurrent.act.halt.bias.fill_(-2.0)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [0, 0, 0, 11, 12, 13]])
    mask = (ids > 0).long()
    out = model(ids, n_loops=4, attention_mask=mask)  # left padding; compacted rows once tokens halt
    assert out.loops[:, 3:].min() < out.loops.max()
    cache = model.new_cache(2, 16, 4, packed=True)
    model(ids[:1, :2], n_loops=4, cache=cache.narrow(0, 1))  # rows hold 2 and 0 tokens
    model(ids, n_loops=4, cache=cache, attention_mask=mask)  # packed: row 1 has padding cells
    assert rows_without_a_key and set(rows_without_a_key) == {0}


@torch.no_grad()
def test_per_row_depths_with_left_padding_match_each_row_alone():
    """Per-row depths that grow along the batch, without a cache: the rows run sorted deepest
    first (Context.take), each with its own padding mask and RoPE positions, and every row's
    logits are those of its own call at its own depth."""
    model = small_model(std=0.1)
    a, b = torch.randint(0, 64, (1, 6)), torch.randint(0, 64, (1, 3))
    ids = torch.cat([a, torch.cat([torch.zeros(1, 3, dtype=torch.long), b], 1)])
    mask = torch.tensor([[1] * 6, [0] * 3 + [1] * 3])
    out = model(ids, n_loops=torch.tensor([2, 3]), attention_mask=mask)
    assert_close(out.logits[0], model(a, n_loops=2).logits[0], **TOL)
    assert_close(out.logits[1, 3:], model(b, n_loops=3).logits[0], **TOL)
    assert out.loops.tolist() == [[2] * 6, [3] * 6]


def test_packed_rows_layout():
    """PackedRows for rows taking 1, 3, 0 and 2 tokens, T = 4, exactly: a row decoding one token
    attends in the (B, 1) batch alone and takes no row of the (M, T - 1) grid of the others (a
    one-token row in that grid padded out to the prompt's width)."""
    p = PackedRows.build([1, 3, 0, 2], 4, torch.device("cpu"))
    assert p.ends == [1, 4, 4, 6]
    assert p.last.tolist() == [0, 3, 5] and p.rows.tolist() == [0, 1, 3]
    assert p.multi.tolist() == [1, 3]
    assert p.other.tolist() == [1, 2, 4] and p.cell.tolist() == [1, 2, 5]
    assert p.sizes == [(0, 0, 0), (1, 0, 0), (2, 1, 2), (2, 1, 2), (3, 2, 3)]
    two = p.narrow(2)
    assert two.ends == [1, 4] and two.last.tolist() == [0, 3] and two.rows.tolist() == [0, 1]
    assert two.multi.tolist() == [1] and two.other.tolist() == [1, 2] and two.cell.tolist() == [1, 2]
    assert PackedRows.build([2, 1], 2, torch.device("cpu")).rows is None  # every row has a token


@torch.no_grad()
def test_mla_takes_the_absorbed_path_only_with_a_cache(monkeypatch):
    """Without a cache (training, a plain forward; the loop's rolling keys are no cache) MLA
    runs the naive path, however short the call; a cached decode step runs the absorbed one."""
    calls = []
    real = MLAttention._absorbed
    monkeypatch.setattr(MLAttention, "_absorbed", lambda self, *a: calls.append(1) or real(self, *a))
    model = small_model()
    ids = torch.randint(0, 64, (2, 4))
    model(ids, n_loops=3)
    assert calls == []
    cache = model.new_cache(2, 8, 3)
    model(ids, n_loops=3, cache=cache)
    model(ids[:, :1], n_loops=3, cache=cache)
    assert calls


@torch.no_grad()
def test_a_packed_call_attends_in_two_parts(monkeypatch):
    """The real tokens of a packed call attend as PackedRows lays them out (each row's last
    token, then the grid of the rows taking several), not through the compacted-rows grid,
    which pads every row out to the longest row's width."""
    calls = []
    real = MLAttention._attend_packed
    monkeypatch.setattr(MLAttention, "_attend_packed", lambda self, *a: calls.append(1) or real(self, *a))
    model = small_model()
    cache = model.new_cache(2, 16, packed=True)
    model(torch.tensor([[1, 2, 3]]), cache=cache.narrow(0, 1))
    assert calls == []  # one row, no padding: a plain call
    model(torch.tensor([[0, 0, 4], [5, 6, 7]]), cache=cache, attention_mask=torch.tensor([[0, 0, 1], [1, 1, 1]]))
    n_layers = model.cfg.prelude_layers + model.cfg.max_loop_iters + model.cfg.coda_layers
    assert len(calls) == n_layers
