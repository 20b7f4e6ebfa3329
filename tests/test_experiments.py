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
from openmythos.experiments.depth_extrapolation import prefix_targets, training_batch
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


def phi_run(name, layers, loss, loops=1):
    return {"name": name, "layers": layers, "val_loss": loss, "loops": loops}


def test_phi_is_not_read_off_runs_that_cannot_carry_it():
    # the committed run's dense curve: 6 layers no better than 4
    flat = [phi_run("dense-3", 3, 6.277), phi_run("dense-4", 4, 6.034), phi_run("dense-6", 6, 6.041)]
    assert "did not fall with every added layer" in why_phi_is_undefined(flat, [])
    dense = [phi_run("dense-3", 3, 6.3), phi_run("dense-4", 4, 6.1), phi_run("dense-6", 6, 6.0)]
    a, b = fit_log_curve([3, 4, 6], [6.3, 6.1, 6.0])
    looped = [phi_run("looped-1x2", 4, 6.2, 2), phi_run("looped-1x4", 6, 6.5, 4)]  # worse than 3 dense layers
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
    cfg = ActParetoConfig(smoke=True, corpus=FIXTURE, out_dir=str(tmp_path / "my run"))
    cfg.given = frozenset({"smoke", "out_dir"})  # a value with a space, quoted for the shell
    assert Report("act-pareto", cfg).command() == f"mythos experiment act-pareto --out_dir '{tmp_path}/my run' --smoke true"


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
    # found by the model or the task, after the folder and the corpus copy or a first training
    ("depth-extrapolation", {"attn_type": "foo", "smoke": True}, "attn_type='foo' is not one of"),
    ("depth-extrapolation", {"n_entities": 7, "n_relations": 1, "smoke": True}, "holds no 4-hop query"),
    ("act-pareto", {"dim": 30}, "MythosConfig"),
    ("act-pareto", {"min_loops": 9}, "min_loops=9 exceeds loops=8"),
    ("param-efficiency", {"dim": 6}, "MythosConfig"),
    ("stability", {"dim": 30}, "MythosConfig"),
    ("stability", {"lrs": [1e-3, 1e-3]}, r"lrs=\[0.001, 0.001\] lists a value twice"),
    ("stability", {"lrs": [1e-3, 1.0000001e-3]}, "two rates that print alike"),
])
def test_a_bad_device_corpus_or_tokenizer_is_refused_before_any_folder(name, fields, message, tmp_path, monkeypatch):
    """They were found once the first model started, as run.device / data.tokenizer, after the
    report's folder and the data copies were written (a model field or a task too small for its
    hops, after a first model had trained; a value listed twice ran twice into one folder)."""
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
    ({"dense_layers": [4, 4]}, "lists a value twice"),
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


# ---- from a mutation review of the experiments: what a reader of a report trusts ----


def test_report_tables_and_head_state_what_they_measured(tmp_path):
    """Guards a separator row one column short (a table markdown does not render), cells
    rounded past 4 significant digits, a smoke report without its warning, and the machine
    facts or wall time recorded wrongly."""
    assert common.markdown_table(["a", "b"], [[1, 0.123456], ["x", 2.0]]) == (
        "| a | b |\n|---|---|\n| 1 | 0.1235 |\n| x | 2 |")
    assert common.machine(7)["threads"] == 7 and common.machine(0)["threads"] == torch.get_num_threads()
    report = Report("x", ActParetoConfig(out_dir=str(tmp_path / "x"), smoke=True))
    report.started -= 90.0
    payload = report.write()
    assert payload["wall_seconds"] == pytest.approx(90.0, abs=1.0)
    head = (tmp_path / "x" / "report.md").read_text().splitlines()[2]
    assert "wall time 1.5 min" in head and head.endswith("**smoke run: numbers are meaningless**")


