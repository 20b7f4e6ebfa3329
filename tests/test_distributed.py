"""DDP and FSDP2 on the CPU with gloo, 2 processes under torchrun: the same losses as one process
with the global batch, and checkpoints (whole or DCP shards) that resume across world sizes and
strategies. The single-process run and each strategy's 2-process run are shared by the tests of a
module (they are the expensive part); every launch has a timeout."""

import contextlib
import datetime
import json
import multiprocessing
import os
import subprocess
import sys
import traceback
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


def run_ranks(tmp_path: Path, fn, world_size: int = 2, timeout_s: float = 20.0) -> dict:
    """fn(rank) in `world_size` forked processes that share one gloo group (no torchrun, no
    re-import: well under a second): rank -> its return value. A rank that raises, or waits on a
    collective the others never join (gloo's timeout), fails the test with its traceback. fn
    returns plain Python values: a tensor would be passed by a handle that dies with its rank."""
    import torch.distributed as dist

    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    store = str(tmp_path / "gloo_store")

    def main(rank: int) -> None:
        torch.set_num_threads(1)
        try:
            dist.init_process_group("gloo", store=dist.FileStore(store, world_size), rank=rank,
                                    world_size=world_size,
                                    timeout=datetime.timedelta(seconds=timeout_s))
            results.put((rank, True, fn(rank)))
            dist.destroy_process_group()
        except BaseException:
            results.put((rank, False, traceback.format_exc()))

    procs = [ctx.Process(target=main, args=(rank,), daemon=True) for rank in range(world_size)]
    for p in procs:
        p.start()
    try:
        got = [results.get(timeout=timeout_s + 30) for _ in procs]
    finally:
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
    errors = [value for _, ok, value in got if not ok]
    assert not errors, "\n".join(errors)
    return {rank: value for rank, _, value in got}


@pytest.mark.multiprocess
def test_the_rank_helpers_across_two_processes(tmp_path):
    """any_rank: a flag true on one rank is true on all (a time limit or Ctrl-C on one rank stops
    every rank at the same step); global_max: the largest; per_rank: each rank's value in its
    place. Each rank gets the same lists."""
    from openmythos.training.distributed import DistEnv, any_rank, global_max, per_rank

    def helpers(rank):
        env, cpu = DistEnv(rank, 2, rank), torch.device("cpu")
        return (any_rank([rank == 0, False, True], env, cpu), global_max([0.5, 0.25][rank], env, cpu),
                per_rank([10.0, 20.0][rank], env, cpu))

    assert run_ranks(tmp_path, helpers) == {rank: ([True, False, True], 0.5, [10.0, 20.0])
                                            for rank in range(2)}


@pytest.mark.multiprocess
@pytest.mark.parametrize("max_tokens", [0, 24], ids=["every-window", "a-subset"])
def test_evaluate_on_two_ranks_is_evaluate_in_one_process(tmp_path, max_tokens):
    """Ranks score disjoint windows (unequal shares: 5 windows and a remainder) and all-reduce
    the summed loss, target count and loops: every rank returns the one-process loss and loops
    per token (under ACT, so the loops differ by token), not its own share's."""
    import numpy as np

    from openmythos.data import PackedTokens
    from openmythos.evaluation import evaluate
    from tests.conftest import small_model

    model = small_model(std=0.1, halting="act", act_threshold=0.5)
    tokens = PackedTokens(np.random.default_rng(5).integers(0, 64, size=1 + 5 * 8 + 3))
    kwargs = dict(seq_len=8, batch_size=2, n_loops=3, max_tokens=max_tokens)
    single = evaluate(model, tokens, **kwargs)
    got = run_ranks(tmp_path, lambda rank: evaluate(model, tokens, rank=rank, world_size=2, **kwargs))
    for rank in range(2):
        torch.testing.assert_close(got[rank], single, atol=1e-6, rtol=1e-6)


def _fsdp_groups(unit):  # FSDP2's own state: no public reader of a unit's reshard setting
    return unit._get_fsdp_state()._fsdp_param_groups


@pytest.mark.multiprocess
def test_gathered_holds_every_unit_whole_and_then_restores_each_ones_resharding(tmp_path):
    """Inside `gathered` every FSDP2 unit stays all-gathered, so ranks may run different numbers
    of forwards (rank 1 runs one more here: under the units' own resharding it would wait on an
    all-gather rank 0 never joins); on exit each unit is sharded again and reshards after forward
    as `parallelize` set it: prelude and coda yes, the looped block per dist.reshard_recurrent,
    the root never (it is needed in backward)."""
    from openmythos.model import OpenMythos
    from openmythos.training.config import DistConfig
    from openmythos.training.distributed import broadcast_full_weights, gathered, parallelize
    from tests.conftest import small_config, small_model

    def reshards(unit):
        return all(g.post_forward_mesh_info is not None for g in _fsdp_groups(unit))

    def run(rank):
        seen = {}
        for reshard in (False, True):
            with torch.device("meta"):
                model = OpenMythos(small_config())
            parallelize(model, DistConfig(strategy="fsdp", reshard_recurrent=reshard),
                        device=torch.device("cpu"))
            reference = small_model(std=0.1)
            broadcast_full_weights(model, reference.state_dict() if rank == 0 else {})
            units = [model.prelude[0], model.recurrent, model.coda[0], model]
            ids = torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(rank))
            with torch.no_grad():
                model(ids)
                set_up = [reshards(u) for u in units]
                with gathered(model, reshard):
                    for _ in range(rank + 1):
                        logits = model(ids).logits
                    inside = [all(g.is_unsharded for g in _fsdp_groups(u)) for u in units]
                after = [reshards(u) for u in units]
                sharded = [all(g.is_sharded for g in _fsdp_groups(u)) for u in units]
                close = torch.allclose(logits, reference(ids).logits, atol=1e-5)
            seen[reshard] = set_up, inside, after, sharded, close
        return seen

    expected = {reshard: ([True, reshard, True, False], [True] * 4, [True, reshard, True, False],
                          [True] * 4, True) for reshard in (False, True)}
    assert run_ranks(tmp_path, run) == {0: expected, 1: expected}


