"""`mythos` end to end, through `python -m openmythos.cli` subprocesses: train -> eval -> generate
-> info, Ctrl-C and resume; and, in-process, the error messages a user sees."""

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from openmythos.cli import main

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT / "tests" / "data" / "train_small.txt"
# OMP threads that wait on each other at every tiny op only cost time on a busy CI machine
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def tiny_train_args(run_dir: Path, cache: Path, steps: int = 8) -> list[str]:
    args = {
        "run.out_dir": run_dir, "run.dtype": "fp32", "run.log_every": 1, "run.threads": 1,
        "data.corpus": TEXT, "data.tokenizer": "byte", "data.seq_len": 32, "data.cache_dir": cache,
        "train.steps": steps, "train.batch_size": 4, "train.warmup_steps": 2, "train.lr": 3e-3,
        "model.dim": 32, "model.n_heads": 2, "model.max_seq_len": 64, "model.max_loop_iters": 2,
        "model.halting": "none", "model.n_experts": 4, "model.expert_dim": 16,
        "model.kv_lora_rank": 16, "model.q_lora_rank": 0, "model.qk_rope_head_dim": 8,
        "model.qk_nope_head_dim": 8, "model.v_head_dim": 8, "model.lora_rank": 4,
        "model.loop_embed_fraction": 4, "loops.mean": 2, "eval.depths": "1,2,4",
        "eval.samples": 1, "eval.sample_tokens": 8,
    }
    return [item for key, value in args.items() for item in (f"--{key}", str(value))]


def curve(metrics: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, metrics.read_text().splitlines())]


def mythos(*args: str, check: bool = True, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "openmythos.cli", *args], cwd=ROOT, env=env or ENV,
                            capture_output=True, text=True, timeout=300, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"mythos {' '.join(args)} failed ({result.returncode}):\n"
                             f"{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("cli")
    result = mythos("train", *tiny_train_args(tmp / "run", tmp / "cache"))
    assert "unigram baseline" in result.stdout and "n_loops" in result.stdout
    return tmp / "run"


def test_train_writes_summary_metrics_and_checkpoint(run_dir):
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 8
    for key in ("val_loss", "val_bpb", "unigram_loss"):
        assert isinstance(summary[key], float) and summary[key] > 0
    assert set(summary["loss_per_depth"]) == {"1", "2", "4"}
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 8
    assert (run_dir / "checkpoints" / "step_00000008" / "manifest.json").is_file()
    assert (run_dir / "config.toml").is_file()


@pytest.mark.slow
def test_eval_prints_a_table_and_json(run_dir):
    out = mythos("eval", "--checkpoint", str(run_dir), "--n-loops", "1,2").stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert set(result["loss_per_depth"]) == {"1", "2"}
    assert {"loss", "ppl", "bpb"} <= set(result["loss_per_depth"]["2"])
    assert "n_loops" in out and "unigram baseline" in out
    on_file = json.loads(mythos("eval", "--checkpoint", str(run_dir), "--data", str(TEXT),
                                "--n-loops", "2", "--max-tokens", "256").stdout.splitlines()[-1])
    assert on_file["tokens"] == 256 and on_file["data"] == str(TEXT)


def test_generate_streams_a_continuation(run_dir):
    out = mythos("generate", "--checkpoint", str(run_dir), "--prompt", "Fellow-Citizens",
                 "--max-new-tokens", "12", "--temperature", "0").stdout
    assert out.startswith("Fellow-Citizens") and len(out) > len("Fellow-Citizens")