def test_time_budget_shares_floors_and_no_cap(monkeypatch):
    """Written-out shares: a fifth held back, each run's fit to what is left over the runs still
    to come less the largest overhead seen, a 5 s floor (0 minutes would mean no limit to the
    trainer), and budget_minutes=0 is no cap at all."""
    clock = [0.0]
    monkeypatch.setattr(common.time, "perf_counter", lambda: clock[0])
    b = TimeBudget(10.0, 4, start=0.0)
    assert b.next_minutes() == pytest.approx(120 / 60)  # 0.8 * 600 s / 4
    clock[0] = 200.0
    b.finished(200.0, 120.0)  # 80 s overhead
    assert b.next_minutes() == pytest.approx((400 / 3 - 80) / 60)
    clock[0] = 263.0
    b.finished(63.0, 53.0)  # a smaller overhead does not lower the largest seen
    assert b.overhead_s == 80.0 and b.next_minutes() == pytest.approx((337 / 2 - 80) / 60)
    clock[0] = 700.0  # past the budget: the floor, never 0 (= unlimited) or negative
    assert b.next_minutes() == pytest.approx(5 / 60)
    clock[0] = 1e6
    assert TimeBudget(0.0, 3, start=0.0).next_minutes() == 0.0


def test_threads_are_restored_after_an_experiment():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with common.threads(1):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_zero_is_refused_where_only_seeds_threads_and_budgets_may_be_zero():
    """--steps 0 was run as 2 steps: only the NON_NEGATIVE fields may be 0."""
    with pytest.raises(ValueError, match="steps=0 must be positive"):
        ActParetoConfig(steps=0)
    ActParetoConfig(seed=0, threads=0, budget_minutes=0, val_chars=0, ponder_weight=0)


def test_lm_run_trains_with_the_experiments_own_settings(tmp_path, monkeypatch):
    """The corpus split (the first val_chars of the held-out split; all of the corpus with 0) and
    the TrainConfig each model trains with: AdamW, fixed depth, the experiment's seed, tokenizer
    and its own run.dtype, and the overhead its budget learns from."""
    from openmythos.data.corpus import load_corpus
    from openmythos.experiments import lm

    cfg = lm.LMExperimentConfig(corpus=FIXTURE, tokenizer="byte", val_chars=50, seed=7)
    data = lm.corpus_split(cfg, tmp_path)
    val = "\n\n".join(d.text for d in load_corpus(FIXTURE).val)[:50]
    assert Path(data["data.val_path"]).read_text() == val and len(val) == 50
    assert lm.corpus_split(lm.LMExperimentConfig(corpus=FIXTURE, tokenizer="byte", val_chars=0),
                           tmp_path) == {"data.corpus": FIXTURE}
    seen = []

    def fake_train(train_cfg):
        seen.append(train_cfg)
        common.time.sleep(0.05)
        return {"status": "completed", "train_time_s": 0.0}

    monkeypatch.setattr(lm, "train", fake_train)
    budget = TimeBudget(0.0, 1)
    out = lm.lm_run(cfg, tmp_path / "m", {"dim": 32}, {**data, "run.dtype": "bf16"}, budget)
    c = seen[0]
    assert (c.train.optimizer, c.loops.sampler, c.run.seed, c.run.dtype, c.data.tokenizer) == (
        "adamw", "fixed", 7, "bf16", "byte")
    assert c.model.overrides["dim"] == 32 and out["diverged"] is False and out["metrics"] == []
    assert budget.done == 1 and budget.overhead_s >= 0.04  # the wall time outside training


def test_act_pareto_evaluate_scores_every_token_and_counts_loops():
    """Loss and loops are per token over all batches, against a plain cross-entropy."""
    from openmythos.experiments.act_pareto import evaluate
    from tests.conftest import small_model

    model = small_model(std=0.1)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 64, (2, 8), generator=g), torch.randint(0, 64, (2, 8), generator=g))
               for _ in range(3)]
    got = evaluate(model, batches, 2)
    with torch.no_grad():
        want = torch.nn.functional.cross_entropy(
            torch.cat([model(x, n_loops=2).logits.flatten(0, 1) for x, _ in batches]),
            torch.cat([y.flatten() for _, y in batches]))
    assert got["val_loss"] == pytest.approx(float(want), rel=1e-5) and got["mean_loops"] == 2.0
    # with ragged exits, a batch runs as deep as its deepest token
    act = small_model(std=0.1, halting="act", act_threshold=0.5)
    with torch.no_grad():
        act.recurrent.act.halt.weight.normal_(0, 1.0)
        loops = [act(x, n_loops=3).loops for x, _ in batches]
    got = evaluate(act, batches, 3)
    assert got["mean_loops"] == pytest.approx(float(torch.cat(loops).float().mean()))
    assert got["batch_loops"] == pytest.approx(sum(float(run.max()) for run in loops) / 3)
    assert got["batch_loops"] > got["mean_loops"]