def test_parallelize_checkpoints_the_loops_only_when_asked():
    from openmythos.training.config import DistConfig
    from openmythos.training.distributed import parallelize
    from tests.conftest import small_model

    for on in (False, True):
        model = small_model()
        assert parallelize(model, DistConfig(activation_checkpointing=on), device=torch.device("cpu")) is model
        assert model.recurrent.checkpoint_loops is on


def test_init_distributed_joins_the_group_torchrun_describes(monkeypatch):
    """The process's place from torchrun's variables (its GPU by LOCAL_RANK, not RANK: on a
    second node they differ), nccl on CUDA and gloo on the CPU with the timeout given, and no
    second init_process_group once a group exists. Rank 0 alone is the main process, not every
    node's first."""
    import torch.distributed as dist

    from openmythos.training.distributed import DistEnv, init_distributed

    calls, devices, initialized = [], [], [False]
    monkeypatch.setattr(dist, "is_initialized", lambda: initialized[0])
    monkeypatch.setattr(dist, "init_process_group", lambda backend, timeout: calls.append((backend, timeout)))
    monkeypatch.setattr(torch.cuda, "set_device", devices.append)
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert init_distributed("cuda", "ddp", timeout_s=30) == DistEnv(rank=5, world_size=8, local_rank=1)
    assert devices == [1] and calls == [("nccl", datetime.timedelta(seconds=30))]
    assert init_distributed("cpu", "fsdp").local_rank == 1
    assert calls[1:] == [("gloo", datetime.timedelta(seconds=600))] and devices == [1]
    initialized[0] = True
    init_distributed("cpu", "ddp")
    assert len(calls) == 2
    assert DistEnv(0, 8, 0).is_main and not DistEnv(4, 8, 0).is_main


@pytest.mark.multiprocess
@pytest.mark.parametrize("when", ["during step 2", "after the last stop check"])
def test_a_signal_on_one_rank_stops_every_rank_at_the_same_step(tmp_path, when):
    """Ranks see a signal at different points (here rank 0 alone gets a SIGTERM). During a step
    they agree (any_rank) to stop after it: both save step 2 and skip the final evaluation. Just
    after their last agreement it comes too late to stop them: both evaluate under the default
    handlers (the one-process path, which ends its evaluation at once, would leave rank 1 waiting
    on rank 0's collectives)."""
    import signal

    from openmythos.data import PackedTokens
    from openmythos.training import Trainer
    from openmythos.training import trainer as trainer_mod
    from openmythos.training.config import load_config
    from openmythos.training.distributed import DistEnv
    from openmythos.training.trainer import _StopRequest
    from tests.test_training import tiny_overrides

    cfg = load_config(None, tiny_overrides(tmp_path, **{"train.steps": 3, "train.warmup_steps": 1,
                                                        "eval.samples": 0, "dist.strategy": "ddp"}))
    # what a run imports on first use, imported once here rather than in each forked rank
    # (seconds each): DDP's torch._dynamo and the loss plot's matplotlib
    import torch._dynamo  # noqa: F401
    with contextlib.suppress(ImportError):
        import matplotlib.pyplot  # noqa: F401

    def sigterm_to_this_rank():
        if getattr(signal.getsignal(signal.SIGTERM), "__self__", None).__class__ is _StopRequest:
            os.kill(os.getpid(), signal.SIGTERM)  # else it would end the rank

    def run(rank):  # patches in a forked rank reach this rank alone
        batches, saved = [0], []
        sample_batch, save, any_rank = PackedTokens.sample_batch, Trainer.save, trainer_mod.any_rank

        def sample_batch_under_a_signal(self, *args, **kwargs):
            batches[0] += 1
            if rank == 0 and when == "during step 2" and batches[0] == 2:
                sigterm_to_this_rank()
            return sample_batch(self, *args, **kwargs)

        def check_then_a_signal(flags, env, device):
            agreed = any_rank(flags, env, device)
            if rank == 0 and when != "during step 2" and saved == [True]:
                saved.append("signalled")
                sigterm_to_this_rank()
            return agreed

        PackedTokens.sample_batch = sample_batch_under_a_signal
        Trainer.save = lambda self, final=False: saved.append(final) or save(self, final)
        trainer_mod.any_rank = check_then_a_signal
        summary = train(cfg.override({"data.cache_dir": str(tmp_path / f"cache{rank}")}), DistEnv(rank, 2, rank))
        return summary["status"], summary["steps"], summary["strategy"], summary.get("val_loss")

    got = run_ranks(tmp_path, run)
    status, steps, strategy, val_loss = got[0]
    assert got[1] == got[0] and strategy == "ddp"
    if when == "during step 2":
        assert (status, steps, val_loss) == ("interrupted", 2, None)
    else:
        assert (status, steps) == ("completed", 3) and val_loss is not None
