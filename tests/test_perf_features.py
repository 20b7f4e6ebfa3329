"""Speed and memory features: the ring KV-cache policy, per-loop activation checkpointing,
truncated-backprop memory, the opt-in torch.compile path and the kernels behind them (the MoE
custom op, the zero-padded value head for the fused attention kernel)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.testing import assert_close

from openmythos import MythosConfig
from openmythos.model.moe import _grouped_swiglu, expert_swiglu
from tests.conftest import small_config, small_model


def loss_and_grads(model, ids, **kwargs):
    model.zero_grad(set_to_none=True)
    out = model(ids, **kwargs)
    loss = F.cross_entropy(out.logits.flatten(0, 1), ids.flatten()) + 0.01 * out.ponder_loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def saved_bytes(model, ids, **kwargs) -> int:
    """Bytes autograd keeps for backward outside checkpointed regions (distinct storages)."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids, **kwargs).logits.sum()
    return sum(seen.values())


# ---- activation checkpointing and truncated backprop


@pytest.mark.parametrize("attn_type", ["mla", "gqa"])
@pytest.mark.parametrize("halting", ["none", "act"])
def test_checkpointing_each_loop_gives_identical_gradients(attn_type, halting):
    model = small_model(attn_type=attn_type, halting=halting).train()
    if halting == "act":  # some rows halt early, so the checkpointed loops run on compacted rows
        with torch.no_grad():
            torch.nn.init.normal_(model.recurrent.act.halt.weight, std=1.0)
    ids = torch.randint(0, 64, (2, 10))
    for kwargs in ({"n_loops": 4}, {"n_loops": torch.tensor([2, 4])}, {"n_loops": 4, "backprop_loops": 2}):
        torch.manual_seed(1)
        ref_loss, ref = loss_and_grads(model.enable_activation_checkpointing(False), ids, **kwargs)
        torch.manual_seed(1)
        loss, got = loss_and_grads(model.enable_activation_checkpointing(True), ids, **kwargs)
        assert torch.equal(loss, ref_loss)
        assert got.keys() == ref.keys()
        for name in ref:
            assert torch.equal(got[name], ref[name]), name


def test_checkpointed_training_after_inference_mode():
    # the loop embeddings are cached: a first build under inference_mode must not leave an
    # inference tensor that checkpointed training then cannot save for backward
    from openmythos.model.recurrence import _loop_embedding

    _loop_embedding.cache_clear()
    model = small_model()
    ids = torch.randint(0, 64, (2, 10))
    with torch.inference_mode():
        model(ids, n_loops=3)
    model.train().enable_activation_checkpointing(True)
    model(ids, n_loops=3, targets=ids).loss.backward()
    assert model.recurrent.lora.B.grad is not None


def test_checkpointing_keeps_activations_of_one_loop_not_all():
    model = small_model(max_seq_len=64).train()
    ids = torch.randint(0, 64, (2, 32))
    plain = {n: saved_bytes(model, ids, n_loops=n) for n in (2, 8)}
    model.enable_activation_checkpointing()
    ckpt = {n: saved_bytes(model, ids, n_loops=n) for n in (2, 8)}
    per_loop_plain = (plain[8] - plain[2]) / 6
    per_loop_ckpt = (ckpt[8] - ckpt[2]) / 6
    assert per_loop_ckpt < per_loop_plain / 4, (per_loop_ckpt, per_loop_plain)


def test_truncated_backprop_memory_is_bounded_by_the_window():
    model = small_model(max_seq_len=64).train()
    ids = torch.randint(0, 64, (2, 32))
    window = {n: saved_bytes(model, ids, n_loops=n, backprop_loops=2) for n in (2, 4, 8, 16)}
    # at n_loops == 2 the first loop's input state is the prelude output, already kept
    assert window[2] <= window[4] == window[8] == window[16]
    assert saved_bytes(model, ids, n_loops=8) > 2 * window[8]


