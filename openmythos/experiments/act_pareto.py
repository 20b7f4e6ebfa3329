"""Adaptive compute: validation loss against the mean number of loops actually run.

One model is trained on the bundled corpus with ACT halting and a ponder cost. It is then
evaluated three ways with the same weights: at fixed depths (halting off), with ACT at several
halting thresholds, and with a KL exit (stop once the next-token distribution read from the
state moves less than a threshold between successive loops, after a minimum number of loops).
Tokens/s is measured in the same process for every point, so the ratios are comparable.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from statistics import fmean

import torch
import torch.nn.functional as F

from openmythos.experiments.common import Report, TimeBudget, markdown_table, threads
from openmythos.experiments.lm import LMExperimentConfig, check_models, corpus_split, lm_run, width
from openmythos.model import OpenMythos
from openmythos.training.checkpoint import load_model
from openmythos.training.trainer import prepare_data, resolve_device


@dataclass
class ActParetoConfig(LMExperimentConfig):
    loops: int = 8
    dim: int = 128  # the tiny preset at half width
    steps: int = 500
    batch_size: int = 8
    seq_len: int = 64
    lr: float = 2e-3
    ponder_weight: float = 1e-3
    depths: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 6, 8])
    act_thresholds: list[float] = field(default_factory=lambda: [0.3, 0.5, 0.7, 0.9, 0.99])
    kl_thresholds: list[float] = field(default_factory=lambda: [3e-2, 1e-2, 3e-3, 1e-3])
    min_loops: int = 2
    eval_tokens: int = 8192

    def __post_init__(self) -> None:
        super().__post_init__()
        if any(t > 1 for t in self.act_thresholds):
            raise ValueError(f"act_thresholds={self.act_thresholds!r} must lie in (0, 1]")


@torch.no_grad()
def evaluate(model: OpenMythos, batches: list[tuple[torch.Tensor, torch.Tensor]],
             n_loops: int) -> dict[str, float]:
    """Loss, mean loops per token, loops run per batch (its deepest token's: a batch runs until
    its last token halts) and tokens/s over fixed validation batches."""
    model.eval()
    loss = loops = count = deepest = 0.0
    start = time.perf_counter()
    device = model.embed.weight.device
    for x, y in batches:
        out = model(x.to(device), n_loops=n_loops)
        logits = out.logits.float().flatten(0, 1)
        loss += float(F.cross_entropy(logits, y.to(device).flatten(), reduction="sum"))
        loops += float(out.loops.float().sum())
        deepest += float(out.loops.max())
        count += y.numel()
    elapsed = time.perf_counter() - start
    return {"val_loss": loss / count, "mean_loops": loops / count, "batch_loops": deepest / len(batches),
            "tok_per_s": count / elapsed}


def run(cfg: ActParetoConfig) -> dict:
    if cfg.smoke:
        cfg.smoke_defaults(loops=3, steps=2, batch_size=2, seq_len=32, eval_tokens=256, depths=[1, 3],
                           act_thresholds=[0.5, 0.99], kl_thresholds=[1e-2])
    if cfg.min_loops > cfg.loops:  # the KL exit could never stop before the last loop
        raise ValueError(f"min_loops={cfg.min_loops} exceeds loops={cfg.loops}")
    check_models(model_overrides(cfg))
    report = Report("act-pareto", cfg)
    steps = max(2, round(cfg.steps * cfg.scale))
    budget = TimeBudget(cfg.budget_minutes, cfg.repeats)  # a fifth held back for the evaluations
    data = corpus_split(cfg, report.out)
    with threads(cfg.threads):
        runs = [train_and_sweep(cfg, report.out / ("model" if cfg.repeats == 1 else f"model-seed{seed}"),
                                {**data, "run.seed": seed}, steps, budget) for seed in cfg.seeds]
    train = [r["train"] for r in runs]
    points = over_seeds([r["points"] for r in runs], cfg.loops)
    full = full_depth(points, cfg.loops)
    verdicts = {rule: verdict([p for p in points if p["rule"] == rule], full) for rule in ("act", "kl")}
    report.results = {"points": points, "train": train, "verdicts": verdicts}
    spread = cfg.repeats > 1
    rows = [[p["rule"], p["setting"], p["mean_loops"], p["batch_loops"], p["val_loss"], p["val_loss"] - full["val_loss"],
             *([p["gap_spread"]] if spread else []), p["tok_per_s"], p["tok_per_s"] / full["tok_per_s"]]
            for p in points]
    cut = [f"seed {t['seed']} at step {t['steps']}" for t in train if t["status"] == "time_limit"]
    report.add("## Quality against compute\n\n"
               + (f"Each point is the mean over models trained with seeds {', '.join(map(str, cfg.seeds))}; "
                  "the spread is the largest minus the smallest of their loss gaps to full depth.\n\n"
                  if spread else "") + markdown_table(
        ["exit rule", "setting", "mean loops", "loops run per batch", "val loss", f"Δ loss vs {cfg.loops} loops",
         *(["spread of Δ between seeds"] if spread else []), "tokens/s", f"speed vs {cfg.loops} loops"], rows)
        + "\n\nMean loops are per token; loops run per batch are its deepest token's (the batch loops "
        "until its last token halts, on fewer live tokens each loop), the mean over the evaluation batches "
        f"of 8 x {cfg.seq_len} tokens."
        + (f"\n\n**Training was cut short by the time budget** ({', '.join(cut)} of {steps})." if cut else ""))
    report.add("## Does halting pay?\n\n" + "\n".join(
        f"- **{rule}**: {v['summary']}" for rule, v in verdicts.items()) + "\n\n"
        f"The rule: among an exit rule's settings within {LOSS_TOLERANCE} nats of full depth's loss, "
        f"the one with the fewest loops; it saves compute if it runs at most {LOOPS_SAVED:.0%} of the "
        f"loops, and time if its tokens/s are at least {FASTER}x full depth's ("
        + (f"means over {cfg.repeats} seeds" if spread else "one seed")
        + ", one timing per point and model, after a warm-up).")
    report.add("Settings: fixed = n_loops; act = halting threshold (trained at "
               f"{runs[0]['act_threshold']}); kl = KL threshold in nats, at least {cfg.min_loops} loops. "
               "The KL readout applies the final norm and LM head to the looped state directly "
               "(the coda is skipped), so the exit itself costs one vocabulary projection per loop.")

    def draw(fig):
        ax = fig.add_subplot(1, 1, 1)
        for rule, marker in (("fixed", "o-"), ("act", "s--"), ("kl", "^:")):
            pts = sorted((p["mean_loops"], p["val_loss"]) for p in points if p["rule"] == rule)
            if pts:
                ax.plot(*zip(*pts, strict=True), marker, label=rule)
        ax.set(xlabel="mean loops per token", ylabel="validation loss (nats/token)")
        ax.legend()

    report.figure("pareto.png", draw, "Validation loss against mean loops executed")
    return report.write()


LOSS_TOLERANCE = 0.01  # nats: "at little cost"
LOOPS_SAVED = 0.75  # at most this share of full depth's loops
FASTER = 1.2  # tokens/s against full depth's


def verdict(points: list[dict], full: dict) -> dict:
    """Does an exit rule's best setting at little cost save loops, and time?"""
    close = [p for p in points if p["val_loss"] - full["val_loss"] <= LOSS_TOLERANCE]
    if not close:
        return {"setting": None, "saves_loops": False, "saves_time": False,
                "summary": f"no setting came within {LOSS_TOLERANCE} nats of full depth"}
    best = min(close, key=lambda p: p["mean_loops"])
    share, speed = best["mean_loops"] / full["mean_loops"], best["tok_per_s"] / full["tok_per_s"]
    saves_loops, saves_time = share <= LOOPS_SAVED, speed >= FASTER
    return {"setting": best["setting"], "saves_loops": saves_loops, "saves_time": saves_time,
            "summary": f"at {best['setting']}, {best['mean_loops']:.2f} of {full['mean_loops']:.0f} loops "
                       f"({best['val_loss'] - full['val_loss']:+.4f} nats) at {speed:.2f}x the tokens/s: "
                       f"loops {'saved' if saves_loops else 'not saved'}, "
                       f"time {'saved' if saves_time else 'not saved'}"}


