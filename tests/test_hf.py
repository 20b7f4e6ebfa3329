"""The Hugging Face integration against our own model: exact logits through save/load, greedy
generate against ours, the labels loss against our cross-entropy, trust_remote_code loading in a
fresh interpreter, the pipeline, and clear errors for broken directories."""

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

os.environ["HF_HUB_OFFLINE"] = os.environ["TRANSFORMERS_OFFLINE"] = "1"  # read at import
pytest.importorskip("transformers", minversion="4.55",
                    reason="the hf extra (transformers>=4.55) is not installed")

from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline  # noqa: E402

from openmythos import MythosConfig, OpenMythos  # noqa: E402
from openmythos.data.tokenizer import (  # noqa: E402
    ByteTokenizer,
    GPT2Tokenizer,
    load_tokenizer,
    train_bpe,
)
from openmythos.hf import (  # noqa: E402
    OpenMythosCache,
    OpenMythosForCausalLM,
    OpenMythosHFConfig,
    export_hf,
    load_pretrained,
    save_hf,
    to_hf_tokenizer,
)
from openmythos.hf.modeling_openmythos import _WHOLE_SEQUENCE_EVERY_STEP  # noqa: E402
from tests.conftest import small_config  # noqa: E402

CORPUS = sorted((Path(__file__).parent / "data" / "corpus").rglob("*.*"))
VOCAB = 300


def tiny_model(seed: int = 0, **overrides) -> OpenMythos:
    """A small model whose greedy continuations vary (the default init gives near-uniform logits,
    so every step would pick the same token and prove little)."""
    torch.manual_seed(seed)
    model = OpenMythos(small_config(**{"vocab_size": VOCAB, **overrides}))
    model.init_weights(std=0.2)
    return model.eval()


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe(CORPUS, vocab_size=VOCAB)


@pytest.fixture(scope="module")
def exported(tokenizer, tmp_path_factory):
    """(our model, the directory save_hf wrote for it)."""
    model = tiny_model(max_seq_len=96)
    return model, save_hf(model, tmp_path_factory.mktemp("hf") / "tiny-mythos", tokenizer, n_loops=2)


def test_config_carries_every_field(exported):
    model, path = exported
    saved = json.loads((path / "config.json").read_text())
    assert {k: saved[k] for k in model.cfg.to_dict()} == model.cfg.to_dict()
    cfg = MythosConfig.from_preset("1b")
    hf_cfg = OpenMythosHFConfig.from_mythos(cfg)
    assert hf_cfg.to_mythos() == cfg and hf_cfg.hidden_size == cfg.dim
    with pytest.raises(ValueError, match="n_heads"):
        OpenMythosHFConfig(dim=64, n_heads=5)


def test_logits_round_trip_exact(exported):
    model, path = exported
    ids = torch.randint(0, VOCAB, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :5] = 0  # left padding
    hf = OpenMythosForCausalLM.from_openmythos(model)
    assert set(hf.state_dict()) == {f"model.{k}" for k in model.state_dict()}
    for loaded in (hf, OpenMythosForCausalLM.from_pretrained(path),
                   AutoModelForCausalLM.from_pretrained(path)):
        assert type(loaded) is OpenMythosForCausalLM
        for n_loops in (None, 5):  # 5: past the trained depth
            for m in (None, mask):
                want = model(ids, n_loops=n_loops, attention_mask=m).logits
                assert torch.equal(loaded(ids, n_loops=n_loops, attention_mask=m).logits, want)
                last = loaded(ids, n_loops=n_loops, attention_mask=m, logits_to_keep=1).logits
                assert_close(last, want[:, -1:])


@pytest.mark.parametrize("attn_type,halting", [("mla", "none"), ("gqa", "none"), ("mla", "act"), ("gqa", "kl")])
def test_greedy_generate_matches_ours(attn_type, halting):
    # max_seq_len 160 and a 60-token prompt make the cache grow past its first 64-column block
    model = tiny_model(attn_type=attn_type, halting=halting, max_seq_len=160)
    hf = OpenMythosForCausalLM.from_openmythos(model)
    ids = torch.randint(2, VOCAB, (2, 60))
    want = model.generate(ids, 10, temperature=0, n_loops=2)
    assert torch.equal(hf.generate(ids, max_new_tokens=10, do_sample=False, n_loops=2), want)
    assert want[:, 60:].unique().numel() > 2  # the continuations are not one repeated token

    # left-padded prompts of different lengths; the depth from the generation config
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13]]
    want = model.generate(prompts, 6, temperature=0, n_loops=3, pad_token_id=1)
    padded = torch.tensor([prompts[0], [1] * 5 + prompts[1]])
    mask = (padded != 1).long()
    hf.generation_config.n_loops = 3
    out = hf.generate(padded, attention_mask=mask, max_new_tokens=6, do_sample=False,
                      pad_token_id=1, return_dict_in_generate=True)
    assert torch.equal(out.sequences, want)
    cache = getattr(out, "cache", None) or out.past_key_values
    assert isinstance(cache, OpenMythosCache) and cache.kv.n_loops == 3


