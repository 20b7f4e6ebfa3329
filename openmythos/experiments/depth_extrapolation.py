"""Depth extrapolation on k-hop composition: do more loops at inference solve longer chains?

Models train on chains of at most K hops and are tested on held-out chains of 1..2K hops at
1..4x the training depth. Compared: fixed-depth training, random-depth training with truncated
backprop (Huginn-style lognormal-Poisson depths per step), ACT halting, a dense model with
the same parameters (the same network at one loop) and a dense model with the same compute
(as many unique layers as the looped model runs).
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from dataclasses import dataclass
from statistics import fmean

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from openmythos.config import MythosConfig
from openmythos.data.tasks import KHopTask
from openmythos.experiments.common import (
    ExperimentConfig,
    Report,
    TimeBudget,
    markdown_table,
    threads,
)
from openmythos.model import OpenMythos
from openmythos.model.model import IGNORE_INDEX
from openmythos.training.config import LoopsConfig, OptimConfig
from openmythos.training.loops import LoopSampler
from openmythos.training.optim import build_optimizer, lr_at
from openmythos.training.trainer import resolve_device


@dataclass
class DepthExtrapolationConfig(ExperimentConfig):
    """The CPU default is a small instance of the task (the LTG setting is 200 entities, 10
    relations, K = 3: `--n_entities 200 --n_relations 10 --train_hops 3 --attn_type mla
    --n_experts 4 --dim 256 --scale 20 --budget_minutes 0` on a GPU)."""

    n_entities: int = 32
    n_relations: int = 8
    train_hops: int = 2  # K: training chains have 1..K hops, tests go to 2K
    train_loops: int = 4
    dim: int = 64
    attn_type: str = "gqa"  # "mla" is the full architecture; GQA is faster at this size on a CPU
    n_experts: int = 1  # routed experts (top-min(2, n)), plus one shared expert
    steps: int = 1600
    batch_size: int = 128
    lr: float = 3e-3
    prefix_loss: bool = True  # also teach every chain prefix (see `prefix_targets`)
    backprop: int = 4  # truncated backprop window of the random-depth variant
    ponder_weight: float = 0.01
    eval_examples: int = 256  # with `repeats`, each seed draws its own task and models


@dataclass(frozen=True)
class Variant:
    name: str
    description: str
    prelude: int = 1
    coda: int = 1
    loops: int = 0  # trained depth; 0 -> cfg.train_loops
    halting: str = "none"
    random_depth: bool = False


def variants(cfg: DepthExtrapolationConfig) -> list[Variant]:
    extra = cfg.train_loops + 1  # prelude + coda layers that, with one pass, match the looped compute
    return [
        Variant("fixed", f"looped, trained at exactly {cfg.train_loops} loops"),
        Variant("random", "looped, lognormal-Poisson depth per step, truncated backprop",
                random_depth=True),
        Variant("act", "looped with ACT halting and a ponder cost", halting="act"),
        Variant("dense-params", "the same network at one loop (same parameters)", loops=1),
        Variant("dense-compute", f"{extra + 1} unique layers (same compute as the looped model)",
                prelude=extra // 2, coda=extra - extra // 2, loops=1),
    ]


def model_config(cfg: DepthExtrapolationConfig, task: KHopTask, v: Variant, width: int) -> MythosConfig:
    d = cfg.dim
    return MythosConfig(
        vocab_size=task.vocab_size, dim=d, n_heads=4, n_kv_heads=4, max_seq_len=width,
        max_output_tokens=width, max_loop_iters=v.loops or cfg.train_loops,
        prelude_layers=v.prelude, coda_layers=v.coda, attn_type=cfg.attn_type, kv_lora_rank=d // 4,
        q_lora_rank=d // 2, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=d // 4,
        n_experts=cfg.n_experts, n_shared_experts=1, n_experts_per_tok=min(2, cfg.n_experts),
        expert_dim=d, lora_rank=8,
        rope_theta=10000.0, halting=v.halting,
    )


def train_variant(model: OpenMythos, task: KHopTask, cfg: DepthExtrapolationConfig, v: Variant,
                  width: int, steps: int, minutes: float = 0.0) -> list[float]:
    """Train losses per step; stops early once `minutes` (0 = no limit) have passed."""
    optim = OptimConfig(optimizer="muon", steps=steps, lr=cfg.lr, warmup_steps=max(1, steps // 20), weight_decay=0.0)
    opt = build_optimizer(model, optim)
    gen = torch.Generator().manual_seed(cfg.seed)
    # one depth per step, never too shallow for the longest training chain. Huginn's
    # n = Poisson(tau) + 1 has mean r + 1: r = train_loops - 1 trains near the fixed variant's
    # depth (4.1 loops for 4 at train_hops 2; the floor at train_hops raises it, to 4.4 at 3 hops)
    sampler = LoopSampler(LoopsConfig(sampler="lognormal-poisson", mean=max(1, cfg.train_loops - 1),
                                      per="batch", min=cfg.train_hops, max=3 * cfg.train_loops),
                          cfg.seed + 1)
    depth = v.loops or cfg.train_loops
    device = model.embed.weight.device
    losses = []
    model.train()
    start = time.perf_counter()
    for step in tqdm(range(steps), desc=v.name, leave=False):
        if minutes and time.perf_counter() - start > 60 * minutes:
            break
        for group in opt.param_groups:
            group["lr"] = lr_at(step, optim)
        ids, targets = training_batch(task, cfg.batch_size, cfg.train_hops, gen, width)
        n_loops = sampler.sample(cfg.batch_size) if v.random_depth else depth
        out = model(ids.to(device), n_loops=n_loops, backprop_loops=cfg.backprop if v.random_depth else None)
        loss = F.cross_entropy(out.logits[:, -1].float(), targets.to(device))
        total = loss + out.aux_loss + (cfg.ponder_weight * out.ponder_loss if v.halting == "act" else 0)
        if cfg.prefix_loss:
            prefix = prefix_targets(task, ids).flatten().to(device)
            total = total + F.cross_entropy(out.logits.flatten(0, 1).float(), prefix, ignore_index=IGNORE_INDEX)
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        model.update_router_bias(out.expert_load)
        losses.append(loss.item())
    return losses


def training_batch(task: KHopTask, n: int, max_hops: int, generator: torch.Generator,
                   width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Hop counts uniform in 1..max_hops. One-hop queries come from both splits: they are the
    facts themselves, and a held-out chain is only answerable when every fact on it was taught;
    what stays held out is which chains of two or more facts were ever seen."""
    ids, targets, hops = task.batch(n, max_hops, generator, width)
    facts = (hops == 1).nonzero().squeeze(1)
    held_out = facts[torch.rand(len(facts), generator=generator) < 1 / task.TEST_EVERY]
    if len(held_out):
        ids[held_out], targets[held_out] = task.sample(len(held_out), 1, generator, width, "test")
    return ids, targets