def train_and_sweep(cfg: ActParetoConfig, out_dir: Path, settings: dict, steps: int,
                    budget: TimeBudget) -> dict:
    """One ACT model trained, then evaluated at every point of the sweep: fixed depths (full
    depth among them, asked for or not), ACT thresholds and KL thresholds."""
    out = lm_run(cfg, out_dir, model_overrides(cfg),
                 {**settings, "train.steps": steps, "train.batch_size": cfg.batch_size, "train.lr": cfg.lr,
                  "train.warmup_steps": max(1, steps // 20), "data.seq_len": cfg.seq_len,
                  "train.ponder_weight": cfg.ponder_weight,
                  "run.dtype": "bf16",  # as in the measured run
                  "loops.mean": cfg.loops, "loops.max": cfg.loops, "eval.depths": [cfg.loops],
                  "eval.max_tokens": cfg.eval_tokens, "eval.depth_max_tokens": cfg.eval_tokens},
                 budget)
    if out.get("diverged"):
        raise ValueError(f"act-pareto: training diverged at lr={cfg.lr} (seed {settings['run.seed']}: "
                         f"{out['error']}); try a smaller --lr")
    model, tokenizer, train_cfg = load_model(out["checkpoint"], resolve_device(cfg.device, "device"))
    data = prepare_data(train_cfg.data, tokenizer)
    batches = [b for _, b in zip(range(max(1, cfg.eval_tokens // (8 * cfg.seq_len))),
                                 data.val.iter_eval_batches(8, cfg.seq_len), strict=False)]
    evaluate(model, batches[:1], 1)  # warm-up: the first point's tokens/s would pay for it
    points = [{"rule": "fixed", "setting": n, **evaluate(model.with_exit(halting="none"), batches, n)}
              for n in sorted({*cfg.depths, cfg.loops})]
    points += [{"rule": "act", "setting": thr,
                **evaluate(model.with_exit(halting="act", act_threshold=thr), batches, cfg.loops)}
               for thr in cfg.act_thresholds]
    points += [{"rule": "kl", "setting": thr,
                **evaluate(model.with_exit(halting="kl", kl_threshold=thr, min_loops=cfg.min_loops),
                           batches, cfg.loops)} for thr in cfg.kl_thresholds]
    train = {"seed": settings["run.seed"],
             **{k: out.get(k) for k in ("status", "steps", "val_loss", "train_time_s", "tok_per_s")}}
    return {"train": train, "points": points, "act_threshold": model.cfg.act_threshold}


def model_overrides(cfg: ActParetoConfig) -> dict:
    return {"halting": "act", "max_loop_iters": cfg.loops, **width(cfg.dim)}


def full_depth(points: list[dict], loops: int) -> dict:
    return next(p for p in points if p["rule"] == "fixed" and p["setting"] == loops)


def over_seeds(runs: list[list[dict]], loops: int) -> list[dict]:
    """The seeds' sweeps as one: each point's loss, loops and tokens/s averaged, and the spread
    between seeds of its loss gap to full depth (the difference the verdict reads). One sweep is
    returned as it is."""
    if len(runs) == 1:
        return runs[0]
    fulls = [full_depth(points, loops) for points in runs]
    merged = []
    for same in zip(*runs, strict=True):
        gaps = [p["val_loss"] - f["val_loss"] for p, f in zip(same, fulls, strict=True)]
        merged.append({"rule": same[0]["rule"], "setting": same[0]["setting"],
                       **{k: fmean(p[k] for p in same) for k in ("val_loss", "mean_loops", "batch_loops", "tok_per_s")},
                       "gap_spread": max(gaps) - min(gaps)})
    return merged
