"""DDP and FSDP2 on the CPU with gloo, 2 processes under torchrun: the same losses as one process
with the global batch, and checkpoints (whole or DCP shards) that resume across world sizes and
strategies. The single-process run and each strategy's 2-process run are shared by the tests of a
module (they are the expensive part); every launch has a timeout."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from openmythos.training import TrainConfig, load_model, train
from openmythos.training.trainer import report

FIXTURE = str(Path(__file__).parent / "data" / "train_small.txt")
COMMON = ["--model.dim", "64", "--model.n_heads", "2", "--model.kv_lora_rank", "16",
          "--model.q_lora_rank", "32", "--model.qk_nope_head_dim", "16", "--model.v_head_dim", "16",
          "--model.expert_dim", "32", "--model.max_loop_iters", "2", "--model.halting", "none",
          "--data.corpus", FIXTURE, "--data.tokenizer", "byte", "--data.seq_len", "32",
          "--run.dtype", "fp32", "--run.head_dtype", "fp32",  # exact comparisons: no bf16 head
          "--run.progress", "false", "--run.log_every", "1",
          "--run.threads", "1", "--train.lr", "2e-3", "--train.warmup_steps", "1",
          "--train.max_minutes", "0",
          "--loops.sampler", "fixed", "--loops.mean", "2",  # pinned: not the quickstart's
          "--train.optimizer", "adamw",  # the quickstart's Muon needs whole matrices, not shards
          "--eval.samples", "0", "--eval.depths", "[1]", "--eval.max_tokens", "256",
          "--eval.depth_max_tokens", "256"]
STEPS, EVERY = 6, 3  # every run saves at step 3, the point the resumed runs continue from


def launch(out: Path, nproc: int, batch: int, *extra: str, strategy: str = "ddp",
           steps: int = STEPS) -> list[dict]:
    """Train under torchrun with `nproc` processes, or in one plain process (strategy "none")."""
    env = {**os.environ, "OPENMYTHOS_CACHE": str(out.parent / "cache"), "OMP_NUM_THREADS": "1"}
    train_args = ["-m", "openmythos.cli", "train", *COMMON, "--train.steps", str(steps),
                  "--train.batch_size", str(batch), "--run.out_dir", str(out), *extra]
    if strategy == "none":
        cmd = [sys.executable, *train_args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", *train_args, "--dist.strategy", strategy]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    # FSDP2's warning that a sharded module returned a view ("can produce wrong gradients")
    assert "returned a view tensor" not in done.stderr
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


def losses(records):
    return [r["loss"] for r in records]


def step_dir(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step_{step:08d}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """name -> (run dir, records), each run launched once, when a test first asks for it."""
    root, done = tmp_path_factory.mktemp("dist"), {}
    plans = {"single": (1, 4, "none"), "ddp": (2, 2, "ddp"), "fsdp": (2, 2, "fsdp")}

    def get(name):
        if name not in done:
            nproc, batch, strategy = plans[name]
            out = root / name
            done[name] = out, launch(out, nproc, batch, "--checkpoint.every", str(EVERY),
                                     strategy=strategy)
        return done[name]
    return get


@pytest.mark.multiprocess
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one_process_with_the_global_batch(runs, strategy):
    _, single = runs("single")
    _, two = runs(strategy)
    assert len(single) == len(two) == STEPS
    assert losses(two) == pytest.approx(losses(single), abs=1e-5)
    assert all(len(r["tok_per_s_rank"]) == 2 and min(r["tok_per_s_rank"]) > 0 for r in two)
    assert [r["rho"] for r in two] == pytest.approx([r["rho"] for r in single], abs=1e-6)
    # the router biases follow the global expert load (all-reduced), not each rank's own
    assert [r["load_entropy"] for r in two] == pytest.approx([r["load_entropy"] for r in single], abs=1e-6)


@pytest.mark.multiprocess
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_gradient_accumulation_matches_one_process(runs, tmp_path, strategy):
    """2 ranks x 2 micro-batches of 1, synchronised only on the last, = 1 process x 4."""
    _, single = runs("single")
    accum = launch(tmp_path / "accum", 2, 1, "--train.grad_accum", "2", strategy=strategy)
    assert losses(accum) == pytest.approx(losses(single), abs=1e-5)


@pytest.mark.multiprocess
def test_fsdp_bf16_mixed_precision_with_activation_checkpointing(runs, tmp_path):
    """The 1b-gpu recipe's settings: bf16 parameters for compute, fp32 master weights."""
    _, single = runs("single")
    out = tmp_path / "bf16"
    mixed = launch(out, 2, 2, "--run.dtype", "bf16", "--dist.activation_checkpointing", "true",
                   strategy="fsdp")
    assert losses(mixed) == pytest.approx(losses(single), abs=2e-2)
    assert losses(mixed) != pytest.approx(losses(single), abs=1e-6)  # bf16 really was used
    weights = load_file(step_dir(out, STEPS) / "model.safetensors")
    assert {v.dtype for v in weights.values()} == {torch.float32}


