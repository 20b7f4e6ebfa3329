"""Every experiment runs end to end in --smoke mode and writes a well-formed report; the phi
fit recovers a known exponent."""

import json
import math
from pathlib import Path

import pytest
import torch

from openmythos.data.tasks import KHopTask
from openmythos.experiments import EXPERIMENTS, common, run_experiment
from openmythos.experiments.act_pareto import ActParetoConfig, verdict
from openmythos.experiments.common import Report, TimeBudget
from openmythos.experiments.depth_extrapolation import prefix_targets
from openmythos.experiments.param_efficiency import (
    effective_layers,
    fit_log_curve,
    fit_phi,
    why_phi_is_undefined,
)
from openmythos.model.model import IGNORE_INDEX

FIXTURE = str(Path(__file__).parent / "data" / "train_small.txt")


@pytest.mark.parametrize("name", list(EXPERIMENTS))
def test_smoke_run_writes_a_report(name, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENMYTHOS_CACHE", str(tmp_path / "cache"))
    extra = {} if name == "depth-extrapolation" else {"corpus": FIXTURE, "tokenizer": "byte"}
    payload = run_experiment(name, smoke=True, out_dir=str(tmp_path / name), threads=1, **extra)
    out = tmp_path / name
    saved = json.loads((out / "results.json").read_text())
    assert saved["experiment"] == name and saved["results"] == json.loads(json.dumps(payload["results"], default=str))
    report = (out / "report.md").read_text()
    assert report.startswith(f"# {name}") and "|---|" in report
    assert list(out.glob("*.png")), "every experiment draws at least one plot"
    if name == "stability":  # a run that did not diverge may still have learned nothing
        for r in payload["results"]["runs"]:
            assert math.isfinite(r["unigram_loss"]) and r["learned"] == (r["val_loss"] < r["unigram_loss"])


def test_phi_fit_recovers_a_known_exponent():
    a, b, phi = 4.0, -0.5, 0.46
    dense = [3, 4, 6, 10]
    a_fit, b_fit = fit_log_curve(dense, [a + b * math.log(n) for n in dense])
    assert (a_fit, b_fit) == pytest.approx((a, b))
    loops = [2, 4, 8]
    looped_losses = [a + b * math.log(2 + r ** phi) for r in loops]
    eff = [effective_layers(x, a_fit, b_fit) - 2 for x in looped_losses]
    assert fit_phi(loops, eff) == pytest.approx(phi)


def test_phi_is_not_read_off_runs_that_cannot_carry_it():
    def run(name, layers, loss, loops=1):
        return {"name": name, "layers": layers, "val_loss": loss, "loops": loops}

    # the committed run's dense curve: 6 layers no better than 4
    flat = [run("dense-3", 3, 6.277), run("dense-4", 4, 6.034), run("dense-6", 6, 6.041)]
    assert "did not fall with every added layer" in why_phi_is_undefined(flat, [])
    dense = [run("dense-3", 3, 6.3), run("dense-4", 4, 6.1), run("dense-6", 6, 6.0)]
    a, b = fit_log_curve([3, 4, 6], [6.3, 6.1, 6.0])
    looped = [run("looped-1x2", 4, 6.2, 2), run("looped-1x4", 6, 6.5, 4)]  # worse than 3 dense layers
    for x in looped:
        x["effective_layers"] = effective_layers(x["val_loss"], a, b)
    assert why_phi_is_undefined(dense, looped) == "looped-1x4 did no better than 2 unique layers (L_eff <= 2)"
    looped[1]["val_loss"] = 6.05
    looped[1]["effective_layers"] = effective_layers(6.05, a, b)
    assert why_phi_is_undefined(dense, looped) is None
    assert math.isnan(effective_layers(6.0, a, 0.0)) and math.isfinite(effective_layers(a - 1.0, a, -1e-9))


def test_act_pareto_verdict_applies_its_stated_rule():
    full = {"rule": "fixed", "setting": 8, "mean_loops": 8.0, "val_loss": 6.0, "tok_per_s": 100.0}
    points = [{"setting": 0.3, "mean_loops": 3.0, "val_loss": 6.005, "tok_per_s": 150.0},
              {"setting": 0.1, "mean_loops": 1.5, "val_loss": 6.2, "tok_per_s": 300.0},  # too costly
              {"setting": 0.9, "mean_loops": 7.0, "val_loss": 6.0, "tok_per_s": 101.0}]
    v = verdict(points, full)
    assert (v["setting"], v["saves_loops"], v["saves_time"]) == (0.3, True, True)
    points[0]["tok_per_s"] = 110.0
    assert (verdict(points, full)["saves_loops"], verdict(points, full)["saves_time"]) == (True, False)
    assert verdict(points[1:2], full)["setting"] is None


def test_time_budget_gives_every_run_the_same_training_time(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(common.time, "perf_counter", lambda: clock[0])

    def spend(budget, overhead_s):
        shares = []
        for _ in range(budget.runs):
            train_s = 60 * budget.next_minutes()
            shares.append(train_s)
            clock[0] += train_s + overhead_s
            budget.finished(train_s + overhead_s, train_s)
        return shares

    shares = spend(TimeBudget(14.0, 5, start=0.0), overhead_s=10.0)
    assert shares == pytest.approx([shares[0]] * 5) and clock[0] <= 14 * 60
    clock[0] = 0.0
    slow = spend(TimeBudget(14.0, 5, start=0.0), overhead_s=100.0)  # past the fifth held back
    assert slow[-1] < slow[0] and clock[0] <= 14 * 60 + 1e-6


def test_the_recorded_command_repeats_the_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a Report makes its folder
    cfg = ActParetoConfig(smoke=True, depths=[1, 2], lr=1e-3)
    cfg.given = frozenset({"smoke", "depths", "lr"})
    assert Report("act-pareto", cfg).command() == "mythos experiment act-pareto --depths 1,2 --lr 0.001 --smoke true"


def test_unknown_experiment_and_field():
    with pytest.raises(ValueError, match="unknown experiment 'nope'"):
        run_experiment("nope")
    with pytest.raises(TypeError, match="stepz"):
        run_experiment("stability", stepz=3)
    with pytest.raises(ValueError, match="dtype='fp16' must be one of"):
        run_experiment("stability", dtype="fp16")


@pytest.mark.parametrize("name, fields, message", [
    ("depth-extrapolation", {"device": "tpu"}, "device='tpu' is not a device"),
    ("stability", {"corpus": "nope"}, "corpus='nope' is neither one of"),
    ("act-pareto", {"corpus": ""}, "corpus='' is neither one of"),
    ("param-efficiency", {"tokenizer": "foo"}, "tokenizer='foo' is neither one of"),
])
def test_a_bad_device_corpus_or_tokenizer_is_refused_before_any_folder(name, fields, message, tmp_path, monkeypatch):
    """They were found once the first model started, as run.device / data.tokenizer, after the
    report's folder and the data copies were written."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=message):
        run_experiment(name, **fields)
    assert not (tmp_path / "runs").exists()


def test_prefix_targets_follow_each_chain_and_leave_held_out_prefixes_out():
    task = KHopTask(12, 3, seed=0)
    ids, targets, hops = task.batch(256, 4, torch.Generator().manual_seed(0), width=8)
    prefix = prefix_targets(task, ids)
    assert torch.equal(prefix[:, -2], targets), "the last relation's prefix is the whole chain"
    T, held_out = ids.shape[1], 0
    for row, want, k in zip(ids, prefix, hops.tolist(), strict=True):
        head = (row[T - k - 2] - task.entity_token(0)).view(1)
        chain = (row[T - k - 1:T - 1] - task.relation_token(0)).view(1, k)
        expected = torch.full((T,), IGNORE_INDEX)
        for i in range(1, k + 1):  # the i-th relation: the entity after i hops, unless held out
            if i >= 2 and bool(task.is_test(head, chain[:, :i])):
                held_out += 1
            else:
                expected[T - k - 2 + i] = task.entity_token(task.follow(head, chain[:, :i]))[0]
        assert torch.equal(want, expected), (row, want, expected)
    assert held_out > 0  # the batch really holds prefixes that the test split asks


def test_act_pareto_trains_at_its_loop_count_and_names_a_divergence(tmp_path, monkeypatch):
    from openmythos.experiments import act_pareto

    seen = {}

    def diverging_run(cfg, out_dir, model, settings, budget):
        seen.update(model=model, settings=settings)
        return {"error": "3 non-finite steps in a row", "metrics": [], "diverged": True}

    monkeypatch.setattr(act_pareto, "lm_run", diverging_run)
    cfg = act_pareto.ActParetoConfig(loops=5, out_dir=str(tmp_path), corpus=FIXTURE, tokenizer="byte")
    with pytest.raises(ValueError, match="training diverged at lr=0.002"):
        act_pareto.run(cfg)
    assert seen["model"]["max_loop_iters"] == 5
    assert seen["settings"]["loops.mean"] == 5 and seen["settings"]["loops.max"] == 5


@pytest.mark.parametrize("fields, message", [
    ({"dense_layers": [4]}, "two or more different positive depths"),
    ({"dense_layers": [4, 4]}, "two or more different positive depths"),
    ({"loops": [1, 2]}, "loop counts >= 2"),
    ({"loops": []}, "loop counts >= 2"),
])
def test_param_efficiency_refuses_what_it_cannot_fit_before_training(fields, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        run_experiment("param-efficiency", out_dir=str(tmp_path), corpus=FIXTURE, tokenizer="byte", **fields)


def test_depth_extrapolation_picks_its_best_depth_on_chains_it_does_not_report(tmp_path, monkeypatch):
    import openmythos.experiments.depth_extrapolation as de

    seen, real = {"test": set(), "train": set()}, de.KHopTask.sample

    def sample(self, n, hops, generator, width=None, split="train"):
        ids, targets = real(self, n, hops, generator, width, split)
        if hops > 2:  # the long chains (smoke: train_hops 2); training draws up to 2 hops only
            seen[split].update(map(tuple, ids.tolist()))
        return ids, targets

    monkeypatch.setattr(de.KHopTask, "sample", sample)
    run_experiment("depth-extrapolation", smoke=True, out_dir=str(tmp_path), threads=1)
    assert seen["test"] and seen["train"] and not seen["test"] & seen["train"]


def test_an_experiment_never_deletes_a_folder_it_did_not_make(tmp_path):
    from openmythos.experiments.common import fresh_dir

    mine = tmp_path / "model"
    mine.mkdir()
    (mine / "notes.txt").write_text("a user's file")
    with pytest.raises(ValueError, match="exists without the .openmythos-experiment file"):
        fresh_dir(mine)
    assert (mine / "notes.txt").read_text() == "a user's file"
    ours = fresh_dir(tmp_path / "run")
    (ours / "old.txt").write_text("an earlier run's")
    assert list(fresh_dir(ours).iterdir()) == [ours / ".openmythos-experiment"]  # emptied
    kept = tmp_path / "data" / "train" / "keep.txt"  # where an experiment writes its corpus split
    kept.parent.mkdir(parents=True)
    kept.write_text("mine")
    with pytest.raises(ValueError, match="exists without the .openmythos-experiment file"):
        run_experiment("stability", smoke=True, out_dir=str(tmp_path), corpus=FIXTURE, tokenizer="byte")
    assert kept.read_text() == "mine"
    results = tmp_path / "user" / "results.json"  # the experiment's own file names, in a user's folder
    results.parent.mkdir()
    results.write_text("a user's results")
    with pytest.raises(ValueError, match="user' exists without the .openmythos-experiment file"):
        run_experiment("depth-extrapolation", smoke=True, out_dir=str(results.parent))
    assert results.read_text() == "a user's results"
    with pytest.raises(ValueError, match="notes.txt' is a file, not a folder"):
        run_experiment("depth-extrapolation", smoke=True, out_dir=str(mine / "notes.txt"))


def test_each_run_gets_a_folder_of_its_own_by_default(tmp_path, monkeypatch):
    """A smoke check after a long run wrote to the same runs/experiments/NAME and replaced it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(common.time, "strftime", lambda fmt: "20261130-170000")  # the same second
    first = run_experiment("depth-extrapolation", smoke=True, threads=1)
    second = run_experiment("depth-extrapolation", smoke=True, threads=1)
    folders = [Path(p["config"]["out_dir"]) for p in (first, second)]
    assert folders == [Path("runs/experiments/depth-extrapolation-smoke-20261130-170000"),
                       Path("runs/experiments/depth-extrapolation-smoke-20261130-170000-2")]
    assert all((f / "results.json").is_file() for f in folders)


def test_smoke_settings_keep_the_fields_a_user_set():
    from openmythos.experiments.stability import StabilityConfig

    cfg = StabilityConfig(smoke=True, steps=7)
    cfg.smoke_defaults(steps=3, loops=2)
    assert (cfg.steps, cfg.loops) == (7, 2)
    given = StabilityConfig(smoke=True, lrs=[1e-3, 4e-3, 1.6e-2, 6.4e-2, 0.256])  # = the default,
    given.given = frozenset({"smoke", "lrs"})  # but set by the user (run_experiment records it)
    given.smoke_defaults(lrs=[1e-3], steps=3)
    assert (len(given.lrs), given.steps) == (5, 3)
