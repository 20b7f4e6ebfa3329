"""Serving throughput on mixed traffic: sequential `generate`, static batching and the continuous
depth-wise batching engine, side by side in one process on the same requests.

Engine rows: `engine-fifo` admits waiting requests in arrival order, `engine` (the default
policy) groups rows of like depth (see openmythos/serving/engine.py).

Traffic: every request arrives at t = 0 with its own prompt length, output length and depth
(n_loops). Static batching takes fixed batches in arrival order, left-pads them to the longest
prompt, runs every token at the batch's deepest depth and decodes until its longest output is
done. Tokens/s counts only the tokens each request asked for. Greedy decoding, halting off, so
every request does exactly the work it asked for.

    python benchmarks/serving.py [--preset tiny] [--requests 48] [--threads 1] [--rounds 3]
    python benchmarks/serving.py --profile --threads 1     # where each mode's time goes

Prints a table and a final JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import time

# before torch loads OpenMP: spin-waiting threads on a shared CPU run many times slower
# (docs/performance.md, "This machine"); an explicit setting in the environment wins
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from openmythos import MythosConfig, OpenMythos  # noqa: E402
from openmythos.cli import int_at_least  # noqa: E402
from openmythos.serving import Engine, SamplingParams  # noqa: E402


def traffic(n: int, vocab: int, max_loops: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": [rng.randrange(vocab) for _ in range(rng.randint(8, 64))],
             "max_tokens": rng.randint(8, 64), "n_loops": rng.randint(2, max_loops)}
            for _ in range(n)]


def run_sequential(model, reqs):
    start, done = time.perf_counter(), []
    for r in reqs:
        model.generate(torch.tensor([r["prompt"]]), r["max_tokens"], n_loops=r["n_loops"], temperature=0)
        done.append(time.perf_counter() - start)
    return done, [r["n_loops"] for r in reqs]


def run_static(model, reqs, batch: int):
    start, done, loops = time.perf_counter(), [], []
    for i in range(0, len(reqs), batch):
        group = reqs[i:i + batch]
        depth = max(r["n_loops"] for r in group)
        model.generate([r["prompt"] for r in group], max(r["max_tokens"] for r in group),
                       n_loops=depth, temperature=0)
        done += [time.perf_counter() - start] * len(group)
        loops += [depth] * len(group)
    return done, loops


def run_engine(model, reqs, batch: int, max_loops: int, admission: str):
    engine = Engine(model, max_batch=batch, max_queue=len(reqs), max_loops=max_loops,
                    max_len=model.cfg.max_seq_len, admission=admission)
    start, done, usage = time.perf_counter(), {}, {}

    def on_event(i):
        def handle(ev):
            if ev.kind == "done":
                done[i], usage[i] = time.perf_counter() - start, ev.usage
        return handle

    for i, r in enumerate(reqs):
        engine.submit(r["prompt"], SamplingParams(max_tokens=r["max_tokens"], temperature=0,
                                                  n_loops=r["n_loops"]), on_event(i))
    engine.run_until_idle()
    # loops per position: prompt and generated tokens alike, as for the other two
    positions = [len(r["prompt"]) + r["max_tokens"] - 1 for r in reqs]
    return [done[i] for i in range(len(reqs))], [usage[i]["loops_executed"] / p for i, p in enumerate(positions)]


def percentile(xs, q):
    # "inclusive": within the data (the default extrapolates past the largest of a small sample)
    return statistics.quantiles(xs, n=100, method="inclusive")[q - 1] if len(xs) > 1 else xs[0]


def profile(model, reqs, batch: int, max_loops: int) -> dict:
    """Static batching, then the engine, with timers around the model's calls and the looped
    block's passes (a profiler's per-call overhead would weigh on the engine's Python more than
    on static batching): each mode's steps, loop-steps, seconds per pass of the looped block and
    per step for the rest (prelude, coda, head, prompts riding along, bookkeeping). From these,
    two rough bounds on the engine at this machine's costs: with the rest of its step as cheap
    as static batching's, and with a perfect packing of rows by depth (the fewest steps and
    loop-steps it would need; not reachable online)."""
    block = model.recurrent

    def measured(run) -> dict:
        spent = {"loop_s": 0.0, "loop_steps": 0, "steps": 0}
        step, forward = block._step, model.forward

        def timed_step(*args, **kwargs):
            start = time.perf_counter()
            out = step(*args, **kwargs)
            spent["loop_s"] += time.perf_counter() - start
            spent["loop_steps"] += 1
            return out

        def counted_forward(*args, **kwargs):
            spent["steps"] += 1  # one model call per step: a prefill call or a decode step
            return forward(*args, **kwargs)

        block._step, model.forward = timed_step, counted_forward  # instance attributes shadow
        try:
            with torch.no_grad():
                seconds = max(run()[0])
        finally:
            del block._step, model.forward
        return {"s": seconds, **spent, "loop_ms": 1e3 * spent["loop_s"] / spent["loop_steps"],
                "step_fixed_ms": 1e3 * (seconds - spent["loop_s"]) / spent["steps"]}

    static = measured(lambda: run_static(model, reqs, batch))
    engine = measured(lambda: run_engine(model, reqs, batch, max_loops, "depth"))
    loop_s, fixed_s = engine["loop_ms"] / 1e3, engine["step_fixed_ms"] / 1e3
    same_fixed_s = engine["steps"] * static["step_fixed_ms"] / 1e3 + engine["loop_steps"] * loop_s
    # every request's prompt rides in a step as well: a step per output token, less the first
    ideal_steps = math.ceil(sum(r["max_tokens"] for r in reqs) / batch)
    ideal_loop_steps = sum(r["n_loops"] * r["max_tokens"] for r in reqs) / batch
    ideal_s = ideal_steps * fixed_s + ideal_loop_steps * loop_s
    return {"static_s": static["s"], "engine_s": engine["s"], "engine_vs_static": static["s"] / engine["s"],
            **{f"static_{key}": static[key] for key in ("steps", "loop_steps", "loop_ms", "step_fixed_ms")},
            **{key: engine[key] for key in ("steps", "loop_steps", "loop_ms", "step_fixed_ms")},
            "same_fixed_vs_static": static["s"] / same_fixed_s,
            "ideal_steps": ideal_steps, "ideal_loop_steps": ideal_loop_steps,
            "ideal_engine_s": ideal_s, "ideal_vs_static": static["s"] / ideal_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny", choices=["tiny", "small"])
    ap.add_argument("--requests", type=int_at_least(1), default=48)
    ap.add_argument("--batch", type=int_at_least(1), default=8)
    ap.add_argument("--max-loops", type=int_at_least(2), default=16, help="depths are drawn from 2 to it")
    ap.add_argument("--threads", type=int_at_least(1), default=1, help="as mythos serve (benchmarks/threads.py)")
    ap.add_argument("--seed", type=int_at_least(0), default=0)
    ap.add_argument("--rounds", type=int_at_least(1), default=3)
    ap.add_argument("--skip-sequential", action="store_true")
    ap.add_argument("--profile", action="store_true",
                    help="instead: one timed static and engine run each, split into loop and step costs")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cfg = MythosConfig.from_preset(args.preset, halting="none")
    model = OpenMythos(cfg).eval()
    reqs = traffic(args.requests, cfg.vocab_size, args.max_loops, args.seed)
    useful = sum(r["max_tokens"] for r in reqs)
    # warm-up: one short request through each path
    run_engine(model, reqs[:2], args.batch, args.max_loops, "fifo")
    run_static(model, reqs[:2], args.batch)
    if args.profile:
        result = profile(model, reqs, args.batch, args.max_loops)
        for key, value in result.items():
            print(f"{key:<20} {value:,.2f}")
        print(json.dumps({"benchmark": "serving-profile", "preset": args.preset,
                          "requests": args.requests, "batch": args.batch, **result}))
        return
    runs = {"static": lambda: run_static(model, reqs, args.batch),
            "engine-fifo": lambda: run_engine(model, reqs, args.batch, args.max_loops, "fifo"),
            "engine": lambda: run_engine(model, reqs, args.batch, args.max_loops, "depth")}
    if not args.skip_sequential:
        runs["sequential"] = lambda: run_sequential(model, reqs)
    # the modes alternate, in an order that flips every round, so that a change in the machine's
    # load hits them alike; each round's ratios compare runs minutes apart at most
    rounds = {name: [] for name in runs}
    for i in range(args.rounds):
        for name in (list(runs) if i % 2 == 0 else list(runs)[::-1]):
            with torch.no_grad():
                done, loops = runs[name]()
            rounds[name].append({"tok_per_s": useful / max(done), "p50_s": percentile(done, 50),
                                 "p99_s": percentile(done, 99), "mean_loops": sum(loops) / len(loops),
                                 "wall_s": max(done)})
    results = {name: {key: statistics.median(r[key] for r in rs) for key in rs[0]}
               for name, rs in rounds.items()}
    for name, rs in rounds.items():
        results[name]["vs_static"] = statistics.median(
            r["tok_per_s"] / s["tok_per_s"] for r, s in zip(rs, rounds["static"], strict=True))
    print(f"{args.preset}: {args.requests} requests, prompts 8-64, outputs 8-64, n_loops 2-{args.max_loops}, "
          f"batch {args.batch}, {args.threads} threads, median of {args.rounds} rounds")
    print(f"{'mode':<12} {'tok/s':>8} {'p50 s':>8} {'p99 s':>8} {'loops':>6} {'vs static':>9}")
    for name, r in results.items():
        print(f"{name:<12} {r['tok_per_s']:>8.1f} {r['p50_s']:>8.2f} {r['p99_s']:>8.2f} "
              f"{r['mean_loops']:>6.2f} {r['vs_static']:>8.2f}x")
    print(json.dumps({"benchmark": "serving", "preset": args.preset, "requests": args.requests,
                      "batch": args.batch, "threads": args.threads, "rounds": args.rounds,
                      "results": results, "engine_vs_static": results["engine"]["vs_static"],
                      "engine_fifo_vs_static": results["engine-fifo"]["vs_static"]}))

if __name__ == "__main__":
    main()
