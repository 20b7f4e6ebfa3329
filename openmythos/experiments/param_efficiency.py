"""Parameter efficiency on real text: is a block looped r times worth r unique blocks?

At equal training tokens on the bundled corpus: dense models of several depths (unique layers,
one pass) and looped models (one prelude block, one block looped r times, one coda block).
Every block has the same FFN width: the looped block's MoE is set to one routed plus one shared
expert of half the dense width, which computes exactly what a dense SwiGLU of full width does,
so "layers" means the same thing on both sides.

The dense losses are fitted as loss = a + b*ln(layers); a looped model's loss then reads off its
effective layer count L_eff, and with the prelude and coda counted once,
L_eff - 2 = r^phi. phi is fitted by least squares over the looped models (the literature reports
phi ~ 0.46, "How much is one recurrence worth", 2026). With `repeats` > 1 every model trains
once per seed (seed, seed + 1, ...), the fit reads each model's mean loss, and the report gives
the spread between seeds beside it.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

from openmythos.experiments.common import Report, TimeBudget, markdown_table, threads
from openmythos.experiments.lm import LMExperimentConfig, check_models, corpus_split, lm_run
from openmythos.training import open_checkpoint


@dataclass
class ParamEfficiencyConfig(LMExperimentConfig):
    dense_layers: list[int] = field(default_factory=lambda: [3, 4, 6])
    loops: list[int] = field(default_factory=lambda: [2, 4])
    dim: int = 128  # the tiny preset at half width, so that every model sees the same tokens in time
    steps: int = 500
    batch_size: int = 8
    seq_len: int = 64
    lr: float = 3e-3


def fit_log_curve(layers: list[float], losses: list[float]) -> tuple[float, float]:
    """Least-squares loss = a + b * ln(layers)."""
    xs = [math.log(n) for n in layers]
    mx, my = sum(xs) / len(xs), sum(losses) / len(losses)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, losses, strict=True)) / sum((x - mx) ** 2 for x in xs)
    return my - b * mx, b


def effective_layers(loss: float, a: float, b: float) -> float:
    if b == 0:  # a flat dense curve: no depth to read a loss off
        return math.nan
    return math.exp(min((loss - a) / b, 700.0))  # past it, exp overflows a float


def fit_phi(loops: list[int], looped_layers: list[float]) -> float:
    """phi in looped_layers = r^phi, least squares through the origin in log-log space."""
    xs = [math.log(r) for r in loops]
    ys = [math.log(n) for n in looped_layers]
    return sum(x * y for x, y in zip(xs, ys, strict=True)) / sum(x * x for x in xs)


def why_phi_is_undefined(dense: list[dict], looped: list[dict]) -> str | None:
    """The reason phi cannot be read off these runs, or None. The fit assumes loss falls with
    unique depth (a dense curve that does not is noise, and any phi fitted to it is too; with
    several seeds, each fall must exceed the spread between seeds of the two models), and a
    log of L_eff - 2 (a looped model no better than its prelude and coda alone has none)."""
    lost = [x["name"] for x in dense + looped if math.isnan(x["val_loss"])]
    if lost:
        return f"{', '.join(lost)} has no validation loss (a run diverged)"
    by_depth = sorted(dense, key=lambda x: x["layers"])
    if any(b["val_loss"] >= a["val_loss"] for a, b in itertools.pairwise(by_depth)):
        return "the dense models' loss did not fall with every added layer, so depth is not measured"
    within = [f"{a['layers']} to {b['layers']} layers" for a, b in itertools.pairwise(by_depth)
              if a["val_loss"] - b["val_loss"] <= max(a.get("val_loss_spread", 0), b.get("val_loss_spread", 0))]
    if within:
        return (f"the dense models' loss fell by no more than the spread between seeds from "
                f"{', '.join(within)}, so depth is not measured")
    worse = [x["name"] for x in looped if not x["effective_layers"] > 2]
    if worse:
        return f"{', '.join(worse)} did no better than 2 unique layers (L_eff <= 2)"
    return None


def over_seeds(runs: list[dict]) -> dict:
    """One model's runs, one per seed, as one: the mean loss (NaN if a seed has none) and the
    spread between seeds, the fewest tokens, the mean training time, and the worst status."""
    losses = [x["val_loss"] for x in runs]
    statuses = [x["status"] for x in runs]
    times = [x["train_time_s"] for x in runs if x["train_time_s"] is not None]
    return {"val_loss": sum(losses) / len(losses),
            "val_loss_spread": max(losses) - min(losses) if all(map(math.isfinite, losses)) else math.nan,
            "tokens": min((x["tokens"] for x in runs if x["tokens"] is not None), default=None),
            "train_time_s": sum(times) / len(times) if times else None,
            "status": next((s for s in ("diverged", "time_limit") if s in statuses), statuses[0])}


def block_overrides(width: int) -> dict:
    half = (width * 4 // 3) // 2
    return {"dim": width, "kv_lora_rank": width // 4, "q_lora_rank": width // 2, "n_experts": 1,
            "n_experts_per_tok": 1, "n_shared_experts": 1, "expert_dim": half, "halting": "none"}


def run(cfg: ParamEfficiencyConfig) -> dict:
    if cfg.smoke:
        cfg.smoke_defaults(dense_layers=[3, 4], loops=[2], steps=2, seq_len=32, batch_size=2)
    if len(set(cfg.dense_layers)) < 2 or min(cfg.dense_layers) < 1:
        raise ValueError(f"param-efficiency: dense_layers={cfg.dense_layers} needs two or more "
                         "different positive depths, to fit loss against depth")
    if not cfg.loops or min(cfg.loops) < 2:
        raise ValueError(f"param-efficiency: loops={cfg.loops} needs loop counts >= 2 (one loop "
                         "is a dense model)")
    block = block_overrides(cfg.dim)
    runs = []
    for n in cfg.dense_layers:
        # n unique layers: prelude + coda = n - 1, and one pass of the (MoE = dense) block
        model = {**block, "prelude_layers": (n - 1) // 2, "coda_layers": n - 1 - (n - 1) // 2,
                 "max_loop_iters": 1}
        runs.append((f"dense-{n}", "dense", n, 1, model))
    for r in cfg.loops:
        runs.append((f"looped-1x{r}", "looped", 2 + r, r, {**block, "prelude_layers": 1, "coda_layers": 1,
                                                          "max_loop_iters": r}))
    check_models(*(model for *_, model in runs))
    report = Report("param-efficiency", cfg)
    steps = max(2, round(cfg.steps * cfg.scale))
    settings = {**corpus_split(cfg, report.out), "train.steps": steps, "train.batch_size": cfg.batch_size, "train.lr": cfg.lr,
                "train.warmup_steps": max(1, steps // 20), "data.seq_len": cfg.seq_len,
                "eval.max_tokens": 8192, "eval.depth_max_tokens": 4096,
                "eval.depths": [1], "loops.max": max([*cfg.loops, 1])}
    with threads(cfg.threads):
        seeds = cfg.seeds
        rows, results = [], []
        budget = TimeBudget(cfg.budget_minutes, len(runs) * len(seeds))
        for name, kind, layers, r, model in runs:
            outs = [lm_run(cfg, report.out / (name if cfg.repeats == 1 else f"{name}-seed{seed}"), model,
                           {**settings, "run.seed": seed, "loops.mean": r, "eval.n_loops": r}, budget)
                    for seed in seeds]
            # the model as trained, with the tokenizer's vocabulary (none if every seed diverged)
            built = next((out["checkpoint"] for out in outs if "checkpoint" in out), None)
            mcfg = open_checkpoint(built).model_cfg if built else None
            per_seed = [{"seed": seed, "val_loss": out.get("val_loss", math.nan), "tokens": out.get("tokens_seen"),
                         "train_time_s": out.get("train_time_s"),
                         "status": "diverged" if out["diverged"] else out.get("status")}
                        for seed, out in zip(seeds, outs, strict=True)]
            results.append({"name": name, "kind": kind, "layers": layers, "loops": r,
                            "params": mcfg.num_params() if mcfg else math.nan,
                            "flops_per_token": mcfg.flops_per_token(r, cfg.seq_len) if mcfg else math.nan,
                            **over_seeds(per_seed), "seeds": per_seed})
    dense = [x for x in results if x["kind"] == "dense"]
    looped = [x for x in results if x["kind"] == "looped"]
    a, b = fit_log_curve([x["layers"] for x in dense], [x["val_loss"] for x in dense])
    for x in looped:
        x["effective_layers"] = effective_layers(x["val_loss"], a, b)
    undefined = why_phi_is_undefined(dense, looped)
    phi = math.nan if undefined else fit_phi([x["loops"] for x in looped],
                                             [x["effective_layers"] - 2 for x in looped])
    report.results = {"runs": results, "dense_fit": {"a": a, "b": b}, "phi": phi,
                      "phi_undefined_because": undefined}
    spread = ["spread between seeds"] if cfg.repeats > 1 else []
    for x in results:
        rows.append([x["name"], x["params"], x["layers"], x["loops"], x["flops_per_token"], x["tokens"],
                     x["val_loss"], *([x["val_loss_spread"]] if spread else []), x.get("effective_layers", "")])
    cut = [x["name"] for x in results if x["status"] == "time_limit"]
    diverged = [x["name"] for x in results if x["status"] == "diverged"]
    report.add("## Validation loss at equal training tokens\n\n"
               + (f"Each model trained with seeds {', '.join(map(str, seeds))}: the mean loss, and "
                  "the largest minus the smallest.\n\n" if spread else "") + markdown_table(
        ["model", "params", "layer passes", "loops", "train FLOPs/token", "train tokens",
         "val loss (nats/token)", *spread, "effective unique layers"], rows)
        + (f"\n\n**Cut short by the time budget, so not at equal tokens:** {', '.join(cut)}." if cut else "")
        + (f"\n\n**Diverged (no validation loss):** {', '.join(diverged)}." if diverged else ""))
    verdict = (f"phi is not measurable here: {undefined}" if undefined else
               f"phi = {phi:.2f} (a loop is worth r^{phi:.2f} unique layers; the literature reports ~0.46)")
    report.add(f"## Fit\n\nDense: loss = {a:.4f} {b:+.4f}·ln(layers). {verdict}.\n\n"
               "Where phi is near 1 a loop is as good as a unique layer; near 0 it adds nothing.")

    def draw(fig):
        for i, (key, label) in enumerate((("params", "parameters"), ("flops_per_token", "train FLOPs per token"))):
            ax = fig.add_subplot(1, 2, i + 1)
            for kind, marker in (("dense", "o-"), ("looped", "s--")):
                pts = sorted((x[key], x["val_loss"]) for x in results if x["kind"] == kind)
                if pts:
                    ax.plot(*zip(*pts, strict=True), marker, label=kind)
            ax.set_xlabel(label)
            ax.set_ylabel("validation loss (nats/token)")
            ax.legend()

    report.figure("loss_vs_params_flops.png", draw, "Validation loss against parameters and FLOPs")
    return report.write()
