"""Quality per wall-clock: the quickstart against open-mythos 0.5.0, side by side in one run.

    python benchmarks/quality_vs_open_mythos.py                  # both, the quickstart's budget
    python benchmarks/quality_vs_open_mythos.py --minutes 2      # a quick check
    python benchmarks/quality_vs_open_mythos.py --save benchmarks/results/quality_8min.json

Both train for the same wall-clock budget of training steps (the quickstart's
`train.max_minutes` unless `--minutes` is given) on the same data: the State of the Union
speeches up to 2000, with the same byte-level BPE (vocab 8192, trained once, by our run, on that
split); both are scored on every token of the 2001+ speeches, in the same consecutive windows of
256, as nats/token and bits per byte.

- **Ours** is `mythos train` itself (the quickstart recipe, every default), in a fresh process,
  with only the run directory, the budget and, with `--threads`, the thread count overridden.
- **The peer** (`open-mythos==0.5.0`, from `benchmarks/.venv-open-mythos`, made by
  `bash benchmarks/setup_open_mythos.sh`) runs in a fresh process under its own interpreter with
  the settings issue 3 gives for it: its tiny MLA config (dim 256, 4 loops; the rest as our
  `tiny` preset, which mirrors its field names and parameter count), batch 16 x 256, AdamW at
  2e-3 (torch's default betas and weight decay), gradient clipping at 1.0, 20 warmup steps, then
  a cosine to 10 % that ends exactly at the budget (the same time-following schedule the
  quickstart uses, so the peer's decay is not cut short by the clock). It keeps its own ACT
  halting (threshold 0.99), as a user of the package gets it.

Ours runs first, then the peer; each gets the same `torch.set_num_threads` (the quickstart's
`run.threads`, or `--threads`) and the same environment. The load average is recorded before and
after each, because the machine may be shared. Output: a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PEER_PYTHON = HERE / ".venv-open-mythos" / "bin" / "python"
SEQ_LEN, PEER_BATCH, PEER_LR, PEER_WARMUP = 256, 16, 2e-3, 20
DEPTHS = (1, 2, 4, 8, 16)
DEPTH_TOKENS = 65536  # validation tokens per depth, in windows spread over the split
# the peer's tiny MLA config: dim 256, 4 loops, and the rest as our `tiny` preset
PEER_CONFIG = dict(
    vocab_size=8192, dim=256, n_heads=4, n_kv_heads=4, max_seq_len=256, max_loop_iters=4,
    prelude_layers=1, coda_layers=1, attn_type="mla", kv_lora_rank=64, q_lora_rank=128,
    qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32, n_experts=8, n_shared_experts=1,
    n_experts_per_tok=2, expert_dim=128, lora_rank=8, rope_theta=10000.0, max_output_tokens=256,
)


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# --------------------------------------------------------------------------------------------
# the peer's worker: runs under the peer's interpreter, with torch, numpy and open_mythos only


def eval_windows(n_tokens: int, max_tokens: int = 0):
    """Start positions of the scored windows: every consecutive window of SEQ_LEN (the remainder
    last), or about max_tokens targets in windows spread evenly over the split, as our
    `evaluate_loss` reads them."""
    import numpy as np

    n_windows = (n_tokens - 1) // SEQ_LEN
    if max_tokens and n_windows * SEQ_LEN > max_tokens:
        picked = np.linspace(0, n_windows - 1, max(1, max_tokens // SEQ_LEN)).round()
        return [(int(i) * SEQ_LEN, SEQ_LEN) for i in picked]
    windows = [(i * SEQ_LEN, SEQ_LEN) for i in range(n_windows)]
    if n_tokens - 1 > n_windows * SEQ_LEN:
        windows.append((n_windows * SEQ_LEN, n_tokens - 1 - n_windows * SEQ_LEN))
    return windows


def peer_worker(args: argparse.Namespace) -> None:
    import numpy as np
    import torch
    import torch.nn.functional as F
    from open_mythos.main import MythosConfig, OpenMythos

    if args.threads:
        torch.set_num_threads(args.threads)
    data = Path(args.data)
    train = np.load(data / "train.npy", mmap_mode="r")
    val = np.load(data / "val.npy")
    torch.manual_seed(0)
    model = OpenMythos(MythosConfig(**PEER_CONFIG))
    opt = torch.optim.AdamW(model.parameters(), lr=PEER_LR)
    gen = torch.Generator().manual_seed(0)
    budget, step, train_time = 60 * args.minutes, 0, 0.0
    model.train()
    while train_time < budget:
        t0 = time.perf_counter()
        if step < PEER_WARMUP:
            lr = PEER_LR * (step + 1) / PEER_WARMUP
        else:
            lr = PEER_LR * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, train_time / budget))))
        for group in opt.param_groups:
            group["lr"] = lr
        starts = torch.randint(len(train) - SEQ_LEN, (PEER_BATCH,), generator=gen).numpy()
        window = torch.from_numpy(train[starts[:, None] + np.arange(SEQ_LEN + 1)].astype(np.int64))
        logits = model(window[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), window[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        train_time += time.perf_counter() - t0
        if step % 10 == 0:
            print(f"peer step {step}: loss {loss.item():.4f}, {train_time:.0f} s", flush=True)

    @torch.no_grad()
    def val_loss(n_loops: int, max_tokens: int = 0) -> float:
        model.eval()
        total, count = 0.0, 0
        windows = eval_windows(len(val), max_tokens)
        for length in sorted({n for _, n in windows}):  # the short remainder in a batch of its own
            starts = np.array([s for s, n in windows if n == length])
            for i in range(0, len(starts), PEER_BATCH):
                idx = starts[i:i + PEER_BATCH, None] + np.arange(length + 1)
                window = torch.from_numpy(val[idx].astype(np.int64))
                logits = model(window[:, :-1], n_loops=n_loops)
                total += F.cross_entropy(logits.flatten(0, 1).float(), window[:, 1:].flatten(),
                                         reduction="sum").item()
                count += window[:, 1:].numel()
        return total / count

    t0 = time.perf_counter()
    result = {
        "steps": step, "tokens_seen": step * PEER_BATCH * SEQ_LEN, "train_time_s": round(train_time, 2),
        "tok_per_s": round(step * PEER_BATCH * SEQ_LEN / train_time, 1),
        "params": sum(p.numel() for p in model.parameters()),
        "val_loss": val_loss(PEER_CONFIG["max_loop_iters"]),
        "val_n_loops": PEER_CONFIG["max_loop_iters"],
        "loss_per_depth": {str(n): val_loss(n, DEPTH_TOKENS) for n in DEPTHS},
    }
    result["eval_s"] = round(time.perf_counter() - t0, 1)
    Path(args.out).write_text(json.dumps(result))


# --------------------------------------------------------------------------------------------
# the driver: runs under our interpreter


def run_ours(out: Path, minutes: float, threads: int | None, env: dict) -> dict:
    from openmythos.training.config import load_config

    cmd = [sys.executable, "-m", "openmythos.cli", "train", "--run.out_dir", str(out),
           "--train.max_minutes", str(minutes), "--run.progress", "false"]
    if threads is not None:
        cmd += ["--run.threads", str(threads)]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"our run failed ({done.returncode}):\n{done.stderr[-4000:]}")
    summary = json.loads((out / "summary.json").read_text())
    summary["command_s"] = round(time.perf_counter() - t0, 1)
    summary["config"] = load_config(out / "config.toml").to_dict()  # as it ran, overrides included
    return summary


def run_peer(peer_python: Path, data: Path, minutes: float, threads: int | None, env: dict,
             out: Path) -> dict:
    cmd = [str(peer_python), str(Path(__file__).resolve()), "--worker", "peer", "--data",
           str(data), "--minutes", str(minutes), "--out", str(out)]
    if threads:
        cmd += ["--threads", str(threads)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=HERE)
    if done.returncode != 0:
        raise SystemExit(f"the peer's run failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(out.read_text())


def export_tokens(run_dir: Path, out: Path) -> dict:
    """The exact token streams our run trained and was scored on (its saved tokenizer applied to
    the same split), as .npy files the peer's worker reads."""
    import numpy as np

    from openmythos.data import unigram_loss
    from openmythos.training.checkpoint import open_checkpoint
    from openmythos.training.config import load_config
    from openmythos.training.trainer import prepare_data

    cfg = load_config(run_dir / "config.toml")
    data = prepare_data(cfg.data, open_checkpoint(run_dir).tokenizer())
    train, val = np.asarray(data.train.tokens), np.asarray(data.val.tokens)
    np.save(out / "train.npy", train)
    np.save(out / "val.npy", val)
    return {"tokenizer": data.tokenizer.name, "train_tokens": len(train), "val_tokens": len(val),
            "bytes_per_token": data.val.bytes_per_token,
            "unigram_loss": unigram_loss(train, val, data.tokenizer.vocab_size)}


