"""Decoding on one thread against torch's default (one per core), side by side in one process:
greedy `generate` at batch 1 and 8, and the serving engine on mixed traffic (48 requests at
batch 8, as benchmarks/serving.py). The basis of `mythos generate` and `mythos serve` running
on one thread by default (`--threads`).

    python benchmarks/threads.py [--preset tiny] [--rounds 5] [--requests 48]

The thread counts alternate, in an order that flips every round; medians. Prints a table and a
final JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

# before torch loads OpenMP, as the CLI does (spin-waiting threads on a shared CPU crawl)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from serving import run_engine, traffic  # noqa: E402  (beside this script)

from openmythos import MythosConfig, OpenMythos  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny", choices=["tiny", "small"])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--requests", type=int, default=48, help="the engine's")
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    torch.manual_seed(0)
    cfg = MythosConfig.from_preset(args.preset, halting="none")
    model = OpenMythos(cfg).eval()
    reqs = traffic(args.requests, cfg.vocab_size, 16, seed=0)
    prompts = {b: torch.randint(0, cfg.vocab_size, (b, 32)) for b in (1, 8)}
    cases = {f"generate, batch {b}": (lambda p=p: model.generate(p, args.new_tokens, temperature=0))
             for b, p in prompts.items()}
    cases[f"engine, batch 8, {args.requests} requests"] = lambda: run_engine(model, reqs, 8, 16, "depth")
    counts = sorted({1, cores})
    seconds = {case: {n: [] for n in counts} for case in cases}
    with torch.no_grad():
        for case, run in cases.items():
            run()  # warm-up
            for i in range(args.rounds):
                for n in counts if i % 2 == 0 else counts[::-1]:
                    torch.set_num_threads(n)
                    start = time.perf_counter()
                    run()
                    seconds[case][n].append(time.perf_counter() - start)
    results = {case: {f"{n}_threads_s": statistics.median(by[n]) for n in counts} for case, by in seconds.items()}
    for case, by in seconds.items():
        results[case]["default_vs_one"] = statistics.median(
            d / o for d, o in zip(by[cores], by[1], strict=True))
    print(f"{args.preset}: {cores} cores, median of {args.rounds} rounds, load average {os.getloadavg()[0]:.2f}")
    print(f"{'case':<30} {'1 thread s':>11} {f'{cores} threads s':>12} {'ratio':>6}")
    for case, r in results.items():
        print(f"{case:<30} {r['1_threads_s']:>11.3f} {r[f'{cores}_threads_s']:>12.3f} {r['default_vs_one']:>5.2f}x")
    print(json.dumps({"benchmark": "threads", "preset": args.preset, "cores": cores, "rounds": args.rounds,
                      "load_average_end": os.getloadavg()[0], "results": results}))


if __name__ == "__main__":
    main()