def test_chunked_prefill_on_a_short_ring_is_refused_by_name():
    """A ring cache shorter than the depth is exact only for a prompt prefilled in one call:
    transformers' prefill_chunk_size gave other greedy tokens than our generate. Refused at the
    depth asked for; a ring as deep as the loops chunks as before."""
    model = tiny_model(kv_cache_policy="ring", kv_cache_ring=2)
    hf = OpenMythosForCausalLM.from_openmythos(model)
    ids = torch.randint(2, VOCAB, (1, 20))
    with pytest.raises(ValueError, match=r"prefill_chunk_size: a ring cache .*kv_cache_ring=2. shorter "
                                         r"than the depth n_loops=3"):
        hf.generate(ids, max_new_tokens=2, do_sample=False, prefill_chunk_size=8, n_loops=3)
    want = model.generate(ids, 2, temperature=0, n_loops=2)
    assert torch.equal(hf.generate(ids, max_new_tokens=2, do_sample=False, prefill_chunk_size=8, n_loops=2), want)


def test_chunked_prefill_of_a_batch_whose_first_chunk_is_all_padding():
    """Left padding longer than a chunk makes a chunk of padding alone: a cached call that marks
    no token is valid (only a whole-sequence call without one is refused), and the tokens are
    those of one prefill."""
    hf = OpenMythosForCausalLM.from_openmythos(tiny_model())
    ids = torch.randint(2, VOCAB, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, :6], mask[1, :7] = 0, 0
    want = hf.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    got = hf.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0,
                      prefill_chunk_size=4)
    assert torch.equal(got, want)


def test_chunked_prefill_a_restart_and_a_passed_generation_config():
    from transformers import GenerationConfig

    model = tiny_model()
    hf = OpenMythosForCausalLM.from_openmythos(model)
    hf.generation_config.n_loops = 2
    ids = torch.randint(2, VOCAB, (1, 20))
    want = model.generate(ids, 5, temperature=0, n_loops=2)
    assert torch.equal(hf.generate(ids, max_new_tokens=5, do_sample=False, prefill_chunk_size=8), want)
    # the model's depth holds when the passed config has none
    passed = GenerationConfig(max_new_tokens=5, do_sample=False)
    assert torch.equal(hf.generate(ids, generation_config=passed), want)
    # restart from a returned cache with the whole mask, and (transformers 5) the tokens it does
    # not hold alone, or (4) the whole sequence, as each version's generate passes them
    first = hf.generate(ids, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
    cache, seq = getattr(first, "cache", None) or first.past_key_values, first.sequences
    if _WHOLE_SEQUENCE_EVERY_STEP:
        out = hf.generate(seq, attention_mask=torch.ones_like(seq), past_key_values=cache,
                          max_new_tokens=3, do_sample=False)
    else:
        out = hf.generate(seq[:, cache.get_seq_length():], attention_mask=torch.ones_like(seq),
                          cache=cache, max_new_tokens=3, do_sample=False)
    assert torch.equal(out[:, -3:], want[:, -3:])


def test_generate_without_cache_and_with_beams():
    model = tiny_model()
    hf = OpenMythosForCausalLM.from_openmythos(model)
    ids = torch.randint(2, VOCAB, (2, 6))
    want = model.generate(ids, 4, temperature=0, n_loops=2)
    assert torch.equal(hf.generate(ids, max_new_tokens=4, do_sample=False, n_loops=2,
                                   use_cache=False), want)
    # the cache must follow the beams that transformers reorders at every step: as recomputing
    # each step without one
    beams = hf.generate(ids, max_new_tokens=4, num_beams=3, do_sample=False, n_loops=2)
    assert beams.shape == (2, 10)
    assert torch.equal(beams, hf.generate(ids, max_new_tokens=4, num_beams=3, do_sample=False,
                                          n_loops=2, use_cache=False))
    sampled = hf.generate(ids, max_new_tokens=4, do_sample=True, num_return_sequences=2)
    assert sampled.shape == (4, 10)


def test_resized_embeddings_are_the_head_too():
    hf = OpenMythosForCausalLM.from_openmythos(tiny_model())
    hf.resize_token_embeddings(VOCAB + 8, mean_resizing=False)
    logits = hf(torch.tensor([[VOCAB + 3, 5]])).logits
    assert logits.shape == (1, 2, VOCAB + 8) and hf.model.cfg.vocab_size == VOCAB + 8


def test_labels_loss_is_our_cross_entropy():
    model = tiny_model()
    hf = OpenMythosForCausalLM.from_openmythos(model)
    ids = torch.randint(0, VOCAB, (3, 16))
    labels = ids.clone()
    labels[0, :4] = -100  # e.g. a prompt that is not trained on
    out = hf(ids, labels=labels, n_loops=2)
    logits = model(ids, n_loops=2).logits
    ours = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1),
                           ignore_index=-100)
    torch.testing.assert_close(out.loss, ours)
    # and the loss the trainer optimises (targets, no logits)
    torch.testing.assert_close(out.loss, model(ids[:, :-1], n_loops=2, targets=labels[:, 1:]).loss)
    out.loss.backward()
    assert hf.model.embed.weight.grad is not None