@pytest.mark.parametrize("args, message", [
    (["--n-loops", "0"], "--n-loops: expected an integer >= 1"),
    (["--max-new-tokens", "-5"], "--max-new-tokens: expected an integer >= 1"),
    (["--top-p", "1.5"], "top_p"),
    (["--temperature", "nan"], "temperature"),
    (["--max-new-tokens", "100000"], "exceeds the model's context"),
    (["--draft-loops", "0"], "--draft-loops: expected an integer >= 1"),
    (["--draft-tokens", "3"], "--draft-tokens needs --draft-loops"),
    (["--draft-loops", "9", "--n-loops", "2", "--max-new-tokens", "4"], "--draft-loops 9 exceeds the depth of 2 loops"),
])
def test_generate_refuses_bad_arguments_before_it_writes(run_dir, args, message):
    done = mythos("generate", "--checkpoint", str(run_dir), "--prompt", "hi", *args, check=False)
    assert done.returncode == 2 and message in done.stderr and done.stdout == ""


@pytest.mark.slow
def test_home_relative_paths_and_top_k_zero(run_dir, tmp_path):
    home = {**ENV, "HOME": str(tmp_path)}
    mythos("export-hf", "--checkpoint", str(run_dir), "--out=~/hf", env=home)
    assert (tmp_path / "hf" / "config.json").is_file()
    ask = ("--prompt", "Fellow", "--max-new-tokens", "6", "--temperature", "0", "--top-k", "0")
    assert mythos("generate", "--checkpoint=~/hf", *ask, env=home).stdout.startswith("Fellow")
    out = mythos("experiment", "depth-extrapolation", "--smoke", "--out_dir=~/exp", env=home).stdout
    assert "depth-extrapolation" in out and (tmp_path / "exp" / "report.md").is_file()


def test_generate_writes_as_it_goes(run_dir):
    from openmythos.cli import generate

    class Recorder(io.StringIO):
        writes = 0

        def write(self, text):
            Recorder.writes += bool(text)
            return super().write(text)

    out = Recorder()
    text = generate(str(run_dir), "Fellow-Citizens", max_new_tokens=12, temperature=0, out=out)
    assert out.getvalue() == text + "\n" and Recorder.writes > 3  # the prompt, then piece by piece


def test_generate_with_speculative_drafts_writes_the_same_text(run_dir):
    from openmythos.cli import generate

    kwargs = dict(prompt="Fellow-Citizens", max_new_tokens=16, n_loops=3, temperature=0)
    plain = generate(str(run_dir), out=io.StringIO(), **kwargs)
    for draft_loops in (1, 2):
        assert generate(str(run_dir), out=io.StringIO(), draft_loops=draft_loops, **kwargs) == plain


@pytest.mark.slow
def test_eval_runs_the_weights_with_another_exit_rule_and_counts_the_loops(run_dir, capsys):
    args = ["eval", "--checkpoint", str(run_dir), "--data", str(TEXT), "--n-loops", "4", "--max-tokens", "64"]

    def run(*extra: str) -> dict:
        assert main([*args, *extra]) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    trained = run()  # the run trained without halting: every token runs 4 loops
    assert trained["loss_per_depth"]["4"]["loops"] == 4.0 and trained["exit_rule"]["halting"] == "none"
    # any drift counts as settled: every token stops after the 2 loops the KL test needs
    settled = run("--halting", "kl", "--kl-threshold", "1e9")
    assert settled["loss_per_depth"]["4"]["loops"] == 2.0
    assert settled["loss_per_depth"]["4"]["loss"] != trained["loss_per_depth"]["4"]["loss"]
    assert settled["exit_rule"] == {**trained["exit_rule"], "halting": "kl", "kl_threshold": 1e9}
    assert main([*args, "--halting", "kl", "--kl-threshold", "-1"]) == 2
    assert "kl_threshold=-1.0" in capsys.readouterr().err
    # generate takes the same flags
    ask = ["generate", "--checkpoint", str(run_dir), "--prompt", "Fellow", "--max-new-tokens", "4",
           "--temperature", "0"]
    assert main([*ask, "--halting", "kl", "--kl-threshold", "1e9"]) == 0
    capsys.readouterr()
    assert main([*ask, "--kl-threshold", "1e-3"]) == 2  # without --halting kl it would do nothing
    assert "kl_threshold applies to halting='kl', but the rule is halting='none'" in capsys.readouterr().err
    assert main([*ask, "--halting", "act"]) == 2  # the run trained no halting unit
    assert "halting='act' needs a halting unit trained with it" in capsys.readouterr().err