def prefix_targets(task: KHopTask, ids: torch.Tensor) -> torch.Tensor:
    """(B, T) targets that teach every prefix of a chain: at its i-th relation token, the entity
    reached after i hops; IGNORE_INDEX elsewhere. The test is unchanged (the answer at the query token),
    but the model is told what each hop should give, which lets a few minutes of CPU training
    learn to compose instead of memorising chains. A prefix of two or more hops that is itself a
    held-out chain stays IGNORE_INDEX: the test asks it, so training must not answer it."""
    table, first_relation = task.relations, task.relation_token(0)
    B, T = ids.shape
    entity = torch.zeros(B, dtype=torch.long)
    head = torch.zeros(B, dtype=torch.long)
    chain = torch.zeros(B, T, dtype=torch.long)  # each row's relations so far
    hops = torch.zeros(B, dtype=torch.long)
    targets = torch.full_like(ids, IGNORE_INDEX)
    for t in range(T):
        token = ids[:, t]
        is_relation = token >= first_relation
        is_entity = (token >= task.entity_token(0)) & ~is_relation
        relation = (token - first_relation).clamp(min=0)
        head = torch.where(is_entity, token - task.entity_token(0), head)
        entity = torch.where(is_entity, head, entity)
        entity = torch.where(is_relation, table[relation, entity], entity)
        chain[is_relation, hops[is_relation]] = relation[is_relation]
        hops += is_relation
        taught = is_relation.clone()
        for k in hops[is_relation].unique().tolist():
            rows = (is_relation & (hops == k)).nonzero().squeeze(1)
            if k >= 2:
                taught[rows] = ~task.is_test(head[rows], chain[rows, :k])
        targets[:, t] = torch.where(taught, task.entity_token(entity), IGNORE_INDEX)
    return targets


