"""Self-speculative decoding against plain decoding, side by side in one process: the same model
drafts at a few loops and checks the drafts at full depth (openmythos.generation.speculative_stream).

Its gain depends on how often shallow loops agree with deep ones, which only a trained model
shows: pass a checkpoint (the README's quickstart run, for one). Without one, a randomly
initialised `tiny` model is used, and the table says so. Greedy decoding of held-out text (the
corpus's validation split, or the bundled one's), one sequence, one thread by default; the two
modes alternate over the rounds, and the ratio is the median of each round's.

    python benchmarks/speculative.py --checkpoint runs/quickstart-... [--threads 1] [--rounds 3]

Prints a table and a final JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

# before torch loads OpenMP (docs/performance.md, "This machine")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from openmythos import MythosConfig, OpenMythos  # noqa: E402
from openmythos.cli import int_at_least  # noqa: E402
from openmythos.data import ByteTokenizer, load_corpus  # noqa: E402
from openmythos.generation import generate, speculative_generate  # noqa: E402
from openmythos.training import load_model  # noqa: E402


def prompts(tokenizer, corpus: str, n: int, length: int) -> list[list[int]]:
    """n prompts of `length` tokens from the validation split, spread over its documents."""
    docs = load_corpus(corpus).val
    ids = [t for d in docs for t in tokenizer.encode(d.text)]
    step = max(length, len(ids) // n)
    return [ids[i * step:i * step + length] for i in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", help="a run or checkpoint folder (default: a random tiny model)")
    ap.add_argument("--draft-loops", type=int_at_least(1), nargs="+", default=[1, 2])
    ap.add_argument("--draft-tokens", type=int_at_least(1), nargs="+", default=[2, 4, 6])
    ap.add_argument("--n-loops", type=int_at_least(1), help="full depth (default: the model's max_loop_iters)")
    ap.add_argument("--prompts", type=int_at_least(1), default=4)
    ap.add_argument("--prompt-tokens", type=int_at_least(1), default=32)
    ap.add_argument("--new-tokens", type=int_at_least(1), default=96)
    ap.add_argument("--corpus", default="sotu")
    ap.add_argument("--threads", type=int_at_least(1), default=1)
    ap.add_argument("--rounds", type=int_at_least(1), default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.checkpoint:
        model, tokenizer, _ = load_model(args.checkpoint)
    else:
        torch.manual_seed(0)
        tokenizer = ByteTokenizer()
        model = OpenMythos(MythosConfig.from_preset("tiny", vocab_size=tokenizer.vocab_size)).eval()
    n_loops = model.cfg.max_loop_iters if args.n_loops is None else args.n_loops
    texts = prompts(tokenizer, args.corpus, args.prompts, args.prompt_tokens)
    settings = [(d, k) for d in args.draft_loops for k in args.draft_tokens if d <= n_loops]
    if not settings:
        raise SystemExit(f"no --draft-loops at or below --n-loops {n_loops}: nothing to compare")

    def plain():
        return [generate(model, [p], args.new_tokens, n_loops=n_loops, temperature=0)[0].tolist()
                for p in texts]

    def speculative(d, k):
        outs, drafted, accepted = [], 0, 0
        for p in texts:
            out, stats = speculative_generate(model, [p], args.new_tokens, n_loops=n_loops,
                                              draft_loops=d, draft_tokens=k, temperature=0)
            outs.append(out[0].tolist())
            drafted, accepted = drafted + stats["drafted"], accepted + stats["accepted"]
        return outs, accepted / max(drafted, 1)

    def timed(fn):
        start = time.perf_counter()
        result = fn()
        return result, time.perf_counter() - start

    plain()  # warm-up
    tokens = args.prompts * args.new_tokens
    rows = {s: {"ratio": [], "plain_s": [], "spec_s": [], "same": True} for s in settings}
    reference = None
    for r in range(args.rounds):
        for s in settings:
            runs = [("plain", plain), ("spec", lambda s=s: speculative(*s))]
            for name, fn in (runs if r % 2 == 0 else runs[::-1]):
                result, seconds = timed(fn)
                if name == "plain":
                    reference, plain_s = result, seconds
                else:
                    (outs, acceptance), spec_s = result, seconds
            rows[s]["ratio"].append(plain_s / spec_s)
            rows[s]["plain_s"].append(plain_s)
            rows[s]["spec_s"].append(spec_s)
            # the drafts, so the acceptance, are the same every round (greedy)
            rows[s].update(acceptance=acceptance, same=rows[s]["same"] and outs == reference)
    model_name = args.checkpoint or "random-init tiny (untrained: acceptance says little)"
    print(f"model: {model_name}; n_loops {n_loops}; {args.prompts} prompts x {args.new_tokens} new "
          f"tokens, greedy, batch 1; {args.threads} thread(s), median of {args.rounds} rounds")
    print(f"{'draft loops':>11} {'draft tokens':>12} {'accepted':>9} {'plain tok/s':>12} "
          f"{'spec tok/s':>11} {'speedup':>8} {'same tokens':>12}")
    results = []
    for (d, k), row in rows.items():
        plain_tps = tokens / statistics.median(row["plain_s"])
        spec_tps = tokens / statistics.median(row["spec_s"])
        ratio = statistics.median(row["ratio"])
        print(f"{d:>11} {k:>12} {row['acceptance']:>9.2f} {plain_tps:>12.1f} {spec_tps:>11.1f} "
              f"{ratio:>7.2f}x {str(row['same']):>12}")
        results.append({"draft_loops": d, "draft_tokens": k, "acceptance": row["acceptance"],
                        "plain_tok_s": plain_tps, "spec_tok_s": spec_tps, "speedup": ratio,
                        "same_tokens": row["same"]})
    best = max(results, key=lambda r: r["speedup"])
    print(json.dumps({"benchmark": "speculative", "model": model_name, "n_loops": n_loops,
                      "threads": args.threads, "rounds": args.rounds, "results": results,
                      "best_speedup": best["speedup"], "best": [best["draft_loops"], best["draft_tokens"]]}))


if __name__ == "__main__":
    main()