def test_act_pareto_verdict_boundaries_are_inclusive():
    """'within 0.01 nats', 'at most 75% of the loops', 'at least 1.2x': each bound counts."""
    full = {"mean_loops": 8.0, "val_loss": 0.0, "tok_per_s": 100.0}
    v = verdict([{"setting": 0.5, "mean_loops": 6.0, "val_loss": 0.01, "tok_per_s": 120.0}], full)
    assert (v["setting"], v["saves_loops"], v["saves_time"]) == (0.5, True, True)
    ActParetoConfig(act_thresholds=[1.0])
    with pytest.raises(ValueError, match="must lie in"):
        ActParetoConfig(act_thresholds=[1.01])


@pytest.mark.parametrize("repeats", [1, 2])
def test_param_efficiency_matches_its_models_and_reads_phi_off_the_runs(repeats, tmp_path, monkeypatch):
    """With training replaced by losses on a known curve (dense: a + b ln(layers); looped: L_eff
    = 2 + r^0.46), the experiment must build n-layer dense models and MoE blocks as wide as a
    dense FFN, evaluate each at its own depth, scale the steps, count FLOPs at r loops, say
    which runs the budget cut, and read phi = 0.46 back. With two seeds the losses lie 0.01 on
    either side of the curve: the fit reads their mean, the report their spread."""
    from types import SimpleNamespace

    from openmythos.config import MythosConfig
    from openmythos.experiments import param_efficiency as pe

    a, b, phi = 6.0, -0.5, 0.46
    seen = {}

    def fake_run(cfg, out_dir, model, settings, budget):
        r, seed = model["max_loop_iters"], settings["run.seed"]
        seen[out_dir.name] = (model, settings, budget.runs)
        layers = model["prelude_layers"] + model["coda_layers"] + (1 if r == 1 else r ** phi)
        off = 0.01 * (2 * seed - (repeats - 1))  # 0 for one seed, -0.01 and 0.01 for two
        return {"checkpoint": model, "val_loss": a + b * math.log(layers) + off, "metrics": [],
                "status": "time_limit" if r == 4 else "completed", "diverged": False}

    monkeypatch.setattr(pe, "lm_run", fake_run)
    monkeypatch.setattr(Report, "figure", lambda *a, **k: None)  # plots cost seconds
    monkeypatch.setattr(pe, "open_checkpoint",
                        lambda model: SimpleNamespace(model_cfg=MythosConfig.from_preset("tiny", **model)))
    cfg = pe.ParamEfficiencyConfig(out_dir=str(tmp_path / "pe"), corpus=FIXTURE, tokenizer="byte",
                                   val_chars=0, scale=2.0, repeats=repeats)
    payload = pe.run(cfg)
    results = {x["name"]: x for x in payload["results"]["runs"]}
    names = ["dense-3", "dense-4", "dense-6", "looped-1x2", "looped-1x4"]
    assert sorted(seen) == (names if repeats == 1 else [f"{n}-seed{s}" for n in names for s in (0, 1)])
    for folder, (model, settings, runs) in seen.items():
        r, x = model["max_loop_iters"], results[folder.removesuffix("-seed0").removesuffix("-seed1")]
        mcfg = MythosConfig.from_preset("tiny", **model)
        if folder.startswith("dense"):
            assert model["prelude_layers"] + model["coda_layers"] + 1 == x["layers"]
        assert 2 * mcfg.expert_dim == mcfg.ffn_dim  # one routed + one shared = a dense SwiGLU
        assert (settings["loops.mean"], settings["eval.n_loops"], settings["train.steps"], runs) == (r, r, 1000, 5 * repeats)
        assert x["flops_per_token"] == mcfg.flops_per_token(r, cfg.seq_len)
        assert x["val_loss_spread"] == pytest.approx(0.02 * (repeats - 1))
        assert [y["seed"] for y in x["seeds"]] == list(range(repeats))
    assert payload["results"]["phi"] == pytest.approx(phi)
    assert payload["results"]["dense_fit"] == pytest.approx({"a": a, "b": b})
    report = (tmp_path / "pe" / "report.md").read_text()
    assert "not at equal tokens:** looped-1x4." in report
    assert ("spread between seeds" in report) == (repeats > 1)