@torch.no_grad()
def accuracy(model: OpenMythos, task: KHopTask, hops: int, n_loops: int, n: int, width: int,
             seed: int, split: str = "test") -> tuple[float, float]:
    """Accuracy on chains of exactly `hops` hops from `split` (held-out chains by default), and
    the mean loops actually run."""
    model.eval()
    ids, targets = task.sample(n, hops, torch.Generator().manual_seed(seed + hops), width, split)
    out = model(ids.to(model.embed.weight.device), n_loops=n_loops)
    hit = out.logits[:, -1].argmax(-1).cpu() == targets
    return float(hit.float().mean()), float(out.loops[:, -1].float().mean())


def run(cfg: DepthExtrapolationConfig) -> dict:
    if cfg.smoke:
        cfg.smoke_defaults(n_entities=12, n_relations=3, train_hops=2, train_loops=2, dim=32, steps=4,
                           batch_size=8, eval_examples=16)
    check(cfg)
    report = Report("depth-extrapolation", cfg)
    max_hops = 2 * cfg.train_hops
    loop_grid = sorted({1, 2, cfg.train_loops // 2 or 1, cfg.train_loops, 2 * cfg.train_loops,
                        3 * cfg.train_loops, 4 * cfg.train_loops})
    budget = TimeBudget(cfg.budget_minutes, len(variants(cfg)) * cfg.repeats)
    with threads(cfg.threads):
        runs = [train_and_score(dataclasses.replace(cfg, seed=seed), loop_grid, budget)
                for seed in cfg.seeds]
    results = {name: over_seeds([r[name] for r in runs]) for name in runs[0]}
    report.results = {k: {kk: vv for kk, vv in r.items() if kk != "losses"} for k, r in results.items()}
    _write(report, cfg, results, loop_grid, max_hops)
    return report.write()


def check(cfg: DepthExtrapolationConfig) -> None:
    """Before any folder, what would fail minutes in: every variant's model, and a query of
    every hop count scored (1 to 2 x train_hops) in both splits of every seed's task."""
    width = 2 * cfg.train_hops + 2
    for seed in cfg.seeds:
        task = KHopTask(cfg.n_entities, cfg.n_relations, seed)
        for v in variants(cfg):
            model_config(cfg, task, v, width)
        for hops, split in itertools.product(range(1, 2 * cfg.train_hops + 1), ("train", "test")):
            task.sample(1, hops, torch.Generator().manual_seed(seed), width, split)


