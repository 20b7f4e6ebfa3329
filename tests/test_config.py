import json
import re

import pytest
import torch

from openmythos import MythosConfig, OpenMythos
from openmythos.config import PRESETS

# Parameter counts of open-mythos 0.5.0 (PyPI), measured by building each of its variants on the
# meta device and summing p.numel(); our presets must build models of exactly these sizes.
LEGACY_COUNTS = {
    "1b": 1_064_028_034, "3b": 3_041_725_186, "10b": 9_981_316_994, "50b": 50_374_247_426,
    "100b": 99_545_072_130, "500b": 497_849_137_154, "1t": 999_326_352_386,
}
LEGACY_DEFAULT_COUNT = 436_035_842  # open_mythos.MythosConfig() with no arguments
LEGACY_GQA = dict(attn_type="gqa", dim=256, n_heads=8, n_kv_heads=2, vocab_size=1000, n_experts=8,
                  expert_dim=64, max_loop_iters=4, prelude_layers=1, coda_layers=1, lora_rank=8,
                  n_experts_per_tok=2, n_shared_experts=1)
LEGACY_GQA_COUNT = 1_771_810


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_builds_on_meta_with_exact_count(name):
    cfg = MythosConfig.from_preset(name)
    with torch.device("meta"):
        model = OpenMythos(cfg)
    assert all(p.is_meta for p in model.parameters())
    assert all(b.numel() < 1_000_000 for b in model.buffers()), "no table sized by the context"
    assert count(model) == cfg.num_params()
    if name in LEGACY_COUNTS:
        assert cfg.num_params() == LEGACY_COUNTS[name]


def test_legacy_configs_build_with_the_same_count():
    assert MythosConfig().num_params() == LEGACY_DEFAULT_COUNT
    cfg = MythosConfig(**LEGACY_GQA)
    assert cfg.num_params() == LEGACY_GQA_COUNT
    assert count(OpenMythos(cfg)) == LEGACY_GQA_COUNT


def test_preset_names_accept_legacy_prefix_and_overrides():
    cfg = MythosConfig.from_preset("mythos_1b", max_loop_iters=4)
    assert cfg.dim == 2048 and cfg.max_loop_iters == 4
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        MythosConfig.from_preset("nope")


def test_round_trip_through_json():
    cfg = MythosConfig.from_preset("tiny", halting="none", discretisation="zoh")
    again = MythosConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg


def test_unknown_field_suggests_the_closest():
    with pytest.raises(ValueError, match=r"'n_expert'.*did you mean 'n_experts'"):
        MythosConfig.from_dict({"n_expert": 4})


@pytest.mark.parametrize("field,value,needle", [
    ("dim", 30, "dim=30"),
    ("qk_rope_head_dim", 7, "qk_rope_head_dim=7"),
    ("n_experts_per_tok", 9, "n_experts_per_tok=9"),
    ("attn_type", "mha", "attn_type='mha'"),
    ("vocab_size", 0, "vocab_size=0"),
    ("n_heads", -2, "n_heads=-2"),
    ("act_threshold", 1.5, "act_threshold=1.5"),
    ("halting", "sometimes", "halting='sometimes'"),
    ("injection", "magic", "injection='magic'"),
    ("expert_dim", 2.5, "expert_dim=2.5"),
    ("dropout", "0.1", "dropout='0.1' must be a finite number"),
    ("rope_theta", float("inf"), "rope_theta=inf must be a finite number"),
    ("vocab_size", True, "vocab_size=True must be a positive integer"),  # not an int of 1
    ("prelude_layers", False, "prelude_layers=False must be a non-negative integer"),
    ("min_loops", True, "min_loops=True"),
    ("loop_embed_fraction", 1000, "loop_embed_fraction=1000 leaves no channel"),  # silently no embedding
])
def test_validation_names_field_and_value(field, value, needle):
    overrides = {"n_experts": 8, field: value}
    with pytest.raises(ValueError, match=needle.replace("(", r"\(")):
        MythosConfig.from_preset("tiny", **overrides)


def test_from_dict_needs_a_dict():
    for value in (None, [1], "tiny"):
        with pytest.raises(ValueError, match="MythosConfig.from_dict needs a dict of fields"):
            MythosConfig.from_dict(value)


def test_gqa_kv_heads_must_divide_heads():
    with pytest.raises(ValueError, match="n_kv_heads=3"):
        MythosConfig.from_preset("tiny", attn_type="gqa", n_kv_heads=3)


def test_active_params_and_flops_scale_with_depth():
    cfg = MythosConfig.from_preset("1b")
    assert cfg.active_params_per_token() < cfg.num_params()
    f4, f8, f16 = (cfg.flops_per_token(n, seq_len=1024) for n in (4, 8, 16))
    assert f8 - f4 == (f16 - f8) // 2 > 0  # linear in the loop count
    assert cfg.flops_per_token(4, 1024) == 3 * cfg.flops_per_token(4, 1024, backward=False)


@pytest.mark.parametrize("overrides", [dict(attn_type="gqa"), dict(attn_type="mla"),
                                       dict(attn_type="mla", q_lora_rank=0, halting="act"),
                                       dict(halting="kl", min_loops=3)])