@pytest.mark.multiprocess
def test_fsdp_checkpoints_hold_shards_and_the_final_one_whole_weights(runs):
    fsdp, _ = runs("fsdp")
    single, _ = runs("single")
    periodic, final = step_dir(fsdp, EVERY), step_dir(fsdp, STEPS)
    shards = sorted(p.name for p in (periodic / "dcp").iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    manifest = json.loads((periodic / "manifest.json").read_text())["files"]
    assert {"dcp/__0_0.distcp", "dcp/__1_0.distcp", "trainer_state.pt"} <= set(manifest)
    assert not (periodic / "model.safetensors").exists()
    # the final checkpoint's consolidated weights are the single-process run's weights
    whole, reference = (load_file(step_dir(r, STEPS) / "model.safetensors") for r in (fsdp, single))
    assert whole.keys() == reference.keys()
    for k in reference:
        torch.testing.assert_close(whole[k], reference[k], atol=1e-5, rtol=0)
    # eval/generate read a periodic checkpoint too: its shards are gathered in this process
    sharded, _, _ = load_model(periodic)
    plain, _, _ = load_model(step_dir(single, EVERY))
    assert sharded.state_dict().keys() == plain.state_dict().keys()
    for name, a in sharded.state_dict().items():
        torch.testing.assert_close(a, plain.state_dict()[name], atol=1e-5, rtol=0, msg=name)
    assert (final / "dcp" / ".metadata").is_file()


@pytest.mark.multiprocess
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_resume_across_world_sizes(runs, tmp_path, strategy):
    single, full = runs("single")
    two, _ = runs(strategy)
    # saved by 2 processes at step 3, resumed by 1 plain process with the same global batch
    one = launch(tmp_path / "one", 1, 4, "--checkpoint.resume", str(step_dir(two, EVERY)),
                 strategy="none")
    # saved by 1 plain process, resumed by 2
    back = launch(tmp_path / "back", 2, 2, "--checkpoint.resume", str(step_dir(single, EVERY)),
                  strategy=strategy)
    tail = losses(full)[EVERY:]
    # the resumed runs train only the steps after the checkpoint (a fresh run would match too)
    assert [r["step"] for r in one] == [r["step"] for r in back] == list(range(EVERY + 1, STEPS + 1))
    assert losses(one)[-EVERY:] == pytest.approx(tail, abs=1e-5)
    assert losses(back)[-EVERY:] == pytest.approx(tail, abs=1e-5)
    if strategy == "fsdp":  # 2 shards resharded into 1
        solo = launch(tmp_path / "solo", 1, 4, "--checkpoint.resume", str(step_dir(two, EVERY)),
                      strategy="fsdp")
        assert losses(solo)[-EVERY:] == pytest.approx(tail, abs=1e-5)


@pytest.mark.multiprocess
def test_fsdp_resume_with_dropout_is_exact(tmp_path):
    """Dropout's masks come from (seed, step, rank): a resumed sharded run draws the ones the run
    drew uninterrupted (rank 0 alone initialising the whole model at start-up leaves its torch
    generator elsewhere than the other rank's)."""
    drop = ("--model.dropout", "0.1")
    full = launch(tmp_path / "full", 2, 2, *drop, "--checkpoint.every", str(EVERY), strategy="fsdp")
    resumed = launch(tmp_path / "resumed", 2, 2, *drop, "--checkpoint.resume",
                     str(step_dir(tmp_path / "full", EVERY)), strategy="fsdp")
    assert losses(resumed) == losses(full)[EVERY:]


@pytest.mark.multiprocess
def test_a_different_global_batch_is_refused(runs, tmp_path):
    two, _ = runs("ddp")
    env = {**os.environ, "OPENMYTHOS_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-m", "openmythos.cli", "train", *COMMON,
                           "--train.steps", str(STEPS), "--train.batch_size", "2",
                           "--checkpoint.resume", str(two)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "global batch" in done.stderr


def test_fsdp_without_torchrun_is_refused(tmp_path, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    cfg = TrainConfig().override({"dist.strategy": "fsdp", "train.optimizer": "adamw",
                                  "run.out_dir": str(tmp_path)})
    with pytest.raises(ValueError, match=r"dist.strategy='fsdp' needs a torchrun launch"):
        train(cfg)


def test_strategy_none_under_torchrun_is_refused(tmp_path, monkeypatch):
    # each rank used to train the whole run alone, into the same folder
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = TrainConfig().override({"run.out_dir": str(tmp_path)})
    with pytest.raises(ValueError, match=r"dist.strategy='none' under a launch of 2 processes .* ddp or fsdp"):
        train(cfg)
    assert not any(tmp_path.iterdir())


def test_the_resume_hint_of_a_distributed_run_is_a_torchrun_launch():
    summary = {"run_dir": "runs/x", "status": "interrupted", "steps": 3, "tokens_seen": 10, "train_time_s": 1.0,
               "tok_per_s": 10.0, "checkpoint": "runs/x/checkpoints/step_00000003"}
    assert "resume with: mythos train --resume runs/x" in report(summary)
    assert ("resume with: torchrun --nproc_per_node=4 -m openmythos.cli train --resume runs/x"
            in report({**summary, "world_size": 4, "local_world_size": 4}))
    assert ("resume with: torchrun --nnodes=2 (and its rendezvous flags) --nproc_per_node=8 -m openmythos.cli "
            "train --resume runs/x" in report({**summary, "world_size": 16, "local_world_size": 8}))
    # one process under torchrun (configs/1b-gpu.toml on one GPU): FSDP2 still needs the launcher
    assert ("resume with: torchrun --nproc_per_node=1 -m openmythos.cli train --resume runs/x"
            in report({**summary, "strategy": "fsdp"}))


def test_fsdp_with_muon_is_refused():
    with pytest.raises(ValueError, match=r"train.optimizer='muon'.*dist.strategy='fsdp'"):
        TrainConfig().override({"dist.strategy": "fsdp", "train.optimizer": "muon"})


def test_the_rank_helpers_in_one_process_pass_values_through():
    """Without a process group the cross-rank helpers return this process's own values: the
    stop flags as given (a time limit or Ctrl-C stops the run), rho(A) for the log, and a
    one-entry list of the throughput."""
    from openmythos.training.distributed import DistEnv, any_rank, global_max, per_rank

    env, cpu = DistEnv(), torch.device("cpu")
    assert env.is_main and env.world_size == 1
    assert any_rank([True, False], env, cpu) == [True, False]
    assert global_max(0.75, env, cpu) == 0.75
    assert per_rank(123.5, env, cpu) == [123.5]


@pytest.mark.parametrize("present", ["RANK", "WORLD_SIZE"])
def test_a_half_set_torchrun_environment_is_refused_by_name(monkeypatch, present):
    """RANK without WORLD_SIZE (or the reverse) is no torchrun launch: the clear message, not a
    KeyError on the missing variable."""
    from openmythos.training.distributed import init_distributed

    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(present, "0" if present == "RANK" else "2")
    with pytest.raises(ValueError, match=r"dist.strategy='ddp' needs a torchrun launch"):
        init_distributed("cpu", "ddp")