def test_param_efficiency_names_a_model_whose_seed_diverged(tmp_path, monkeypatch):
    """One seed of dense-4 diverges: the model's status says so, the report lists it, and phi is
    refused for that reason (not for a dense curve that "did not fall")."""
    from types import SimpleNamespace

    from openmythos.config import MythosConfig
    from openmythos.experiments import param_efficiency as pe

    def fake_run(cfg, out_dir, model, settings, budget):
        if out_dir.name == "dense-4-seed1":
            return {"error": "3 non-finite steps", "metrics": [], "diverged": True}
        layers = model["prelude_layers"] + model["coda_layers"] + model["max_loop_iters"]
        return {"checkpoint": model, "val_loss": 6.0 - 0.1 * layers, "metrics": [], "status": "completed",
                "train_time_s": 2.0, "diverged": False}

    monkeypatch.setattr(pe, "lm_run", fake_run)
    monkeypatch.setattr(Report, "figure", lambda *a, **k: None)
    monkeypatch.setattr(pe, "open_checkpoint",
                        lambda model: SimpleNamespace(model_cfg=MythosConfig.from_preset("tiny", **model)))
    payload = pe.run(pe.ParamEfficiencyConfig(out_dir=str(tmp_path / "pe"), corpus=FIXTURE, tokenizer="byte",
                                              val_chars=0, repeats=2))
    runs = {x["name"]: x for x in payload["results"]["runs"]}
    assert [x["status"] for x in runs["dense-4"]["seeds"]] == ["completed", "diverged"]
    assert runs["dense-4"]["status"] == "diverged" and runs["dense-3"]["status"] == "completed"
    assert runs["dense-4"]["train_time_s"] == 2.0  # the seeds that trained
    assert payload["results"]["phi_undefined_because"] == "dense-4 has no validation loss (a run diverged)"
    assert "**Diverged (no validation loss):** dense-4." in (tmp_path / "pe" / "report.md").read_text()


def test_phi_is_undefined_for_a_flat_step_or_a_looped_run_without_a_loss():
    """A dense curve that stays level between two depths did not fall; a looped run with no loss
    (it diverged: L_eff is NaN) cannot be fitted either, and says why."""
    level = [phi_run("dense-3", 3, 6.3), phi_run("dense-4", 4, 6.1), phi_run("dense-6", 6, 6.1)]
    assert "did not fall with every added layer" in why_phi_is_undefined(level, [])
    dense = [phi_run("dense-3", 3, 6.3), phi_run("dense-4", 4, 6.1), phi_run("dense-6", 6, 6.0)]
    a, b = fit_log_curve([3, 4, 6], [6.3, 6.1, 6.0])
    lost = {**phi_run("looped-1x2", 4, math.nan, 2), "effective_layers": effective_layers(math.nan, a, b)}
    assert why_phi_is_undefined(dense, [lost]) == "looped-1x2 has no validation loss (a run diverged)"
    # with seeds, a fall within either model's spread between seeds is noise too
    noisy = [{**x, "val_loss_spread": spread} for x, spread in zip(dense, [0.05, 0.12, 0.03], strict=True)]
    assert why_phi_is_undefined(noisy, []) == ("the dense models' loss fell by no more than the spread "
                                               "between seeds from 4 to 6 layers, so depth is not measured")


