"""Every experiment runs end to end in --smoke mode and writes a well-formed report; the phi
fit recovers a known exponent."""

import json
import math
from pathlib import Path

import pytest
import torch

from openmythos.data.tasks import KHopTask
from openmythos.experiments import EXPERIMENTS, run_experiment
from openmythos.experiments.depth_extrapolation import prefix_targets
from openmythos.experiments.param_efficiency import effective_layers, fit_log_curve, fit_phi
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


def test_unknown_experiment_and_field():
    with pytest.raises(ValueError, match="unknown experiment 'nope'"):
        run_experiment("nope")
    with pytest.raises(TypeError, match="stepz"):
        run_experiment("stability", stepz=3)


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
    with pytest.raises(ValueError, match="data' exists without the .openmythos-experiment file"):
        run_experiment("stability", smoke=True, out_dir=str(tmp_path), corpus=FIXTURE, tokenizer="byte")
    assert kept.read_text() == "mine"


def test_smoke_settings_keep_the_fields_a_user_set():
    from openmythos.experiments.stability import StabilityConfig

    cfg = StabilityConfig(smoke=True, steps=7)
    cfg.smoke_defaults(steps=3, loops=2)
    assert (cfg.steps, cfg.loops) == (7, 2)
    given = StabilityConfig(smoke=True, lrs=[1e-3, 4e-3, 1.6e-2, 6.4e-2, 0.256])  # = the default,
    given.given = frozenset({"smoke", "lrs"})  # but set by the user (run_experiment records it)
    given.smoke_defaults(lrs=[1e-3], steps=3)
    assert (len(given.lrs), given.steps) == (5, 3)
