"""Whole-model behaviour: dtypes, meta-device initialisation and bad input."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from openmythos import OpenMythos
from openmythos.model.layers import RMSNorm
from tests.conftest import small_config, small_model


def relative_error(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """|got - want| / |want| over the vocabulary, per position: (B, T)."""
    got, want = got.float(), want.float()
    return (got - want).norm(dim=-1) / want.norm(dim=-1)


@pytest.mark.parametrize("attn_type", ["mla", "gqa"])
@pytest.mark.parametrize("halting", ["none", "act"])
@torch.no_grad()
def test_bf16_model_matches_fp32(attn_type, halting):
    # std=0.1: at the default init the logits barely depend on the input, so a decode that lost
    # its context would pass any bound bf16 rounding needs; norm weights away from 1, so that a
    # low-precision norm that dropped its weight would show. Per position, bf16 rounding stays
    # under 0.03 here, and either of those errors gives 0.6 or more
    model = small_model(std=0.1, attn_type=attn_type, halting=halting)
    for module in model.modules():
        if isinstance(module, RMSNorm):
            module.weight.normal_(1, 0.5)
    ids = torch.randint(0, 64, (2, 12))
    ref = model(ids).logits
    low = model.to(torch.bfloat16)
    out = low(ids).logits
    assert out.dtype == torch.bfloat16
    worst = float(relative_error(out, ref).max())
    assert worst < 0.08
    # decode through the cache in bf16 too: a prompt, then a token at a time, as the full pass
    cache = low.new_cache(2, 12)
    steps = [low(ids[:, :4], cache=cache).logits]
    steps += [low(ids[:, t:t + 1], cache=cache).logits for t in range(4, 12)]
    worst = float(relative_error(torch.cat(steps, 1), out).max())
    assert worst < 0.08
    # the control: each token decoded with no context at all is far outside that bound
    alone = torch.cat([low(ids[:, t:t + 1]).logits for t in range(4, 12)], 1)
    best = float(relative_error(alone, out[:, 4:]).min())
    assert best > 0.3


def test_autocast_matches_fp32():
    model = small_model()
    ids = torch.randint(0, 64, (2, 12))
    ref = model(ids).logits
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids).logits
    assert_close(out.float(), ref, atol=0.05, rtol=0.05)


@pytest.mark.parametrize("attn_type", ["mla", "gqa"])
@torch.no_grad()
def test_autocast_decodes_through_a_cache_written_by_index(attn_type):
    # halted tokens, left padding and ragged rows write the fp32 cache by index: under autocast
    # the entries are bf16, and must be converted like the dense writes are
    model = small_model(attn_type=attn_type, halting="act")
    torch.nn.init.normal_(model.recurrent.act.halt.weight, std=0.5)
    model.recurrent.act.halt.bias.fill_(-2.0)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [0, 0, 0, 11, 12, 13]])
    mask = (ids > 0).long()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        full = model(ids, n_loops=4, attention_mask=mask)
        for packed in (False, True):
            cache = model.new_cache(2, 12, 4, packed=packed)
            out = model(ids, n_loops=4, cache=cache, attention_mask=mask)
            assert out.loops.min() < out.loops.max()  # some tokens halted: written by index
            assert_close(out.logits[:, -1], full.logits[:, -1], atol=0.05, rtol=0.05)
            step = model(torch.tensor([[3], [4]]), n_loops=4, cache=cache)  # ragged rows if packed
            assert step.logits.shape == (2, 1, 64) and torch.isfinite(step.logits).all()


def test_bf16_head_matches_fp32_and_keeps_the_outer_autocast():
    model = small_model()
    ids = torch.randint(0, 64, (2, 12))
    ref = model(ids)
    out = model(ids, head_dtype=torch.bfloat16)
    assert out.logits.dtype == torch.bfloat16  # only the head: the rest of the step stays fp32
    assert_close(out.state_norm, ref.state_norm, atol=0, rtol=0)
    assert_close(out.logits.float(), ref.logits, atol=0.05, rtol=0.05)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # no head_dtype: the outer autocast holds
        assert model(ids).logits.dtype == torch.bfloat16


@pytest.mark.parametrize("fused", [True, False], ids=["linear_cross_entropy", "torch<2.13"])
@pytest.mark.parametrize("head_dtype, tol", [(None, 1e-5), (torch.bfloat16, 2e-2)])
def test_loss_from_targets_matches_logits_and_cross_entropy(head_dtype, tol, fused, monkeypatch):
    """The chunked head + cross-entropy (no logits) against the plain path, loss and gradients:
    torch's F.linear_cross_entropy, and the checkpointed chunks used where torch predates it."""
    if not fused:
        monkeypatch.delattr(torch.nn.functional, "linear_cross_entropy", raising=False)  # torch < 2.13 has none
    model = small_model()
    ids, targets = torch.randint(0, 64, (5, 64)), torch.randint(0, 64, (5, 64))  # > 1 chunk
    targets[0, :9] = -100

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref_loss = torch.nn.functional.cross_entropy(model(ids).logits.flatten(0, 1), targets.flatten())
    ref = grads(ref_loss)
    out = model(ids, targets=targets, head_dtype=head_dtype)
    assert out.logits is None and out.loss.dtype == torch.float32
    assert_close(out.loss, ref_loss, atol=tol, rtol=tol)
    got = grads(out.loss)
    assert got.keys() == ref.keys()
    for name in ref:  # relative error of each whole gradient
        assert (got[name] - ref[name]).norm() <= tol * ref[name].norm(), name


