"""The benchmark scripts run end to end: the GPU one (on the CPU, on a toy model), so that it
works the first time a GPU is lent, and the speculative-decoding one."""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_script_measures_every_section_on_a_toy_model(tmp_path):
    done = subprocess.run([sys.executable, "benchmarks/gpu.py", "--device", "cpu", "--smoke",
                           "--warmup", "0", "--repeats", "1", "--new-tokens", "4",
                           "--out", str(tmp_path / "gpu.jsonl")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    smoke = summary["results"]["smoke"]
    for key in ("train_tok_s", "prefill_tok_s", "decode_b1_tok_s", "decode_b8_tok_s",
                "train_peak_mb", "mfu_vs_measured"):
        assert smoke[key] > 0, key
    assert smoke["errors"] == {} and "| train_tok_s |" in done.stdout
    machine, model = (json.loads(line) for line in (tmp_path / "gpu.jsonl").read_text().splitlines())
    assert machine["peak_tflops_measured"] > 0 and model == {"model": "smoke", **smoke}


def test_gpu_script_keeps_the_numbers_measured_before_a_failure(monkeypatch):
    from benchmarks import gpu

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(gpu, "stream", out_of_memory)
    cfg, batch, seq = gpu.SMOKE
    args = argparse.Namespace(warmup=0, repeats=1, new_tokens=2, peak_tflops=790.0)
    out = gpu.measure(cfg, batch, seq, torch.device("cpu"), args)
    assert out["train_tok_s"] > 0 and out["prefill_tok_s"] > 0
    assert set(out["errors"]) == {"decode_b1", "decode_b8"} and "out of memory" in out["errors"]["decode_b1"]
    assert "decode_b1_tok_s" not in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine would run the real benchmark")
def test_gpu_script_refuses_a_missing_device():
    done = subprocess.run([sys.executable, "benchmarks/gpu.py", "--device", "cuda"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "--device cuda but CUDA is not available" in done.stderr


def test_gpu_script_names_an_unknown_model():
    done = subprocess.run([sys.executable, "benchmarks/gpu.py", "--device", "cpu", "--models",
                           "medium-mlx"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "unknown model 'medium-mlx'" in done.stderr


@pytest.mark.slow
def test_speculative_script_compares_on_held_out_prompts():
    done = subprocess.run([sys.executable, "benchmarks/speculative.py", "--prompts", "1",
                           "--prompt-tokens", "8", "--new-tokens", "6", "--rounds", "1",
                           "--draft-loops", "1", "--draft-tokens", "2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    (row,) = summary["results"]
    assert row["same_tokens"] is True and 0 <= row["acceptance"] <= 1 and row["speedup"] > 0
    assert "random-init tiny" in summary["model"] and "speedup" in done.stdout


def test_cache_policy_quality_reports_bytes_per_token(monkeypatch):
    """Each policy's cache size per token, whatever the batch it decodes (it once reported the
    bytes of its 8-row cache per position), and the per_loop policy matches the full forward."""
    from types import SimpleNamespace

    import openmythos.data.corpus
    import openmythos.training.checkpoint
    from benchmarks.speed import cache_policy_quality
    from tests.conftest import small_model

    model = small_model(std=0.1, max_seq_len=32)
    docs = [SimpleNamespace(text=" ".join(map(str, range(i, i + 40)))) for i in range(0, 400, 40)]
    tokenizer = SimpleNamespace(encode=lambda text: [int(w) % 64 for w in text.split()])
    run = SimpleNamespace(data=SimpleNamespace(corpus="fake"))
    monkeypatch.setattr(openmythos.training.checkpoint, "load_model", lambda path: (model, tokenizer, run))
    monkeypatch.setattr(openmythos.data.corpus, "load_corpus", lambda name: SimpleNamespace(val=docs))
    result = cache_policy_quality("ckpt", [("per_loop", None), ("ring", 1)], batch=2, width=24, prefix=8)
    per_loop, ring = result["rows"]
    for row in result["rows"]:
        cfg = model.cfg.replace(kv_cache_policy=row["policy"], **({"kv_cache_ring": 1} if row["ring"] else {}))
        assert row["cache_bytes_per_token"] == cfg.kv_cache_bytes_per_token(3, torch.float32)
    assert per_loop["loss_increase"] == pytest.approx(0.0, abs=1e-4)
    assert per_loop["top1_agreement_with_full"] == 1.0


def test_serving_profile_counts_each_modes_steps_and_loops():
    """The profile's timers count what each mode ran: static batching one call per output token
    of each batch's longest request, each at the batch's deepest depth (the counts the packing
    bound compares against); the engine fewer loop-steps than that, on the same requests."""
    from benchmarks.serving import profile, traffic
    from tests.conftest import small_model

    model = small_model(max_seq_len=128, max_loop_iters=4).eval()
    reqs = traffic(5, model.cfg.vocab_size, 6, seed=1)
    result = profile(model, reqs, batch=2, max_loops=6)
    groups = [reqs[i:i + 2] for i in range(0, 5, 2)]
    assert result["static_steps"] == sum(max(r["max_tokens"] for r in g) for g in groups)
    assert result["static_loop_steps"] == sum(max(r["max_tokens"] for r in g) * max(r["n_loops"] for r in g)
                                              for g in groups)
    assert max(r["max_tokens"] for r in reqs) <= result["steps"] < result["static_steps"] + len(reqs)
    assert result["loop_steps"] < result["static_loop_steps"]
    assert result["engine_vs_static"] == pytest.approx(result["static_s"] / result["engine_s"])
    assert all(result[k] > 0 for k in ("loop_ms", "step_fixed_ms", "static_loop_ms", "static_step_fixed_ms"))
    assert model.forward.__func__ is type(model).forward  # the timers are gone afterwards
    assert "_step" not in vars(model.recurrent)


@pytest.mark.slow
def test_threads_script_times_each_case_at_one_thread_and_the_default():
    done = subprocess.run([sys.executable, "benchmarks/threads.py", "--rounds", "1", "--requests", "2",
                           "--new-tokens", "4"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(summary["results"]) == {"generate, batch 1", "generate, batch 8", "engine, batch 8, 2 requests"}
    for row in summary["results"].values():
        assert row["1_threads_s"] > 0 and row["default_vs_one"] > 0


def test_optimizer_script_times_each_variant():
    done = subprocess.run([sys.executable, "benchmarks/optimizer.py", "--rounds", "2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(summary["step_ms"]) == {"muon, Newton-Schulz in bf16", "muon, Newton-Schulz in fp32",
                                       "adamw, fused", "adamw, torch's CPU default"}
    assert all(ms > 0 for ms in summary["step_ms"].values()) and summary["has_fast_bf16"] in (True, False)