def test_an_exported_folder_serves_generate_and_eval_alike(run_dir, tmp_path):
    hf = tmp_path / "hf"
    mythos("export-hf", "--checkpoint", str(run_dir), "--out", str(hf))
    ask = ("--prompt", "Fellow-Citizens", "--max-new-tokens", "12", "--temperature", "0")
    assert (mythos("generate", "--checkpoint", str(hf), *ask).stdout
            == mythos("generate", "--checkpoint", str(run_dir), *ask).stdout)
    scores = [json.loads(mythos("eval", "--checkpoint", str(path), "--data", str(TEXT), "--n-loops", "2",
                                "--max-tokens", "256").stdout.splitlines()[-1])["loss_per_depth"]["2"]
              for path in (hf, run_dir)]
    assert scores[0]["loss"] == pytest.approx(scores[1]["loss"], rel=1e-5)


@pytest.mark.slow
def test_generate_with_a_compiled_decode_step_writes_the_same_text(run_dir):
    from openmythos.cli import generate

    kwargs = dict(prompt="Fellow-Citizens", max_new_tokens=12, temperature=0, out=io.StringIO())
    assert generate(str(run_dir), compile=True, **kwargs) == generate(str(run_dir), **kwargs)


@pytest.mark.slow
def test_info_for_a_preset_and_a_checkpoint(run_dir):
    out = mythos("info", "--preset", "tiny", "--n-loops", "8").stdout
    preset = json.loads(out.splitlines()[-1])
    assert preset["params"] > preset["active_params"] > 0 and preset["n_loops"] == 8
    assert preset["flops_per_token_train"] == 3 * preset["flops_per_token_forward"]
    assert preset["kv_bytes_per_token_bf16"] > 0
    ckpt = json.loads(mythos("info", "--checkpoint", str(run_dir)).stdout.splitlines()[-1])
    assert ckpt["n_loops"] == 2


def test_console_script_is_declared():
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["mythos"] == "openmythos.cli:main"