@pytest.mark.parametrize("dtype, vocab", [(torch.float16, 64), (torch.float16, 70_000), (torch.bfloat16, 64)])
def test_a_low_precision_heads_loss_is_computed_in_fp32(dtype, vocab):
    """The loss of an fp16 or bf16 model from targets (torch's F.linear_cross_entropy) against
    fp64 cross-entropy by hand from the head's own input and weights: the max-shift, exp-sum and
    log run in fp32 (torch keeps them in the input dtype unless asked: the per-token losses were
    up to ~4e-4 off, and a flat distribution over 70k ids summed to inf in fp16). The op returns the
    per-token losses in the head's dtype (it has no wider output), so the reference rounds each
    once to it."""
    model = small_model(vocab_size=vocab).to(dtype)
    if vocab > 64:  # nearly flat: an exp-sum near 70k, past fp16's largest value
        with torch.no_grad():
            model.embed.weight.mul_(0.05)
    ids, targets = torch.randint(0, 64, (2, 24)), torch.randint(0, vocab, (2, 24))
    targets[0, :5] = -100
    seen = []
    model.norm.register_forward_hook(lambda _m, _args, x: seen.append(x))
    loss = model(ids, targets=targets).loss
    logits = seen[0].flatten(0, 1).double() @ model.embed.weight.double().T
    per_token = F.cross_entropy(logits, targets.flatten(), reduction="none", ignore_index=-100)
    ref = per_token.to(dtype).double().sum() / (targets != -100).sum()
    assert loss.dtype == torch.float32
    assert_close(loss.double(), ref, atol=0, rtol=5e-7)


def test_ignored_targets_leave_their_positions_out():
    model = small_model()
    ids, targets = torch.randint(0, 64, (3, 20)), torch.randint(0, 64, (3, 20))
    targets[:, :7] = -100  # as in torch's cross_entropy and transformers' labels
    ref = torch.nn.functional.cross_entropy(model(ids).logits.flatten(0, 1), targets.flatten())
    assert_close(model(ids, targets=targets).loss, ref, atol=1e-5, rtol=1e-5)


def test_targets_of_the_wrong_shape_or_ids_are_refused():
    model, ids = small_model(), torch.randint(0, 64, (2, 12))
    with pytest.raises(ValueError, match=r"targets must be an int64 tensor of shape \(2, 12\), got torch.int64 \(2, 11\)"):
        model(ids, targets=torch.randint(0, 64, (2, 11)))
    with pytest.raises(ValueError, match=r"targets must be an int64 tensor of shape \(2, 12\), got list"):
        model(ids, targets=ids.tolist())
    calls = []  # refused before the forward runs, not after it
    model.prelude[0].register_forward_hook(lambda *args: calls.append(1))
    with pytest.raises(ValueError, match="targets"):
        model(ids, targets=ids.float())
    assert not calls
    with pytest.raises(ValueError, match=r"targets contains token id 64, outside \[0, vocab_size=64\)"):
        model(ids, targets=torch.full((2, 12), 64))
    with pytest.raises(ValueError, match="leave every position out"):
        model(ids, targets=torch.full((2, 12), -100))


@pytest.mark.parametrize("keep", [1, 3, 12, 20])
def test_logits_to_keep_gives_the_last_positions(keep):
    model = small_model()
    ids = torch.randint(0, 64, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :4] = 0
    full = model(ids, attention_mask=mask).logits
    kept = model(ids, attention_mask=mask, logits_to_keep=keep).logits
    assert kept.shape == (2, min(keep, 12), 64)
    assert_close(kept, full[:, -keep:])


@pytest.mark.parametrize("attn_type,policy", [("mla", "per_loop"), ("gqa", "ring"), ("mla", "ring")])
@pytest.mark.parametrize("depths", [[3, 2, 4], [4, 3, 2]], ids=["gathered", "deepest_first"])
@torch.no_grad()
def test_a_packed_call_matches_each_row_alone(attn_type, policy, depths, monkeypatch):
    # rows of different lengths each take a different number of new tokens (one for a decoding
    # row, a chunk for one being prefilled) at their own depth, in one left-padded call: the
    # logits and every cache entry are those of each row's own call. Depths that never grow
    # along the batch run each loop on a prefix of the real tokens (RecurrentBlock._deepest_first)
    model = small_model(attn_type=attn_type, kv_cache_policy=policy, kv_cache_ring=2)
    cached = [torch.randint(0, 64, (n,)) for n in (5, 2, 0)]
    new = [torch.randint(0, 64, (n,)) for n in (1, 3, 4)]
    prefixes = []  # real tokens the looped block ran on, per loop of the packed call
    step = model.recurrent._step
    monkeypatch.setattr(model.recurrent, "_step", lambda h, *a: prefixes.append(len(h)) or step(h, *a))
    took_prefixes = []  # calls that ran on the deepest-first path
    deepest_first = model.recurrent._deepest_first
    monkeypatch.setattr(model.recurrent, "_deepest_first",
                        lambda *a: took_prefixes.append(1) or deepest_first(*a))

    def cache():
        c = model.new_cache(3, 16, 4, packed=True)
        for b, ids in enumerate(cached):
            if len(ids):
                model(ids[None], n_loops=depths[b], cache=c.narrow(b, 1))
        return c

    together, alone = cache(), cache()
    ids = torch.stack([torch.cat([torch.zeros(4 - len(x), dtype=torch.long), x]) for x in new])
    mask = (torch.arange(4) >= 4 - torch.tensor([len(x) for x in new]).unsqueeze(1)).long()
    prefixes.clear()
    out = model(ids, n_loops=torch.tensor(depths), cache=together, attention_mask=mask, logits_to_keep=1)
    live = [sum(len(x) for x, d in zip(new, depths, strict=True) if d > t) for t in range(4)]
    assert prefixes == live  # halted tokens leave the loop either way
    assert len(took_prefixes) == (depths == sorted(depths, reverse=True))
    ref = [model(x[None], n_loops=d, cache=alone.narrow(b, 1), logits_to_keep=1).logits
           for b, (x, d) in enumerate(zip(new, depths, strict=True))]
    assert_close(out.logits, torch.cat(ref), atol=1e-5, rtol=1e-5)
    assert out.loops.tolist() == [[0] * (4 - len(x)) + [d] * len(x)  # padding runs nothing
                                  for x, d in zip(new, depths, strict=True)]
    for mine, theirs in zip(together.slots, alone.slots, strict=True):
        for a, b in zip(mine.tensors, theirs.tensors, strict=True):
            assert_close(a, b, atol=1e-5, rtol=1e-5)
    for name in ("valid", "next_pos", "lengths"):
        assert torch.equal(getattr(together, name), getattr(alone, name)), name
    assert together.lengths.tolist() == [6, 5, 4]  # padding took no columns