# ---- the ring KV-cache policy


def test_ring_policy_config_is_validated():
    with pytest.raises(ValueError, match="kv_cache_policy"):
        small_config(kv_cache_policy="rolling")
    with pytest.raises(ValueError, match="kv_cache_ring"):
        small_config(kv_cache_policy="ring", kv_cache_ring=0)
    assert MythosConfig.from_dict(small_config().to_dict()).kv_cache_policy == "per_loop"


@pytest.mark.parametrize("attn_type", ["mla", "gqa"])
def test_ring_cache_memory_does_not_grow_with_depth(attn_type):
    model = small_model(attn_type=attn_type, kv_cache_policy="ring", kv_cache_ring=2)
    sizes = {n: model.new_cache(1, 16, n).nbytes() for n in (1, 2, 4, 16)}
    assert sizes[2] == sizes[4] == sizes[16] > sizes[1]
    assert len(model.new_cache(1, 16, 16).loop_slots) == 2
    assert sizes[16] == 16 * model.cfg.kv_cache_bytes_per_token(16, torch.float32)


@pytest.mark.parametrize("ring", [1, 2])
@torch.no_grad()
def test_ring_cache_prefill_is_exact_and_decode_close(ring):
    # std=0.1: at the default init the logits barely depend on the input, so a decode that read
    # noise from its cache would come as close to the full pass as one that reads stale loops
    model = small_model(std=0.1, kv_cache_policy="ring", kv_cache_ring=ring)
    ids = torch.randint(0, 64, (2, 12))
    full = model(ids, n_loops=3).logits

    def decode(noise: bool) -> torch.Tensor:
        cache = model.new_cache(2, 12, 3)
        outs = [model(ids[:, :6], n_loops=3, cache=cache).logits]
        if noise:  # the control: the looped block's entries of the prompt are garbage
            for slot in cache.loop_slots:
                for buf in slot.tensors:
                    buf.normal_()
        outs += [model(ids[:, i:i + 1], n_loops=3, cache=cache).logits for i in range(6, 12)]
        return torch.cat(outs, 1)

    def decode_error(logits: torch.Tensor) -> float:
        return float((logits[:, 6:] - full[:, 6:]).norm() / full[:, 6:].norm())

    inc = decode(noise=False)
    assert_close(inc[:, :6], full[:, :6], atol=1e-5, rtol=1e-5)
    # stale loops, not garbage: here about a third of the error of decoding from noise
    real, noise = decode_error(inc), decode_error(decode(noise=True))
    assert real < 0.5 * noise, (real, noise)