def test_tokenizer_files(exported, tokenizer):
    _, path = exported
    hf_tok = AutoTokenizer.from_pretrained(path)
    assert (hf_tok.eos_token_id, hf_tok.bos_token_id, hf_tok.pad_token_id) == (
        tokenizer.eos_id, tokenizer.bos_id, tokenizer.pad_id)
    assert hf_tok.padding_side == "left" and len(hf_tok) == tokenizer.vocab_size
    text = "\n".join(f.read_text() for f in CORPUS)
    ids = tokenizer.encode(text)
    assert hf_tok(text)["input_ids"] == ids
    assert hf_tok.decode(ids) == tokenizer.decode(ids) == text
    assert load_tokenizer(path).encode(text) == ids  # our own loader reads the directory too
    # only what the model takes (transformers 4.x added token_type_ids, which forward refuses)
    assert set(hf_tok(["a b", "c"], padding=True)) == {"input_ids", "attention_mask"}


@pytest.mark.parametrize("kind", ["byte", "gpt2"])
def test_other_tokenizer_kinds_convert(kind):
    if kind == "gpt2":
        try:
            ours = GPT2Tokenizer()
        except ValueError as e:
            pytest.skip(f"GPT-2 BPE files unavailable: {e}")
    else:
        ours = ByteTokenizer()
    hf_tok = to_hf_tokenizer(ours)
    text = "Fourscore and seven years ago — naïve 1790s\n\n  spacing"
    assert hf_tok(text)["input_ids"] == ours.encode(text)
    assert hf_tok.decode(ours.encode(text)) == text
    assert (hf_tok.eos_token_id, hf_tok.pad_token_id) == (ours.eos_id, ours.pad_id)
    # ids no character can hold (a stray continuation byte, a cut-off character) decode alike
    for ids in ([104, 105, 140, 48, 6], ours.encode("東京")[:-1], [ours.eos_id, *ours.encode("ok")]):
        assert hf_tok.decode(ids) == ours.decode(ids)


REMOTE_SCRIPT = textwrap.dedent("""
    import json, sys

    class BlockOpenMythos:  # the package is installed (editable) here: make it unimportable
        def find_spec(self, name, path=None, target=None):
            if name == "openmythos" or name.startswith("openmythos."):
                raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")

    sys.meta_path.insert(0, BlockOpenMythos())
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, out = sys.argv[1], sys.argv[2]
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=True)  # it reads config.json too
    ids = torch.load(out + "/ids.pt")
    torch.save({"logits": model(ids).logits,
                "greedy": model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=None)},
               out + "/out.pt")
    model.save_pretrained(out + "/resaved")
    print(json.dumps({"module": type(model).__module__, "eos": tok.eos_token_id,
                      "imported": sorted(m for m in sys.modules if m.startswith("openmythos"))}))
""")


def test_trust_remote_code_without_the_package(exported, tmp_path):
    model, path = exported
    ids = torch.randint(2, VOCAB, (2, 7))
    torch.save(ids, tmp_path / "ids.pt")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-c", REMOTE_SCRIPT, str(path), str(tmp_path)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
                         stdin=subprocess.DEVNULL)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["module"].startswith("transformers_modules.") and report["imported"] == []
    assert report["eos"] == 0
    got = torch.load(tmp_path / "out.pt")
    assert torch.equal(got["logits"], model(ids).logits)
    assert torch.equal(got["greedy"], model.generate(ids, 6, temperature=0, n_loops=2))
    # a copy loaded as remote code saves a directory with the same code
    for f in path.glob("*.py"):
        assert (tmp_path / "resaved" / f.name).read_text() == f.read_text()


def test_saved_code_is_self_contained(exported):
    _, path = exported
    code = sorted(f.name for f in path.glob("*.py"))
    assert code == ["configuration_openmythos.py", "modeling_openmythos.py", "openmythos_core.py"]
    for f in path.glob("*.py"):
        assert not re.search(r"^\s*(from|import) openmythos", f.read_text(), flags=re.MULTILINE), f
    auto_map = json.loads((path / "config.json").read_text())["auto_map"]
    assert auto_map == {"AutoConfig": "configuration_openmythos.OpenMythosHFConfig",
                        "AutoModelForCausalLM": "modeling_openmythos.OpenMythosForCausalLM"}