def test_stability_judges_each_run_by_its_trace(tmp_path, monkeypatch):
    """Diverged: aborted, or the mean of the last tenth of logged losses above the first loss;
    learned: a validation loss below the unigram loss (a run that has none did not learn);
    state norms compared at the last step every run reached; counts per injection."""
    from openmythos.experiments import stability

    def trace(losses):
        return [{"step": i + 1, "loss": x, "rho": 0.5, "state_norm": float(i + 1)} for i, x in enumerate(losses)]

    outs = {  # lti: ends at 5.8 but its last tenth averages 4.9 < 5; free: ends above where it began
        "lti": {"metrics": trace([5.0] * 18 + [4.0, 5.8]), "diverged": False, "val_loss": 4.0, "unigram_loss": 4.5},
        "free": {"metrics": trace([5.0] * 18 + [5.5, 5.5]), "diverged": False, "val_loss": 4.2, "unigram_loss": 4.5},
        "additive": {"metrics": trace([5.0] * 10), "diverged": True, "error": "3 non-finite steps"},
    }
    seen = []

    def fake_run(cfg, out_dir, model, settings, budget):
        seen.append((settings, budget.runs))
        return outs[model["injection"]]

    monkeypatch.setattr(stability, "lm_run", fake_run)
    monkeypatch.setattr(Report, "figure", lambda *a, **k: None)  # plots cost seconds
    cfg = stability.StabilityConfig(out_dir=str(tmp_path / "s"), corpus=FIXTURE, tokenizer="byte", val_chars=0,
                                    lrs=[1e-3], dtype="bf16", scale=2.0)
    runs = {r["injection"]: r for r in stability.run(cfg)["results"]["runs"]}
    assert {k: (r["diverged"], r["learned"]) for k, r in runs.items()} == {
        "lti": (False, True), "free": (True, True), "additive": (True, False)}
    assert runs["lti"]["final_loss"] == pytest.approx(4.9)
    assert all((s["run.dtype"], s["train.steps"], n) == ("bf16", 200, 3) for s, n in seen)
    report = (tmp_path / "s" / "report.md").read_text()
    assert "state norm at step 10" in report  # the additive run stopped at step 10
    assert "| lti | 0 / 1 | 1 / 1 |" in report and "| free | 1 / 1 | 1 / 1 |" in report
    with pytest.raises(ValueError, match=r"injections \['nope'\] are not among"):
        stability.run(stability.StabilityConfig(out_dir=str(tmp_path / "n"), corpus=FIXTURE,
                                                tokenizer="byte", injections=["nope"]))


def test_stability_repeats_trains_every_setting_on_each_seed(tmp_path, monkeypatch):
    """With two seeds every (injection, lr) trains once per seed, in a folder of its own and with
    that seed; the runs table names the seed and the counts are over every run."""
    from openmythos.experiments import stability

    seen = []

    def fake_run(cfg, out_dir, model, settings, budget):
        seen.append((out_dir.name, settings["run.seed"], budget.runs))
        losses = [5.0, 6.0] if (model["injection"], settings["run.seed"]) == ("free", 4) else [5.0, 4.0]
        return {"metrics": [{"step": i + 1, "loss": x, "rho": 0.5, "state_norm": 1.0} for i, x in enumerate(losses)],
                "diverged": False, "val_loss": 4.0, "unigram_loss": 4.5, "steps": 2,
                "status": "time_limit" if out_dir.name == "lti-lr0.004-seed3" else "completed"}

    monkeypatch.setattr(stability, "lm_run", fake_run)
    monkeypatch.setattr(Report, "figure", lambda *a, **k: None)
    cfg = stability.StabilityConfig(out_dir=str(tmp_path / "s"), corpus=FIXTURE, tokenizer="byte", val_chars=0,
                                    lrs=[1e-3, 4e-3], injections=["lti", "free"], seed=3, repeats=2)
    runs = stability.run(cfg)["results"]["runs"]
    assert seen == [(f"{i}-lr{lr:g}-seed{s}", s, 8) for i in ("lti", "free") for lr in (1e-3, 4e-3) for s in (3, 4)]
    assert [(r["seed"], r["diverged"]) for r in runs if r["injection"] == "free"] == [
        (3, False), (4, True), (3, False), (4, True)]
    report = (tmp_path / "s" / "report.md").read_text()
    assert "| injection | lr | seed | diverged |" in report and "| free | 0.001 | 4 | yes |" in report
    assert "| lti | 0 / 4 | 4 / 4 |" in report and "| free | 2 / 4 | 4 / 4 |" in report
    assert "**Cut short by the time budget** (each run trains for the same time), of 100 steps: lti-lr0.004-seed3 (2)" in report


