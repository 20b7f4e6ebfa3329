"""Serving throughput on mixed traffic: sequential `generate`, static batching and the continuous
depth-wise batching engine, side by side in one process on the same requests.

Engine rows: `engine-fifo` admits waiting requests in arrival order, `engine` (the default
policy) groups rows of like depth (see openmythos/serving/engine.py).

Traffic: every request arrives at t = 0 with its own prompt length, output length and depth
(n_loops). Static batching takes fixed batches in arrival order, left-pads them to the longest
prompt, runs every token at the batch's deepest depth and decodes until its longest output is
done. Tokens/s counts only the tokens each request asked for. Greedy decoding, halting off, so
every request does exactly the work it asked for.

    python benchmarks/serving.py [--preset tiny] [--requests 48] [--threads 2] [--rounds 3]
    python benchmarks/serving.py --profile --threads 1     # where the engine's time goes

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
    """Static batching, then the engine, each under cProfile: where the engine's time goes, and
    a rough bound on what a perfect packing of rows by depth could reach on this machine, from
    the fewest steps and loop-steps it would need and the measured cost of each."""
    import cProfile
    import pstats

    deepest = []  # loops run by each step: its deepest row's
    depths = Engine._depths

    def spy(engine, rows):
        d = depths(engine, rows)
        deepest.append(int(d.max()) if torch.is_tensor(d) else d)
        return d

    def profiled(run):
        prof = cProfile.Profile()
        with torch.no_grad():
            prof.enable()
            seconds = max(run()[0])
            prof.disable()
        return seconds, {func: (calls, cumulative) for (_, _, func), (_, calls, _, cumulative, _)
                         in pstats.Stats(prof).stats.items()}

    static_s, _ = profiled(lambda: run_static(model, reqs, batch))
    Engine._depths = spy
    try:
        engine_s, by_name = profiled(lambda: run_engine(model, reqs, batch, max_loops, "depth"))
    finally:
        Engine._depths = depths
    steps, step_s = by_name["_advance"]
    loop_s = by_name["_step"][1] / by_name["_step"][0]  # one pass of the looped block
    fixed_s = (step_s - sum(deepest) * loop_s) / steps  # the rest of a step
    # every request's prompt rides in a step as well: a step per output token, less the first
    ideal_steps = math.ceil(sum(r["max_tokens"] for r in reqs) / batch)
    ideal_loop_steps = sum(r["n_loops"] * r["max_tokens"] for r in reqs) / batch
    ideal_s = ideal_steps * fixed_s + ideal_loop_steps * loop_s
    # static batching: each batch prefills, then decodes until its longest output, every row at
    # its deepest depth (as the engine's counts, the prefill call included)
    groups = [reqs[i:i + batch] for i in range(0, len(reqs), batch)]
    static_steps = [(max(r["max_tokens"] for r in g), max(r["n_loops"] for r in g)) for g in groups]
    return {"static_s": static_s, "engine_s": engine_s, "engine_vs_static": static_s / engine_s,
            "static_steps": sum(n for n, _ in static_steps),
            "static_loop_steps": sum(n * d for n, d in static_steps),
            "steps": steps, "loop_steps": sum(deepest), "steps_s": step_s,
            "loop_ms": 1e3 * loop_s, "step_fixed_ms": 1e3 * fixed_s,
            "ideal_steps": ideal_steps, "ideal_loop_steps": ideal_loop_steps,
            "ideal_engine_s": ideal_s, "ideal_vs_static": static_s / ideal_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny", choices=["tiny", "small"])
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-loops", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--skip-sequential", action="store_true")
    ap.add_argument("--profile", action="store_true",
                    help="instead: one static and one profiled engine run, and the packing bound")
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