def test_pipeline_generates_text(exported, tokenizer):
    model, path = exported
    generator = pipeline("text-generation", model=str(path))
    prompt = "The state of the union"
    text = generator(prompt, max_new_tokens=8, do_sample=False)[0]["generated_text"]
    ids, eos = tokenizer.encode(prompt), tokenizer.eos_id
    new = model.generate([ids], 8, temperature=0, n_loops=2, eos_token_id=eos)[0, len(ids):].tolist()
    assert text == prompt + tokenizer.decode(new[:new.index(eos)] if eos in new else new)
    # without a length: the pipeline's own default asked for 256 new tokens past the context
    assert generator(prompt, do_sample=False)[0]["generated_text"].startswith(text)


def test_hf_training_features_reach_the_core():
    """Activation checkpointing through transformers' switch (Trainer's gradient_checkpointing),
    the expert load for the router bias, and a cache as deep as the deepest row of a depth
    tensor (it was built at max_loop_iters)."""
    model = tiny_model().train()
    hf = OpenMythosForCausalLM.from_openmythos(model)
    ids = torch.randint(0, VOCAB, (2, 6))
    out = hf(ids, labels=ids, n_loops=2)
    assert torch.equal(out.expert_load, model(ids, n_loops=2).expert_load)
    want = torch.autograd.grad(out.loss, model.embed.weight)[0]
    # transformers' own switch, with the arguments its Trainer passes (5.x: every_n_layers)
    enable = getattr(hf, "activation_checkpointing_enable", hf.gradient_checkpointing_enable)
    enable()
    assert hf.is_gradient_checkpointing and model.recurrent.checkpoint_loops
    assert getattr(hf, "is_activation_checkpointing", True)
    got = torch.autograd.grad(hf(ids, labels=ids, n_loops=2).loss, model.embed.weight)[0]
    assert_close(got, want)
    getattr(hf, "activation_checkpointing_disable", hf.gradient_checkpointing_disable)()
    assert not hf.is_gradient_checkpointing
    deep = torch.tensor([model.cfg.max_loop_iters + 2, 1])
    with torch.no_grad():
        assert_close(hf.eval()(ids, use_cache=True, n_loops=deep).logits, hf(ids, n_loops=deep).logits)


def test_router_bias_callback_balances_under_the_trainer(tmp_path):
    """transformers' Trainer with RouterBiasCallback moves the router bias once per optimizer
    step, by the load of all that step's micro-batches, and never by its evaluation passes."""
    pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate")
    from transformers import Trainer, TrainingArguments

    from openmythos.hf import RouterBiasCallback

    model = tiny_model(n_experts=4, n_experts_per_tok=1, router_bias_rate=0.05).train()
    hf = OpenMythosForCausalLM.from_openmythos(model)
    ids = torch.randint(0, VOCAB, (4, 12), generator=torch.Generator().manual_seed(1))
    data = [{"input_ids": row, "labels": row} for row in ids]

    # the expected loads: every step trains on all four rows (2 per batch x 2 accumulated), and
    # with lr 0 only the bias changes between the steps
    reference = tiny_model(n_experts=4, n_experts_per_tok=1, router_bias_rate=0.05).train()
    expected = []
    for _ in range(2):
        with torch.no_grad():
            expected.append(reference(ids).expert_load)
        reference.update_router_bias(expected[-1])

    seen = []
    update = model.update_router_bias
    model.update_router_bias = lambda load: (seen.append(load.clone()), update(load))
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2,
                             gradient_accumulation_steps=2, max_steps=2, learning_rate=0.0,
                             eval_strategy="steps", eval_steps=1, per_device_eval_batch_size=4,
                             report_to=[], save_strategy="no", use_cpu=True)
    Trainer(hf, args, train_dataset=data, eval_dataset=data, callbacks=[RouterBiasCallback()]).train()

    assert len(seen) == 2
    for got, want in zip(seen, expected, strict=True):
        assert_close(got, want)
    assert_close(model.moe.router_bias, reference.moe.router_bias)
    assert model.moe.router_bias.abs().sum() > 0
    with pytest.raises(TypeError, match="needs an OpenMythos model"):
        RouterBiasCallback().on_train_begin(args, None, None, model=torch.nn.Linear(2, 2))
    # a train() that raised never reached on_train_end (its hook) nor its optimizer step (the
    # load of its last forwards): the next one counts each forward once, from zero
    callback = RouterBiasCallback()
    callback.on_train_begin(args, None, None, model=hf)
    hf.train()(ids[1:2])
    callback.on_train_begin(args, None, None, model=hf)
    out = hf.train()(ids[:1])
    assert torch.equal(callback.load, out.expert_load)
    callback.on_train_end(args, None, None)


