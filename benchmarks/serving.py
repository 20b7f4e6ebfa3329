"""Serving throughput on mixed traffic: sequential `generate`, static batching and the continuous
depth-wise batching engine, side by side in one process on the same requests.

Traffic: every request arrives at t = 0 with its own prompt length, output length and depth
(n_loops). Static batching takes fixed batches in arrival order, left-pads them to the longest
prompt, runs every token at the batch's deepest depth and decodes until its longest output is
done. Tokens/s counts only the tokens each request asked for. Greedy decoding, halting off, so
every request does exactly the work it asked for.

    python benchmarks/serving.py [--preset tiny] [--requests 48] [--threads 2]

Prints a table and a final JSON line.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch

from openmythos import MythosConfig, OpenMythos
from openmythos.serving import Engine, SamplingParams


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


def run_engine(model, reqs, batch: int, max_loops: int):
    engine = Engine(model, max_batch=batch, max_queue=len(reqs), max_loops=max_loops,
                    max_len=model.cfg.max_seq_len)
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
    return statistics.quantiles(xs, n=100)[q - 1] if len(xs) > 1 else xs[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny", choices=["tiny", "small"])
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-loops", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-sequential", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cfg = MythosConfig.from_preset(args.preset, halting="none")
    model = OpenMythos(cfg).eval()
    reqs = traffic(args.requests, cfg.vocab_size, args.max_loops, args.seed)
    useful = sum(r["max_tokens"] for r in reqs)
    # warm-up: one short request through each path
    run_engine(model, reqs[:2], args.batch, args.max_loops)
    run_static(model, reqs[:2], args.batch)
    results = {}
    runs = {"static": lambda: run_static(model, reqs, args.batch),
            "engine": lambda: run_engine(model, reqs, args.batch, args.max_loops)}
    if not args.skip_sequential:
        runs["sequential"] = lambda: run_sequential(model, reqs)
    for name, fn in runs.items():
        with torch.no_grad():
            done, loops = fn()
        wall = max(done)
        results[name] = {"tok_per_s": useful / wall, "p50_s": percentile(done, 50),
                         "p99_s": percentile(done, 99), "mean_loops": sum(loops) / len(loops),
                         "wall_s": wall}
    print(f"{args.preset}: {args.requests} requests, prompts 8-64, outputs 8-64, n_loops 2-{args.max_loops}, "
          f"batch {args.batch}, {args.threads} threads")
    print(f"{'mode':<11} {'tok/s':>8} {'p50 s':>8} {'p99 s':>8} {'loops':>6} {'vs static':>9}")
    for name, r in results.items():
        print(f"{name:<11} {r['tok_per_s']:>8.1f} {r['p50_s']:>8.2f} {r['p99_s']:>8.2f} "
              f"{r['mean_loops']:>6.2f} {r['tok_per_s'] / results['static']['tok_per_s']:>8.2f}x")
    print(json.dumps({"benchmark": "serving", "preset": args.preset, "requests": args.requests,
                      "results": results,
                      "engine_vs_static": results["engine"]["tok_per_s"] / results["static"]["tok_per_s"]}))


if __name__ == "__main__":
    main()
