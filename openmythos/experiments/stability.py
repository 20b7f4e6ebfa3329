"""Stability of looped training: the LTI-constrained injection (rho(A) < 1 by construction)
against an unconstrained learned A ("free") and a plain residual recurrence ("additive", A = 1),
across a learning-rate sweep on the bundled corpus.

A run counts as diverged when it aborts on non-finite steps, or when its last tenth of logged
steps averages above its first logged loss (it ended worse than it started). A run that did not
diverge may still have learned nothing: "learned" says whether its validation loss ended below
the split's unigram loss (token frequencies alone).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

from openmythos.config import INJECTIONS
from openmythos.experiments.common import Report, TimeBudget, markdown_table, threads
from openmythos.experiments.lm import LMExperimentConfig, check_models, corpus_split, lm_run, width
from openmythos.training.config import DTYPES


@dataclass
class StabilityConfig(LMExperimentConfig):
    lrs: list[float] = field(default_factory=lambda: [1e-3, 4e-3, 1.6e-2, 6.4e-2, 0.256])
    injections: list[str] = field(default_factory=lambda: list(INJECTIONS))
    loops: int = 8
    dim: int = 128  # the tiny preset at half width: instability shows early, so go for steps
    steps: int = 100
    batch_size: int = 8
    seq_len: int = 32
    val_chars: int = 50_000
    dtype: str = "fp32"  # run.dtype: instability in bf16 is what a real test would look for

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r} must be one of {DTYPES}")
        if len({f"{lr:g}" for lr in self.lrs}) < len(self.lrs):  # a run's folder is named by lr{lr:g}
            raise ValueError(f"lrs={self.lrs!r} holds two rates that print alike: their runs would share a folder")


def run(cfg: StabilityConfig) -> dict:
    if cfg.smoke:
        cfg.smoke_defaults(lrs=[1e-3], loops=2, steps=3, batch_size=2, seq_len=32)
    unknown = set(cfg.injections) - set(INJECTIONS)
    if unknown:
        raise ValueError(f"injections {sorted(unknown)} are not among {INJECTIONS}")
    models = {i: {"injection": i, "halting": "none", "max_loop_iters": cfg.loops, **width(cfg.dim)}
              for i in cfg.injections}
    check_models(*models.values())
    report = Report("stability", cfg)
    steps = max(3, round(cfg.steps * cfg.scale))
    results = []
    budget = TimeBudget(cfg.budget_minutes, len(cfg.injections) * len(cfg.lrs) * cfg.repeats)
    data = corpus_split(cfg, report.out)
    with threads(cfg.threads):
        for injection, lr, seed in itertools.product(cfg.injections, cfg.lrs, cfg.seeds):
            name = f"{injection}-lr{lr:g}" + (f"-seed{seed}" if cfg.repeats > 1 else "")
            out = lm_run(cfg, report.out / name, models[injection],
                         {**data, "run.seed": seed, "train.steps": steps, "train.lr": lr,
                          "train.batch_size": cfg.batch_size, "train.warmup_steps": max(1, steps // 10),
                          "data.seq_len": cfg.seq_len, "loops.mean": cfg.loops, "loops.max": cfg.loops,
                          "run.log_every": 1, "run.dtype": cfg.dtype, "train.max_bad_steps": 3,
                          "eval.max_tokens": 16384, "eval.depths": [cfg.loops], "eval.depth_max_tokens": 4096},
                         budget)
            trace = [r for r in out["metrics"] if "loss" in r]
            tail = trace[-max(1, len(trace) // 10):]
            first = trace[0]["loss"] if trace else math.nan
            last = sum(r["loss"] for r in tail) / len(tail) if trace else math.nan
            diverged = out["diverged"] or not math.isfinite(last) or last > first
            results.append({
                "name": name, "injection": injection, "lr": lr, "seed": seed, "diverged": diverged,
                "steps": out.get("steps", len(trace)), "status": out.get("status", "diverged"),
                "first_loss": first, "final_loss": last, "val_loss": out.get("val_loss", math.nan),
                "unigram_loss": out.get("unigram_loss", math.nan),
                "learned": out.get("val_loss", math.inf) < out.get("unigram_loss", -math.inf),
                "max_rho": max((r["rho"] for r in trace), default=math.nan),
                "max_state_norm": max((r["state_norm"] for r in trace), default=math.nan),
                "trace": [{k: r[k] for k in ("step", "loss", "rho", "state_norm")} for r in trace],
            })
    report.results = {"runs": results}
    # runs cut short by the time budget are compared where all of them still were
    common = min((r["trace"][-1]["step"] for r in results if r["trace"]), default=0)

    def norm_at(r: dict) -> float:
        return next((t["state_norm"] for t in r["trace"] if t["step"] >= common), math.nan)

    seed = ["seed"] if cfg.repeats > 1 else []
    cut = [(r["name"], r["steps"]) for r in results if r["status"] == "time_limit"]
    rows = [[r["injection"], r["lr"], *([r["seed"]] if seed else []), "yes" if r["diverged"] else "no",
             "yes" if r["learned"] else "no", r["steps"], r["final_loss"], r["val_loss"], r["max_rho"],
             norm_at(r), r["max_state_norm"]] for r in results]
    unigram = next((r["unigram_loss"] for r in results if math.isfinite(r["unigram_loss"])), math.nan)
    report.add("## Runs\n\n" + markdown_table(
        ["injection", "lr", *seed, "diverged", f"learned (val loss < unigram {unigram:.3f})", "steps",
         "final train loss", "val loss", "max rho(A)", f"state norm at step {common}",
         "max state norm"], rows)
        + (f"\n\n**Cut short by the time budget** (each run trains for the same time), of {steps} steps: "
           f"{', '.join(f'{name} ({n})' for name, n in cut)}; the counts below compare runs of "
           "different lengths." if cut else ""))
    summary = []
    for injection in cfg.injections:
        runs = [r for r in results if r["injection"] == injection]
        finite = [r["final_loss"] for r in runs if math.isfinite(r["final_loss"])]
        summary.append([injection, f"{sum(r['diverged'] for r in runs)} / {len(runs)}",
                        f"{sum(r['learned'] for r in runs)} / {len(runs)}", min(finite, default=math.nan),
                        max(norm_at(r) for r in runs)])
    report.add("## Diverged and learned\n\n" + markdown_table(
        ["injection", "diverged", "learned (val loss below unigram)", "best final train loss",
         f"largest state norm at step {common}"], summary))

    def draw(fig):
        axes = [fig.add_subplot(1, 3, i + 1) for i in range(3)]
        colours = dict(zip(INJECTIONS, ("tab:blue", "tab:red", "tab:orange"), strict=True))
        for r in results:
            shade = 0.35 + 0.65 * cfg.lrs.index(r["lr"]) / max(1, len(cfg.lrs) - 1)
            steps_ = [t["step"] for t in r["trace"]]
            for ax, key in zip(axes, ("loss", "rho", "state_norm"), strict=True):
                ax.plot(steps_, [t[key] for t in r["trace"]], lw=0.8, alpha=shade,
                        color=colours[r["injection"]], label=r["name"])
        axes[0].set(xlabel="step", ylabel="train loss")
        axes[1].set(xlabel="step", ylabel="rho(A)")
        axes[1].axhline(1.0, color="k", lw=0.5, ls=":")
        axes[2].set(xlabel="step", ylabel="hidden-state norm", yscale="log")
        axes[0].legend(fontsize=5)

    report.figure("stability.png", draw, "Training loss, rho(A) and hidden-state norm per run "
                  "(colour: injection; darker: higher learning rate)")
    return report.write()