@torch.no_grad()
def test_a_row_with_no_new_token_sits_out_a_packed_call():
    model = small_model()
    together, alone = (model.new_cache(2, 16, packed=True) for _ in range(2))
    for cache in (together, alone):
        for b, n in enumerate((3, 5)):
            model(torch.arange(1, n + 1)[None], cache=cache.narrow(b, 1))
    ids, mask = torch.tensor([[7, 8, 9], [0, 0, 0]]), torch.tensor([[1, 1, 1], [0, 0, 0]])
    out = model(ids, cache=together, attention_mask=mask, logits_to_keep=1)
    ref = model(ids[:1], cache=alone.narrow(0, 1), logits_to_keep=1)
    assert_close(out.logits[:1], ref.logits, atol=1e-5, rtol=1e-5)
    assert out.loops[1].tolist() == [0, 0, 0] and together.lengths.tolist() == [6, 5]
    for mine, theirs in zip(together.loop_slots, alone.loop_slots, strict=True):
        assert_close(mine.tensors[0], theirs.tensors[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attn_type", ["mla", "gqa"])
@torch.no_grad()
def test_the_deepest_row_may_sit_out_a_packed_call(attn_type):
    # depths [3, 1] never grow along the batch, but row 0 takes no token: it runs no loop, and
    # row 1 gets what its own call gives
    model = small_model(attn_type=attn_type)
    together, alone = (model.new_cache(2, 16, 3, packed=True) for _ in range(2))
    for cache in (together, alone):
        model(torch.tensor([[1, 2], [3, 4]]), n_loops=torch.tensor([3, 1]), cache=cache)
    out = model(torch.tensor([[0, 0], [0, 5]]), n_loops=torch.tensor([3, 1]), cache=together,
                attention_mask=torch.tensor([[0, 0], [0, 1]]), logits_to_keep=1)
    ref = model(torch.tensor([[5]]), n_loops=1, cache=alone.narrow(1, 1), logits_to_keep=1)
    assert_close(out.logits[1:], ref.logits, atol=1e-5, rtol=1e-5)
    assert out.loops.tolist() == [[0, 0], [0, 1]] and together.lengths.tolist() == [2, 3]
    for mine, theirs in zip(together.loop_slots, alone.loop_slots, strict=True):
        assert_close(mine.tensors[0], theirs.tensors[0], atol=1e-5, rtol=1e-5)


def test_a_packed_call_refuses_what_it_cannot_place():
    model = small_model()
    cache = model.new_cache(2, 8, packed=True)
    model(torch.tensor([[1, 2, 3]]), cache=cache.narrow(0, 1))  # rows now hold 3 and 0 tokens
    with pytest.raises(ValueError, match="left padding .* row 0 is not"):
        model(torch.tensor([[1, 2], [3, 4]]), cache=cache, attention_mask=torch.tensor([[1, 0], [1, 1]]))
    with pytest.raises(ValueError, match="a row would hold 9 tokens > cache max_len=8"):
        model(torch.ones(2, 6, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="marks no real token"):
        model(torch.ones(2, 2, dtype=torch.long), cache=cache, attention_mask=torch.zeros(2, 2))


def test_fp16_forward_is_finite():
    out = small_model().to(torch.float16)(torch.randint(0, 64, (1, 8))).logits
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("attn_type,halting", [("mla", "act"), ("gqa", "kl"), ("mla", "none")])
def test_an_fp64_model_is_fp64_throughout(attn_type, halting):
    """An fp64 model as a numerical reference: its gradients pass gradcheck end to end (the
    norms, rotations, router and halting scores, injection and loss ran through fp32 before),
    and reading fp32 states casts them rather than failing in the matmul."""
    from torch.func import functional_call

    model = small_model(attn_type=attn_type, halting=halting, std=0.1).double()
    ids, names = torch.randint(0, 64, (2, 5)), ("recurrent.injection.B", "recurrent.norm.weight")
    params = tuple(dict(model.named_parameters())[n].detach().clone().requires_grad_() for n in names)

    def loss(*values):
        out = functional_call(model, dict(zip(names, values, strict=True)), (ids,),
                              {"n_loops": 3, "targets": ids})
        return out.loss + out.ponder_loss

    assert loss(*params).dtype == torch.float64
    assert torch.autograd.gradcheck(loss, params, fast_mode=True)
    states = model.loop_states(ids, 2)
    assert_close(model.readout(states.float()), model.readout(states), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("halting, n_loops", [("none", 3), ("none", [3, 1]), ("none", [1, 3]), ("act", 3)],
                         ids=["fixed_depth", "deepest_first", "gathered", "act"])
def test_an_fp64_models_ponder_cost_is_fp64_on_every_loop_path(halting, n_loops):
    """The ponder cost of an fp64 model is fp64 whichever path the loop takes (a fixed depth,
    per-row depths run deepest first or gathered, ACT): a zero built in the default dtype went
    unnoticed, as fp32 + fp64 scalars promote to fp64 in the training loss."""
    model = small_model(halting=halting).double()
    n_loops = torch.tensor(n_loops) if isinstance(n_loops, list) else n_loops
    out = model(torch.randint(0, 64, (2, 5)), n_loops=n_loops)
    assert out.ponder_loss.dtype == torch.float64 and out.logits.dtype == torch.float64


def test_an_fp64_models_loss_is_fp64_in_checkpointed_chunks(monkeypatch):
    """The chunked head's loss of an fp64 model where torch predates F.linear_cross_entropy
    (checkpointed chunks) is fp64 and matches cross-entropy of its fp64 logits to fp64 precision
    (a chunk cast to fp32 is off by ~1e-8, inside fp64's default tolerance; the fused path is
    held to fp64 by test_an_fp64_model_is_fp64_throughout)."""
    monkeypatch.delattr(torch.nn.functional, "linear_cross_entropy", raising=False)
    model = small_model(std=0.1).double()
    ids, targets = torch.randint(0, 64, (2, 12)), torch.randint(0, 64, (2, 12))
    out = model(ids, targets=targets)
    ref = F.cross_entropy(model(ids).logits.flatten(0, 1), targets.flatten())
    assert out.loss.dtype == torch.float64
    assert_close(out.loss, ref, atol=1e-12, rtol=0)


def test_act_runs_under_a_low_precision_default_dtype():
    """Building in bf16 through torch's default dtype (as llama-style code does): ACT's sums are
    fp32 whatever the default (they took it and failed once rows halted)."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        torch.manual_seed(0)
        model = OpenMythos(small_config(halting="act", act_threshold=0.5)).eval()
        with torch.no_grad():
            model.recurrent.act.halt.weight.normal_(0, 1.0)  # ragged exits
            out = model(torch.randint(0, 64, (2, 10)), n_loops=3)
    finally:
        torch.set_default_dtype(default)
    assert 1 < out.loops.float().mean() < 3 and torch.isfinite(out.logits).all()


def test_meta_build_then_init_weights():
    cfg = small_config()
    with torch.device("meta"):
        model = OpenMythos(cfg)
    model.to_empty(device="cpu")
    model.init_weights()
    ref = small_model()
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters(), strict=True):
        assert torch.isfinite(p).all(), name
        if q.numel() > 1:
            assert float(p.detach().std()) == pytest.approx(float(q.detach().std()), rel=0.5, abs=1e-6), name
    assert (model.moe.router_bias == 0).all()
    assert torch.isfinite(model(torch.randint(0, 64, (1, 4))).logits).all()


@torch.no_grad()
def test_init_weights_resets_the_constant_initialisations():
    """init_weights() on a used model (or one built on the meta device, whose memory holds
    anything) sets every constant start exactly: RMSNorm gains 1, the balancing bias 0, the
    injection's log_A = log_dt = 0 and B = 0.1, the halting bias -log(max_loops - 1)."""
    model = small_model(halting="act")
    for p in model.parameters():
        p.add_(0.5)
    model.moe.router_bias.fill_(0.3)
    model.init_weights()
    norms = [m.weight for m in model.modules() if isinstance(m, RMSNorm)]
    assert len(norms) > 4 and all(torch.equal(w, torch.ones_like(w)) for w in norms)
    assert torch.equal(model.moe.router_bias, torch.zeros(4))
    inj = model.recurrent.injection
    assert (inj.log_A == 0).all() and (inj.log_dt == 0).all() and torch.equal(inj.B, torch.full((64,), 0.1))
    assert float(model.recurrent.act.halt.bias) == pytest.approx(-math.log(2))


def test_act_at_init_runs_the_trained_depth():
    model = small_model(halting="act", max_loop_iters=4)
    ids = torch.randint(0, 64, (1, 8))
    assert (model(ids, n_loops=16).loops == 4).all()
    assert not torch.allclose(model(ids, n_loops=2).logits, model(ids, n_loops=4).logits)


@torch.no_grad()
@pytest.mark.parametrize("depth, threshold", [  # at L = 1 a threshold of 1 is out of a finite bias's reach
    (L, t) for L in (1, 2, 3, 16, 60, 101, 128) for t in (0.3, 0.5, 0.9, 0.99, 1.0) if (L, t) != (1, 1.0)])
def test_act_at_init_runs_the_trained_depth_at_any_threshold(depth, threshold):
    """Every token halts at exactly max_loop_iters at init, given more loops: the halting
    probability was 1/L whatever the threshold, which stopped at ceil(threshold * L) (half the
    depth at 0.5, a loop early at 0.99 from L = 101) and at 2 loops for L = 1."""
    model = small_model(halting="act", max_loop_iters=depth, act_threshold=threshold)
    ids = torch.randint(0, 64, (2, 3))
    assert (model(ids, n_loops=depth + 2).loops == depth).all()
    with torch.autocast("cpu", torch.bfloat16):  # a bf16 halting logit halted early from L ~ 40
        assert (model(ids, n_loops=depth + 2).loops == depth).all()


BAD_INPUTS = [
    (lambda m: m(torch.tensor([[1, 64]])), ValueError, "token id 64"),
    (lambda m: m(torch.tensor([[-1, 2]])), ValueError, "token id -1"),
    (lambda m: m(torch.tensor([[1.0, 2.0]])), TypeError, "dtype torch.float32"),
    (lambda m: m(torch.tensor([1, 2])), ValueError, "shape"),
    (lambda m: m(torch.zeros(1, 0, dtype=torch.long)), ValueError, "non-empty"),
    (lambda m: m(torch.zeros(1, 65, dtype=torch.long)), ValueError, "max_seq_len=64"),
    (lambda m: m(torch.zeros(1, 2, dtype=torch.long), n_loops=0), ValueError, "n_loops"),
    (lambda m: m(torch.zeros(1, 2, dtype=torch.long), n_loops=-1), ValueError, "n_loops"),
    (lambda m: m(torch.zeros(1, 2, dtype=torch.long), n_loops=2.5), ValueError, "n_loops"),
    (lambda m: m(torch.zeros(1, 2, dtype=torch.long), backprop_loops=0), ValueError, "backprop_loops"),
    (lambda m: m(torch.zeros(2, 2, dtype=torch.long), cache=m.new_cache(1, 8)), ValueError, "batch_size=1"),
    (lambda m: m(torch.zeros(1, 9, dtype=torch.long), cache=m.new_cache(1, 8)), ValueError, "cache overflow"),
    (lambda m: m(torch.zeros(1, 2, dtype=torch.long), cache=m.new_cache(1, 8, 2), n_loops=3),
     ValueError, "n_loops=3"),
    (lambda m: m(torch.zeros(1, 2, dtype=torch.long), attention_mask=torch.ones(1, 3)),
     ValueError, "attention_mask"),
    (lambda m: m.new_cache(1, 100), ValueError, "max_len=100"),
    (lambda m: m.new_cache(1, 0), ValueError, "max_len"),
    (lambda m: m(torch.zeros(1, 2, dtype=torch.long), attention_mask=torch.tensor([[float("-inf"), 0.0]])),
     ValueError, "attention_mask must hold 1 for a token and 0 for padding, got a value -inf"),
    (lambda m: m(torch.zeros(1, 2, dtype=torch.long), logits_to_keep=-1), ValueError, "logits_to_keep"),
    (lambda m: m(torch.zeros(1, 2, dtype=torch.long), logits_to_keep=1.5), ValueError, "logits_to_keep"),
    (lambda m: m(torch.zeros(1, 2, dtype=torch.long), logits_to_keep=1,
                 targets=torch.zeros(1, 2, dtype=torch.long)), ValueError, "logits_to_keep=1 with targets"),
    (lambda m: m("hello"), TypeError, "input_ids"),
    (lambda m: m(torch.zeros(1, 2, dtype=torch.uint8)), TypeError, "dtype torch.uint8"),
    (lambda m: m(torch.zeros(1, 2, dtype=torch.long), attention_mask=[[1, 1]]), TypeError, "attention_mask"),
    (lambda m: m(torch.zeros(1, 2, dtype=torch.long), n_loops=torch.tensor([True])), ValueError, "n_loops"),
    (lambda m: m(torch.zeros(1, 2, dtype=torch.long), backprop_loops=True), ValueError, "backprop_loops"),
    (lambda m: m(torch.zeros(1, 2, dtype=torch.long), head_dtype=torch.int64), ValueError, "head_dtype"),
    (lambda m: m(torch.zeros(1, 2, dtype=torch.long), head_dtype="bf16"), ValueError, "head_dtype"),
    # an additive mask's "keep everything" read as all padding: every token saw only itself
    (lambda m: m(torch.zeros(2, 2, dtype=torch.long), attention_mask=torch.zeros(2, 2)),
     ValueError, "attention_mask marks no real token"),
    (lambda m: m.readout(torch.zeros(2, 63)), ValueError, r"readout takes looped states \(\.\.\., dim=64\)"),
    (lambda m: m.readout(torch.zeros(2, 64, dtype=torch.long)), ValueError, "floating dtype, got .* torch.int64"),
]


@pytest.mark.parametrize("call,exc,needle", BAD_INPUTS)
def test_bad_input_gets_a_clear_error(call, exc, needle):
    with pytest.raises(exc, match=needle):
        call(small_model())


@pytest.mark.parametrize("other, field", [
    (dict(kv_cache_policy="ring", kv_cache_ring=1), "kv_cache_policy"),  # else decodes wrong, silently
    (dict(attn_type="gqa"), "attn_type"),
    (dict(kv_lora_rank=8), "entry shape"),
    (dict(prelude_layers=0), "prelude_layers"),
])
def test_a_cache_built_for_another_model_is_refused(other, field):
    model, ids = small_model(), torch.randint(0, 64, (1, 5))
    with pytest.raises(ValueError, match=f"cache was built for another model: its {field} is"):
        model(ids, cache=small_model(**other).new_cache(1, 16))
    with pytest.raises(ValueError, match="its dtype is torch.float32, this model's torch.bfloat16"):
        small_model().to(torch.bfloat16)(ids, cache=model.new_cache(1, 16))
    model(ids, cache=model.new_cache(1, 16).narrow(0, 1))  # its own, and a view of it, are fine


@torch.no_grad()
def test_padding_seen_through_a_view_masks_the_whole_caches_decode():
    """A view shares its cache's padding flag: after a left-padded prefill through narrow(), a
    decode on the whole cache must still mask the padding columns (with a flag of the view's
    own, the cache attended to them)."""
    model = small_model(std=0.1)
    ids, mask = torch.tensor([[1, 2, 3], [0, 0, 4]]), torch.tensor([[1, 1, 1], [0, 0, 1]])
    via_view, direct = model.new_cache(2, 16), model.new_cache(2, 16)
    model(ids, cache=via_view.narrow(0, 2), attention_mask=mask)
    model(ids, cache=direct, attention_mask=mask)
    assert via_view.has_padding
    step = torch.tensor([[5], [6]])
    assert_close(model(step, cache=via_view).logits, model(step, cache=direct).logits)


@torch.no_grad()
def test_a_chunked_prefill_may_start_with_a_chunk_of_padding_alone():
    """Left padding longer than a chunk: the first chunk marks no token in any row, which a
    cached call takes (only a call without a cache that marks none is refused), and the chunks
    give the logits of one call at every real token."""
    model = small_model(std=0.1)
    ids, mask = torch.randint(1, 64, (2, 10)), torch.ones(2, 10, dtype=torch.long)
    mask[0, :4], mask[1, :6] = 0, 0
    full = model(ids, attention_mask=mask).logits
    cache = model.new_cache(2, 16)
    chunks = [model(ids[:, s:s + 3], cache=cache, attention_mask=mask[:, s:s + 3]).logits for s in range(0, 10, 3)]
    real = mask.bool()
    assert_close(torch.cat(chunks, 1)[real], full[real], atol=1e-5, rtol=1e-5)
    assert cache.next_pos.tolist() == [6, 4]


@torch.no_grad()
def test_move_rows_carries_every_written_column_and_the_positions():
    """move_rows (the engine reordering its rows) moves each row whole: its entries up to the
    longest moving row's length, `valid`, `next_pos` and `lengths`. Copying only up to the
    shortest moving row (a freshly admitted one holds none) lost the other rows' entries."""
    model = small_model()
    cache = model.new_cache(3, 16, packed=True)
    for b, n in enumerate((2, 5, 0)):
        if n:
            model(torch.arange(1, n + 1)[None] + b, cache=cache.narrow(b, 1))
    before = [[t.clone() for t in s.tensors] for s in cache.slots]
    state = {name: getattr(cache, name).clone() for name in ("valid", "next_pos", "lengths")}
    cache.move_rows([1, 2, 0], [0, 1, 2])  # row 1 (5 tokens) to 0, row 2 (empty) to 1, row 0 to 2
    order = [1, 2, 0]
    for slot, old in zip(cache.slots, before, strict=True):
        for t, o in zip(slot.tensors, old, strict=True):
            for dst, src in enumerate(order):
                n = int(state["lengths"][src])
                assert torch.equal(t[dst, :n], o[src, :n])
    for name, value in state.items():
        assert torch.equal(getattr(cache, name), value[order]), name


def _padded_prefill(model, max_len):
    ids, mask = torch.tensor([[1, 2, 3], [0, 0, 4]]), torch.tensor([[1, 1, 1], [0, 0, 1]])
    cache = model.new_cache(2, max_len)
    model(ids, cache=cache, attention_mask=mask)
    return cache, ids, mask


@torch.no_grad()
def test_select_rows_continues_each_row_from_its_source():
    """Beam search's reorder: row i continues from row index[i], its entries and its padding
    mask alike, and decodes as a cache prefilled in that order."""
    model = small_model(std=0.1)
    cache, ids, mask = _padded_prefill(model, 16)
    cache.select_rows(torch.tensor([1, 0]))
    ref = model.new_cache(2, 16)
    model(ids[[1, 0]], cache=ref, attention_mask=mask[[1, 0]])
    for name in ("valid", "next_pos", "lengths"):
        assert torch.equal(getattr(cache, name), getattr(ref, name)), name
    step = torch.tensor([[6], [5]])
    assert_close(model(step, cache=cache).logits, model(step, cache=ref).logits)


@torch.no_grad()
def test_copy_to_a_larger_cache_decodes_as_the_original():
    """copy_to (a cache that outgrew its allocation) carries every row's columns, the padding
    mask and the padding flag: the copy decodes as the original, left-padded or ragged."""
    model = small_model(std=0.1)
    small, _, _ = _padded_prefill(model, 8)
    ragged = model.new_cache(2, 8, packed=True)
    for b, n in enumerate((3, 5)):
        model(torch.arange(1, n + 1)[None] + b, cache=ragged.narrow(b, 1))
    for cache in (small, ragged):
        big = model.new_cache(2, 16, packed=cache.packed)
        cache.copy_to(big)
        assert big.has_padding == cache.has_padding and torch.equal(big.lengths, cache.lengths)
        step = torch.tensor([[6], [5]])
        assert_close(model(step, cache=big).logits, model(step, cache=cache).logits)


def test_rewind_stops_at_the_shortest_row():
    """Rows of a packed cache hold different lengths: rewinding past the shortest is refused
    (it left that row a negative length)."""
    model = small_model()
    cache = model.new_cache(2, 16, packed=True)
    for b, n in enumerate((3, 5)):
        model(torch.arange(1, n + 1)[None], cache=cache.narrow(b, 1))
    with pytest.raises(ValueError, match=r"rewind: n must be an integer in \[0, 3\], got 4"):
        cache.rewind(4)
    cache.rewind(3)
    assert cache.lengths.tolist() == [0, 2] and cache.next_pos.tolist() == [0, 2]


def test_reset_empties_the_cache_and_forgets_its_padding():
    model = small_model()
    cache, _, _ = _padded_prefill(model, 16)
    assert cache.has_padding
    cache.reset()
    assert not cache.has_padding and cache.length == 0 and cache.next_pos.tolist() == [0, 0]
    assert not cache.valid.any()


def test_a_per_loop_cache_ignores_the_unused_ring_length():
    """kv_cache_ring means nothing to a per-loop cache: two such models of different ring
    lengths take each other's caches (their layouts are the same)."""
    model = small_model(kv_cache_ring=5)
    model(torch.tensor([[1, 2]]), cache=small_model(kv_cache_ring=2).new_cache(1, 16))


def test_rewind_takes_integers_only():
    import numpy as np

    model = small_model()
    cache = model.new_cache(1, 16)
    model(torch.randint(0, 64, (1, 5)), cache=cache)
    with pytest.raises(ValueError, match=r"rewind: n must be an integer in \[0, 5\], got True"):
        cache.rewind(True)
    cache.rewind(np.int64(2))
    assert cache.length == 3 and int(cache.next_pos[0]) == 3


def test_with_exit_runs_the_same_weights_under_another_exit_rule():
    model = small_model().train()
    ids = torch.randint(0, 64, (2, 6))
    kl = model.with_exit(halting="kl", kl_threshold=1e9)  # any drift counts as settled
    assert kl.training and kl.cfg.halting == "kl" and kl.cfg.dim == model.cfg.dim
    for (name, a), (_, b) in zip(model.state_dict().items(), kl.state_dict().items(), strict=True):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr(), name  # copied, not shared
    assert (kl.eval()(ids, n_loops=4).loops == 2).all()
    assert_close(kl.with_exit(halting="none")(ids, n_loops=3).logits, model.eval()(ids, n_loops=3).logits)
    with pytest.raises(ValueError, match=r"with_exit changes only .*, got \['dim'\]"):
        model.with_exit(dim=128)
    # ACT's halting unit trains only with ACT; a threshold of another rule would do nothing
    with pytest.raises(ValueError, match="halting='act' needs a halting unit trained with it"):
        model.with_exit(halting="act")
    with pytest.raises(ValueError, match="kl_threshold applies to halting='kl', but the rule is halting='none'"):
        model.with_exit(kl_threshold=1e-3)
    act = small_model(halting="act")
    assert act.with_exit(act_threshold=0.5).cfg.act_threshold == 0.5
    with pytest.raises(ValueError, match="act_threshold applies to halting='act', but the rule is halting='kl'"):
        act.with_exit(halting="kl", act_threshold=0.5)


def test_rewind_past_a_left_padded_rows_tokens_keeps_its_position():
    """Every row's position went back by n, left padding included: a one-token prompt beside a
    three-token one read RoPE position -1 after rewinding 3. A rewound cache must decode as one
    that never held the forgotten tokens."""
    model = small_model()
    ids, mask = torch.tensor([[1, 2, 3], [0, 0, 4]]), torch.tensor([[1, 1, 1], [0, 0, 1]])
    cache = model.new_cache(2, 16)
    model(ids, cache=cache, attention_mask=mask)
    model(torch.tensor([[5], [6]]), cache=cache)
    cache.rewind(3)
    assert cache.next_pos.tolist() == [1, 0] and cache.length == 1
    fresh = model.new_cache(2, 16)
    model(ids[:, :1], cache=fresh, attention_mask=mask[:, :1])  # the one column both keep
    assert fresh.next_pos.tolist() == cache.next_pos.tolist()
    assert torch.equal(fresh.valid, cache.valid)


# ---- tests from a mutation review of OpenMythos.forward (each checked to fail with its mutant)


def test_a_negative_target_id_is_refused_by_name():
    """Only IGNORE_INDEX (-100) may stand for a left-out position: another negative id is
    refused with the id (without the lower bound it reached cross_entropy as an index)."""
    model, ids = small_model(), torch.randint(0, 64, (2, 12))
    targets = torch.randint(0, 64, (2, 12))
    targets[1, 3] = -5
    with pytest.raises(ValueError, match=r"targets contains token id -5, outside \[0, vocab_size=64\)"):
        model(ids, targets=targets)


@pytest.mark.parametrize("fused", [True, False], ids=["linear_cross_entropy", "torch<2.13"])
def test_the_loss_head_runs_in_head_dtype(fused, monkeypatch):
    """head_dtype applies to the loss's head as to the logits': the chunked head's matmuls get
    bf16 operands (a loss that ignored head_dtype ran the fp32 head, matching the bf16 one
    within the loss test's tolerance, so only the operands show it)."""
    import openmythos.model.model as model_module

    seen = []
    if fused:
        real = torch.nn.functional.linear_cross_entropy
        monkeypatch.setattr(torch.nn.functional, "linear_cross_entropy",
                            lambda x, w, *a, **k: seen.append((x.dtype, w.dtype)) or real(x, w, *a, **k))
    else:
        monkeypatch.delattr(torch.nn.functional, "linear_cross_entropy", raising=False)
        real = model_module._head_loss
        monkeypatch.setattr(model_module, "_head_loss",
                            lambda x, w, t: seen.append((x.dtype, w.to(x.dtype).dtype)) or real(x, w, t))
    model = small_model()
    ids, targets = torch.randint(0, 64, (2, 12)), torch.randint(0, 64, (2, 12))
    model(ids, targets=targets, head_dtype=torch.bfloat16)
    assert seen and set(seen) == {(torch.bfloat16, torch.bfloat16)}
    seen.clear()
    model(ids, targets=targets)
    assert set(seen) == {(torch.float32, torch.float32)}


@pytest.mark.parametrize("n_loops, needle", [
    (torch.tensor([2, 0]), r"n_loops as a tensor must be \(2,\) positive integers"),
    (torch.tensor([2, 2, 2]), r"n_loops as a tensor must be \(2,\) positive integers"),
    (torch.tensor([[2, 2]]), r"n_loops as a tensor must be \(2,\) positive integers"),
])
def test_per_row_depths_are_checked(n_loops, needle):
    """A (B,) tensor of depths: one per row, each at least 1 (a zero depth ran no loop for its row
    and gave logits of the prelude and coda alone; a depth tensor of another length went on
    to fail deep inside, or to be broadcast)."""
    with pytest.raises(ValueError, match=needle):
        small_model()(torch.zeros(2, 3, dtype=torch.long), n_loops=n_loops)


def test_the_deepest_row_is_checked_against_the_caches_loop_slots():
    """Per-row depths against a cache: the deepest row must fit the cache's loop slots, not the
    shallowest (a row deeper than the cache has no slot to write)."""
    model = small_model()
    with pytest.raises(ValueError, match="n_loops=3 exceeds the cache's n_loops=2 slots"):
        model(torch.zeros(2, 3, dtype=torch.long), n_loops=torch.tensor([1, 3]), cache=model.new_cache(2, 8, 2))


@torch.no_grad()
def test_with_exit_and_loop_states_leave_the_random_stream_alone():
    """with_exit built its copy with a fresh init, which drew from the global generator: one
    logit-lens call between seeded steps moved every later draw (and allocated the model again,
    in fp32 on the CPU, whatever the original's device and dtype)."""
    model = small_model(halting="act")
    ids = torch.randint(0, 64, (2, 5))
    torch.manual_seed(0)
    want = torch.rand(3)
    torch.manual_seed(0)
    model.with_exit(halting="none")
    model.loop_states(ids, n_loops=3)
    assert torch.equal(torch.rand(3), want)
    assert model.recurrent.cfg.halting == "act"  # loop_states ran halting off for its call only


def test_with_exit_keeps_the_dtype_and_checks_min_loops():
    """with_exit gives the model in its embedding's dtype (a bf16 model came back fp32, and then
    refused its own caches); min_loops belongs to the KL exit and is refused under another rule."""
    model = small_model().to(torch.bfloat16)
    kl = model.with_exit(halting="kl", min_loops=2)
    assert {p.dtype for p in kl.parameters() if p.dim() > 1} == {torch.bfloat16}
    assert kl.embed.weight.dtype == torch.bfloat16 and kl.cfg.min_loops == 2
    kl(torch.tensor([[1, 2, 3]]), cache=model.new_cache(1, 8))  # the original's cache fits the copy
    with pytest.raises(ValueError, match="min_loops applies to halting='kl', but the rule is halting='none'"):
        model.with_exit(min_loops=2)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@torch.no_grad()
def test_with_exit_keeps_the_mode_it_found(training):
    """with_exit's copy is in the original's mode, eval included (a module is built in train
    mode, so an eval model's copy ran dropout), and leaves the original's alone."""
    model = small_model(dropout=0.3).train(training)
    ids = torch.randint(0, 64, (2, 6))
    copy = model.with_exit(halting="kl", kl_threshold=1e9)
    assert all(m.training == training for m in copy.modules()) and model.training == training
    if not training:  # no dropout: the same logits twice
        assert_close(copy(ids, n_loops=3).logits, copy(ids, n_loops=3).logits, atol=0, rtol=0)


@torch.no_grad()
def test_spectral_radius_is_the_largest_absolute_decay():
    """rho(A) = max |A_i|: an unconstrained ("free") injection may learn a negative A, whose size
    counts as much as a positive one's (the max without the abs reported 0.5 here, not 1.2)."""
    model = small_model(injection="free")
    model.recurrent.injection.A.copy_(torch.linspace(0.5, -1.2, 64))
    assert model.spectral_radius() == pytest.approx(1.2)
    lti = small_model()  # A = exp(-exp(0)) at init
    assert lti.spectral_radius() == pytest.approx(math.exp(-1), rel=1e-6)


@torch.no_grad()
def test_compiled_decode_runs_only_for_a_plain_decode_step():
    """compile_decode's graph covers one token per row, an int depth, no mask, no targets and
    no gradients; every other call (a prefill, a padded step, per-row depths, a loss, a
    training step) must take the eager forward, which handles it. A stand-in records the
    calls that reach the compiled step."""
    model = small_model()
    calls = []
    model.compiled_decode = lambda *args: calls.append(args[1]) or model._decode(*args)
    cache = model.new_cache(2, 16)
    model(torch.tensor([[1, 2, 3], [4, 5, 6]]), cache=cache)  # prefill: several tokens
    assert calls == []
    step = torch.tensor([[7], [8]])
    model(step, cache=cache, n_loops=2)
    assert calls == [2]  # the plain decode step
    model(step, cache=cache, attention_mask=torch.ones(2, 1, dtype=torch.long))
    model(step, cache=cache, n_loops=torch.tensor([2, 3]))
    out = model(step, cache=cache, targets=torch.tensor([[1], [2]]))
    assert out.loss is not None and out.logits is None
    with torch.enable_grad():
        model(step, cache=cache)
    assert calls == [2] and cache.length == 8


@pytest.mark.parametrize("attn_type", ["mla", "gqa"])
@pytest.mark.parametrize("T", [2, 3])
@torch.no_grad()
def test_a_short_prompt_is_causal(attn_type, T):
    """Without a cache or padding the call is causal through SDPA's is_causal: a position's
    logits never depend on the tokens after it, for a two-token prompt too (is_causal taken
    only for T > 2 let the first token read the second)."""
    model = small_model(std=0.1, attn_type=attn_type)
    ids = torch.randint(0, 64, (2, T))
    full = model(ids).logits
    for t in range(T - 1):
        assert_close(full[:, t], model(ids[:, :t + 1]).logits[:, -1], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_a_packed_call_may_fill_the_cache_exactly():
    """A packed call that brings a row to exactly max_len tokens fits (refusing it at >= cost
    the cache its last column), and decodes like a dense cache holding the same tokens."""
    model = small_model(std=0.1)
    cache = model.new_cache(2, 8, packed=True)
    model(torch.tensor([[1, 2, 3]]), cache=cache.narrow(0, 1))  # rows hold 3 and 0 tokens
    ids = torch.tensor([[4, 5, 6, 7, 8], [0, 0, 0, 9, 10]])
    out = model(ids, cache=cache, attention_mask=(ids > 0).long(), logits_to_keep=1)
    assert cache.lengths.tolist() == [8, 2]
    ref = model(torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]]), logits_to_keep=1)
    assert_close(out.logits[:1], ref.logits, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_readout_is_the_head_on_a_looped_state():
    """readout(h) = the head after the final norm: with no coda layers it gives the model's own
    logits from the last loop's state (a readout without the norm, the KL exit's probe and
    the logit lens, read logits of another scale)."""
    model = small_model(std=0.1, coda_layers=0)
    for module in model.modules():
        if isinstance(module, RMSNorm):
            module.weight.normal_(1, 0.5)
    ids = torch.randint(0, 64, (2, 7))
    states = model.loop_states(ids, n_loops=3)
    assert_close(model.readout(states[-1]), model(ids, n_loops=3).logits, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_token_corr_is_the_mean_cosine_between_distinct_positions():
    """MythosOutput.token_corr (logged in training) is the cosine similarity of the final states
    of every pair of distinct positions in a sequence, averaged over pairs and sequences; it is
    None for a single position and for a cached call."""
    model = small_model()
    ids = torch.randint(0, 64, (3, 6))
    final = F.normalize(model.loop_states(ids, n_loops=3)[-1], dim=-1)
    cos = final @ final.transpose(1, 2)  # (B, T, T)
    off = ~torch.eye(6, dtype=torch.bool)
    assert_close(model(ids, n_loops=3).token_corr, cos[:, off].mean(), atol=1e-5, rtol=1e-5)
    assert model(ids[:, :1], n_loops=3).token_corr is None
    assert model(ids, n_loops=3, cache=model.new_cache(3, 8)).token_corr is None


def test_the_logged_metrics_carry_no_graph():
    """token_corr and state_norm, logged at each training step, are detached from the graph
    (one kept alive through them would hold the step's activations until it is logged)."""
    model = small_model().train()
    out = model(torch.randint(0, 64, (2, 6)), n_loops=3)
    assert out.logits.requires_grad
    assert not out.token_corr.requires_grad and not out.state_norm.requires_grad


@torch.no_grad()
def test_state_norm_is_the_mean_norm_of_the_final_state():
    """MythosOutput.state_norm (logged in training) is the L2 norm of the recurrent block's final
    state per position, averaged over positions: not their sum."""
    model = small_model()
    ids = torch.randint(0, 64, (2, 7))
    final = model.loop_states(ids, n_loops=3)[-1]
    want = final.norm(dim=-1).mean()
    assert_close(model(ids, n_loops=3).state_norm, want, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_a_default_cache_holds_a_whole_context():
    """new_cache(B) holds max_seq_len tokens at the trained depth, in the model's dtype: a prompt
    as long as the context fits it."""
    model = small_model()
    cache = model.new_cache(2)
    assert (cache.max_len, cache.n_loops, cache.packed) == (64, 3, False)
    model(torch.randint(0, 64, (2, 64)), cache=cache, logits_to_keep=1)
    assert cache.length == 64


@torch.no_grad()
def test_expert_load_counts_each_experts_tokens_over_every_loop():
    """out.expert_load, by which the router bias moves, is per expert the number of (token,
    slot) assignments the router made to it, summed over the loops: the router's own choices
    counted, not the load as the MoE reports it."""
    model, ids = small_model(std=0.3), torch.randint(0, 64, (2, 5))
    route, chosen = model.moe.route, []

    def recording(x):
        idx, gates, scores = route(x)
        chosen.append(idx)
        return idx, gates, scores

    model.moe.route = recording
    out = model(ids, n_loops=3)
    assert len(chosen) == 3
    counts = sum(torch.bincount(idx.flatten(), minlength=model.cfg.n_experts) for idx in chosen)
    assert out.expert_load.tolist() == counts.tolist() and len(set(counts.tolist())) > 1
