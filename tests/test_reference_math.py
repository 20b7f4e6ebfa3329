"""The library's core math against independent references written out here in plain torch:
RoPE, GQA and MLA attention, sampling temperature / top-k / top-p, MoE routing scores and the
balance loss, active-parameter counts, and validation loss / bits per byte.

The other suites compare the library with itself (cached vs full, absorbed vs naive, grouped vs
looped), so a bug shared by both sides (a wrong scale, rotations switched off, a dropped
temperature) leaves them green. Each reference below is built from the definition, never from a
library helper, and runs in float64 where that is cheap.
"""

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.testing import assert_close

from openmythos.data import PackedTokens
from openmythos.evaluation.perplexity import (
    bits_per_byte,
    depth_table,
    evaluate,
    loss_per_depth,
    perplexity,
    scored_targets,
)
from openmythos.generation import probabilities
from openmythos.model.attention import Context, GQAttention, MLAttention
from openmythos.model.block import TransformerBlock
from openmythos.model.layers import RMSNorm, SwiGLU, apply_rope, rope_angles
from openmythos.model.moe import MoE
from tests.conftest import small_config, small_model

THETA = 10000.0


# ---- RoPE


def reference_rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """RoFormer's rotation as a complex product, in float64. x (..., T, H, d), positions (..., T).

    The library uses the GPT-NeoX ("half-split") pairing: channel j is paired with channel
    j + d/2 (not with j + 1, the interleaved GPT-J / Meta layout), and pair j turns at frequency
    theta^(-2j/d). So pair j is the complex number x[j] + i x[j + d/2], multiplied by
    exp(i * pos * theta^(-2j/d)); the real parts form the first half of the output, the
    imaginary parts the second.
    """
    d = x.shape[-1]
    half = d // 2
    freq = theta ** (-2.0 * torch.arange(half, dtype=torch.float64) / d)  # (d/2,)
    angle = positions.to(torch.float64).unsqueeze(-1) * freq  # (..., T, d/2)
    rot = torch.polar(torch.ones_like(angle), angle).unsqueeze(-2)  # (..., T, 1, d/2)
    xd = x.to(torch.float64)
    z = torch.complex(xd[..., :half], xd[..., half:]) * rot
    return torch.cat([z.real, z.imag], dim=-1)


def library_rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    cos, sin = rope_angles(positions, x.shape[-1], theta)
    return apply_rope(x, cos, sin)


def test_rope_matches_complex_rotation():
    """rope_angles + apply_rope = multiplication by exp(i*pos*theta^(-2j/d)) in the NeoX
    half-split pairing: guards the frequencies, the sign of the rotation, the pairing and that
    the rotation is applied at all."""
    x = torch.randn(2, 9, 3, 16)
    positions = torch.tensor([list(range(9)), list(range(40, 49))])
    assert_close(library_rope(x, positions, THETA).double(), reference_rope(x, positions, THETA),
                 atol=1e-5, rtol=1e-5)
    # each pair is a plane rotation: norms are kept, pair by pair
    out = library_rope(x, positions, THETA)

    def pair_norms(t: torch.Tensor) -> torch.Tensor:
        return t[..., :8].square() + t[..., 8:].square()
    assert_close(pair_norms(out), pair_norms(x), atol=1e-5, rtol=1e-5)


def test_rope_of_an_fp64_model_is_exact_in_fp64():
    """Angles and rotation in fp64 for an fp64 model (they went through fp32: ~1e-7 off)."""
    x = torch.randn(2, 9, 3, 16, dtype=torch.float64)
    positions = torch.tensor([list(range(9)), list(range(1000, 1009))])
    cos, sin = rope_angles(positions, 16, THETA, torch.float64)
    out = apply_rope(x, cos, sin)
    assert out.dtype == torch.float64
    assert_close(out, reference_rope(x, positions, THETA))