def bpb(loss: float, bytes_per_token: float) -> float:
    return loss / math.log(2) / bytes_per_token


def table(ours: dict, peer: dict | None, data: dict, minutes: float) -> str:
    bpt = data["bytes_per_token"]
    cols = [("ours (mythos train)", ours)] + ([("open-mythos 0.5.0", peer)] if peer else [])
    rows = [
        ("training budget", lambda r: f"{minutes:g} min"),
        ("training time (s)", lambda r: f"{r['train_time_s']:.0f}"),
        ("steps", lambda r: f"{r['steps']}"),
        ("tokens seen", lambda r: f"{r['tokens_seen']:,}"),
        ("train tok/s", lambda r: f"{r['tok_per_s']:,.0f}"),
        ("parameters", lambda r: f"{r['params']:,}"),
        ("load average before / after", lambda r: " / ".join(f"{x[0]:.1f}" for x in r["load"])),
        ("val loss (nats/token)", lambda r: f"{r['val_loss']:.4f} (n_loops {r['val_n_loops']})"),
        ("**val bits/byte**", lambda r: f"**{bpb(r['val_loss'], bpt):.4f}**"),
    ]
    rows += [(f"val loss at n_loops {n}",
              lambda r, n=n: f"{r['loss_per_depth'][str(n)]:.4f}" if str(n) in r["loss_per_depth"] else "-")
             for n in DEPTHS]
    lines = ["| | " + " | ".join(name for name, _ in cols) + " |",
             "|---|" + "---|" * len(cols)]
    lines += [f"| {label} | " + " | ".join(fmt(r) for _, r in cols) + " |" for label, fmt in rows]
    uni = data["unigram_loss"]
    lines.append(f"\nunigram baseline: {uni:.4f} nats/token = {bpb(uni, bpt):.4f} bits/byte; "
                 f"{bpt:.3f} bytes/token over {data['val_tokens']:,} validation tokens")
    if peer:
        ratio = bpb(ours["val_loss"], bpt) / bpb(peer["val_loss"], bpt)
        lines.append(f"bits/byte ratio ours / peer: {ratio:.3f} "
                     f"({(1 - ratio) * 100:.1f} % lower; the target is at least 10 % lower)")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=None,
                   help="training budget for both (default: the quickstart's train.max_minutes)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads for both (default: the quickstart's run.threads, "
                        "or torch's default when that is 0)")
    p.add_argument("--peer-python", type=Path, default=PEER_PYTHON)
    p.add_argument("--skip-peer", action="store_true", help="ours only")
    p.add_argument("--keep", type=Path, default=None, help="keep the run directories here")
    p.add_argument("--save", type=Path, default=None, help="also write the JSON line here")
    p.add_argument("--worker", choices=["peer"], help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return peer_worker(args)

    sys.path.insert(0, str(ROOT))
    from openmythos.training.config import TrainConfig

    quickstart = TrainConfig()
    minutes = args.minutes if args.minutes is not None else quickstart.train.max_minutes
    if minutes <= 0:
        p.error("--minutes must be positive")
    threads = args.threads if args.threads is not None else (quickstart.run.threads or None)
    if not args.skip_peer and not args.peer_python.exists():
        p.error(f"{args.peer_python} not found: run bash benchmarks/setup_open_mythos.sh first")
    # both runs under the wait policy `mythos train` sets for itself (openmythos/cli.py)
    env = {**os.environ, "PYTHONPATH": str(ROOT),
           "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    with tempfile.TemporaryDirectory(prefix="quality-") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        load = [load_average()]
        print(f"ours: mythos train, {minutes:g} min of training ...", flush=True)
        ours = run_ours(work / "ours", minutes, args.threads, env)
        load.append(load_average())
        ours["load"] = load
        data = export_tokens(work / "ours", work)
        peer = None
        if not args.skip_peer:
            print(f"peer: open-mythos 0.5.0, {minutes:g} min of training ...", flush=True)
            load = [load_average()]
            peer = run_peer(args.peer_python, work, minutes, threads, env, work / "peer.json")
            load.append(load_average())
            peer["load"] = load
    print(table(ours, peer, data, minutes))
    bpt = data["bytes_per_token"]
    keys = ("steps", "tokens_seen", "train_time_s", "tok_per_s", "params", "val_loss",
            "val_n_loops", "loss_per_depth", "load")
    record = {
        "benchmark": "quality_vs_open_mythos", "started": started, "minutes": minutes,
        "threads": threads or "torch default", "cpus": os.cpu_count(),
        "omp_wait_policy": env["OMP_WAIT_POLICY"], **data,
        "ours": {**{k: ours[k] for k in keys}, "val_bpb": bpb(ours["val_loss"], bpt),
                 "command_s": ours["command_s"], "config": ours["config"]},
    }
    if peer:
        record["peer"] = {**{k: peer[k] for k in keys}, "val_bpb": bpb(peer["val_loss"], bpt),
                          "config": PEER_CONFIG, "batch": [PEER_BATCH, SEQ_LEN], "lr": PEER_LR}
        record["bpb_ratio"] = record["ours"]["val_bpb"] / record["peer"]["val_bpb"]
    line = json.dumps(record)
    print(line)
    if args.save:
        args.save.parent.mkdir(parents=True, exist_ok=True)
        args.save.write_text(line + "\n")


if __name__ == "__main__":
    main()