def train_and_score(cfg: DepthExtrapolationConfig, loop_grid: list[int], budget: TimeBudget) -> dict[str, dict]:
    """Every variant trained on cfg.seed's task and scored at every depth of loop_grid."""
    task = KHopTask(cfg.n_entities, cfg.n_relations, cfg.seed)
    max_hops = 2 * cfg.train_hops
    width = max_hops + 2
    steps = max(1, round(cfg.steps * cfg.scale))
    results: dict[str, dict] = {}
    for v in variants(cfg):
        started = time.perf_counter()
        torch.manual_seed(cfg.seed)
        model = OpenMythos(model_config(cfg, task, v, width)).to(resolve_device(cfg.device, "device"))
        trained = time.perf_counter()
        losses = train_variant(model, task, cfg, v, width, steps, budget.next_minutes())
        train_s = time.perf_counter() - trained
        grid = loop_grid if v.loops != 1 else [1]
        acc = {n: {k: accuracy(model, task, k, n, cfg.eval_examples, width, cfg.seed)
                   for k in range(1, max_hops + 1)} for n in grid}
        # the best depth for long chains is chosen on other long chains, so that the accuracy
        # reported at it is not the maximum of several noisy cells: those outside the test
        # split, which training never shows either (it stops at train_hops), and disjoint
        # from the test chains by construction
        choice = {n: fmean(accuracy(model, task, k, n, cfg.eval_examples, width, cfg.seed, "train")[0]
                           for k in range(cfg.train_hops + 1, max_hops + 1)) for n in grid}
        results[v.name] = {
            "description": v.description, "params": model.cfg.num_params(),
            "train_loops": v.loops or cfg.train_loops, "choice": choice,
            "final_train_loss": sum(losses[-20:]) / len(losses[-20:]),
            "accuracy": {n: {k: a for k, (a, _) in row.items()} for n, row in acc.items()},
            "mean_loops": {n: {k: m for k, (_, m) in row.items()} for n, row in acc.items()},
            "steps": len(losses), "train_seconds": round(train_s, 1), "losses": losses,
        }
        budget.finished(time.perf_counter() - started, train_s)
    return results


def over_seeds(runs: list[dict]) -> dict:
    """One variant's runs, one per seed, as one: accuracies, loops run, depth choice scores,
    final loss, training time and loss curve averaged (the curve over the steps all of them
    reached), the fewest steps, and the best depth picked on the mean choice score. One run is
    returned as it is, with its best depth."""
    first = runs[0]

    def mean(key: str) -> dict:
        return {n: {k: fmean(r[key][n][k] for r in runs) for k in row} for n, row in first[key].items()}

    choice = {n: fmean(r["choice"][n] for r in runs) for n in first["choice"]}
    steps = min(r["steps"] for r in runs)
    return {**first, "choice": choice, "best_loops": max(choice, key=choice.get),
            "accuracy": mean("accuracy"), "mean_loops": mean("mean_loops"),
            "final_train_loss": fmean(r["final_train_loss"] for r in runs), "steps": steps,
            "train_seconds": round(fmean(r["train_seconds"] for r in runs), 1),
            "losses": [fmean(r["losses"][i] for r in runs) for i in range(steps)],
            **({"by_seed": [r["accuracy"] for r in runs]} if len(runs) > 1 else {})}


