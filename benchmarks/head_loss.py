"""The output head and its loss in a training step, four ways, side by side in one process:
fp32 logits + cross-entropy, bf16 logits + fp32 cross-entropy, and the model's chunked loss
(`model(x, targets=y)`, no logits) in fp32 and with a bf16 head.

    python benchmarks/head_loss.py                 # the tiny preset, batch 8 x 256, 2 loops, 1 thread
    python benchmarks/head_loss.py --threads 2 --rounds 5

Two tables: the head alone (the tiny preset's 8192 x 256 tied head on 2048 rows, forward +
backward, including torch's default chunking for comparison), then a whole training step
(forward, loss, backward, AdamW). Modes alternate within every round; medians over rounds, and
each mode's time relative to the first. Prints the tables, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import warnings

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from openmythos import MythosConfig, OpenMythos  # noqa: E402

BF16 = torch.bfloat16


def seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def head_modes(rows: int, dim: int, vocab: int) -> dict:
    h = torch.randn(rows, dim, requires_grad=True)
    w = (torch.randn(vocab, dim) * 0.02).requires_grad_()
    y = torch.randint(0, vocab, (rows,))

    def chunked(dtype, **options):
        opts = torch.nn.LinearCrossEntropyOptions(**options)
        return lambda: F.linear_cross_entropy(h.to(dtype), w.to(dtype), y, reduction="none",
                                              options=opts).float().mean().backward()

    return {
        "fp32 logits + cross-entropy": lambda: F.cross_entropy(h @ w.T, y).backward(),
        "bf16 logits + fp32 cross-entropy":
            lambda: F.cross_entropy((h.to(BF16) @ w.to(BF16).T).float(), y).backward(),
        "chunked fp32, 256 rows": chunked(torch.float32, batch_chunk_size=256),
        "chunked bf16, torch's default chunks": chunked(BF16),
        "chunked bf16, 256 rows (the model's)": chunked(BF16, batch_chunk_size=256,
                                                        acc_policy="balanced"),
    }


def step_modes(batch: int, seq: int, loops: int) -> dict:
    torch.manual_seed(0)
    model = OpenMythos(MythosConfig.from_preset("tiny", halting="none"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, model.cfg.vocab_size, (batch, seq + 1))
    x, y = ids[:, :-1], ids[:, 1:]

    def step(loss_fn):
        def run():
            loss_fn().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return run

    def logits_loss(head_dtype):
        logits = model(x, n_loops=loops, head_dtype=head_dtype).logits
        return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())

    return {
        "fp32 logits + cross-entropy": step(lambda: logits_loss(None)),
        "bf16 logits + fp32 cross-entropy": step(lambda: logits_loss(BF16)),
        "chunked loss, fp32 head": step(lambda: model(x, n_loops=loops, targets=y).loss),
        "chunked loss, bf16 head (the trainer's on AMX)":
            step(lambda: model(x, n_loops=loops, targets=y, head_dtype=BF16).loss),
    }


def measure(modes: dict, rounds: int, repeats: int) -> dict:
    times = {name: [] for name in modes}
    for i in range(rounds):  # the modes alternate; the order flips every round
        for name in list(modes) if i % 2 == 0 else list(modes)[::-1]:
            times[name].append(seconds(modes[name], repeats))
    return {name: statistics.median(ts) for name, ts in times.items()}


def table(title: str, results: dict) -> None:
    first = next(iter(results.values()))
    print(f"\n{title}\n| mode | seconds | vs first |\n|---|---|---|")
    for name, s in results.items():
        print(f"| {name} | {s:.3f} | {first / s:.2f}x |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--loops", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", module="torch.nn")  # the chunked op's fallback notices
    cfg = MythosConfig.from_preset("tiny")
    head = measure(head_modes(args.batch * args.seq, cfg.dim, cfg.vocab_size), args.rounds,
                   args.repeats)
    step = measure(step_modes(args.batch, args.seq, args.loops), args.rounds, args.repeats)
    print(f"tiny preset, {args.batch} x {args.seq} tokens, {args.loops} loops, "
          f"{args.threads} thread(s), median of {args.rounds} rounds x {args.repeats} repeats")
    table("head alone (forward + backward)", head)
    table("whole training step (forward, loss, backward, AdamW)", step)
    print(json.dumps({"benchmark": "head_loss", "threads": args.threads, "batch": args.batch,
                      "seq": args.seq, "loops": args.loops, "head_s": head, "step_s": step}))


if __name__ == "__main__":
    main()
