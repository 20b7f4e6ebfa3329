"""The GPU run of the performance issue, as one prepared script: bf16 training, prefill and decode
speed with model FLOPs utilisation, on the medium config and on the 1b preset at fewer loops.

    python3 benchmarks/gpu.py --out "$OUT/gpu.jsonl"       # on a CUDA device (~5 min on an H200)
    python3 benchmarks/gpu.py --models medium-mla --repeats 5
    python3 benchmarks/gpu.py --device cpu --smoke          # the same code on a toy model

- **Training**: the trainer's step (forward, the chunked head + cross-entropy, backward) and a
  fused AdamW step under bf16 autocast (fp32 parameters and optimizer state), halting off so
  that every loop runs.
- **Attention**: every forward runs under `sdpa_kernel(FLASH_ATTENTION)`, so a shape the flash
  kernel cannot take raises instead of silently falling back to the math kernel (training and
  prefill; a decode step's single query attends through the kernel SDPA picks).
- **MFU**: tokens/s x `cfg.flops_per_token(seq_len)` against the `--peak-tflops` figure (790, the
  issue's H200 bf16 figure) and against a bf16 matmul peak measured in the same run.
- **Prefill and decode** in bf16 weights and cache; decode: a 32-token prompt, then greedy
  tokens at batch 1 and 8, `n_loops = max_loop_iters`.
- **Memory**: the device's peak allocation in the training section (peak RSS on the CPU).

Each model's numbers are printed (and appended to `--out`) as one JSON line as soon as it is done,
and a section that fails records its error instead of its numbers, so a failure or a time limit
keeps what was measured before it. Then a table, and one JSON line with everything.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.speed import MEDIUM, peak_rss_mb  # noqa: E402
from openmythos import MythosConfig, OpenMythos  # noqa: E402
from openmythos.generation import stream  # noqa: E402

MODELS = {  # name -> (config, training batch, sequence length)
    "medium-mla": (MythosConfig(**MEDIUM, halting="none"), 64, 256),
    "medium-gqa": (MythosConfig(**{**MEDIUM, "attn_type": "gqa", "n_kv_heads": 2},
                                halting="none"), 64, 256),
    # the 1b preset with 4 loops instead of 16, which fits one GPU with room to spare
    "1b-4loops": (MythosConfig.from_preset("1b", max_loop_iters=4, halting="none"), 8, 2048),
}
SMOKE = (MythosConfig(vocab_size=256, dim=64, n_heads=4, n_kv_heads=4, max_seq_len=128,
                      max_loop_iters=2, n_experts=4, n_experts_per_tok=2, expert_dim=32,
                      kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8,
                      v_head_dim=8, halting="none"), 2, 32)
PROMPT = 32


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn, device: torch.device, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_mb(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else peak_rss_mb()


def matmul_tflops(device: torch.device, n: int, repeats: int) -> float:
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    return 2 * n ** 3 / median_seconds(lambda: a @ b, device, 2, repeats) / 1e12


def measure(cfg: MythosConfig, batch: int, seq: int, device: torch.device, args) -> dict:
    torch.manual_seed(0)
    model = OpenMythos(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device=device)
    flops = cfg.flops_per_token(seq_len=seq)
    out = {"params": sum(p.numel() for p in model.parameters()),
           "active_params": cfg.active_params_per_token(), "batch": batch, "seq_len": seq,
           "n_loops": cfg.max_loop_iters, "errors": {}}

    def section(name: str, run) -> None:  # a failure is recorded, and the next section runs
        try:
            run()
        except Exception as e:  # noqa: BLE001 -- an OOM or a kernel refusal must not lose the rest
            out["errors"][name] = f"{type(e).__name__}: {e}"
            traceback.print_exc()

    def train_step():  # the trainer's step: the loss from the head in chunks, no logits
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(ids[:, :-1], targets=ids[:, 1:], head_dtype=torch.bfloat16).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def train():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            reset_peak(device)
            out["train_tok_s"] = batch * seq / median_seconds(train_step, device, args.warmup, args.repeats)
            out["train_peak_mb"] = peak_mb(device)
        out["train_tflops"] = out["train_tok_s"] * flops / 1e12
        out["mfu_vs_nominal"] = out["train_tflops"] / args.peak_tflops

    section("train", train)
    opt.state.clear()
    section("bf16", lambda: model.to(torch.bfloat16).eval())  # inference: bf16 weights and cache, in place
    if "bf16" in out["errors"]:
        return out

    def prefill():
        cache = model.new_cache(batch, seq)

        def step():  # as generate's prefill: the head on the last position only
            model(ids[:, :-1], cache=cache, logits_to_keep=1)
            cache.rewind(seq)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            out["prefill_tok_s"] = batch * seq / median_seconds(step, device, args.warmup, args.repeats)

    def decode(b: int):  # one query per step: SDPA picks its kernel (MLA decode reads the latent)
        prompt = ids[:, :PROMPT].repeat(-(-b // batch), 1)[:b]  # b rows, whatever the batch
        dt = median_seconds(lambda: list(stream(model, prompt, args.new_tokens, temperature=0)),
                            device, 1, args.repeats)
        out[f"decode_b{b}_tok_s"] = b * args.new_tokens / dt  # whole calls, prompt included

    with torch.no_grad():
        section("prefill", prefill)
        for b in (1, 8):
            section(f"decode_b{b}", lambda b=b: decode(b))
    return out


def report(line: dict, out_path: str | None) -> None:
    """One JSON line, printed and appended to out_path at once: a later failure keeps it."""
    text = json.dumps(line)
    print(text, flush=True)
    if out_path:
        with open(out_path, "a", encoding="utf-8") as f:
            f.write(text + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated: {list(MODELS)}")
    ap.add_argument("--smoke", action="store_true", help="one toy model, for testing the script")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--peak-tflops", type=float, default=790.0)
    ap.add_argument("--matmul-n", type=int, default=8192)
    ap.add_argument("--out", help="append each model's JSON line to this file as it finishes")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda but CUDA is not available; use --device cpu --smoke to test the script")
    models = {"smoke": SMOKE} if args.smoke else {}
    for name in [] if args.smoke else args.models.split(","):
        if name not in MODELS:
            sys.exit(f"--models: unknown model {name!r}; choose from {list(MODELS)}")
        models[name] = MODELS[name]
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    measured_peak = matmul_tflops(device, 256 if args.smoke else args.matmul_n, args.repeats)
    report({"device": device_name, "torch": torch.__version__, "peak_tflops_measured": measured_peak}, args.out)
    results = {}
    for name, (cfg, b, t) in models.items():
        try:
            results[name] = r = measure(cfg, b, t, device, args)
        except Exception as e:  # noqa: BLE001 -- building the model failed (e.g. out of memory)
            traceback.print_exc()
            results[name] = r = {"errors": {"build": f"{type(e).__name__}: {e}"}}
        if "train_tflops" in r:
            r["mfu_vs_measured"] = r["train_tflops"] / measured_peak
        report({"model": name, **r}, args.out)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    print(f"{device_name}, torch {torch.__version__}, bf16 autocast, flash SDPA; bf16 matmul peak "
          f"measured {measured_peak:.0f} TFLOP/s, nominal {args.peak_tflops:.0f}")
    cols = ["params", "active_params", "batch", "seq_len", "n_loops", "train_tok_s", "train_tflops",
            "mfu_vs_nominal", "mfu_vs_measured", "train_peak_mb", "prefill_tok_s",
            "decode_b1_tok_s", "decode_b8_tok_s"]
    print("| measure | " + " | ".join(results) + " |")
    print("|---" * (len(results) + 1) + "|")
    for col in cols:
        cells = ["-" if col not in r else f"{r[col]:.1%}" if col.startswith("mfu") else f"{r[col]:,.1f}"
                 if isinstance(r[col], float) else f"{r[col]:,}" for r in results.values()]
        print(f"| {col} | " + " | ".join(cells) + " |")
    print(json.dumps({"benchmark": "gpu", "device": device_name, "torch": torch.__version__,
                      "peak_tflops_nominal": args.peak_tflops,
                      "peak_tflops_measured": measured_peak, "results": results}))


if __name__ == "__main__":
    main()