def _write(report: Report, cfg: DepthExtrapolationConfig, results: dict, loop_grid: list[int],
           max_hops: int) -> None:
    K = cfg.train_hops
    seeds = cfg.seeds if cfg.repeats > 1 else []
    rows = []
    verdicts = []
    for name, r in results.items():
        acc = r["accuracy"]
        trained = acc[r["train_loops"]]
        best_n = r["best_loops"]
        long_trained = fmean(trained[k] for k in range(K + 1, max_hops + 1))
        long_best = fmean(acc[best_n][k] for k in range(K + 1, max_hops + 1))
        per_seed = [" / ".join(f"{fmean(a[best_n][k] for k in range(K + 1, max_hops + 1)):.3f}"
                               for a in r["by_seed"])] if seeds else []
        rows.append([name, r["params"], r["steps"], r["train_seconds"], r["train_loops"],
                     fmean(trained[k] for k in range(1, K + 1)),
                     long_trained, best_n, long_best, *per_seed])
        if len(acc) > 1:
            gained = long_best - long_trained
            verdicts.append(f"- **{name}**: on {K + 1}–{max_hops} hops, {best_n} loops give "
                            f"{long_best:.3f} vs {long_trained:.3f} at the trained depth "
                            f"({'extrapolates' if gained > 0.02 and best_n > r['train_loops'] else 'no gain from extra loops'}).")
    steps = max(1, round(cfg.steps * cfg.scale))
    cut = [f"{name} ({r['steps']} of {steps} steps)" for name, r in results.items() if r["steps"] < steps]
    report.add("## Accuracy on held-out chains\n\n"
               + (f"Each variant trained with seeds {', '.join(map(str, seeds))}, each drawing its own "
                  "task: accuracies are the means over seeds, the best depth is picked on their mean, "
                  "and the last column gives each seed's.\n\n" if seeds else "") + markdown_table(
        ["variant", "params", "train steps", "train s", "trained loops", f"acc 1–{K} hops (trained depth)",
         f"acc {K + 1}–{max_hops} hops (trained depth)", "best loops (long chains)",
         f"acc {K + 1}–{max_hops} hops (best loops)",
         *([f"acc {K + 1}–{max_hops} hops (best loops), per seed"] if seeds else [])], rows)
        + (f"\n\n**Cut short by the time budget** (each variant trains for the same time): "
           f"{', '.join(cut)}." if cut else ""))
    report.add("## Does depth extrapolate?\n\n" + "\n".join(verdicts) + "\n\nChance is "
               f"{1 / cfg.n_entities:.3f}. 'Extrapolates' means more loops than trained raise "
               "long-chain accuracy by more than 2 points. The best depth is chosen on other "
               "long chains (outside the test split, and like them never trained on), and its "
               "accuracy is the one measured on the test chains. One-hop queries are the facts "
               "themselves and are all taught (a chain is only answerable if its facts were); from "
               "two hops on, every test chain is one the model never saw.")
    grid_rows = [[name, n, *(r["accuracy"][n][k] for k in range(1, max_hops + 1))]
                 for name, r in results.items() for n in r["accuracy"]]
    report.add("## Accuracy by hops and test-time loops\n\n" + markdown_table(
        ["variant", "loops", *(f"{k} hop{'s' if k > 1 else ''}" for k in range(1, max_hops + 1))],
        grid_rows))
    report.add("## Variants\n\n" + "\n".join(f"- **{k}**: {r['description']}" for k, r in results.items()))
    looped = [k for k, r in results.items() if len(r["accuracy"]) > 1]

    def heatmaps(fig):
        for i, name in enumerate(looped):
            ax = fig.add_subplot(1, len(looped), i + 1)
            acc = results[name]["accuracy"]
            grid = [[acc[n][k] for n in loop_grid] for k in range(1, max_hops + 1)]
            im = ax.imshow(grid, origin="lower", aspect="auto", vmin=0, vmax=1, cmap="viridis")
            ax.set_xticks(range(len(loop_grid)), [str(n) for n in loop_grid])
            ax.set_yticks(range(max_hops), [str(k) for k in range(1, max_hops + 1)])
            ax.axhline(K + 0.5 - 1, color="w", lw=1, ls="--")
            ax.set_title(name)
            ax.set_xlabel("n_loops at test")
            if i == 0:
                ax.set_ylabel("hops")
        fig.colorbar(im, ax=fig.axes, shrink=0.8, label="accuracy")

    report.figure("accuracy_heatmap.png", heatmaps,
                  f"Accuracy, hops x test-time loops (dashed: the trained {K} hops)")

    def curves(fig):
        ax = fig.add_subplot(1, 1, 1)
        for name, r in results.items():
            ax.plot(r["losses"], label=name, lw=0.8)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("train loss (nats)")
        ax.legend()

    report.figure("train_loss.png", curves, "Training loss")
