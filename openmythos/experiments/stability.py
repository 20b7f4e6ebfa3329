"""Stability of looped training: the LTI-constrained injection (rho(A) < 1 by construction)
against an unconstrained learned A ("free") and a plain residual recurrence ("additive", A = 1),
across a learning-rate sweep on the bundled corpus.

A run counts as diverged when it aborts on non-finite steps or ends above its starting loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from openmythos.experiments.common import Report, markdown_table, threads
from openmythos.experiments.lm import LMExperimentConfig, lm_run

INJECTIONS = ("lti", "free", "additive")


@dataclass
class StabilityConfig(LMExperimentConfig):
    lrs: list[float] = field(default_factory=lambda: [2e-3, 8e-3, 3e-2])
    injections: list[str] = field(default_factory=lambda: list(INJECTIONS))
    loops: int = 8
    steps: int = 150
    batch_size: int = 8
    seq_len: int = 128


def run(cfg: StabilityConfig) -> dict:
    if cfg.smoke:
        cfg.lrs, cfg.loops, cfg.steps, cfg.batch_size, cfg.seq_len = [1e-3], 2, 3, 2, 32
    unknown = set(cfg.injections) - set(INJECTIONS)
    if unknown:
        raise ValueError(f"injections {sorted(unknown)} are not among {INJECTIONS}")
    report = Report("stability", cfg)
    steps = max(3, round(cfg.steps * cfg.scale))
    results = []
    with threads(cfg.threads):
        for injection in cfg.injections:
            for lr in cfg.lrs:
                name = f"{injection}-lr{lr:g}"
                out = lm_run(cfg, report.out / name,
                    {"injection": injection, "halting": "none", "max_loop_iters": cfg.loops},
                    {"train.steps": steps, "train.lr": lr, "train.batch_size": cfg.batch_size,
                     "train.warmup_steps": max(1, steps // 10), "data.seq_len": cfg.seq_len,
                     "loops.mean": cfg.loops, "loops.max": cfg.loops, "run.log_every": 1,
                     "run.dtype": "fp32", "train.max_bad_steps": 3, "eval.max_tokens": 16384,
                     "eval.depths": [cfg.loops], "eval.depth_max_tokens": 4096})
                trace = [r for r in out["metrics"] if "loss" in r]
                first = trace[0]["loss"] if trace else math.nan
                last = trace[-1]["loss"] if trace else math.nan
                diverged = out["diverged"] or not math.isfinite(last) or last > first
                results.append({
                    "name": name, "injection": injection, "lr": lr, "diverged": diverged,
                    "first_loss": first, "final_loss": last, "val_loss": out.get("val_loss", math.nan),
                    "max_rho": max((r["rho"] for r in trace), default=math.nan),
                    "max_state_norm": max((r["state_norm"] for r in trace), default=math.nan),
                    "trace": [{k: r[k] for k in ("step", "loss", "rho", "state_norm")} for r in trace],
                })
    report.results = {"runs": results}
    rows = [[r["injection"], r["lr"], "yes" if r["diverged"] else "no", r["final_loss"],
             r["val_loss"], r["max_rho"], r["max_state_norm"]] for r in results]
    report.add("## Runs\n\n" + markdown_table(
        ["injection", "lr", "diverged", "final train loss", "val loss", "max rho(A)",
         "max state norm"], rows))
    summary = []
    for injection in cfg.injections:
        runs = [r for r in results if r["injection"] == injection]
        frac = sum(r["diverged"] for r in runs) / len(runs)
        summary.append([injection, f"{frac:.0%}", min(r["final_loss"] for r in runs)])
    report.add("## Diverged fraction\n\n" + markdown_table(
        ["injection", "diverged", "best final train loss"], summary))

    def draw(fig):
        ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
        for r in results:
            steps_ = [t["step"] for t in r["trace"]]
            ax1.plot(steps_, [t["loss"] for t in r["trace"]], lw=0.8, label=r["name"])
            ax2.plot(steps_, [t["rho"] for t in r["trace"]], lw=0.8, label=r["name"])
        ax1.set(xlabel="step", ylabel="train loss", yscale="log")
        ax2.set(xlabel="step", ylabel="rho(A)")
        ax2.axhline(1.0, color="k", lw=0.5, ls=":")
        ax1.legend(fontsize=6)

    report.figure("stability.png", draw, "Training loss and rho(A) per run")
    return report.write()