def test_flops_match_torch_flop_counter(overrides):
    from torch.utils.flop_counter import FlopCounterMode

    cfg = MythosConfig.from_preset("tiny", **{"vocab_size": 512, "halting": "none", **overrides})
    model = OpenMythos(cfg)
    model.recurrent.act.halt.bias.data.fill_(-30.0)  # ACT never halts: every token runs 3 loops
    T = 64
    ids = torch.randint(0, cfg.vocab_size, (1, T))
    qk, v = ((cfg.head_dim, cfg.head_dim) if cfg.attn_type == "gqa"
             else (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim))
    attn_ours = (cfg.prelude_layers + cfg.coda_layers + 3) * cfg.n_heads * (qk + v) * T
    for backward in (False, True):  # a forward pass, then a training step's forward + backward
        with FlopCounterMode(display=False) as counter:
            logits = model(ids, n_loops=3).logits
            if backward:
                logits.sum().backward()
        # the CPU's fused SDPA kernel is not counted by FlopCounterMode: compare the linear layers
        counts = counter.get_flop_counts()["Global"]
        matmul = sum(counts.get(op, 0) for op in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm))
        ours = cfg.flops_per_token(3, seq_len=T, backward=backward)
        assert (ours - attn_ours * (3 if backward else 1)) * T == matmul


@pytest.mark.parametrize("attn_type", ["mla", "gqa"])
def test_kv_bytes_per_token_match_the_cache(attn_type):
    cfg = MythosConfig.from_preset("tiny", attn_type=attn_type)
    model = OpenMythos(cfg)
    cache = model.new_cache(batch_size=2, max_len=32, n_loops=5)
    assert cache.nbytes() == 2 * 32 * cfg.kv_cache_bytes_per_token(5, torch.float32)


def test_mla_cache_holds_one_shared_rope_key():
    cfg = MythosConfig.from_preset("1b")
    per_layer = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    assert cfg.kv_cache_bytes_per_token(16, torch.bfloat16) == (4 + 16) * per_layer * 2


def test_a_preset_must_be_named():
    with pytest.raises(ValueError, match="preset must be a name, one of .*; got 5"):
        MythosConfig.from_preset(5)


# from a mutation review: the boundaries and defaults the tests above left open

def test_counts_default_to_the_configs_depth_and_context():
    """flops_per_token() and kv_cache_bytes_per_token() without arguments (the benchmarks' MFU,
    the README's example) count max_loop_iters loops at max_seq_len, nothing less."""
    cfg = MythosConfig.from_preset("tiny")
    assert cfg.flops_per_token() == cfg.flops_per_token(cfg.max_loop_iters, cfg.max_seq_len)
    assert cfg.flops_per_token(backward=False) == cfg.flops_per_token(
        cfg.max_loop_iters, cfg.max_seq_len, backward=False)
    assert cfg.flops_per_token() != cfg.flops_per_token(1, cfg.max_seq_len)
    assert cfg.kv_cache_bytes_per_token() == cfg.kv_cache_bytes_per_token(cfg.max_loop_iters)


@pytest.mark.parametrize("call, needle", [
    (lambda c: c.flops_per_token(-5, 256), "n_loops must be a positive integer, got -5"),
    (lambda c: c.flops_per_token(2.5), "n_loops must be a positive integer, got 2.5"),
    (lambda c: c.flops_per_token(True), "n_loops must be a positive integer, got True"),
    (lambda c: c.flops_per_token(4, -256), "seq_len must be a positive integer, got -256"),
    (lambda c: c.kv_cache_bytes_per_token(0), "n_loops must be a positive integer, got 0"),
    (lambda c: c.kv_cache_bytes_per_token(4, "bfloat16"), "dtype must be a torch.dtype, got 'bfloat16'"),
])
def test_the_accounting_refuses_what_it_cannot_count(call, needle):
    """Nonsense in, a number out, before (a negative depth gave positive FLOPs, negative bytes)."""
    with pytest.raises(ValueError, match=needle):
        call(MythosConfig.from_preset("tiny"))


@pytest.mark.parametrize("injection", ["lti", "free", "additive"])
def test_num_params_counts_every_injection(injection):
    """The injection ablations build different parameters (A and B, B alone, none): num_params
    must count each exactly, not only the presets' "lti"."""
    cfg = MythosConfig.from_preset("tiny", injection=injection)
    with torch.device("meta"):
        assert count(OpenMythos(cfg)) == cfg.num_params()


@pytest.mark.parametrize("overrides", [
    dict(act_threshold=1.0),  # the closed end of (0, 1]
    dict(n_experts=2, n_experts_per_tok=2),  # every expert for every token
    dict(dropout=0.0, q_lora_rank=0, qk_nope_head_dim=0, prelude_layers=0, coda_layers=0),
])
def test_values_on_the_edge_of_a_range_are_accepted(overrides):
    cfg = MythosConfig.from_preset("tiny", **overrides)
    assert all(getattr(cfg, k) == v for k, v in overrides.items())


@pytest.mark.parametrize("overrides, needle", [
    (dict(dropout=1.0), "dropout=1.0 must lie in [0, 1)"),  # drops every activation
    (dict(kl_threshold=0.0), "kl_threshold=0.0 must be positive"),  # the KL exit never fires
    (dict(norm_eps=0.0), "norm_eps=0.0 must be positive"),
    (dict(rope_theta=0.0), "rope_theta=0.0 must be positive"),
    (dict(kv_lora_rank=0), "kv_lora_rank=0 must be a positive integer"),  # an empty MLA latent
    (dict(attn_type="gqa", n_heads=256, n_kv_heads=4), "dim=256 gives an odd head_dim=1; RoPE needs an even one"),
    (dict(loop_embed_fraction=3), "loop_embed_fraction=3 gives an odd loop-embedding width 85 for dim=256"),
])
def test_values_just_past_a_range_are_refused_by_name(overrides, needle):
    with pytest.raises(ValueError, match=re.escape(f"MythosConfig.{needle}")):
        MythosConfig.from_preset("tiny", **overrides)