def test_router_bias_callback_moves_each_rank_by_the_load_summed_over_the_ranks(monkeypatch):
    """Under torch.distributed every rank's bias moves by the load of all ranks' tokens (an
    all-reduce SUM), as `mythos train` does: a rank that moved by its own load alone, or by the
    largest count per expert, drifted from the others. The other rank is simulated: its load is
    what the all-reduce adds."""
    from types import SimpleNamespace

    import torch.distributed as dist

    from openmythos.hf import RouterBiasCallback, callbacks

    other = torch.tensor([5, 0, 1, 3])  # the other rank's tokens per expert

    def all_reduce(tensor, op=dist.ReduceOp.SUM):
        assert op == dist.ReduceOp.SUM
        tensor += other

    monkeypatch.setattr(callbacks, "dist", SimpleNamespace(
        is_available=lambda: True, is_initialized=lambda: True, all_reduce=all_reduce,
        ReduceOp=dist.ReduceOp))
    model = tiny_model(n_experts=4, n_experts_per_tok=1, router_bias_rate=0.05).train()
    hf = OpenMythosForCausalLM.from_openmythos(model)
    seen = []
    update = model.update_router_bias
    model.update_router_bias = lambda load: (seen.append(load.clone()), update(load))
    callback = RouterBiasCallback()
    callback.on_train_begin(None, None, None, model=hf)
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    own = hf(ids).expert_load.clone()
    callback.on_optimizer_step(None, None, None)
    callback.on_train_end(None, None, None)
    assert len(seen) == 1 and torch.equal(seen[0], own + other)
    reference = tiny_model(n_experts=4, n_experts_per_tok=1, router_bias_rate=0.05)
    reference.update_router_bias(own + other)
    assert_close(model.moe.router_bias, reference.moe.router_bias)


def test_export_from_training_checkpoint(tokenizer, tmp_path):
    from openmythos.training import TrainConfig, save_checkpoint

    model = tiny_model()
    cfg = TrainConfig().override({"data.seq_len": 32})  # within the model's context
    save_checkpoint(tmp_path / "run", 7, model, cfg, tokenizer, state={}, keep=1)
    out = export_hf(tmp_path / "run", tmp_path / "hf", n_loops=2)
    loaded, tok, train_cfg = load_pretrained(out)
    ids = torch.randint(0, VOCAB, (1, 9))
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert tok.encode("a test") == tokenizer.encode("a test")
    assert train_cfg.to_dict() == cfg.to_dict()
    assert json.loads((out / "generation_config.json").read_text())["n_loops"] == 2
    # safetensors writes owner-only files: the weights get the folder's other files' permissions
    (step,) = (tmp_path / "run" / "checkpoints").glob("step_*")
    for folder in (step, out):
        assert (folder / "model.safetensors").stat().st_mode & 0o777 == (folder / "config.json").stat().st_mode & 0o777
    # the same folder written again without a tokenizer or run config keeps none of the old ones
    save_hf(model, out)
    assert load_pretrained(out)[1:] == (None, None) and not list(out.glob("tokenizer*"))
    # never over a checkpoint, a run folder or a file
    step = tmp_path / "run" / "checkpoints" / "step_00000007"
    for target in (step, tmp_path / "run", step / "manifest.json"):
        before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
        with pytest.raises(ValueError, match="not an earlier export"):
            save_hf(model, target)
        assert before == {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}


def _edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, **changes}))


def _drop_field(path, name):
    config = json.loads((path / "config.json").read_text())
    del config[name]
    (path / "config.json").write_text(json.dumps(config))


def _truncate(path, keep):
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[:int(len(data) * keep)])


