"""The optimizer step alone, side by side in one process: Muon with its Newton-Schulz iteration
in bf16 and in fp32, AdamW fused and as torch's CPU default (a loop over the tensors), on a
preset's parameters with random gradients. The basis of MuonAdamW's ns_dtype rule and of
build_optimizer's fused AdamW.

    python benchmarks/optimizer.py [--preset tiny] [--threads 1] [--rounds 10]

The variants alternate, in an order that flips every round; medians. Prints a table and a
final JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP, as the CLI does

import torch  # noqa: E402

from openmythos import MythosConfig, OpenMythos  # noqa: E402
from openmythos.training.optim import MuonAdamW, has_fast_bf16, param_groups  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny", choices=["tiny", "small"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = OpenMythos(MythosConfig.from_preset(args.preset))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    settings = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8)
    variants = {
        "muon, Newton-Schulz in bf16": MuonAdamW(param_groups(model, 0.1, muon=True), **settings,
                                                 ns_dtype=torch.bfloat16),
        "muon, Newton-Schulz in fp32": MuonAdamW(param_groups(model, 0.1, muon=True), **settings,
                                                 ns_dtype=torch.float32),
        "adamw, fused": torch.optim.AdamW(param_groups(model, 0.1), **settings, fused=True),
        "adamw, torch's CPU default": torch.optim.AdamW(param_groups(model, 0.1), **settings),
    }
    names = list(variants)
    seconds = {name: [] for name in names}
    for opt in variants.values():
        opt.step()  # warm-up: creates the state
    for i in range(args.rounds):
        for name in names if i % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            variants[name].step()
            seconds[name].append(time.perf_counter() - start)
    results = {name: 1e3 * statistics.median(s) for name, s in seconds.items()}
    fast = has_fast_bf16(torch.device("cpu"))
    print(f"{args.preset}: {args.threads} thread(s), median of {args.rounds} steps, has_fast_bf16 {fast}")
    for name, ms in results.items():
        print(f"{name:<30} {ms:>8.1f} ms")
    print(json.dumps({"benchmark": "optimizer", "preset": args.preset, "threads": args.threads,
                      "rounds": args.rounds, "has_fast_bf16": fast, "step_ms": results}))


if __name__ == "__main__":
    main()