def test_rope_scores_depend_only_on_the_position_difference():
    """After rotation, q_m . k_n is a function of m - n alone (the point of RoPE), and it does
    change with m - n: guards against rotations that are absolute, or absent."""
    q, k = torch.randn(1, 1, 32), torch.randn(1, 1, 32)

    def score(m: int, n: int) -> torch.Tensor:
        qm = library_rope(q, torch.tensor([m]), THETA)
        kn = library_rope(k, torch.tensor([n]), THETA)
        return (qm * kn).sum()

    for m, n in [(3, 0), (5, 5), (2, 9)]:
        for shift in (1, 7, 30):
            assert_close(score(m + shift, n + shift), score(m, n), atol=1e-4, rtol=1e-4)
    by_offset = torch.stack([score(10 + delta, 10) for delta in range(-4, 5)])
    assert (by_offset[1:] - by_offset[:-1]).abs().min() > 1e-3, by_offset


# ---- attention


def reference_rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps) * weight


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64],
                         ids=["fp32", "bf16", "fp16", "fp64"])
@torch.no_grad()
def test_rmsnorm_matches_the_definition_in_every_dtype(dtype):
    """x / sqrt(mean(x^2) + eps) * weight, in fp32 then rounded once to x's dtype: the fused fp32
    kernel and the low-precision path alike (bf16 and fp16 take their own code); fp64 all in fp64,
    not through fp32. Guards the mean of squares, the eps (an all-zero row, as padding reads, must
    give zeros, not NaN) and the output dtype."""
    norm = RMSNorm(16, eps=1e-5)
    norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(5, 16) * 3
    x[2] = 0.0
    expected = reference_rmsnorm(x.to(dtype).double(), norm.weight.to(dtype).double(), 1e-5)
    out = norm.to(dtype)(x.to(dtype))
    assert out.dtype == dtype
    exact = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {}  # fp32 gives ~1e-7
    assert_close(out, expected.to(dtype), **exact)
    assert (out[2] == 0).all()


def test_swiglu_matches_the_definition():
    """down(silu(gate x) * up x) (Shazeer 2020): the gated branch is `gate`, not `up`, which the
    checkpoints and exported weights name."""
    ffn = SwiGLU(16, 24)
    x = torch.randn(4, 16).double()
    g, u, d = (m.weight.double() for m in (ffn.gate, ffn.up, ffn.down))
    a = x @ g.T
    expected = (a / (1 + torch.exp(-a)) * (x @ u.T)) @ d.T
    assert_close(ffn(x.float()).double(), expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("attn_type", ["mla", "gqa"])
@torch.no_grad()
def test_pre_norm_block_written_out(attn_type):
    """x + attn(attn_norm(x)), then + ffn(ffn_norm(.)): each branch reads its own norm of the
    residual stream and adds onto the stream, not onto the normed input."""
    cfg = small_config(attn_type=attn_type)
    block = TransformerBlock(cfg).eval()
    spread_weights(block)
    x = torch.randn(2, 7, 64) * 2
    ctx = causal_context(2, 7, cfg.qk_rope_head_dim if attn_type == "mla" else cfg.head_dim, POSITIONS)
    h = x + block.attn(block.attn_norm(x), ctx, None)
    assert_close(block(x, ctx), h + block.ffn(block.ffn_norm(h)), atol=1e-5, rtol=1e-5)


def test_block_dropout_drops_both_branches():
    """cfg.dropout drops each residual branch (attention and FFN output) in training: with both
    branches stubbed to ones and x = 0, each output element is 0 + {0, 2} + {0, 2}, never odd."""
    block = TransformerBlock(small_config(dropout=0.5)).train()
    block.attn.forward = lambda x, ctx, kv=None, rows=None: torch.ones_like(x)
    block.ffn.forward = lambda x: torch.ones_like(x)
    out = block(torch.zeros(4, 8, 64), causal_context(4, 8, 8, torch.arange(8).expand(4, 8)))
    assert set(out.unique().tolist()) == {0.0, 2.0, 4.0}


def reference_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               scale: float) -> torch.Tensor:
    """softmax(q k^T * scale + causal mask) v per head; q, k (B, T, H, d), v (B, T, H, dv)."""
    T = q.shape[1]
    scores = torch.einsum("bthd,bshd->bhts", q, k) * scale
    future = torch.ones(T, T, dtype=torch.bool).triu(1)
    p = scores.masked_fill(future, float("-inf")).softmax(-1)
    return torch.einsum("bhts,bshd->bthd", p, v)


def spread_weights(module: nn.Module) -> None:
    """Weights with unit-variance outputs and norm gains away from 1, so the attention is far
    from uniform and a wrong scale, mask or rotation shows in the output."""
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() == 2:
                p.normal_(0, 1.5 / math.sqrt(p.shape[1]))
            else:  # RMSNorm gains
                p.uniform_(0.5, 1.5)