BROKEN = {
    "no config": (lambda p: (p / "config.json").unlink(), "has no config.json"),
    "corrupt config": (lambda p: (p / "config.json").write_text("{oops"), "config.json"),
    "bad field": (lambda p: _edit_config(p, attn_type="flash"), "attn_type"),
    "missing field": (lambda p: _drop_field(p, "dim"), r"lacks the model field\(s\) \['dim'\]"),
    "no weights": (lambda p: (p / "model.safetensors").unlink(), "has no weights"),
    "truncated header": (lambda p: _truncate(p, 0.001), "corrupt or truncated"),
    "truncated weights": (lambda p: _truncate(p, 0.8), "corrupt or truncated"),
    "vocab mismatch": (lambda p: _edit_config(p, vocab_size=VOCAB + 20), "vocabularies do not match"),
    "shape mismatch": (lambda p: _edit_config(p, n_experts=8), "do not fit its config.json"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_directory_gives_clear_error(exported, tmp_path, case):
    _, path = exported
    broken = shutil.copytree(path, tmp_path / "broken")
    damage, message = BROKEN[case]
    damage(broken)
    with pytest.raises(ValueError, match=message):
        OpenMythosForCausalLM.from_pretrained(broken)
    if case != "no config":  # Auto classes need config.json to know the model type at all
        with pytest.raises((ValueError, OSError), match=message):
            AutoModelForCausalLM.from_pretrained(broken)


@pytest.mark.parametrize("damage, message", [
    (lambda p: _drop_field(p, "dim"), "lacks the model field(s) ['dim']"),  # info read today's default
    (lambda p: (p / "config.json").write_text("{oops"), "config.json' cannot be read as JSON"),  # "no checkpoint"
])
def test_the_cli_names_a_damaged_config_json(exported, tmp_path, capsys, damage, message):
    from openmythos.cli import main

    _, path = exported
    broken = shutil.copytree(path, tmp_path / "broken")
    damage(broken)
    assert main(["info", "--checkpoint", str(broken)]) == 2
    assert message in capsys.readouterr().err


def test_an_export_from_before_the_cache_policy_fields_loads(exported, tmp_path):
    """Exports written before kv_cache_policy and kv_cache_ring existed lack them: they take the
    defaults those exports' models had, while any other missing field is refused."""
    _, path = exported
    old = shutil.copytree(path, tmp_path / "old")
    for name in ("kv_cache_policy", "kv_cache_ring"):
        _drop_field(old, name)
    loaded = OpenMythosForCausalLM.from_pretrained(old)
    assert loaded.config.kv_cache_policy == "per_loop"


def test_mismatched_tokenizer_is_refused(tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        save_hf(tiny_model(), tmp_path, train_bpe(CORPUS, vocab_size=VOCAB + 50))


def test_bad_calls():
    hf = OpenMythosForCausalLM.from_openmythos(tiny_model())
    ids = torch.randint(0, VOCAB, (1, 4))
    with pytest.raises(TypeError, match="n_loop"):
        hf(ids, n_loop=2)  # a typo is not silently ignored
    with pytest.raises(ValueError, match="attention_mask has 3 columns"):
        hf(ids, attention_mask=torch.ones(1, 3), use_cache=True)
    with pytest.raises(ValueError, match="own depth"):
        hf.generate(ids, max_new_tokens=2, n_loops=2, past_key_values=OpenMythosCache(3))
    with pytest.raises(ValueError, match="n_loops"):
        hf.generate(ids, max_new_tokens=2, n_loops=0)
    with pytest.raises(ValueError, match="logits_to_keep=1 with labels"):
        hf(ids, labels=ids, logits_to_keep=1)
    for labels, needle in ((ids[:, :3], r"labels must be an int64 tensor of shape \(1, 4\)"),
                           (ids.float(), "labels must be an int64 tensor"),
                           (torch.full((1, 4), VOCAB), f"labels contains token id {VOCAB}, outside")):
        with pytest.raises(ValueError, match=needle):
            hf(ids, labels=labels)
    with pytest.raises(ValueError, match="max_length 1000 exceeds max_seq_len="):
        hf.generate(ids, max_length=1000)  # else it fails at the limit, its tokens lost
    # labels[:, 0] is never a target: a loss over no position was NaN
    first_only = torch.full_like(ids, -100)
    first_only[:, 0] = ids[:, 0]
    for labels, inputs in ((first_only, ids), (ids[:, :1], ids[:, :1])):
        with pytest.raises(ValueError, match="labels keep no position past the first"):
            hf(inputs, labels=labels)
    # a cache that holds every input token: transformers' slice fed the whole prompt again
    held = hf(ids, use_cache=True).past_key_values
    with pytest.raises(ValueError, match="the cache already holds every input token"):
        hf.generate(ids, cache=held, max_new_tokens=2, do_sample=False)
    # right padding: the first new token read a padding position's logits, silently
    with pytest.raises(ValueError, match="left padding"):
        hf.generate(ids, attention_mask=torch.tensor([[1, 1, 0, 0]]), max_new_tokens=2, do_sample=False)
    # input_ids checked before the cache or the labels read their shape (cryptic errors before)
    for bad, error in ((ids[0], ValueError), (ids[None], ValueError), (ids.tolist(), TypeError)):
        with pytest.raises(error, match="input_ids"):
            hf(bad, use_cache=True)


def test_mythos_eval_of_an_export_without_a_run_reads_windows_the_model_takes(exported, capsys):
    """An export without a run's config evaluates in the quickstart's 256-token windows, cut to
    the model's max_seq_len (96 here): 256 was refused, with no flag to change it."""
    from openmythos.cli import _load, main

    assert _load(str(exported[1]), "cpu")[2].data.seq_len == 96
    text = str(Path(__file__).parent / "data" / "train_small.txt")
    assert main(["eval", "--checkpoint", str(exported[1]), "--data", text, "--n-loops", "2",
                 "--max-tokens", "192"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["loss_per_depth"]["2"]["loss"] > 0


def test_save_pretrained_touches_only_its_own_files(tmp_path):
    hf = OpenMythosForCausalLM.from_openmythos(tiny_model())
    mine = "from openmythos.generation import generate\nfrom openmythos import OpenMythos\n"
    (tmp_path / "my_script.py").write_text(mine)
    hf.save_pretrained(tmp_path)
    assert (tmp_path / "my_script.py").read_text() == mine
    assert "from .openmythos_core import" in (tmp_path / "modeling_openmythos.py").read_text()
    with pytest.raises(ValueError, match="is a file, not a directory"):
        hf.save_pretrained(tmp_path / "my_script.py")


@pytest.mark.parametrize("kwargs, needle", [
    (dict(output_hidden_states=True, return_dict_in_generate=True), "output_hidden_states: OpenMythos returns neither"),
    (dict(output_attentions=True, return_dict_in_generate=True), "output_attentions"),
    (dict(prompt_lookup_num_tokens=3), "assisted decoding needs a cache it can crop"),
    (dict(assistant_early_exit=1), "assisted decoding needs a cache it can crop"),
    (dict(cache_implementation="static"), "cache_implementation: OpenMythos builds its own cache"),
    (dict(max_new_tokens=10_000), r"input length 4 \+ max_new_tokens 10000 exceeds max_seq_len="),
])
def test_generate_refuses_what_it_cannot_give(kwargs, needle):
    """transformers would hand back tuples of None, fail deep inside with an AttributeError, or
    (past max_seq_len) fail at the limit after generating up to it."""
    hf = OpenMythosForCausalLM.from_openmythos(tiny_model())
    with pytest.raises(ValueError, match=needle):
        hf.generate(torch.randint(0, VOCAB, (1, 4)), **{"max_new_tokens": 2, **kwargs})
    hf.generation_config.output_hidden_states = True  # the same through the generation config
    with pytest.raises(ValueError, match="output_hidden_states"):
        hf.generate(torch.randint(0, VOCAB, (1, 4)), max_new_tokens=2)
    # ... which a call's own argument overrides, as in transformers
    assert hf.generate(torch.randint(0, VOCAB, (1, 4)), max_new_tokens=2, output_hidden_states=False).shape == (1, 6)


def test_the_core_never_imports_transformers():
    code = ("import sys, openmythos.model, openmythos.training, openmythos.serving, "
            "openmythos.experiments, openmythos.cli, openmythos.generation; "
            "assert 'transformers' not in sys.modules, 'transformers was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent)


def test_a_padded_vocabulary_never_generates_its_padding(tmp_path):
    """A model vocabulary padded past its tokenizer's (GPT-2's 50257 to 50304): transformers'
    generate sampled the padding ids, which decode to nothing, where ours (vocab_size=) never does."""
    tok = ByteTokenizer()
    model = tiny_model(vocab_size=320)
    with torch.no_grad():
        model.embed.weight[tok.vocab_size:] *= 50  # padding rows that would win every argmax
    hf = AutoModelForCausalLM.from_pretrained(save_hf(model, tmp_path / "padded", tok, n_loops=2))
    ids = torch.tensor([tok.encode("hello world")])
    greedy = hf.generate(ids, max_new_tokens=6, do_sample=False)[0, ids.shape[1]:]
    ours = model.generate(ids, 6, n_loops=2, temperature=0, vocab_size=tok.vocab_size)[0, ids.shape[1]:]
    assert greedy.tolist() == ours.tolist()
    torch.manual_seed(0)
    for out in (hf.generate(ids, max_new_tokens=6, do_sample=True),
                hf.generate(ids, max_new_tokens=6, do_sample=False, num_beams=2)):
        assert int(out[0, ids.shape[1]:].max()) < tok.vocab_size


def test_a_reexport_over_a_sharded_export_and_a_variant_load(tmp_path):
    """save_hf may write into an earlier export: the shards it replaced left their index behind,
    which the pre-load check followed (transformers reads the single file first) and called the
    missing shards corrupt. A `variant` save was refused as having no weights."""
    old, new = tiny_model(seed=0), tiny_model(seed=1)
    ids = torch.randint(0, VOCAB, (1, 8))
    OpenMythosForCausalLM.from_openmythos(old).save_pretrained(tmp_path / "exp", max_shard_size="100KB")
    assert (tmp_path / "exp" / "model.safetensors.index.json").is_file()
    save_hf(new, tmp_path / "exp")
    assert_close(load_pretrained(tmp_path / "exp")[0](ids).logits, new(ids).logits, atol=0, rtol=0)
    OpenMythosForCausalLM.from_openmythos(new).save_pretrained(tmp_path / "v", variant="v1")
    loaded = OpenMythosForCausalLM.from_pretrained(tmp_path / "v", variant="v1")
    assert_close(loaded(ids).logits, new(ids).logits, atol=0, rtol=0)


def test_a_compiled_model_exports_as_its_module(tmp_path):
    model = tiny_model()
    ids = torch.randint(0, VOCAB, (1, 8))
    loaded = load_pretrained(save_hf(torch.compile(model), tmp_path / "compiled"))[0]
    assert_close(loaded(ids).logits, model(ids).logits, atol=0, rtol=0)


def test_forward_options_the_cache_depth_and_the_standard_config_names():
    """return_dict=False gives a tuple; output_attentions is refused, not silently ignored;
    use_cache=True builds its cache at the call's n_loops, which a later call without n_loops
    runs at; the cache's first allocation (90 columns round up to a 128 block) stops at
    max_seq_len, which a prompt and max_new_tokens may fill exactly; the wrapper is in the
    wrapped model's mode; transformers' standard config names
    (max_position_embeddings, num_attention_heads, hidden_size) read ours."""
    model = tiny_model(max_seq_len=96)
    hf = OpenMythosForCausalLM.from_openmythos(model)
    assert hf.training is False and hf.model.training is False
    ids = torch.randint(0, VOCAB, (1, 90))
    out = hf(ids[:, :6], return_dict=False)
    assert isinstance(out, tuple) and torch.equal(out[0], model(ids[:, :6]).logits)
    with pytest.raises(ValueError, match="neither attentions nor hidden states"):
        hf(ids[:, :6], output_attentions=True)
    cache = hf(ids, n_loops=2, use_cache=True).past_key_values
    assert cache.n_loops == 2 and cache.kv.n_loops == 2 and cache.kv.max_len == 96
    nxt = torch.tensor([[7]])
    step = hf(nxt, past_key_values=cache, use_cache=True).logits  # at the cache's depth, 2
    assert_close(step, model(torch.cat([ids, nxt], 1), n_loops=2).logits[:, -1:])
    # a prompt and max_new_tokens that fill max_seq_len exactly are generated, not refused
    assert hf.generate(ids, max_new_tokens=6, do_sample=False, n_loops=2).shape == (1, 96)
    cfg = hf.config
    assert (cfg.max_position_embeddings, cfg.num_attention_heads, cfg.hidden_size) == (
        96, model.cfg.n_heads, model.cfg.dim)


def test_from_pretrained_takes_a_subfolder_a_config_loading_info_and_sharded_variants(tmp_path):
    """transformers' from_pretrained options pass through the pre-load directory check: a
    `subfolder`, a `config` given in place of config.json, output_loading_info=True (a (model,
    info) pair), and a sharded save under a `variant`, whose index transformers names
    model.safetensors.index.VARIANT.json."""
    model = tiny_model()
    hf = OpenMythosForCausalLM.from_openmythos(model)
    ids = torch.randint(0, VOCAB, (1, 8))
    want = model(ids).logits
    hf.save_pretrained(tmp_path / "repo" / "sub")
    loaded = OpenMythosForCausalLM.from_pretrained(tmp_path / "repo", subfolder="sub")
    assert torch.equal(loaded(ids).logits, want)
    loaded, info = OpenMythosForCausalLM.from_pretrained(tmp_path / "repo" / "sub", output_loading_info=True)
    assert torch.equal(loaded(ids).logits, want)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    bare = shutil.copytree(tmp_path / "repo" / "sub", tmp_path / "bare")
    (bare / "config.json").unlink()
    assert torch.equal(OpenMythosForCausalLM.from_pretrained(bare, config=hf.config)(ids).logits, want)
    hf.save_pretrained(tmp_path / "vs", variant="v1", max_shard_size="100KB")
    assert torch.equal(OpenMythosForCausalLM.from_pretrained(tmp_path / "vs", variant="v1")(ids).logits, want)


def test_export_metadata_and_what_load_pretrained_checks(tmp_path):
    """save_hf writes into an existing empty folder; generation_config.json holds the tokenizer's
    BOS/EOS/PAD (the byte tokenizer's PAD is not its EOS), the padded ids to suppress and the
    default depth (max_loop_iters when n_loops is not given); tokenizer_config.json names a class
    transformers 4.x has too and the model's context as model_max_length. A bad n_loops is
    refused at export; load_pretrained refuses a corrupt run config and a tokenizer whose ids do
    not embed in the model."""
    tok, model = ByteTokenizer(), tiny_model(vocab_size=260, max_seq_len=96)
    (tmp_path / "empty").mkdir()
    out = save_hf(model, tmp_path / "empty", tok)
    gen = json.loads((out / "generation_config.json").read_text())
    gen.pop("transformers_version", None)
    assert gen == {"bos_token_id": 256, "eos_token_id": 256, "pad_token_id": 257,
                   "suppress_tokens": [258, 259], "n_loops": model.cfg.max_loop_iters, "max_length": 96}
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_cfg["tokenizer_class"] == "PreTrainedTokenizerFast" and tok_cfg["model_max_length"] == 96
    assert AutoTokenizer.from_pretrained(out).model_max_length == 96
    with pytest.raises(ValueError, match="n_loops must be a positive integer"):
        save_hf(model, tmp_path / "bad", n_loops=0)
    (out / "mythos_train_config.json").write_text("{oops")
    with pytest.raises(ValueError, match="mythos_train_config.json' is corrupt"):
        load_pretrained(out)
    small = save_hf(tiny_model(vocab_size=200), tmp_path / "small")
    tok.save(small)  # a tokenizer put beside it later, with ids up to 257
    with pytest.raises(ValueError, match="vocab_size 258 exceeds the model's 200"):
        load_pretrained(small)