def test_act_pareto_repeats_averages_each_point_over_seeds(tmp_path, monkeypatch):
    """With two seeds two models train, each with its seed, and each is swept; a point's loss,
    loops and tokens/s are the means over the models, its spread the range of its loss gaps to
    full depth, and the verdict reads the means."""
    from types import SimpleNamespace

    from openmythos.experiments import act_pareto
    from tests.conftest import small_model

    seeds, current = [], {}

    def fake_run(cfg, out, model, settings, budget):
        seeds.append((out.name, settings["run.seed"], budget.runs))
        return {"checkpoint": settings["run.seed"], "status": "completed", "steps": 2}

    def fake_evaluate(model, batches, n_loops):  # at 1 loop seed 0 loses 0.1 nats more than seed 1
        loops, gap = {"act": (1.5, 0.005), "kl": (2.0, 0.02)}.get(
            model.cfg.halting, (n_loops, {1: 0.3 - 0.1 * current["seed"], 3: 0.0}.get(n_loops)))
        return {"val_loss": 4.0 + current["seed"] + gap, "mean_loops": loops, "batch_loops": loops + current["seed"],
                "tok_per_s": 100.0 * (1 + current["seed"]) / loops}

    def fake_load(path, device):
        current["seed"] = path
        return small_model(halting="act", max_loop_iters=3), None, SimpleNamespace(data=None)

    monkeypatch.setattr(act_pareto, "lm_run", fake_run)
    monkeypatch.setattr(act_pareto, "load_model", fake_load)
    monkeypatch.setattr(act_pareto, "prepare_data", lambda data, tok: SimpleNamespace(
        val=SimpleNamespace(iter_eval_batches=lambda b, t: iter([None]))))
    monkeypatch.setattr(act_pareto, "evaluate", fake_evaluate)
    monkeypatch.setattr(Report, "figure", lambda *a, **k: None)
    cfg = ActParetoConfig(out_dir=str(tmp_path / "a"), corpus=FIXTURE, tokenizer="byte", val_chars=0, loops=3,
                          depths=[1], act_thresholds=[0.5], kl_thresholds=[0.01], repeats=2)
    results = act_pareto.run(cfg)["results"]
    assert seeds == [("model-seed0", 0, 2), ("model-seed1", 1, 2)]
    points = {(p["rule"], p["setting"]): p for p in results["points"]}
    assert points["fixed", 1]["val_loss"] == pytest.approx(4.75) and points["fixed", 1]["gap_spread"] == pytest.approx(0.1)
    assert points["fixed", 3]["tok_per_s"] == pytest.approx(50.0) and points["act", 0.5]["mean_loops"] == 1.5
    assert points["act", 0.5]["batch_loops"] == 2.0  # 1.5 and 2.5
    assert [t["seed"] for t in results["train"]] == [0, 1]
    assert results["verdicts"]["act"]["setting"] == 0.5 and results["verdicts"]["act"]["saves_time"]
    report = (tmp_path / "a" / "report.md").read_text()
    assert "seeds 0, 1" in report and "spread of Δ between seeds" in report and "means over 2 seeds" in report


def test_depth_extrapolation_sweeps_scores_and_picks_as_it_says(tmp_path, monkeypatch):
    """With training and scoring replaced: test depths 1..4x the trained one, hops 1..2K, the
    dense-params model at one loop, dense-compute with as many layers as the looped model runs,
    steps scaled, the final loss a mean of the last 20, the best depth the one the train
    split's long chains favour, and 'extrapolates' only for more loops than trained."""
    import openmythos.experiments.depth_extrapolation as de

    trained = {}

    def fake_train(model, task, cfg, v, width, steps, minutes=0.0):
        trained[v.name] = (model.cfg, steps, model.embed.weight.sum().item())
        return [float(i) for i in range(30)]

    def fake_accuracy(model, task, hops, n_loops, n, width, seed, split="test"):
        act = model.cfg.halting == "act"  # its long chains are best at 1 loop, fewer than trained
        best = 1 if act else 6
        if split == "train":  # the short chains would pick 1 loop: they must not be asked
            return (float(n_loops == 1) if hops <= 2 else 0.6 * (n_loops == best)), float(n_loops)
        return (0.9 if hops <= 2 else 0.8 if n_loops == best else 0.1), float(n_loops)

    monkeypatch.setattr(de, "train_variant", fake_train)
    monkeypatch.setattr(Report, "figure", lambda *a, **k: None)  # plots cost seconds
    monkeypatch.setattr(de, "accuracy", fake_accuracy)
    payload = de.run(de.DepthExtrapolationConfig(smoke=True, scale=2.0, out_dir=str(tmp_path / "d")))
    r = payload["results"]
    assert list(r["fixed"]["accuracy"]) == [1, 2, 4, 6, 8]  # train_loops 2 (smoke), up to 4x
    assert all(list(row) == [1, 2, 3, 4] for row in r["fixed"]["accuracy"].values())  # up to 2K hops
    assert list(r["dense-params"]["accuracy"]) == [1] and trained["dense-params"][0].max_loop_iters == 1
    dense = trained["dense-compute"][0]
    assert dense.prelude_layers + dense.coda_layers + 1 == 2 + 2  # prelude + 2 loops + coda
    assert {t[1] for t in trained.values()} == {8}  # smoke's 4 steps, scale 2
    assert trained["fixed"][2] == trained["random"][2]  # each variant starts from the seed's weights
    assert (r["fixed"]["best_loops"], r["act"]["best_loops"]) == (6, 1)
    assert r["fixed"]["final_train_loss"] == pytest.approx(19.5)
    report = (tmp_path / "d" / "report.md").read_text()
    assert "- **fixed**: on 3–4 hops, 6 loops give 0.800 vs 0.100 at the trained depth (extrapolates)." in report
    assert "- **act**: on 3–4 hops, 1 loops give 0.800 vs 0.100 at the trained depth (no gain from extra loops)." in report


