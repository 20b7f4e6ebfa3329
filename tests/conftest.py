import pytest
import torch

from openmythos import MythosConfig, OpenMythos


def pytest_configure(config):
    """One intra-op thread in the test process: its models are tiny, so a second thread buys
    nothing on a quiet 2-core machine, and on a busy one OpenMP's spin-waiting slowed tests
    about 4x (the seeded speculative-sampling test: 6.8 s with either count on a quiet machine;
    beside two busy processes 37 s with two threads, 9 s with one; `pytest -k
    'second_tokens_distribution and None-None' tests/test_generation.py`). Tests of the thread
    settings set their own counts."""
    torch.set_num_threads(1)


def small_config(**overrides) -> MythosConfig:
    """A model small enough that every test runs in well under a second."""
    base = dict(
        vocab_size=64, dim=64, n_heads=4, n_kv_heads=2, max_seq_len=64, max_loop_iters=3,
        prelude_layers=1, coda_layers=1, attn_type="mla", kv_lora_rank=16, q_lora_rank=32,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, n_experts=4,
        n_shared_experts=1, n_experts_per_tok=2, expert_dim=32, lora_rank=4,
        rope_theta=10000.0, halting="none",
    )
    return MythosConfig(**{**base, **overrides})


def small_model(seed: int = 0, std: float | None = None, **overrides) -> OpenMythos:
    """std: redraw every weight matrix from N(0, std). At the default init (0.02) attention is
    nearly uniform and the logits barely depend on the input, so one token wins nearly
    everywhere: a parity or batching test that must see a mix-up needs a larger spread."""
    torch.manual_seed(seed)
    model = OpenMythos(small_config(**overrides)).eval()
    if std is not None:
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() > 1:
                    p.normal_(0, std)
    return model


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