@pytest.mark.parametrize("args, message", [
    (["train", "--train.lrr", "1e-3"], "unknown config key 'train.lrr'; did you mean 'train.lr'?"),
    (["train", "--config", "nowhere.toml"], "config file 'nowhere.toml' does not exist"),
    (["eval", "--checkpoint", "nowhere"], "checkpoint path 'nowhere' does not exist"),
    (["info", "--checkpoint", "nowhere"], "checkpoint path 'nowhere' does not exist"),
])
def test_user_errors_are_one_clear_line(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_a_checkpoint_that_cannot_be_written_is_one_clear_line(tmp_path, monkeypatch, capsys):
    # a full disk surfaced as torch's RuntimeError traceback with exit code 1 (as if diverged)
    def disk_full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] unexpected pos 311744 vs 311632")

    monkeypatch.setattr(torch, "save", disk_full)
    assert main(["train", *tiny_train_args(tmp_path / "run", tmp_path / "cache", steps=2)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("mythos train: error: could not write checkpoint step 2 in ") and "disk full" in err
    assert list((tmp_path / "run" / "checkpoints").iterdir()) == []


@pytest.mark.parametrize("args, message", [
    (["info", "--preset", "tiny", "--n-loops", "-2"], "--n-loops: expected an integer >= 1, got -2"),
    (["info", "--preset", "tiny", "--seq-len", "0"], "--seq-len: expected an integer >= 1, got 0"),
    (["eval", "--checkpoint", "x", "--max-tokens", "-5"], "--max-tokens: expected an integer >= 0, got -5"),
    (["serve", "--preset", "tiny", "--random-init", "--port", "70000"], "--port: expected a port in [0, 65535]"),
    (["generate", "--checkpoint", "x", "--prompt", "a", "--seed", str(2**64)], "--seed: expected a seed in [0, 2**64)"),
    (["serve", "--preset", "tiny", "--random-init", "--timeout", "nan"], "--timeout: expected a positive finite number, got 'nan'"),
    (["serve", "--preset", "tiny", "--random-init", "--max-queue", "0"], "--max-queue: expected an integer >= 1, got 0"),
])
def test_bad_numbers_on_the_command_line_are_refused(args, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("flag, value, message", [
    ("--scale", "inf", "scale=inf must be a finite number"),
    ("--scale", "nan", "scale=nan must be a finite number"),
    ("--scale", "-1", "scale=-1.0 must be positive"),
    ("--threads", "-1", "threads=-1 must be >= 0"),
    ("--budget_minutes", "-1", "budget_minutes=-1.0 must be >= 0"),
    ("--steps", "-3", "steps=-3 must be positive"),  # was run as 1 step
    ("--lr", "-1", "lr=-1.0 must be positive"),  # was gradient ascent
    ("--loops", "2,0", "loops=[2, 0] must be positive"),
])
def test_an_experiment_refuses_a_bad_number(flag, value, message, capsys):
    assert main(["experiment", "param-efficiency", flag, value]) == 2
    assert message in capsys.readouterr().err


def test_serve_passes_its_limits_to_the_engine_and_the_server(monkeypatch):
    pytest.importorskip("fastapi")
    import openmythos.serving.server as server

    got = {}
    monkeypatch.setattr(server, "serve", lambda engine, host, port, name, limits: got.update(
        engine=engine, limits=limits, name=name))
    assert main(["serve", "--preset", "tiny", "--random-init", "--max-queue", "3", "--max-loops", "12",
                 "--max-tokens", "40", "--timeout", "2.5", "--halting", "kl", "--kl-threshold", "0.01"]) == 0
    engine, limits = got["engine"], got["limits"]
    assert (engine.max_queue, engine.max_loops, engine.max_batch) == (3, 12, 8)
    assert (limits.max_tokens, limits.timeout_s, limits.max_prompt_tokens) == (40, 2.5, 2048)
    assert got["name"] == "tiny-random"
    assert (engine.model.cfg.halting, engine.model.cfg.kl_threshold) == ("kl", 0.01)


def test_experiment_flags_take_a_value_or_stand_alone():
    from openmythos.cli import _flags

    assert _flags(["--smoke", "--scale=4", "--out-dir", "x", "--lr", "-1"]) == {
        "smoke": True, "scale": "4", "out_dir": "x", "lr": "-1"}
    with pytest.raises(ValueError, match="expected --field"):
        _flags(["smoke"])


def test_an_experiment_field_with_its_value_forgotten_is_refused(tmp_path, monkeypatch):
    """`--out_dir` alone used to run the whole experiment into a folder named "true"."""
    from openmythos.cli import experiment_command

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="--out_dir needs a value"):
        experiment_command("stability", {"smoke": True, "out_dir": True})
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_ctrl_c_checkpoints_and_resume_matches_an_uninterrupted_run(tmp_path, run_dir):
    steps = 150
    cmd = [sys.executable, "-m", "openmythos.cli", "train",
           *tiny_train_args(tmp_path / "run", tmp_path / "cache", steps=steps)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    saved = sorted((tmp_path / "run" / "checkpoints").iterdir())
    assert len(saved) == 1 and int(saved[0].name.split("_")[1]) < steps

    # a different config is refused, with the difference shown
    refused = mythos("train", "--resume", str(tmp_path / "run"), "--train.lr", "1e-3", check=False)
    assert refused.returncode == 2 and "train.lr: 0.003 -> 0.001" in refused.stderr

    mythos("train", "--resume", str(tmp_path / "run"))
    straight = tmp_path / "straight"
    mythos("train", *tiny_train_args(straight, tmp_path / "cache", steps=steps))
    assert len(curve(metrics)) == steps
    assert curve(metrics) == curve(straight / "metrics.jsonl")


def test_eval_names_the_file_it_scored(tmp_path, capsys):
    # a run validated on its own val_path: the JSON names that file, not the training corpus
    val = tmp_path / "val.txt"
    val.write_text("a separate validation text, not part of the training file\n" * 4)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT.read_text())
    args = tiny_train_args(tmp_path / "run", tmp_path / "cache", steps=2)
    assert main(["train", *args, "--data.corpus", str(corpus), "--data.val_path", str(val),
                 "--eval.samples", "0", "--eval.depths", "1"]) == 0
    capsys.readouterr()
    main(["eval", "--checkpoint", str(tmp_path / "run"), "--n-loops", "1"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["data"] == str(val) and result["unigram_loss"] > 0
    # --data needs no training corpus: without it, only the unigram baseline is missing
    corpus.unlink()
    assert main(["eval", "--checkpoint", str(tmp_path / "run"), "--n-loops", "1", "--data", str(val)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["data"] == str(val) and result["unigram_loss"] is None and result["loss_per_depth"]["1"]["loss"] > 0


def test_empty_paths_are_refused_not_read_as_the_current_folder(tmp_path, capsys):
    """Path("") is ".": an empty data.corpus trained on every .txt/.md under the working folder,
    and `eval --data ""` scored them under the label of the run's own validation split."""
    from openmythos.data import load_corpus, path_documents
    from openmythos.training.config import load_config

    for key in ("data.corpus", "data.tokenizer"):
        with pytest.raises(ValueError, match=f"{key}='' must not be empty"):
            load_config(None, {key: ""})
    for call in (lambda: load_corpus(""), lambda: path_documents(" ")):
        with pytest.raises(ValueError, match="empty"):
            call()
    assert load_corpus(TEXT).train  # a Path names a path too
    with pytest.raises(ValueError, match="val_path: corpus path '.*nope' does not exist"):
        load_corpus(str(TEXT), val_path=str(tmp_path / "nope"))
    assert main(["train", "--eval.depths", "1.5"]) == 2
    assert "expects a list of int, got [1.5]" in capsys.readouterr().err


def test_out_of_memory_is_an_error_that_leaves_no_run_folder(tmp_path, monkeypatch, capsys):
    """A model too large for memory gave a traceback and exit 1 (the code for a diverged run),
    and left an empty run folder behind."""
    import openmythos.training.trainer as trainer_mod

    def too_big(cfg):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't "
                           "allocate memory: you tried to allocate 11811160064 bytes")

    monkeypatch.setattr(trainer_mod, "OpenMythos", too_big)
    assert main(["train", *tiny_train_args(tmp_path / "run", tmp_path / "cache")]) == 2
    assert "error: out of memory" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_an_exports_generation_depth_is_the_cli_default(run_dir, tmp_path, monkeypatch):
    """export-hf --n-loops sets the depth transformers' generate runs at; generate, info and serve
    ran the export at max_loop_iters instead."""
    import openmythos.cli as cli

    pytest.importorskip("transformers")
    out = cli.export_hf_command(str(run_dir), str(tmp_path / "hf"), n_loops=1)
    assert cli.info(checkpoint=out)["n_loops"] == 1
    assert cli.info(checkpoint=str(run_dir))["n_loops"] == 2  # a training checkpoint: max_loop_iters
    depths = []
    real = cli.OpenMythos.stream
    monkeypatch.setattr(cli.OpenMythos, "stream", lambda self, *a, **k: depths.append(k["n_loops"]) or real(self, *a, **k))
    cli.generate(out, "My", max_new_tokens=2, out=io.StringIO())
    cli.generate(out, "My", max_new_tokens=2, n_loops=2, out=io.StringIO())  # an explicit depth wins
    assert depths == [1, 2]
    with pytest.raises(ValueError, match="--preset and --random-init go without --checkpoint"):
        cli.serve_command(out, None, True, "127.0.0.1", 0, 8)
    # served: requests default to the export's depth, also past max_loop_iters (2 here)
    import openmythos.serving.server as server

    engines = []
    monkeypatch.setattr(server, "serve", lambda engine, *a, **k: engines.append(engine))
    deep = cli.export_hf_command(str(run_dir), str(tmp_path / "deep"), n_loops=4)
    for folder, want in ((out, (1, 2)), (deep, (4, 4)), (str(run_dir), (2, 2))):
        cli.serve_command(folder, None, False, "127.0.0.1", 0, 8)
        assert (engines[-1].default_loops, engines[-1].max_loops) == want
    cli.serve_command(deep, None, False, "127.0.0.1", 0, 8, max_loops=3)  # an explicit cap wins
    assert (engines[-1].default_loops, engines[-1].max_loops) == (3, 3)


def test_generate_takes_a_prompt_that_fills_the_context_and_drafts_at_full_depth(run_dir):
    """The limits are inclusive: a prompt plus --max-new-tokens exactly filling the context is
    served, and --draft-loops may equal the depth asked for, also past max_loop_iters (2 here)."""
    import openmythos.cli as cli
    from openmythos.training import open_checkpoint

    ckpt = open_checkpoint(run_dir)
    room = ckpt.model_cfg.max_seq_len - len(ckpt.tokenizer().encode("My"))
    cli.generate(str(run_dir), "My", max_new_tokens=room, temperature=0, out=io.StringIO())
    cli.generate(str(run_dir), "My", max_new_tokens=2, n_loops=3, draft_loops=3, temperature=0,
                 out=io.StringIO())


def test_eval_scores_at_most_max_tokens_at_each_depth(run_dir, monkeypatch):
    """`mythos eval --max-tokens` reaches the evaluation of every depth, and the result counts
    the tokens scored; a bf16 run is scored under bf16 autocast."""
    import openmythos.cli as cli

    calls, real = [], cli.evaluate_split
    monkeypatch.setattr(cli, "evaluate_split", lambda *a, **k: calls.append(
        (k["n_loops"], k["max_tokens"], k["autocast_dtype"])) or real(*a, **k))
    result = cli.evaluate(str(run_dir), n_loops=[1, 2], max_tokens=64)
    assert calls == [(1, 64, None), (2, 64, None)] and result["tokens"] == 64
    # a run trained in bf16 is scored under bf16 autocast, as its trainer evaluated it
    load = cli._load

    def bf16_run(*args):
        model, tokenizer, cfg = load(*args)
        cfg.run.dtype = "bf16"
        return model, tokenizer, cfg

    monkeypatch.setattr(cli, "_load", bf16_run)
    cli.evaluate(str(run_dir), n_loops=[1], max_tokens=64)
    assert calls[-1] == (1, 64, torch.bfloat16)


def test_a_diverged_run_exits_1_with_its_message(monkeypatch, capsys):
    """TrainingDiverged is a RuntimeError: the out-of-memory clause caught it first and re-raised
    it as a traceback."""
    import openmythos.cli as cli
    from openmythos.training import TrainingDiverged

    def diverging(*args):
        raise TrainingDiverged("training diverged: 3 non-finite steps in a row")

    monkeypatch.setattr(cli, "train_command", diverging)
    assert cli.main(["train"]) == cli.EXIT_DIVERGED
    assert "mythos train: training diverged: 3 non-finite steps" in capsys.readouterr().err


# ---- from a mutation review of the command line: bounds, defaults and exit codes ----


def test_number_flags_accept_their_bounds_and_refuse_past_them(capsys):
    """Off-by-one guards: port 65535 is a port, --timeout 0 is not positive, and eval's
    --n-loops list refuses a depth of 0 as generate's --n-loops does."""
    import argparse

    from openmythos.cli import _int_list, _port, _positive_float

    assert _port("65535") == 65535 and _int_list("1,2") == [1, 2]
    for parse, text in ((_positive_float, "0"), (_int_list, "0,2")):
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "--checkpoint", "x", "--n-loops", "0,2"])
    assert exit_.value.code == 2 and "--n-loops: expected positive integers" in capsys.readouterr().err


def test_stray_arguments_are_refused_outside_train_and_experiment(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["info", "--preset", "tiny", "--bogus", "4"])
    assert exit_.value.code == 2 and "unrecognized arguments: --bogus 4" in capsys.readouterr().err


def test_generate_flags_reach_generate_with_their_defaults(monkeypatch):
    """--top-k 0 keeps every token (top_k=None, not 0) and --draft-tokens defaults to 4."""
    import openmythos.cli as cli

    got = {}
    monkeypatch.setattr(cli, "generate", lambda *a, **k: got.update(args=a, **k))
    assert main(["generate", "--checkpoint", "x", "--prompt", "a", "--top-k", "0", "--draft-loops", "2"]) == 0
    assert got["args"][5] is None and (got["draft_loops"], got["draft_tokens"]) == (2, 4)


@pytest.mark.parametrize("error, code", [
    (KeyboardInterrupt(), 130),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), 2),
])
def test_interrupts_and_out_of_memory_outside_train_have_their_exit_codes(monkeypatch, capsys, error, code):
    import openmythos.cli as cli

    def fail(*args):
        raise error

    monkeypatch.setattr(cli, "info", fail)
    assert main(["info", "--preset", "tiny"]) == code
    error = RuntimeError("a bug")
    with pytest.raises(RuntimeError, match="a bug"):  # any other RuntimeError is a bug: a traceback
        main(["info", "--preset", "tiny"])


def test_info_counts_at_the_given_depth_and_context():
    from openmythos.cli import info
    from openmythos.config import MythosConfig

    cfg = MythosConfig.from_preset("tiny")
    got = info(preset="tiny", n_loops=3, seq_len=100)
    assert (got["flops_per_token_forward"], got["flops_per_token_train"]) == (
        cfg.flops_per_token(3, 100, backward=False), cfg.flops_per_token(3, 100, backward=True))
    assert got["flops_per_token_train"] > got["flops_per_token_forward"]
    with pytest.raises(ValueError, match="exactly one of --preset NAME or --checkpoint DIR"):
        info()


def test_an_unknown_experiment_field_is_a_clear_error_before_anything_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["experiment", "stability", "--stepz", "3"]) == 2
    assert "experiment 'stability' has no field 'stepz'" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("command, default", [
    (["generate", "--checkpoint", "x", "--prompt", "a"], 1),
    (["serve", "--preset", "tiny", "--random-init"], 1),
    (["eval", "--checkpoint", "x"], 0),
])
def test_threads_flag_sets_torch_threads_for_the_command_alone(monkeypatch, capsys, command, default):
    """Decoding defaults to one thread (two ran it 1.1-2.5x slower on a shared 2-core CPU),
    evaluation to torch's default; the count is checked against the cores, and put back after."""
    import openmythos.cli as cli

    seen = []
    for name in ("generate", "serve_command", "evaluate"):
        monkeypatch.setattr(cli, name, lambda *a, **k: seen.append(torch.get_num_threads()))
    before = torch.get_num_threads()
    assert main(command) == 0
    assert seen == [default or before] and torch.get_num_threads() == before
    if (os.cpu_count() or 1) > 1:
        assert main([*command, "--threads", "2"]) == 0 and seen[-1] == 2
    calls, many = len(seen), (os.cpu_count() or 1) + 1
    assert main([*command, "--threads", str(many)]) == 2 and len(seen) == calls  # refused before running
    assert f"--threads={many} is more than this machine's" in capsys.readouterr().err


def test_train_help_lists_every_key_with_the_quickstarts_value(capsys):
    """`mythos train --help` is where a user finds the --section.key overrides: every section's
    keys with the values the quickstart runs, the model's from its preset, and a string with a
    comma quoted so that it reads as one value."""
    from openmythos.training.config import SECTIONS

    with pytest.raises(SystemExit) as stop:
        main(["train", "--help"])
    assert stop.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # unwrapped
    for section in SECTIONS:
        assert f" {section}: " in text
    for shown in ("lr=0.01,", "schedule=cosine,", "preset=tiny,", "dim=256,", "max_loop_iters=4,",
                  'prompt="My fellow citizens,",', "depths=1,2,4,8,16,", "progress=true model:"):
        assert shown in text