def test_depth_extrapolation_repeats_reads_the_mean_over_seeds(tmp_path, monkeypatch):
    """With two seeds every variant trains twice, on its seed's task; the report's accuracies
    are the means, the best depth is picked on the mean choice score (6 loops: 0.3 against 8
    loops' 0.25, though the first seed alone prefers 8), and each seed's long-chain accuracy is
    listed."""
    import openmythos.experiments.depth_extrapolation as de

    trained = set()

    def fake_train(model, task, cfg, v, width, steps, minutes=0.0):
        trained.add((v.name, cfg.seed, task.seed))
        return [float(cfg.seed)] * 4

    def fake_accuracy(model, task, hops, n_loops, n, width, seed, split="test"):
        if split == "train":
            return ((0.5 if n_loops == 8 else 0.0) if seed == 0 else (0.6 if n_loops == 6 else 0.0)), 1.0
        return (0.9 if hops <= 2 else (0.8 if seed == 0 else 0.6) if n_loops == 6 else 0.1), 1.0

    monkeypatch.setattr(de, "train_variant", fake_train)
    monkeypatch.setattr(Report, "figure", lambda *a, **k: None)
    monkeypatch.setattr(de, "accuracy", fake_accuracy)
    r = de.run(de.DepthExtrapolationConfig(smoke=True, repeats=2, out_dir=str(tmp_path / "d")))["results"]
    assert trained == {(v.name, s, s) for v in de.variants(de.DepthExtrapolationConfig(train_loops=2)) for s in (0, 1)}
    fixed = r["fixed"]
    assert fixed["best_loops"] == 6 and fixed["accuracy"][6][3] == pytest.approx(0.7)
    assert fixed["final_train_loss"] == pytest.approx(0.5) and len(fixed["by_seed"]) == 2
    report = (tmp_path / "d" / "report.md").read_text()
    assert "Each variant trained with seeds 0, 1" in report and "| 0.800 / 0.600 |" in report


def test_act_pareto_sweeps_every_rule_at_its_settings(tmp_path, monkeypatch):
    """With training replaced by a small ACT model: full depth is evaluated even when --depths
    leaves it out, each ACT/KL point runs at its own threshold (and KL's min_loops), the steps
    and ponder weight reach the trainer, and the report's columns are loss minus full depth's
    and tokens/s over full depth's."""
    from types import SimpleNamespace

    from openmythos.experiments import act_pareto
    from openmythos.experiments.common import markdown_table
    from openmythos.model import OpenMythos
    from tests.conftest import small_model

    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 64, (8, 16), generator=g), torch.randint(0, 64, (8, 16), generator=g))
               for _ in range(2)]
    seen, exits, real = {}, [], OpenMythos.with_exit
    monkeypatch.setattr(act_pareto, "lm_run", lambda cfg, out, model, settings, budget: seen.update(
        settings=settings) or {"checkpoint": "ck", "status": "completed", "steps": 2})
    monkeypatch.setattr(act_pareto, "load_model", lambda path, device: (
        small_model(halting="act", max_loop_iters=3), None, SimpleNamespace(data=None)))
    monkeypatch.setattr(act_pareto, "prepare_data", lambda data, tok: SimpleNamespace(
        val=SimpleNamespace(iter_eval_batches=lambda b, t: iter(batches))))
    monkeypatch.setattr(OpenMythos, "with_exit", lambda self, **kw: exits.append(kw) or real(self, **kw))
    monkeypatch.setattr(Report, "figure", lambda *a, **k: None)
    cfg = ActParetoConfig(out_dir=str(tmp_path / "a"), corpus=FIXTURE, tokenizer="byte", val_chars=0, loops=3,
                          depths=[1], act_thresholds=[0.5], kl_thresholds=[0.01], min_loops=2, seq_len=16,
                          eval_tokens=256, scale=2.0, ponder_weight=0.05)
    points = act_pareto.run(cfg)["results"]["points"]
    assert [(p["rule"], p["setting"]) for p in points] == [("fixed", 1), ("fixed", 3), ("act", 0.5), ("kl", 0.01)]
    assert exits[-2:] == [{"halting": "act", "act_threshold": 0.5},
                          {"halting": "kl", "kl_threshold": 0.01, "min_loops": 2}]
    assert (seen["settings"]["train.steps"], seen["settings"]["train.ponder_weight"]) == (1000, 0.05)
    full = points[1]
    row = markdown_table(["x"] * 8, [[p["rule"], p["setting"], p["mean_loops"], p["batch_loops"], p["val_loss"],
                                       p["val_loss"] - full["val_loss"], p["tok_per_s"],
                                       p["tok_per_s"] / full["tok_per_s"]] for p in points[:1]]).splitlines()[-1]
    assert row in (tmp_path / "a" / "report.md").read_text()


