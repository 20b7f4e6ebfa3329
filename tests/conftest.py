import pytest
import torch

from openmythos import MythosConfig, OpenMythos


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
