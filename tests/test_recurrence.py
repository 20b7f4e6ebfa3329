"""The loop: unrolled-by-hand parity, rho(A) < 1, ACT weights, row compaction, depth options."""

import math

import pytest
import torch
from torch.testing import assert_close

from openmythos.model.attention import Context
from openmythos.model.recurrence import LTIInjection, build_injection
from tests.conftest import small_config, small_model


def sinusoid(t: int, dim: int, width: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The loop-index embedding written out: sin then cos of t / 10000^(2i / width), then zeros."""
    angles = [t / 10000.0 ** (2 * i / width) for i in range(width // 2)]
    return torch.tensor([*map(math.sin, angles), *map(math.cos, angles)] + [0.0] * (dim - width), dtype=dtype)


def unrolled(model, ids, n_loops, states=None):
    """The model's forward written out by hand, one explicit block call per loop (the state
    after each appended to `states`)."""
    B, T = ids.shape
    dtype = model.embed.weight.dtype  # fp32, or fp64 for an fp64 model: its rotations in fp64
    cos, sin = __import__("openmythos.model.layers", fromlist=["x"]).rope_angles(
        torch.arange(T).expand(B, T), model.cfg.qk_rope_head_dim, model.cfg.rope_theta, dtype)
    ctx = Context(B, T, 0, cos, sin, None, True)
    x = model.embed(ids)
    for layer in model.prelude:
        x = layer(x, ctx)
    rec, e, h = model.recurrent, x, x
    for t in range(n_loops):
        hh = rec.norm(h + sinusoid(t, h.shape[-1], model.cfg.loop_embed_dim, dtype) + e)
        y = rec.block(hh, ctx, None)
        A = torch.exp(-torch.exp(rec.injection.log_dt + rec.injection.log_A))
        h = A * h + torch.exp(rec.injection.log_dt) * rec.injection.B * e + y + rec.lora(y, t)
        if states is not None:
            states.append(h)
    for layer in model.coda:
        h = layer(h, ctx)
    return model.norm(h) @ model.embed.weight.T


@pytest.mark.parametrize("n_loops", [1, 3, 5])
def test_loop_matches_hand_unrolled(n_loops):
    model = small_model()
    ids = torch.randint(0, 64, (2, 10))
    assert_close(model(ids, n_loops=n_loops).logits, unrolled(model, ids, n_loops))


@torch.no_grad()
def test_an_fp64_loop_matches_hand_unrolled_in_fp64():
    """An fp64 model (the numerical reference) loops in fp64 to the last bit or so: its loop-index
    embedding and its rotations are built in fp64, not in fp32 and then cast (which is off by
    ~1e-8 here, inside fp64's default tolerance, so the bound is tighter)."""
    model = small_model(std=0.1).double()
    ids = torch.randint(0, 64, (2, 30))  # positions to 29: an fp32 angle is off by ~1e-6 there
    assert_close(model(ids, n_loops=3).logits, unrolled(model, ids, 3), atol=1e-12, rtol=0)


@pytest.mark.parametrize("halting", ["none", "act"])
def test_loop_states_are_the_states_after_each_loop(halting):
    """Every loop for every token, halting or not: ACT would stop tokens and leave loops out."""
    model = small_model(halting=halting)
    ids = torch.randint(0, 64, (2, 10))
    by_hand = []
    with torch.no_grad():
        unrolled(model, ids, 5, by_hand)
    states = model.loop_states(ids, n_loops=5)
    assert states.shape == (5, 2, 10, model.cfg.dim)
    assert_close(states, torch.stack(by_hand))
    with pytest.raises(ValueError, match="n_loops must be an int"):
        model.loop_states(ids, n_loops=torch.tensor([1, 2]))
    noisy = small_model(dropout=0.3).train()  # eval mode inside: no dropout in the states
    assert_close(noisy.loop_states(ids, 2), noisy.loop_states(ids, 2), rtol=0, atol=0)
    assert noisy.training


def test_depth_changes_the_output_beyond_trained_depth():
    model = small_model()
    ids = torch.randint(0, 64, (1, 8))
    l3, l6 = model(ids, n_loops=3).logits, model(ids, n_loops=6).logits
    assert not torch.allclose(l3, l6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("log_value", [-1e4, -60.0, -20.0, 0.0, 30.0, 1e4])
def test_decay_strictly_inside_unit_interval(dtype, log_value):
    inj = LTIInjection(8, "zoh")
    inj.init_weights()
    with torch.no_grad():
        inj.log_A.fill_(log_value)
        inj.log_dt.fill_(log_value / 2)
    inj = inj.to(dtype)
    A = inj.decay(dtype).to(dtype)
    assert (A < 1).all() and (A >= 0).all(), A
    h = torch.ones(2, 8, dtype=dtype, requires_grad=True)
    out = inj(h, torch.ones(2, 8, dtype=dtype), torch.zeros(2, 8, dtype=dtype))
    out.sum().backward()
    assert torch.isfinite(inj.log_A.grad).all() and torch.isfinite(inj.log_dt.grad).all()
    if dtype != torch.float16:  # fp16 overflows on B*e alone once dt reaches e^20
        assert torch.isfinite(out).all()


def test_zoh_and_euler_gains():
    inj = LTIInjection(4, "zoh")
    inj.init_weights()
    with torch.no_grad():
        inj.log_A.copy_(torch.tensor([-2.0, 0.0, 1.0, 3.0]))
        inj.log_dt.fill_(-0.5)
    dt, a_c = math.exp(-0.5), torch.tensor([-2.0, 0.0, 1.0, 3.0]).exp()
    assert_close(inj.gain(), (1 - torch.exp(-dt * a_c)) / a_c * 0.1)
    inj.discretisation = "euler"
    assert_close(inj.gain(), torch.full((4,), dt * 0.1))


@pytest.mark.parametrize("log_A", [5.0, 30.0])
def test_the_zoh_gain_is_dt_over_the_rate_past_the_bound_of_A(log_A):
    """Past a rate of e^20, where A is exactly 0, the ZOH gain is still (1 - A) / exp(log_A) B:
    e^-5 B at log_dt 19, log_A 5 (capped with A's bound it read dt B / e^20, 55x that); far past
    it (a rate of e^49) under 2e-9 B, with finite gradients for A and the gain."""
    inj = LTIInjection(2, "zoh")
    inj.init_weights()
    with torch.no_grad():
        inj.log_dt.fill_(19.0)
        inj.log_A.fill_(log_A)
    gain = inj.gain()
    if log_A < 20:
        assert_close(gain, torch.full((2,), 0.1 * math.exp(-log_A)), rtol=1e-5, atol=0)
    else:
        assert (gain > 0).all() and (gain < 2e-9 * 0.1).all()
    (gain.sum() + inj.decay().sum()).backward()
    assert all(torch.isfinite(p.grad).all() for p in (inj.log_dt, inj.log_A, inj.B))


@pytest.mark.parametrize("log_dt", [-15.0, 15.0])
def test_the_step_size_is_exp_log_dt_across_its_range(log_dt):
    """dt = exp(log_dt) exactly for |log_dt| up to 20 (clamped there only to stay finite): the
    Euler gain dt B and, at a rate under 1e-6, A = exp(-dt exp(log_A)) and the ZOH gain ~dt B."""
    inj = LTIInjection(2, "euler")
    inj.init_weights()
    with torch.no_grad():
        inj.log_dt.fill_(log_dt)
        inj.log_A.fill_(-log_dt - 14.0)  # the rate dt exp(log_A) = e^-14
    dt = torch.tensor(log_dt, dtype=torch.float64).exp()
    assert_close(inj.gain().double(), torch.full((2,), 0.1 * dt.item(), dtype=torch.float64))
    assert_close(inj.decay().double(), torch.full((2,), math.exp(-math.exp(-14.0)), dtype=torch.float64))
    inj.discretisation = "zoh"
    assert_close(inj.gain().double(), torch.full((2,), 0.1 * dt.item() * -math.expm1(-math.exp(-14.0))
                                                 / math.exp(-14.0), dtype=torch.float64))


@pytest.mark.parametrize("dtype, log_rates", [(torch.float32, [-13.8, -6.9, -2.3, 1.1]),
                                              (torch.float64, [-27.6, -13.8, -2.3, 1.1]),
                                              (torch.bfloat16, [-4.3, -2.1, 0.3, 1.3])])
def test_injection_coefficients_are_exact_in_the_compute_dtype(dtype, log_rates):
    """A = exp(-z) and the zero-order-hold gain dt (1 - exp(-z)) / z B, z = dt exp(log_A) the
    rate (down to 1e-6 in fp32, 1e-12 in fp64), against fp64 by hand to a few ulps of the compute
    dtype (fp32 for a bf16 model, fp64 for an fp64 one): 1 - exp(-z) cancels at a small rate (5 %
    off at z = 1e-6 in fp32), and A or the gain computed in bf16, or in fp32 for an fp64 model, is
    off by ~1e-3 or ~1e-8; so is the rate log_dt + log_A summed in bf16 (the parameters' dtype)
    before the compute dtype."""
    inj = LTIInjection(len(log_rates), "zoh")
    inj.init_weights()
    with torch.no_grad():
        inj.log_dt.fill_(-0.3)
        inj.log_A.copy_(torch.tensor(log_rates) + 0.3)
        inj.B.copy_(torch.linspace(-1, 2, len(log_rates)))
    inj = inj.to(dtype)
    log_dt, log_A, B = (p.detach().double() for p in (inj.log_dt, inj.log_A, inj.B))  # as the model holds them
    z = (log_dt + log_A).exp()
    compute = torch.promote_types(dtype, torch.float32)
    tol = dict(rtol=16 * torch.finfo(compute).eps, atol=0)
    A, gain = inj.decay(dtype), inj.gain(dtype)
    assert A.dtype == gain.dtype == compute
    assert_close(A.double(), torch.exp(-z), **tol)
    assert_close(gain.double(), log_dt.exp() * -torch.expm1(-z) / z * B, **tol)


@pytest.mark.parametrize("injection,a", [("lti", math.exp(-1.0)), ("free", math.exp(-1.0)), ("additive", 1.0)],
                         ids=["lti", "free", "additive"])
def test_each_injection_at_init_written_out(injection, a):
    """h <- A*h + B*e + out at init, per injection: the free ablation starts from the LTI
    injection's A = exp(-exp(0)) (so the two differ only in what training may do to A), the
    additive one is the plain residual A = 1; every B starts at 0.1 (LTI: dt = 1)."""
    inj = build_injection(small_config(injection=injection))
    inj.init_weights()
    assert_close(inj.decay(), torch.full((64,), a))
    h, e, out = torch.randn(3, 64), torch.randn(3, 64), torch.randn(3, 64)
    assert_close(inj(h, e, out), a * h + 0.1 * e + out)


def state_counts_loops(model) -> None:
    """Make the state after loop t equal t + 1 everywhere (the injection returns it)."""
    loop = []

    def inject(h, e, out, coefficients=None):
        loop.append(None)
        return torch.full_like(h, float(len(loop)))

    model.recurrent.injection.forward = inject


def graves_act(probs: list[list[float]], depth: int, threshold: float):
    """ACT (Graves 2016) for one token, written out: its halting probabilities per loop ->
    the weight of each loop's state, the loops run and the ponder cost N + R."""
    c, weights = 0.0, []
    for t in range(depth):
        p = probs[t]
        if t == depth - 1 or c + p >= threshold:
            weights.append(1.0 - c)
            return weights, t + 1, t + 1 + (1.0 - c)
        weights.append(p)
        c += p


# per token, its halting probability at each loop: a token that reaches the threshold at once,
# ones that get there after two or three loops, ones that never do, one that never halts at all
HALT_PROBS = [[0.995, 0, 0, 0], [0.5, 0.6, 0, 0], [0.2, 0.3, 0.1, 0.1],
              [0.1, 0.88, 0.5, 0], [0.0, 0.0, 0.0, 0.0], [0.3, 0.7, 0, 0]]


# ones whose cumulative probability reaches a threshold of 0.75 exactly (every sum exact in
# binary), at loop 1, 2 or 3: each halts there, as Graves' c + p >= threshold says
EXACT_PROBS = [[0.75, 0, 0, 0], [0.5, 0.25, 0, 0], [0.25, 0.25, 0.25, 0],
               [0.125, 0.5, 0.125, 0], [0.0, 0.75, 0.5, 0], [0.5, 0.125, 0.125, 0.5]]


@pytest.mark.parametrize("threshold, halt_probs", [(0.99, HALT_PROBS), (0.75, EXACT_PROBS)],
                         ids=["graves", "exactly_at_the_threshold"])
@pytest.mark.parametrize("n_loops", [1, 2, 3, 4])
def test_act_matches_graves_act_written_out(n_loops, threshold, halt_probs):
    """The halting-weighted output, the loops each token runs and the ponder cost, against ACT
    by hand: the state after loop t is made t + 1 everywhere, so the output is sum_t w_t (t + 1).
    A token whose cumulative probability reaches the threshold exactly halts there (with `>`
    it ran a loop more)."""
    model = small_model(halting="act", coda_layers=0, act_threshold=threshold)
    state_counts_loops(model)
    expected = [graves_act(probs, n_loops, threshold) for probs in halt_probs]
    calls = []

    def halt(h):  # the tokens still looping, in order, get their probability at this loop
        t = len(calls)
        calls.append(h.shape[0])
        live = [i for i, (_, ran, _) in enumerate(expected) if ran > t]
        assert h.shape[0] == len(live), (t, h.shape[0], live)  # halted tokens left the batch
        return torch.tensor([float(halt_probs[i][t]) for i in live])

    model.recurrent.act.forward = halt
    seen = {}
    model.recurrent.register_forward_hook(lambda m, i, o: seen.update(out=o[0]))
    out = model(torch.randint(0, 64, (2, 3)), n_loops=n_loops)
    state = torch.tensor([sum(w * (t + 1) for t, w in enumerate(weights)) for weights, _, _ in expected])
    assert_close(seen["out"], state.view(2, 3, 1).expand_as(seen["out"]))
    assert out.loops.flatten().tolist() == [ran for _, ran, _ in expected]
    assert_close(out.ponder_loss, torch.tensor(sum(cost for _, _, cost in expected) / len(expected)))


@pytest.mark.parametrize("depth, threshold", [(3, 0.999), (5, 0.99), (5, 0.999)])
def test_act_at_init_averages_the_trained_depths_states(depth, threshold):
    """At init every loop's halting probability is 1/L, L the trained depth, for any threshold
    from 1 - 1/(2L) up to 0.999: the output is the plain mean of the L loops' states (the state
    after loop t is made t + 1, so the mean is (L + 1) / 2). The init for the other thresholds,
    threshold / (L - 0.5), also halts at L but weighs the last loop less (it held from 0.999)."""
    model = small_model(halting="act", coda_layers=0, max_loop_iters=depth, act_threshold=threshold)
    state_counts_loops(model)
    seen = {}
    model.recurrent.register_forward_hook(lambda m, i, o: seen.update(out=o[0]))
    out = model(torch.randint(0, 64, (1, 3)), n_loops=depth + 2)
    assert (out.loops == depth).all()
    assert_close(seen["out"], torch.full_like(seen["out"], (depth + 1) / 2))


def test_act_at_init_with_one_trained_loop_stays_below_a_threshold_past_one_minus_1e6():
    """At L = 1 the init's p0 = 1 is kept at 1 - 1e-6 for a finite bias: a threshold above that
    is not reached at the first loop (a p0 nearer 1 rounds to 1.0 in fp32 and halted there)."""
    model = small_model(halting="act", coda_layers=0, max_loop_iters=1, act_threshold=1 - 1e-7)
    assert_close(model.recurrent.act(torch.zeros(1, 64)), torch.tensor([1 - 1e-6]), atol=1e-7, rtol=0)
    assert (model(torch.randint(0, 64, (1, 3)), n_loops=3).loops == 2).all()


def scripted_halting(model, first_p):
    """Halting probabilities: `first_p` (N,) at loop 0, then 0 for every row still running."""
    calls = []

    def halt(h):
        calls.append(h.shape[0])
        return first_p.clone() if len(calls) == 1 else torch.zeros(h.shape[0])

    model.recurrent.act.forward = halt
    rows_in = []
    model.recurrent.block.register_forward_pre_hook(
        lambda m, args: rows_in.append(args[0].reshape(-1, args[0].shape[-1]).shape[0]))
    return rows_in


def test_halted_rows_leave_the_batch():
    model = small_model(halting="act")
    B, T = 2, 6
    rows_in = scripted_halting(model, torch.tensor([1.0, 0.0] * (B * T // 2)))
    out = model(torch.randint(0, 64, (B, T)), n_loops=4)
    assert rows_in == [12, 6, 6, 6]  # half the rows stop after loop 1 and never come back
    assert out.loops.flatten().tolist() == [1, 4] * (B * T // 2)


def test_halted_rows_leave_the_batch_in_decode():
    model = small_model(halting="act")
    cache = model.new_cache(4, 8, 4)
    prompt = torch.randint(0, 64, (4, 3))
    scripted_halting(model, torch.ones(12))
    model(prompt, n_loops=4, cache=cache)
    rows_in = scripted_halting(model, torch.tensor([1.0, 0.0, 0.0, 1.0]))
    out = model(torch.randint(0, 64, (4, 1)), n_loops=4, cache=cache)
    assert rows_in == [4, 2, 2, 2]
    assert out.loops.flatten().tolist() == [1, 4, 4, 1]
    # a token that halted at loop 1 leaves its loop-1 entry in every deeper slot
    for t in range(1, 4):
        for tensor, first in zip(cache.loop_slots[t].tensors, cache.loop_slots[0].tensors, strict=True):
            assert_close(tensor[0, 3], first[0, 3])


def test_early_exit_of_every_row_fills_the_deeper_slots():
    model = small_model(halting="act")
    cache = model.new_cache(2, 8, 4)
    scripted_halting(model, torch.ones(6))  # every token halts after loop 1
    model(torch.randint(0, 64, (2, 3)), n_loops=4, cache=cache)
    for t in range(1, 4):
        for tensor, first in zip(cache.loop_slots[t].tensors, cache.loop_slots[0].tensors, strict=True):
            assert_close(tensor[:, :3], first[:, :3])


def test_halting_none_runs_exactly_n_loops():
    model = small_model(halting="none")
    rows_in = []
    model.recurrent.block.register_forward_pre_hook(lambda m, a: rows_in.append(1))
    out = model(torch.randint(0, 64, (2, 5)), n_loops=6)
    assert len(rows_in) == 6 and (out.loops == 6).all() and out.ponder_loss == 0


def test_per_sequence_depths_match_separate_runs():
    model = small_model()
    ids = torch.randint(0, 64, (3, 7))
    depths = torch.tensor([1, 4, 2])
    calls = []  # (sequences, dense) per loop: without a cache the rows run sorted deepest first,
    hook = model.recurrent.block.register_forward_pre_hook(  # on a prefix, with no row gathers
        lambda m, a: calls.append((a[0].shape[0], a[3] is None)))
    batched = model(ids, n_loops=depths)
    hook.remove()
    assert calls == [(3, True), (2, True), (1, True), (1, True)]
    for b, d in enumerate(depths.tolist()):
        assert_close(batched.logits[b], model(ids[b:b + 1], n_loops=d).logits[0], atol=1e-5, rtol=1e-5)
    assert batched.loops.tolist() == [[1] * 7, [4] * 7, [2] * 7]


@pytest.mark.parametrize("attn_type,policy", [("mla", "per_loop"), ("gqa", "ring")])
@pytest.mark.parametrize("ragged", [False, True])
@torch.no_grad()
def test_deepest_first_depths_run_on_a_prefix_and_match_the_compacted_path(attn_type, policy, ragged):
    # per-sequence depths that never grow along the batch run each loop densely on the sequences
    # still looping; the same sequences in another order take the compacted path (row gathers):
    # the logits and every cache entry agree
    model = small_model(attn_type=attn_type, kv_cache_policy=policy, kv_cache_ring=2)
    depths, lengths = torch.tensor([5, 3, 3, 1]), [6, 2, 4, 3]
    prompts = [torch.randint(0, 64, (n,)) for n in lengths]
    tokens = torch.randint(0, 64, (4, 2))

    def run(order):
        cache, calls = model.new_cache(4, 12, 5), []
        if ragged:  # each prompt into its own row: the rows hold different lengths
            for row, b in enumerate(order):
                model(prompts[b][None], n_loops=int(depths[b]), cache=cache.narrow(row, 1))
            logits = []
        else:  # left-padded together
            ids = torch.stack([torch.cat([torch.zeros(6 - lengths[b], dtype=torch.long), prompts[b]])
                               for b in order])
            mask = (torch.arange(6) >= 6 - torch.tensor(lengths)[order].unsqueeze(1)).long()
            logits = [model(ids, n_loops=depths[order], cache=cache, attention_mask=mask).logits[:, -1:]]
        hook = model.recurrent.block.register_forward_pre_hook(
            lambda m, a: calls.append((a[0].shape[0], a[3] is None)))
        logits += [model(tokens[order, i:i + 1], n_loops=depths[order], cache=cache).logits
                   for i in range(2)]
        hook.remove()
        state = [t for s in cache.slots for t in s.tensors]
        return torch.cat(logits, 1), [*state, cache.valid, cache.next_pos, cache.lengths], calls

    logits, state, calls = run([0, 1, 2, 3])
    order = [2, 0, 3, 1]
    back = torch.tensor(order).argsort()
    shuffled, shuffled_state, shuffled_calls = run(order)
    assert_close(logits, shuffled[back], atol=1e-5, rtol=1e-5)
    for mine, theirs in zip(state, shuffled_state, strict=True):
        assert_close(mine, theirs[back], atol=1e-5, rtol=1e-5)
    # the last decode step: every loop dense on the first 4, 3, 3, 1, 1 sequences
    assert calls[-5:] == [(4, True), (3, True), (3, True), (1, True), (1, True)]
    assert not any(dense for _, dense in shuffled_calls[-4:])  # the compacted path gathers rows


def test_truncated_backprop_through_depth():
    model = small_model().train()
    ids = torch.randint(0, 64, (2, 6))

    def grads(k):
        model.zero_grad()
        out = model(ids, n_loops=4, backprop_loops=k)
        out.logits.square().mean().backward()
        return out.logits.detach(), model.recurrent.lora.scale.weight.grad.clone()

    full, g_full = grads(None)
    same, g_same = grads(4)
    last, g_last = grads(1)
    assert_close(full, last)  # the forward is unchanged
    assert_close(g_full, g_same)
    # with one backprop loop only the last loop's LoRA scale gets a gradient
    assert (g_last[:2] == 0).all() and g_last[2].abs().sum() > 0 and g_full[0].abs().sum() > 0


@pytest.mark.parametrize("halting", ["none", "act", "kl"])
def test_truncated_backprop_with_per_sequence_depths_matches_each_sequence_alone(halting):
    # each sequence backpropagates through its own last k loops, also when it stops long before
    # the deepest one (it used to stop inside the no-grad prefix and get no gradient at all), and
    # with ACT or the KL exit its loops before the window pass on no gradient (its halting
    # weights, readout and keys used to)
    model = small_model(halting=halting, kl_threshold=0.02).train()
    model.init_weights(std=0.2)
    torch.nn.init.normal_(model.recurrent.act.halt.weight, std=0.3)
    ids = torch.randint(0, 64, (3, 5))
    depths = [1, 6, 5]
    params = [model.recurrent.lora.scale.weight, model.embed.weight, model.recurrent.act.halt.weight]

    def grads(ids, n_loops):
        model.zero_grad()
        model(ids, n_loops=n_loops, backprop_loops=2).logits.square().sum().backward()
        return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]

    batched = grads(ids, torch.tensor(depths))
    alone = [grads(ids[b:b + 1], d) for b, d in enumerate(depths)]
    for g, *g_rows in zip(batched, *alone, strict=True):
        assert_close(g, sum(g_rows), atol=1e-4, rtol=1e-4)
    assert alone[0][0].abs().sum() > 0  # the depth-1 sequence trains the looped block


def test_kl_exit_stops_when_predictions_settle():
    model = small_model(halting="kl", kl_threshold=1e9, min_loops=2)  # any drift counts as settled
    out = model(torch.randint(0, 64, (2, 5)), n_loops=6)
    assert (out.loops == 2).all()
    strict = small_model(halting="kl", kl_threshold=1e-30, min_loops=2)
    assert (strict(torch.randint(0, 64, (2, 5)), n_loops=6).loops == 6).all()


def test_kl_exit_matches_fixed_depth_at_its_exit():
    ids = torch.randint(0, 64, (1, 5))
    kl = small_model(halting="kl", kl_threshold=1e9, min_loops=3)
    fixed = small_model(halting="none")
    assert_close(kl(ids, n_loops=8).logits, fixed(ids, n_loops=3).logits)


def kl_exit(probs: list[float], depth: int, threshold: float, min_loops: int) -> int:
    """The KL exit for one token, written out: its readout P(class 0) per loop (two classes) ->
    the loops it runs. It stops after loop t once KL(p_t || p_t-1) < threshold, t >= min_loops."""
    for t in range(1, depth):
        p, q = probs[t], probs[t - 1]
        kl = p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))
        if kl < threshold and t + 1 >= min_loops:
            return t + 1
    return depth


# per token, P(class 0) read at each loop. KL is not symmetric: (.5, .5) -> (.99, .01) moves
# KL(p_t || p_t-1) = 0.64 but KL(p_t-1 || p_t) = 1.61, so a threshold of 1 tells the two apart
KL_PROBS = [[0.5, 0.5, 0.5, 0.5], [0.5, 0.99, 0.99, 0.99], [0.99, 0.5, 0.5, 0.5],
            [0.999, 0.001, 0.999, 0.001], [0.999, 0.999, 0.5, 0.5], [0.001, 0.999, 0.5, 0.99]]


@pytest.mark.parametrize("n_loops", [2, 3, 4])
def test_kl_exit_matches_the_kl_exit_written_out(n_loops):
    """The loops each token runs and the state it leaves with, against the KL exit by hand:
    guards the direction of the divergence, KL(p_t || p_t-1) as documented, not the reverse."""
    model = small_model(halting="kl", coda_layers=0, kl_threshold=1.0)
    state_counts_loops(model)
    expected = [kl_exit(probs, n_loops, 1.0, 1) for probs in KL_PROBS]
    calls = []

    def readout(h):  # the tokens still looping, in order, read their scripted distribution
        t = len(calls)
        calls.append(h.shape[0])
        live = [i for i, ran in enumerate(expected) if ran > t]
        assert h.shape[0] == len(live), (t, h.shape[0], live)
        p = torch.tensor([KL_PROBS[i][t] for i in live])
        return torch.stack([p, 1 - p], -1).log()

    model.readout = readout
    seen = {}
    model.recurrent.register_forward_hook(lambda m, i, o: seen.update(out=o[0]))
    out = model(torch.randint(0, 64, (2, 3)), n_loops=n_loops)
    assert out.loops.flatten().tolist() == expected
    state = torch.tensor(expected, dtype=torch.float32)  # the state after loop t is t + 1
    assert_close(seen["out"], state.view(2, 3, 1).expand_as(seen["out"]))


@torch.no_grad()
def test_a_bf16_models_kl_exit_reads_the_drift_in_fp32():
    """The KL exit of a bf16 model takes its bf16 readout's log-probabilities, and so the drift,
    in fp32. Here each token's readout moves by a KL ~1e-5 between loops, under the threshold:
    every token stops after two loops. Read in bf16, the drift of two such close distributions
    is rounding noise of ~1e-3, either sign, and tokens ran on."""
    model = small_model(halting="kl", coda_layers=0, kl_threshold=1e-4).to(torch.bfloat16)
    first = (torch.randn(6, 64) * 2).to(torch.bfloat16)
    second = (first.float() + torch.randn(6, 64) * 0.004).to(torch.bfloat16)
    logp, logq = torch.log_softmax(second.double(), -1), torch.log_softmax(first.double(), -1)
    assert ((logp.exp() * (logp - logq)).sum(-1) < 0.5e-4).all()  # KL(p_1 || p_0) by hand, in fp64
    readouts = [first, second, second, second]  # each loop's logits, for the tokens still looping
    model.readout = lambda h: readouts.pop(0)[:len(h)]
    assert (model(torch.randint(0, 64, (2, 3)), n_loops=4).loops == 2).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
@torch.no_grad()
def test_act_in_a_bf16_or_fp64_packed_call_matches_each_row_alone(dtype):
    """A packed call (the serving engine's: each row's real tokens only) of a bf16 or fp64 model
    with ACT halting: the halting-weighted sum, cumulative probabilities and ponder cost
    accumulate in the compute dtype (fp32, fp64), which the packed path adds and writes into by
    index, so a buffer in the model's dtype (bf16 += fp32), or in fp32 for an fp64 model, fails
    there (the dense path replaces or promotes its buffers and hid both)."""
    model = small_model(halting="act").to(dtype)
    torch.nn.init.normal_(model.recurrent.act.halt.weight, std=0.1)  # tokens halt at 2 and 3 loops
    new = [torch.randint(0, 64, (n,)) for n in (1, 3, 4)]
    ids = torch.stack([torch.cat([torch.zeros(4 - len(x), dtype=torch.long), x]) for x in new])
    mask = (torch.arange(4) >= 4 - torch.tensor([len(x) for x in new]).unsqueeze(1)).long()
    together, alone = model.new_cache(3, 16, 4, packed=True), model.new_cache(3, 16, 4, packed=True)
    out = model(ids, n_loops=4, cache=together, attention_mask=mask, logits_to_keep=1)
    assert out.logits.dtype == dtype and set(out.loops[out.loops > 0].tolist()) == {2, 3}
    ref = [model(x[None], n_loops=4, cache=alone.narrow(b, 1), logits_to_keep=1).logits
           for b, x in enumerate(new)]
    assert_close(out.logits, torch.cat(ref))


@pytest.mark.parametrize("halting", ["none", "act"])
def test_truncated_backprop_leaves_out_the_balance_loss_of_loops_before_a_window(halting):
    """Per-sequence depths with backprop_loops: a loop that ran any row before its backprop
    window leaves its balance loss (one scalar over every row, which cannot be split) out of the
    gradient. Depths (1, 6, 5) with 2 backprop loops: windows start at loops -1, 4 and 3, so
    only loops 4 and 5 pass a balance-loss gradient on (deepest-first path and halting loop)."""
    model = small_model(halting=halting, balance_loss_weight=0.1).train()
    with torch.no_grad():
        model.recurrent.act.halt.bias.fill_(-20.0)  # ACT never halts a row early here
    per_loop = []
    model.recurrent.block.ffn.register_forward_hook(lambda m, i, o: per_loop.append(o[2]))
    out = model(torch.randint(0, 64, (3, 5)), n_loops=torch.tensor([1, 6, 5]), backprop_loops=2)
    assert len(per_loop) == 6 and out.aux_loss.requires_grad
    live = [t for t, aux in enumerate(per_loop) if aux.requires_grad]
    grads = torch.autograd.grad(out.aux_loss, [per_loop[t] for t in live], allow_unused=True)
    assert [t for t, g in zip(live, grads, strict=True) if g is not None and g != 0] == [4, 5]


def test_truncated_backprop_keeps_the_keys_of_a_token_halted_as_its_window_opens():
    """Per-sequence depths (2, 4, 5), 2 backprop loops, ACT: the windows open at loops 0, 2 and
    3. The first token of the second sequence halts at loop 2, the first of its window, and its
    sequence's other tokens attend to its loop-2 keys at loop 3: those keys pass a gradient on,
    as they do when the sequence runs alone (detaching the keys of every sequence whose window
    opens at or after the loop, rather than after it, dropped it: the third sequence is still
    before its window at loop 2)."""
    model = small_model(halting="act", std=0.2).double().train()  # fp64: sums in another order agree
    B, T, depths = 3, 3, [2, 4, 5]
    seq = [0]  # the sequence that row 0 of the call is: 0 batched, b alone
    rows_in = []
    model.recurrent.block.register_forward_pre_hook(lambda m, a: rows_in.append(a[3]))

    def halt(h):  # p = 1 for the second sequence's first token at loop 2, else 0
        rows = rows_in[-1]
        flat = torch.arange(h.shape[0]) if rows is None else rows
        t = len(rows_in) - 1
        return ((flat // T + seq[0] == 1) & (flat % T == 0) & (t == 2)).to(h.dtype)

    model.recurrent.act.forward = halt
    ids = torch.randint(0, 64, (B, T))
    params = [model.embed.weight, model.recurrent.lora.scale.weight]

    def grads(b, n_loops):
        seq[0] = b
        rows_in.clear()
        model.zero_grad()
        out = model(ids[b:b + len(n_loops)], n_loops=torch.tensor(n_loops), backprop_loops=2)
        out.logits.square().sum().backward()
        return out.loops, [p.grad.clone() for p in params]

    loops, batched = grads(0, depths)
    assert loops.tolist() == [[2] * 3, [3, 4, 4], [5] * 3]
    alone = [grads(b, [d])[1] for b, d in enumerate(depths)]
    for g, *g_rows in zip(batched, *alone, strict=True):
        assert_close(g, sum(g_rows))


@torch.no_grad()
def test_loops_run_are_counted_in_int64_on_every_path():
    """out.loops, the loops each position ran, is an int64 (B, T) tensor whichever path ran:
    a fixed depth, per-sequence depths deepest first or sorted, ACT or the KL exit."""
    ids = torch.randint(0, 64, (2, 3))
    for halting, n_loops, ran in [("none", 3, [3, 3]), ("none", torch.tensor([3, 1]), [3, 1]),
                                  ("none", torch.tensor([1, 3]), [1, 3]), ("act", 3, [3, 3]),
                                  ("kl", 3, [3, 3])]:
        out = small_model(halting=halting, kl_threshold=1e-30)(ids, n_loops=n_loops)
        assert out.loops.dtype == torch.int64, (halting, n_loops, out.loops.dtype)
        assert out.loops.tolist() == [[d] * 3 for d in ran]