def test_depth_extrapolation_trains_each_variant_as_described(monkeypatch):
    """The random variant draws a depth per step (never below train_hops, so the longest
    training chain fits) and backpropagates through the last `backprop` loops; the others run
    their trained depth with full backprop. Accuracy reads the answer at the query token."""
    from types import SimpleNamespace

    import openmythos.experiments.depth_extrapolation as de

    cfg = de.DepthExtrapolationConfig(n_entities=12, n_relations=3, train_hops=3, train_loops=2, dim=32,
                                      batch_size=4, backprop=1, eval_examples=8)
    task, width = de.KHopTask(12, 3, 0), 8
    for v in de.variants(cfg)[:2]:
        torch.manual_seed(0)
        model = de.OpenMythos(de.model_config(cfg, task, v, width))
        calls, forward = [], model.forward
        model.forward = lambda ids, _calls=calls, _forward=forward, **kw: _calls.append(kw) or _forward(ids, **kw)
        de.train_variant(model, task, cfg, v, width, steps=2)
        depths = [c["n_loops"] for c in calls]
        if v.random_depth:
            assert min(depths) >= cfg.train_hops > cfg.train_loops  # drawn, and floored
            assert {c["backprop_loops"] for c in calls} == {1}
        else:
            assert set(depths) == {2} and {c["backprop_loops"] for c in calls} == {None}
    sampled, sample = {}, de.KHopTask.sample

    def recorded(*args):
        ids, sampled["targets"] = sample(*args)
        return ids, sampled["targets"]

    monkeypatch.setattr(de.KHopTask, "sample", recorded)

    class Oracle(torch.nn.Module):  # answers every chain at its query token, and nowhere else
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(1, 1)

        def forward(self, ids, n_loops):
            logits = torch.zeros(*ids.shape, task.vocab_size)
            logits[:, -1] = torch.nn.functional.one_hot(sampled["targets"], task.vocab_size).float()
            return SimpleNamespace(logits=logits, loops=torch.full(ids.shape, n_loops))

    assert de.accuracy(Oracle(), task, 2, 3, 8, width, seed=0) == (1.0, 3.0)


def test_about_one_taught_fact_in_test_every_comes_from_the_test_split():
    """Training teaches the one-hop facts of both splits, each in its share: about one one-hop
    row in TEST_EVERY is a test-split fact (a flipped comparison taught nine in ten)."""
    task = KHopTask(12, 3, seed=0)
    ids, targets = training_batch(task, 4000, 1, torch.Generator().manual_seed(0), 8)
    heads, relations = ids[:, -3] - 2, ids[:, -2:-1] - 2 - task.n_entities  # <e_h> <r> QUERY
    assert torch.equal(targets, task.entity_token(task.follow(heads, relations)))
    share = float(task.is_test(heads, relations).float().mean())
    assert 0.7 / task.TEST_EVERY < share < 1.3 / task.TEST_EVERY
