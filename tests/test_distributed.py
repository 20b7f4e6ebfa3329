"""DDP on the CPU with gloo, 2 processes under torchrun: the same losses as one process with the
global batch, and checkpoints that resume across world sizes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.multiprocess

FIXTURE = str(Path(__file__).parent / "data" / "train_small.txt")
COMMON = ["--model.dim", "64", "--model.n_heads", "2", "--model.kv_lora_rank", "16",
          "--model.q_lora_rank", "32", "--model.qk_nope_head_dim", "16", "--model.v_head_dim", "16",
          "--model.expert_dim", "32", "--model.max_loop_iters", "2", "--model.halting", "none",
          "--data.corpus", FIXTURE, "--data.tokenizer", "byte", "--data.seq_len", "32",
          "--run.dtype", "fp32", "--run.progress", "false", "--run.log_every", "1",
          "--run.threads", "1", "--train.warmup_steps", "1", "--loops.mean", "2",
          "--eval.samples", "0", "--eval.depths", "[1]", "--eval.max_tokens", "256",
          "--eval.depth_max_tokens", "256"]


def launch(out: Path, nproc: int, batch: int, steps: int, *extra: str,
           strategy: str = "ddp") -> list[dict]:
    """Train under torchrun with `nproc` processes, or in one plain process (strategy "none")."""
    env = {**os.environ, "OPENMYTHOS_CACHE": str(out.parent / "cache"), "OMP_NUM_THREADS": "1"}
    train = ["-m", "openmythos.cli", "train", *COMMON, "--train.steps", str(steps),
             "--train.batch_size", str(batch), "--run.out_dir", str(out), *extra]
    if strategy == "none":
        cmd = [sys.executable, *train]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", *train, "--dist.strategy", strategy]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


def losses(records):
    return [r["loss"] for r in records]


def test_ddp_two_processes_match_one_process_with_the_global_batch(tmp_path):
    single = losses(launch(tmp_path / "single", 1, 4, 5, strategy="none"))
    ddp = losses(launch(tmp_path / "ddp", 2, 2, 5))
    assert len(single) == len(ddp) == 5
    assert ddp == pytest.approx(single, abs=1e-5)


def test_resume_across_world_sizes(tmp_path):
    full = losses(launch(tmp_path / "full", 1, 4, 6, "--checkpoint.every", "3", strategy="none"))
    two = launch(tmp_path / "two", 2, 2, 6, "--checkpoint.every", "3")
    assert losses(two) == pytest.approx(full, abs=1e-5)
    # saved by 2 processes at step 3, resumed by 1 with the same global batch (and the reverse)
    one = launch(tmp_path / "one", 1, 4, 6, "--checkpoint.resume",
                 str(tmp_path / "two" / "checkpoints" / "step_00000003"), strategy="none")
    back = launch(tmp_path / "back", 2, 2, 6, "--checkpoint.resume",
                  str(tmp_path / "full" / "checkpoints" / "step_00000003"))
    assert losses(one)[-3:] == pytest.approx(full[3:], abs=1e-5)
    assert losses(back)[-3:] == pytest.approx(full[3:], abs=1e-5)


def test_a_different_global_batch_is_refused(tmp_path):
    launch(tmp_path / "two", 2, 2, 2)
    env = {**os.environ, "OPENMYTHOS_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-m", "openmythos.cli", "train", *COMMON,
                           "--train.steps", "2", "--train.batch_size", "2", "--checkpoint.resume",
                           str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "global batch" in done.stderr