def causal_context(B: int, T: int, rope_dim: int, positions: torch.Tensor) -> Context:
    cos, sin = rope_angles(positions, rope_dim, THETA)
    return Context(B, T, start=0, cos=cos, sin=sin, mask=None, is_causal=True)


POSITIONS = torch.tensor([list(range(7)), list(range(11, 18))])  # one row offset: rope per row


@pytest.mark.parametrize("q_lora_rank,absorb", [(32, False), (32, True), (0, False)],
                         ids=["q_latent-naive", "q_latent-absorbed", "q_direct-naive"])
@torch.no_grad()
def test_mla_matches_hand_written_attention(q_lora_rank, absorb):
    """MLA without a cache equals the DeepSeek-V2 equations written out from the layer's own
    weights: queries (through the normalised q latent when q_lora_rank > 0), the normalised kv
    latent up-projected to per-head k_nope and v, one shared RoPE key, and the scale
    (qk_nope_head_dim + qk_rope_head_dim)^-1/2. Guards the scale, the split of the projections,
    the shared rope key and the causal mask, on both the naive and the absorbed path."""
    cfg = small_config(q_lora_rank=q_lora_rank)
    attn = MLAttention(cfg).eval()
    spread_weights(attn)
    attn.absorb = absorb
    B, T = POSITIONS.shape
    x = torch.randn(B, T, cfg.dim)
    out = attn(x, causal_context(B, T, cfg.qk_rope_head_dim, POSITIONS), None)

    H, r, dv = cfg.n_heads, cfg.kv_lora_rank, cfg.v_head_dim
    nope, rope = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
    W = {name: p.detach().double() for name, p in attn.named_parameters()}
    xd = x.double()
    if q_lora_rank:
        cq = reference_rmsnorm(xd @ W["q_down.weight"].T, W["q_norm.weight"], cfg.norm_eps)
        q = cq @ W["q_up.weight"].T
    else:
        q = xd @ W["q_proj.weight"].T
    q = q.view(B, T, H, nope + rope)
    q_nope, q_rope = q[..., :nope], reference_rope(q[..., nope:], POSITIONS, THETA)
    down = xd @ W["kv_down.weight"].T  # (B, T, r + rope)
    c_kv = reference_rmsnorm(down[..., :r], W["kv_norm.weight"], cfg.norm_eps)
    k_rope = reference_rope(down[..., r:].unsqueeze(2), POSITIONS, THETA)  # (B, T, 1, rope)
    up = (c_kv @ W["kv_up.weight"].T).view(B, T, H, nope + dv)
    k_nope, v = up[..., :nope], up[..., nope:]
    q_full = torch.cat([q_nope, q_rope], -1)
    k_full = torch.cat([k_nope, k_rope.expand(B, T, H, rope)], -1)
    o = reference_causal_attention(q_full, k_full, v, (nope + rope) ** -0.5)
    expected = o.reshape(B, T, H * dv) @ W["wo.weight"].T
    assert_close(out.double(), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
@torch.no_grad()
def test_gqa_matches_hand_written_attention(n_kv_heads):
    """GQA without a cache equals softmax(Q K^T / sqrt(head_dim) + causal mask) V with RoPE on
    the full head of q and k, query head h reading key/value head h // (n_heads / n_kv_heads).
    Guards the scale, the head grouping and the causal mask (the single-kv-head case runs the
    library's shared-key kernel)."""
    cfg = small_config(attn_type="gqa", n_kv_heads=n_kv_heads)
    attn = GQAttention(cfg).eval()
    spread_weights(attn)
    B, T = POSITIONS.shape
    x = torch.randn(B, T, cfg.dim)
    out = attn(x, causal_context(B, T, cfg.head_dim, POSITIONS), None)

    H, hd = cfg.n_heads, cfg.head_dim
    xd = x.double()
    q = (xd @ attn.wq.weight.double().T).view(B, T, H, hd)
    k = (xd @ attn.wk.weight.double().T).view(B, T, n_kv_heads, hd)
    v = (xd @ attn.wv.weight.double().T).view(B, T, n_kv_heads, hd)
    q, k = reference_rope(q, POSITIONS, THETA), reference_rope(k, POSITIONS, THETA)
    group = H // n_kv_heads
    kv_head = [h // group for h in range(H)]  # consecutive query heads share a key head
    o = reference_causal_attention(q, k[:, :, kv_head], v[:, :, kv_head], hd ** -0.5)
    expected = o.reshape(B, T, H * hd) @ attn.wo.weight.double().T
    assert_close(out.double(), expected, atol=1e-4, rtol=1e-4)


# ---- sampling


LOGITS = torch.tensor([[2.0, -1.0, 0.5, 3.0, 0.0, -2.5, 1.2, 0.7],
                       [0.1, 0.4, -0.3, 1.9, 2.2, -1.1, 0.9, -0.6]])


@pytest.mark.parametrize("temperature", [0.5, 2.0, 1.0])
def test_temperature_divides_the_logits(temperature):
    """probabilities(logits, T) = softmax(logits / T): guards that the temperature is applied
    (T = 1 would pass without it, so 0.5 and 2.0 are what check it)."""
    expected = (LOGITS.double() / temperature).exp()
    expected = expected / expected.sum(-1, keepdim=True)
    assert_close(probabilities(LOGITS, temperature).double(), expected, atol=1e-6, rtol=1e-6)


def tempered(row: torch.Tensor, temperature: float) -> list[float]:
    e = [math.exp(v / temperature) for v in row.tolist()]
    return [v / sum(e) for v in e]


@pytest.mark.parametrize("temperature", [0.5, 2.0])
@pytest.mark.parametrize("top_k", [1, 3, 7, 8])  # 7: all but the least likely
def test_top_k_renormalises_the_k_most_likely(temperature, top_k):
    """top_k keeps the k largest logits and renormalises softmax(logits / T) over them."""
    for row, got in zip(LOGITS, probabilities(LOGITS, temperature, top_k=top_k), strict=True):
        p = tempered(row, temperature)
        keep = sorted(range(len(p)), key=lambda i: -p[i])[:top_k]
        mass = sum(p[i] for i in keep)
        expected = torch.tensor([p[i] / mass if i in keep else 0.0 for i in range(len(p))])
        assert_close(got.double(), expected.double(), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("temperature", [0.5, 2.0])
@pytest.mark.parametrize("top_p", [0.3, 0.8, 0.95])
def test_top_p_keeps_the_smallest_nucleus(temperature, top_p):
    """top_p keeps, in order of softmax(logits / T), the tokens until their mass first reaches
    top_p (the token that crosses it included), and renormalises over them."""
    for row, got in zip(LOGITS, probabilities(LOGITS, temperature, top_p=top_p), strict=True):
        p = tempered(row, temperature)
        keep, mass = [], 0.0
        for i in sorted(range(len(p)), key=lambda i: -p[i]):
            if mass >= top_p:
                break
            keep.append(i)
            mass += p[i]
        expected = torch.tensor([p[i] / mass if i in keep else 0.0 for i in range(len(p))])
        assert_close(got.double(), expected.double(), atol=1e-6, rtol=1e-6)


# ---- MoE routing


@pytest.mark.parametrize("score", ["sigmoid", "softmax"])
@torch.no_grad()
def test_router_scores_and_gates(score):
    """route(): scores are sigmoid or softmax of x @ W_router^T (per config); the bias only
    picks the top-k (scores + bias), and the gates are the chosen unbiased scores normalised
    over the k."""
    moe = MoE(small_config(n_experts=6, n_experts_per_tok=2, router_score=score))
    nn.init.normal_(moe.router.weight, std=0.5)
    moe.router_bias.copy_(torch.tensor([0.0, 0.3, -0.2, 0.1, 0.0, 0.25]))
    x = torch.randn(16, 64)
    idx, gates, scores = moe.route(x)
    logits = x.double() @ moe.router.weight.double().T
    if score == "sigmoid":
        expected = 1 / (1 + torch.exp(-logits))
    else:
        expected = logits.exp() / logits.exp().sum(-1, keepdim=True)
    assert_close(scores.double(), expected, atol=1e-6, rtol=1e-6)
    biased = expected + moe.router_bias.double()
    for n in range(len(x)):
        chosen = sorted(range(6), key=lambda e: -biased[n, e].item())[:2]
        assert sorted(idx[n].tolist()) == sorted(chosen)
        picked = expected[n, idx[n]]
        assert_close(gates[n].double(), picked / picked.sum(), atol=1e-6, rtol=1e-6)


def one_hot_router(moe: MoE, logits_NE: torch.Tensor) -> torch.Tensor:
    """Inputs x_n = e_n with router rows set so that router(x) = logits_NE exactly."""
    N = logits_NE.shape[0]
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[:, :N] = logits_NE.T
    return torch.eye(N, moe.router.weight.shape[1])


def test_balance_loss_on_a_hand_computed_example():
    """Switch-style balance loss = weight * n_experts * sum_i f_i * P_i, with f_i the fraction of
    assignments to expert i and P_i the mean over tokens of its normalised score. Worked by hand:
    softmax scores p1 = (.5, .3, .1, .1) -> top-2 {0, 1}; p2 = (.6, .1, .2, .1) -> {0, 2};
    f = (2, 1, 1, 0) / 4, P = (.55, .2, .15, .1), sum f*P = .3625, x 4 experts = 1.45."""
    moe = MoE(small_config(n_experts=4, n_experts_per_tok=2, router_score="softmax",
                           balance_loss_weight=0.5))
    moe.init_weights()
    moe.train()
    probs = torch.tensor([[0.5, 0.3, 0.1, 0.1], [0.6, 0.1, 0.2, 0.1]])
    _, load, aux = moe(one_hot_router(moe, probs.log()))
    assert load.tolist() == [2, 1, 1, 0]
    assert_close(aux, torch.tensor(0.5 * 1.45), atol=1e-6, rtol=1e-6)


def test_balance_loss_normalises_sigmoid_scores():
    """With sigmoid scores, P_i averages each token's scores normalised to sum 1. By hand, with
    sigmoid(ln 7, ln 3, 0, -ln 3) = (7/8, 3/4, 1/2, 1/4), each row summing to 19/8:
    token 1 logits (ln 7, ln 3, 0, -ln 3) -> P1 = (7, 6, 4, 2)/19, top-2 {0, 1};
    token 2 logits (ln 3, -ln 3, ln 7, 0) -> P2 = (6, 2, 7, 4)/19, top-2 {2, 0};
    f = (2, 1, 1, 0)/4, P = (13, 8, 11, 6)/38, sum f*P = 45/152, x 4 experts = 45/38."""
    moe = MoE(small_config(n_experts=4, n_experts_per_tok=2, router_score="sigmoid",
                           balance_loss_weight=1.0))
    moe.init_weights()
    moe.train()
    ln3, ln7 = math.log(3), math.log(7)
    logits = torch.tensor([[ln7, ln3, 0.0, -ln3], [ln3, -ln3, ln7, 0.0]])
    _, load, aux = moe(one_hot_router(moe, logits))
    assert load.tolist() == [2, 1, 1, 0]
    assert_close(aux, torch.tensor(45 / 38), atol=1e-6, rtol=1e-6)


def test_an_fp64_models_balance_loss_is_fp64():
    """The load fractions take the scores' dtype: with 3 tokens x 2 experts (sixths, which fp32
    rounds) an fp64 model's loss is the formula in fp64 to an ulp (fp32 fractions: ~1e-8 off)."""
    moe = MoE(small_config(n_experts=4, n_experts_per_tok=2, router_score="softmax",
                           balance_loss_weight=1.0))
    moe.init_weights()
    moe = moe.double().train()
    logits = torch.tensor([[1.0, 0.5, -0.3, 0.2], [0.1, 0.9, 0.4, -1.0], [-0.2, 0.3, 1.1, 0.6]],
                          dtype=torch.float64)
    _, load, aux = moe(one_hot_router(moe, logits).double())
    assert load.tolist() == [1, 2, 2, 1]
    want = 4 * (load.double() / 6 * logits.softmax(-1).mean(0)).sum()
    assert aux.dtype == torch.float64
    assert_close(aux, want, rtol=4e-16, atol=0)


# ---- parameter counts


@pytest.mark.parametrize("overrides", [{}, {"attn_type": "gqa"}, {"q_lora_rank": 0, "n_experts": 6,
                                                                  "n_experts_per_tok": 3},
                                       {"n_shared_experts": 2}, {"n_shared_experts": 0}],
                         ids=["mla", "gqa", "mla-direct-q", "two-shared", "no-shared"])
def test_active_params_count_only_the_routed_experts_a_token_uses(overrides):
    """active_params_per_token = every parameter of the built model except the routed experts
    a token is not sent to: all shared weights plus n_experts_per_tok of the n_experts routed
    expert FFNs (counted here from the module's own tensors)."""
    cfg = small_config(**overrides)
    model = small_model(**overrides)
    total = sum(p.numel() for p in model.parameters())
    assert cfg.num_params() == total
    unused = 0
    for m in model.modules():
        if isinstance(m, MoE):
            per_expert = sum(w[0].numel() for w in (m.w_gate, m.w_up, m.w_down))
            unused += (cfg.n_experts - cfg.n_experts_per_tok) * per_expert
    assert unused > 0
    assert cfg.active_params_per_token() == total - unused


# ---- evaluation


@torch.no_grad()
def test_evaluate_is_the_mean_cross_entropy_over_every_target():
    """evaluate() = cross-entropy summed over every target of consecutive seq_len windows (the
    short remainder included), divided by the number of targets: the token mean, not a mean of
    per-batch means. Windows are scored one at a time here, so batching cannot hide an error."""
    model = small_model(std=0.1)
    seq_len, n_loops = 8, 2
    stream = np.random.default_rng(0).integers(0, 64, size=1 + 3 * seq_len + 5)
    tokens = PackedTokens(stream)
    loss, loops = evaluate(model, tokens, seq_len=seq_len, batch_size=2, n_loops=n_loops)

    ids = torch.from_numpy(stream).long()
    total, count = 0.0, 0
    for start in range(0, len(stream) - 1, seq_len):
        x = ids[start:start + seq_len]
        y = ids[start + 1:start + seq_len + 1]
        x = x[:len(y)]
        logits = model(x[None], n_loops=n_loops).logits[0].double()
        total += float(-(logits.log_softmax(-1).gather(-1, y[:, None])).sum())
        count += len(y)
    assert count == len(stream) - 1
    assert_close(loss, total / count, atol=1e-5, rtol=1e-5)
    assert_close(loops, float(n_loops))


def reference_loss(model, stream: np.ndarray, seq_len: int, n_loops: int) -> float:
    """Mean next-token cross-entropy over consecutive whole windows, all in one forward pass
    (the batch evaluate() makes of them when batch_size covers them all)."""
    ids = torch.from_numpy(stream).long()
    n = (len(ids) - 1) // seq_len * seq_len
    x, y = ids[:n].view(-1, seq_len), ids[1:n + 1].view(-1, seq_len)
    logits = model(x, n_loops=n_loops).logits.double()
    return float(-(logits.log_softmax(-1).gather(-1, y[..., None])).mean())


@torch.no_grad()
def test_evaluate_a_split_shorter_than_one_window():
    """A validation split shorter than seq_len + 1 tokens is scored as one window of all its
    targets (scored_targets counts them alike), not refused as a window too long for it."""
    model = small_model(std=0.1)
    stream = np.random.default_rng(1).integers(0, 64, size=6)
    loss, _ = evaluate(model, PackedTokens(stream), seq_len=32, batch_size=2, n_loops=2)
    assert_close(loss, reference_loss(model, stream, 5, n_loops=2), atol=1e-5, rtol=1e-5)
    assert scored_targets(PackedTokens(stream), 32) == 5


@torch.no_grad()
def test_evaluate_runs_in_eval_mode_and_under_the_autocast_it_is_given():
    """evaluate() switches a model in training mode to eval mode (no dropout) and back, and
    runs the forward under autocast_dtype: dropout left on, or bf16 evaluation silently in
    fp32, gives another number than the reference."""
    model = small_model(std=0.1, dropout=0.5).train()
    seq_len, n_loops = 8, 2
    stream = np.random.default_rng(2).integers(0, 64, size=1 + 4 * seq_len)
    tokens = PackedTokens(stream)
    loss, _ = evaluate(model, tokens, seq_len=seq_len, batch_size=4, n_loops=n_loops)
    assert model.training
    model.eval()
    assert_close(loss, reference_loss(model, stream, seq_len, n_loops), atol=1e-5, rtol=1e-5)
    model.train()
    bf16, _ = evaluate(model, tokens, seq_len=seq_len, batch_size=4, n_loops=n_loops,
                       autocast_dtype=torch.bfloat16)
    model.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference = reference_loss(model, stream, seq_len, n_loops)
    assert_close(bf16, reference, atol=2e-5, rtol=0)
    assert abs(bf16 - loss) > 1e-4


@torch.no_grad()
def test_loss_per_depth_is_evaluate_at_each_depth():
    """Each entry is the validation loss run at that depth (a sweep that ignored its depths
    printed one loss in every row)."""
    model = small_model(std=0.1)
    seq_len = 8
    stream = np.random.default_rng(3).integers(0, 64, size=1 + 4 * seq_len)
    losses = loss_per_depth(model, PackedTokens(stream), [1, 3], seq_len=seq_len, batch_size=4)
    assert list(losses) == [1, 3]
    for n, loss in losses.items():
        assert_close(loss, reference_loss(model, stream, seq_len, n), atol=1e-5, rtol=1e-5)
    assert abs(losses[1] - losses[3]) > 1e-3


def test_evaluate_builds_no_graph_and_counts_the_loops_each_token_ran():
    """evaluate() runs its forwards without autograd, called from code that has it on (a graph
    kept per batch cost the activations' memory for nothing), and its loops are the mean over
    targets of the loops each token ran: under ACT they differ by token, so a batch's deepest
    depth per token gives another number. Windows scored one at a time are the reference."""
    model = small_model(std=0.1, halting="act", act_threshold=0.5)
    seq_len, n_loops = 8, 3
    stream = np.random.default_rng(4).integers(0, 64, size=1 + 3 * seq_len + 5)
    grad_modes = []
    hook = model.register_forward_hook(lambda *_: grad_modes.append(torch.is_grad_enabled()))
    assert torch.is_grad_enabled()
    _, loops = evaluate(model, PackedTokens(stream), seq_len=seq_len, batch_size=2, n_loops=n_loops)
    hook.remove()
    assert grad_modes and not any(grad_modes)

    ids = torch.from_numpy(stream).long()
    with torch.no_grad():
        windows = [ids[s:min(s + seq_len, len(ids) - 1)] for s in range(0, len(ids) - 1, seq_len)]
        ran = torch.cat([model(x[None], n_loops=n_loops).loops.flatten() for x in windows])
    assert len(ran) == len(stream) - 1 and ran.min() < ran.max()  # the tokens halted apart
    assert_close(loops, float(ran.double().mean()))


@pytest.mark.parametrize("loss,bytes_per_token,expected", [
    (4 * math.log(2), 4.0, 1.0),
    (3 * math.log(2), 1.5, 2.0),
    (math.log(2), 0.25, 4.0),
], ids=["4ln2-nats_4-bytes", "3ln2-nats_1.5-bytes", "ln2-nats_0.25-bytes"])
def test_bits_per_byte(loss, bytes_per_token, expected):
    """nats/token -> bits/byte: loss / ln 2 bits per token, over bytes_per_token bytes."""
    assert_close(bits_per_byte(loss, bytes_per_token), expected)


def test_perplexity_and_bytes_per_token():
    """perplexity = exp(loss); bytes_per_token = text bytes / tokens."""
    assert_close(perplexity(math.log(7.0)), 7.0)
    assert_close(PackedTokens(np.arange(10), n_bytes=35).bytes_per_token, 3.5)


def test_a_diverged_loss_has_a_finite_perplexity():
    """exp overflows a float past ~709.78 nats: a diverged run's report raised OverflowError."""
    assert perplexity(1e4) == math.exp(700)


def test_depth_table_rows():
    """Each row: the depth, its loss, exp(loss), the loss in bits per byte and the loops run."""
    table = depth_table({1: math.log(8), 4: 2 * math.log(2)}, bytes_per_token=2.0, loops={1: 1.0, 4: 2.5})
    assert table.splitlines() == ["n_loops     loss        ppl  bits/byte  loops run",
                                  "      1   2.0794       8.00     1.5000       1.00",
                                  "      4   1.3863       4.00     1.0000       2.50"]
    assert depth_table({2: 1.5}).splitlines() == ["n_loops     loss        ppl",
                                                  "      2   1.5000       4.48"]