@pytest.mark.parametrize("attn_type", ["mla", "gqa"])
@torch.no_grad()
def test_a_ring_cache_prompt_is_exact_when_tokens_halt_at_different_loops(attn_type):
    # past the ring's first lap, the tokens still looping must read a halted token's entry of
    # its last loop, as without a cache, not the one of its loop a lap before
    model = small_model(attn_type=attn_type, halting="act", kv_cache_policy="ring", kv_cache_ring=2)
    torch.nn.init.normal_(model.recurrent.act.halt.weight, std=0.5)
    model.recurrent.act.halt.bias.fill_(-2.0)
    ids = torch.randint(0, 64, (2, 12))
    full = model(ids, n_loops=5)
    assert full.loops.min() <= 2 and full.loops.max() >= 4  # some halt in the first lap, some run on
    cached = model(ids, n_loops=5, cache=model.new_cache(2, 12, 5))
    assert_close(cached.logits, full.logits, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_ring_as_deep_as_the_loop_is_the_per_loop_cache():
    ids = torch.randint(0, 64, (2, 10))
    outs = []
    for policy in ("per_loop", "ring"):
        model = small_model(kv_cache_policy=policy, kv_cache_ring=3)
        model.generate(ids[:, :4], 6, temperature=0, n_loops=3)
        outs.append(model.generate(ids[:, :4], 6, temperature=0, n_loops=3))
    assert torch.equal(outs[0], outs[1])


@torch.no_grad()
def test_loop_t_writes_ring_slot_t_mod_ring():
    """The ring policy's layout: loop t reads and writes slot t % kv_cache_ring, so after a
    prompt slot 0 holds loop 2's entries and slot 1 loop 1's (clamping t to the last slot
    instead left loop 0's in slot 0 and decoded differently)."""
    ids = torch.randint(0, 64, (1, 5))
    caches = {}
    for policy in ("per_loop", "ring"):
        model = small_model(kv_cache_policy=policy, kv_cache_ring=2)
        caches[policy] = model.new_cache(1, 16, 3)
        model(ids, n_loops=3, cache=caches[policy])
    ring, per_loop = caches["ring"].loop_slots, caches["per_loop"].loop_slots
    assert len(ring) == 2
    for slot, loop in ((0, 2), (1, 1)):
        assert_close(ring[slot].tensors[0], per_loop[loop].tensors[0])


@torch.no_grad()
def test_ring_cache_with_halting_keeps_halted_tokens_latest_entry():
    model = small_model(halting="act", kv_cache_policy="ring", kv_cache_ring=2)
    with torch.no_grad():
        torch.nn.init.normal_(model.recurrent.act.halt.weight, std=2.0)
    cache = model.new_cache(3, 16, 5)
    out = model(torch.randint(0, 64, (3, 6)), n_loops=5, cache=cache)
    assert out.loops.min() < out.loops.max()  # a mix of depths
    for _ in range(3):
        assert torch.isfinite(model(torch.randint(0, 64, (3, 1)), n_loops=5, cache=cache).logits).all()
    # a token that ran a single loop has its loop-0 entry in both slots
    b, t = (out.loops == 1).nonzero()[0].tolist()
    for a, c in zip(cache.loop_slots[0].tensors, cache.loop_slots[1].tensors, strict=True):
        assert_close(a[b, t], c[b, t])


@pytest.mark.parametrize("policy", ["ring", "per_loop"])
@pytest.mark.parametrize("exits", ["all_after_two_loops", "ragged"])
@torch.no_grad()
def test_halting_sequences_keep_the_cache_they_would_have_alone(policy, exits):
    # With ACT, a sequence's cache entries (hence its later tokens) must not depend on how deep
    # the others in its batch ran. "all_after_two_loops": every token halts at loop 1, the first
    # sequence by its depth of 2 and the second by ACT within a depth of 3, so the batch's loop
    # stops early; "ragged": strong halting weights stop tokens at different loops while other
    # sequences run on past the ring's length.
    model = small_model(halting="act", act_threshold=0.5, kv_cache_policy=policy, kv_cache_ring=2)
    if exits == "all_after_two_loops":  # p = 0.3 at every loop: the sum reaches 0.5 at loop 1
        model.recurrent.act.halt.weight.zero_()
        model.recurrent.act.halt.bias.fill_(math.log(0.3 / 0.7))
        depths = torch.tensor([2, 3, 1])
    else:
        torch.nn.init.normal_(model.recurrent.act.halt.weight, std=0.5)
        model.recurrent.act.halt.bias.fill_(-2.0)
        depths = torch.tensor([6, 3, 6])
    prompts, steps = torch.randint(0, 64, (3, 5)), torch.randint(0, 64, (3, 2))

    def run(rows):
        cache = model.new_cache(len(rows), 16, 6)
        loops = model(prompts[rows], n_loops=depths[rows], cache=cache).loops
        logits = [model(steps[rows, i:i + 1], n_loops=depths[rows], cache=cache).logits for i in range(2)]
        return loops, torch.cat(logits, 1), cache

    loops, logits, cache = run([0, 1, 2])
    last = loops.amax(1) - 1
    assert last.min() < last.max() or (last == 1).all()  # sequences stop at different loops
    for b in range(3):
        _, alone, own = run([b])
        assert_close(logits[b], alone[0], atol=1e-5, rtol=1e-5)
        for mine, theirs in zip(cache.loop_slots, own.loop_slots, strict=True):
            assert_close(mine.tensors[0][b], theirs.tensors[0][0], atol=1e-5, rtol=1e-5)


# ---- kernels


def test_fused_attention_with_a_narrower_value_head_matches_the_math_kernel():
    # qk head 16 (nope 8 + rope 8), v head 8: v is zero-padded to 16 for the fused kernel
    model = small_model(v_head_dim=8).train()
    ids = torch.randint(0, 64, (2, 12))
    loss, grads = loss_and_grads(model, ids)
    with sdpa_kernel(SDPBackend.MATH):
        ref_loss, ref = loss_and_grads(model, ids)
    assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
    for name in ref:
        assert_close(grads[name], ref[name], atol=1e-5, rtol=1e-4)


def test_moe_custom_op_matches_the_eager_loop_exactly():
    torch.manual_seed(0)
    E, D, Fd = 5, 16, 8
    x = torch.randn(30, D, requires_grad=True)
    ws = [torch.randn(E, Fd, D, requires_grad=True), torch.randn(E, Fd, D, requires_grad=True),
          torch.randn(E, D, Fd, requires_grad=True)]
    load = torch.tensor([6, 0, 10, 4, 10])  # an expert with no token
    y_loop = _grouped_swiglu(x, load, *ws)
    y_op = expert_swiglu(x, load, *ws)[0]
    assert torch.equal(y_loop, y_op)
    g = torch.randn_like(y_loop)
    for a, b in zip(torch.autograd.grad(y_loop, [x, *ws], g), torch.autograd.grad(y_op, [x, *ws], g),
                    strict=True):
        assert torch.equal(a, b)
    torch.library.opcheck(expert_swiglu, (x, load, *ws))


# ---- torch.compile


def _compile_counters():
    import torch._dynamo

    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    return counters


@pytest.mark.parametrize("attn_type", ["mla", "gqa"])
def test_compiled_loop_body_has_no_graph_break_and_matches_eager(attn_type):
    counters = _compile_counters()
    model = small_model(attn_type=attn_type).train()
    ids = torch.randint(0, 64, (2, 10))
    ref_loss, ref = loss_and_grads(model, ids, n_loops=3)
    # fullgraph: a graph break anywhere in a block or in the loop body raises
    model.compile_blocks(backend="aot_eager", fullgraph=True)
    loss, grads = loss_and_grads(model, ids, n_loops=3)
    assert not counters["graph_break"]
    assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
    for name in ref:
        assert_close(grads[name], ref[name], atol=1e-5, rtol=1e-4)
    # one graph serves every loop: a deeper call compiles nothing new
    graphs = counters["stats"]["unique_graphs"]
    loss_and_grads(model, ids, n_loops=5)
    assert counters["stats"]["unique_graphs"] == graphs


@torch.no_grad()
def test_compiled_model_decodes_like_eager():
    _compile_counters()
    model = small_model()
    ids = torch.randint(0, 64, (2, 5))
    ref = model.generate(ids, 6, temperature=0)
    model.compile_blocks(backend="aot_eager")
    assert torch.equal(model.generate(ids, 6, temperature=0), ref)


@torch.no_grad()
def test_loop_states_of_a_compiled_model_after_a_forward():
    """loop_states reads each loop's state through a hook, which a loop body compiled before it
    would never call: after a compiled forward it used to find no states at all."""
    model = small_model(halting="none").eval()
    ids = torch.randint(0, 64, (2, 8))
    want = model.loop_states(ids, n_loops=3)
    model.compile_blocks(backend="eager")
    model(ids, n_loops=3)
    assert_close(model.loop_states(ids, n_loops=3), want)
    assert model.recurrent.compiled_step is not None  # still compiled afterwards


@torch.no_grad()
def test_compiled_model_with_ragged_halting_matches_eager():
    # halted rows: the packed attention grid's size is data, so the body splits around it
    _compile_counters()
    model = small_model(halting="act")
    torch.nn.init.normal_(model.recurrent.act.halt.weight, std=2.0)
    ids = torch.randint(0, 64, (3, 9))
    ref = model(ids, n_loops=4)
    assert ref.loops.min() < ref.loops.max()
    model.compile_blocks(backend="aot_eager")
    out = model(ids, n_loops=4)
    assert torch.equal(out.loops, ref.loops)
    assert_close(out.logits, ref.logits, atol=1e-5, rtol=1e-5)


def _decode_logits(model, ragged: bool, steps: int = 5) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Prefill two prompts (left-padded together, or each into its own rows so that the rows hold
    different lengths, as the serving engine leaves them), then decode `steps` fixed tokens."""
    cache = model.new_cache(2, 16)
    if ragged:
        model(torch.tensor([[1, 2, 3, 4, 5]]), n_loops=3, cache=cache.narrow(0, 1))
        model(torch.tensor([[6, 7]]), n_loops=3, cache=cache.narrow(1, 1))
    else:
        model(torch.tensor([[1, 2, 3, 4, 5], [0, 0, 0, 6, 7]]), n_loops=3, cache=cache,
              attention_mask=torch.tensor([[1, 1, 1, 1, 1], [0, 0, 0, 1, 1]]))
    tokens = torch.randint(0, 64, (2, steps), generator=torch.Generator().manual_seed(3))
    logits = [model(tokens[:, i:i + 1], n_loops=3, cache=cache).logits for i in range(steps)]
    state = [t for s in cache.slots for t in s.tensors]
    return torch.cat(logits, 1), [*state, cache.valid, cache.next_pos, cache.lengths]


@pytest.mark.parametrize("attn_type,policy", [("mla", "per_loop"), ("gqa", "ring")])
@pytest.mark.parametrize("ragged", [False, True])
@torch.no_grad()
def test_compiled_decode_step_is_one_graph_and_matches_eager(attn_type, policy, ragged):
    counters = _compile_counters()
    model = small_model(attn_type=attn_type, kv_cache_policy=policy)
    ref, ref_state = _decode_logits(model, ragged)
    # fullgraph: the whole step (prelude, every loop, coda, head) or an error
    model.compile_decode(backend="aot_eager", fullgraph=True)
    got, state = _decode_logits(model, ragged)
    assert not counters["graph_break"]
    assert counters["stats"]["unique_graphs"] == 1  # every decode step, one graph; prefill eager
    assert_close(got, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(state, ref_state, strict=True):
        assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_compile_decode_refuses_data_dependent_halting():
    with pytest.raises(ValueError, match="halting='act'"):
        small_model(halting="act").compile_decode()


@pytest.mark.slow
@torch.no_grad()
def test_inductor_compiled_decode_generates_like_eager():
    _compile_counters()
    model = small_model()
    ids = [[1, 2, 3, 4, 5], [6, 7]]
    ref = model.generate(ids, 8, temperature=0)
    model.compile_decode()  # inductor, with its C++ wrapper on the CPU
    assert torch.equal(model.generate(ids, 8, temperature=0), ref)


@pytest.mark.slow
def test_inductor_compiled_model_matches_eager():
    _compile_counters()
    model = small_model().train()
    ids = torch.randint(0, 64, (2, 10))
    ref_loss, ref = loss_and_grads(model, ids, n_loops=3)
    model.compile_blocks(fullgraph=True)
    loss, grads = loss_and_grads(model, ids, n_loops=3)
    assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    for name in ref:
        assert_close(grads[name], ref[name], atol=1e-4, rtol=1e-3)
