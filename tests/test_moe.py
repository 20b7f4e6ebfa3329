import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from openmythos.model import moe as moe_module
from openmythos.model.moe import MoE, _grouped_swiglu
from tests.conftest import small_config


def reference_moe(moe: MoE, x_ND: torch.Tensor) -> torch.Tensor:
    """A plain per-token, per-expert loop: the parity reference for the grouped dispatch."""
    idx_NK, gates_NK, _ = moe.route(x_ND)
    out = torch.zeros_like(x_ND)
    for n in range(x_ND.shape[0]):
        for k in range(moe.top_k):
            e = int(idx_NK[n, k])
            h = F.silu(moe.w_gate[e] @ x_ND[n]) * (moe.w_up[e] @ x_ND[n])
            out[n] += gates_NK[n, k].to(x_ND.dtype) * (moe.w_down[e] @ h)
    return out if moe.shared is None else out + moe.shared(x_ND)


def make_moe(**overrides) -> MoE:
    moe = MoE(small_config(n_experts=6, n_experts_per_tok=2, **overrides))
    torch.nn.init.normal_(moe.router.weight, std=0.5)
    moe.init_weights(std=0.1)
    return moe


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_grouped_dispatch_matches_per_expert_loop(score):
    moe = make_moe(router_score=score)
    x = torch.randn(40, 64, requires_grad=True)
    out, load, _ = moe(x)
    ref = reference_moe(moe, x)
    assert_close(out, ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(out)
    grads = torch.autograd.grad((out * g).sum(), [x, moe.w_gate, moe.router.weight])
    grads_ref = torch.autograd.grad((ref * g).sum(), [x, moe.w_gate, moe.router.weight])
    for a, b in zip(grads, grads_ref, strict=True):
        assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert load.sum() == 40 * 2 and load.shape == (6,)


def test_bias_changes_selection_not_gate_weights():
    moe = make_moe()
    x = torch.randn(32, 64)
    idx0, gates0, scores = moe.route(x)
    moe.router_bias[3] = 10.0  # force expert 3 into every top-k
    idx1, gates1, scores1 = moe.route(x)
    assert (idx1 == 3).any(-1).all() and not (idx0 == 3).any(-1).all()
    assert_close(scores1, scores)  # the bias never enters the scores ...
    expected = scores.gather(-1, idx1)
    assert_close(gates1, expected / expected.sum(-1, keepdim=True))  # ... nor the gate weights


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_one_expert_per_token_still_trains_the_router(score):
    # normalised over one expert, the gate would be 1 whatever the router says
    moe = MoE(small_config(n_experts=6, n_experts_per_tok=1, router_score=score))
    torch.nn.init.normal_(moe.router.weight, std=0.5)
    moe.init_weights(std=0.1)
    x = torch.randn(32, 64)
    idx, gates, scores = moe.route(x)
    assert_close(gates, scores.gather(-1, idx))
    moe(x)[0].square().sum().backward()
    assert moe.router.weight.grad.abs().sum() > 0


def test_bias_does_not_change_the_gate_gradient():
    moe = make_moe()
    x = torch.randn(32, 64)
    idx, _, scores = moe.route(x)
    # a bias too small to change any selection leaves the router gradient untouched
    top = scores.sort(-1, descending=True).values.detach()
    small = torch.linspace(-1, 1, 6) * (top[:, 1] - top[:, 2]).min() / 4
    grads = []
    for bias in (torch.zeros(6), small):
        moe.router_bias.copy_(bias)
        moe.router.weight.grad = None
        moe(x)[0].square().sum().backward()
        grads.append(moe.router.weight.grad.clone())
    assert_close(grads[0], grads[1])
    assert (moe.route(x)[0].sort(-1).values == idx.sort(-1).values).all()
    assert not moe.router_bias.requires_grad


def test_update_bias_moves_toward_balance():
    moe = make_moe(router_bias_rate=0.01)
    moe.update_bias(torch.tensor([5.0, 0, 0, 0, 0, 50]))
    assert moe.router_bias[0] == pytest.approx(0.01) and moe.router_bias[5] == pytest.approx(-0.01)


def test_the_bias_stays_fp32_in_a_bf16_model():
    """bf16 would round the 1e-3 steps away once the bias passes ~0.25."""
    fp32, bf16 = make_moe(), make_moe().to(torch.bfloat16)
    assert bf16.router_bias.dtype == torch.float32 and bf16.w_gate.dtype == torch.bfloat16
    load = torch.tensor([0.0, 9, 9, 9, 9, 9])  # expert 0 under-loaded at every update
    for _ in range(600):
        fp32.update_bias(load)
        bf16.update_bias(load)
    assert_close(bf16.router_bias, fp32.router_bias)
    assert bf16.router_bias[0] == pytest.approx(0.6, abs=1e-4)
    # a trained bias keeps its fp32 values through the cast, not bf16-rounded ones
    trained = torch.tensor([0.301, 0.302, -0.303, 0.3045, 0.0005, -0.6])
    moe = make_moe()
    moe.router_bias.copy_(trained)
    assert torch.equal(moe.to(torch.bfloat16).router_bias, trained)
    out, _, _ = bf16(torch.randn(8, 64, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16


def test_balance_loss_only_when_asked():
    x = torch.randn(16, 64)
    assert make_moe().train()(x)[2] == 0
    aux = make_moe(balance_loss_weight=0.1).train()(x)[2]
    assert aux > 0 and aux.requires_grad


def test_balance_loss_is_a_training_term_only():
    """The balance loss is a training regulariser: in eval mode (evaluation, generation) it is 0
    even when configured, with no graph behind it; the load is counted either way."""
    x = torch.randn(16, 64)
    moe = make_moe(balance_loss_weight=0.1)
    _, load, aux = moe.eval()(x)
    assert aux == 0 and not aux.requires_grad and load.sum() == 16 * 2
    assert moe.train()(x)[2] > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_router_scores_are_fp32_in_a_low_precision_model(dtype, score):
    """Scores and gates against fp64 by hand from the stored router weights: the bias moves the
    selection in steps of 1e-3, finer than bf16 resolves a score near 0.5, and so are the logits
    themselves (the router's matmul in bf16 put the scores ~4e-3 off at init, 3e-2 here)."""
    moe = make_moe(router_score=score).to(dtype)
    x = torch.randn(16, 64, dtype=dtype)
    idx, gates, scores = moe.route(x)
    assert scores.dtype == gates.dtype == torch.float32
    logits = x.double() @ moe.router.weight.double().T
    ref = logits.softmax(-1) if score == "softmax" else logits.sigmoid()
    chosen = ref.gather(-1, idx)
    assert_close(scores.double(), ref, atol=0, rtol=3e-6)  # a few ulps of fp32 logits near 10
    assert_close(gates.double(), chosen / chosen.sum(-1, keepdim=True), atol=0, rtol=3e-6)


def test_init_weights_draws_the_experts_at_the_given_std():
    moe = MoE(small_config())
    moe.init_weights(std=0.5)
    for w in (moe.w_gate, moe.w_up, moe.w_down):
        assert float(w.detach().std()) == pytest.approx(0.5, rel=0.05)


def test_route_gradient_matches_a_hand_written_router():
    """The dispatch parity test takes its gates from route() itself, so it cannot see a wrong
    gate gradient: here the gates' gradient is checked against softmax, gather and the
    normalisation over the k written out (the selection is fixed by the forward pass)."""
    moe = make_moe()
    x = torch.randn(16, 64)
    idx, gates, _ = moe.route(x)
    chosen = (x @ moe.router.weight.T).softmax(-1).gather(-1, idx)
    expected = chosen / chosen.sum(-1, keepdim=True)
    g = torch.randn_like(gates)
    grad, = torch.autograd.grad((gates * g).sum(), moe.router.weight)
    grad_ref, = torch.autograd.grad((expected * g).sum(), moe.router.weight)
    assert_close(grad, grad_ref, atol=1e-6, rtol=1e-5)


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch has no _grouped_mm")
@pytest.mark.parametrize("kernel", ["grouped_mm", "custom_op"])
def test_each_expert_kernel_matches_the_eager_loop_also_under_autocast(kernel, monkeypatch):
    """The kernels that CUDA (torch._grouped_mm) and torch.compile (the custom op) take, run on
    the CPU by forcing their branch: the same rows, gradients and autocast dtype as the loop."""
    E, D, Fd = 5, 16, 8
    x = torch.randn(30, D, requires_grad=True)
    ws = [torch.randn(E, Fd, D, requires_grad=True), torch.randn(E, Fd, D, requires_grad=True),
          torch.randn(E, D, Fd, requires_grad=True)]
    load = torch.tensor([6, 0, 10, 4, 10])  # an expert with no token
    g = torch.randn(30, D)
    runs = []
    for forced in (False, True):
        if forced and kernel == "grouped_mm":
            monkeypatch.setattr(moe_module, "_grouped_mm_works", lambda x: True)
        elif forced:
            monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        y = _grouped_swiglu(x, load, *ws)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y_bf16 = _grouped_swiglu(x, load, *ws)
        runs.append((y, y_bf16, *torch.autograd.grad(y, [x, *ws], g)))
    assert runs[1][1].dtype == torch.bfloat16
    for a, b in zip(*runs, strict=True):
        assert_close(a, b, atol=1e-5, rtol=1e-5)
