"""Speed and memory benchmark: OpenMythos against the earlier public implementation.

    python benchmarks/speed.py                                   # core sections, all four configs
    python benchmarks/speed.py --vs-open-mythos                  # ... side by side with open-mythos 0.5.0
    python benchmarks/speed.py --configs medium --attn mla --sections halting,memory,compile

Every measurement runs in a fresh worker process (`--worker`), so peak RSS belongs to one
section of one model, and with `--vs-open-mythos` the two implementations alternate process by
process (the order flips every round). The peer runs from its own virtualenv, made by
`benchmarks/setup_open_mythos.sh`; its act_threshold is infinite so that it never halts, and
ours runs with halting="none": both run every loop. Timings are medians over `--repeats` runs
after `--warmup`; the fp32 and bf16 matmul peaks are measured in the same run, before and after
the models, and MFU uses the higher (the peak). The output is a table and a final JSON line.

Sections (`--sections`, comma-separated, or `all`):
  train      forward + cross-entropy + backward + AdamW step, batch 8 x 256, every loop runs
  bf16       the same step under torch.autocast(cpu, bfloat16)
  prefill    batch 8 x 256 into a fresh KV cache, no grad
  decode     a 32-token prompt then 64 greedy tokens at batch 1 and 8, n_loops = max_loop_iters;
             tokens/s counts the 63 single-token steps after the prompt
  decode_compiled  the same, ours with the whole decode step compiled (compile_decode, inductor),
             the peer eager as shipped (it has no compiled decode)
  train_compiled   the train step, ours with its blocks and loop body compiled (compile_blocks,
             inductor), the peer eager as shipped (it has no compiled path)
  kv         KV-cache bytes per token, measured from each implementation's cache
  halting    ours only: ACT on, threshold -> mean loops -> tokens/s (prefill, batch-8 decode)
  memory     ours only: peak training memory against n_loops, plain / per-loop checkpointing /
             truncated backprop
  compile    ours only: eager against torch.compile of the transformer blocks and loop body
  cachepolicy ours only: decode speed and cache size of the "ring" KV policy
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PEER_PYTHON = HERE / ".venv-open-mythos" / "bin" / "python"

# Field names and values shared with open-mythos 0.5.0 (the two sizes).
SMALL = dict(
    vocab_size=1000, dim=256, n_heads=8, max_seq_len=256, max_loop_iters=4, prelude_layers=1,
    coda_layers=1, n_experts=8, n_shared_experts=1, n_experts_per_tok=2, expert_dim=64,
    lora_rank=8, attn_type="mla", kv_lora_rank=32, q_lora_rank=64, qk_rope_head_dim=16,
    qk_nope_head_dim=16, v_head_dim=16, n_kv_heads=8,
)
MEDIUM = dict(
    SMALL, dim=512, max_loop_iters=8, n_experts=16, expert_dim=256, kv_lora_rank=64,
    q_lora_rank=128, qk_rope_head_dim=32, qk_nope_head_dim=32, v_head_dim=32,
)
CONFIGS = {"small": SMALL, "medium": MEDIUM}
ATTN = {"mla": dict(attn_type="mla"), "gqa": dict(attn_type="gqa", n_kv_heads=2)}

TRAIN_B, TRAIN_T = 8, 256
PREFILL_B, PREFILL_T = 8, 256
PROMPT, NEW_TOKENS = 32, 64
CORE_SECTIONS = ("train", "train_compiled", "bf16", "prefill", "decode", "decode_compiled", "kv")
OURS_ONLY = ("halting", "memory", "compile", "cachepolicy")


def config_dict(name: str, attn: str) -> dict:
    return {**CONFIGS[name], **ATTN[attn]}


# --------------------------------------------------------------------------------------------
# worker side: runs under either interpreter, so it imports only torch until it builds a model


class Model:
    """One interface over both implementations: train step, prefill, greedy decode."""

    def __init__(self, impl: str, cfg: dict, **ours_overrides):
        import torch

        self.impl = impl
        torch.manual_seed(0)
        if impl == "ours":
            sys.path.insert(0, str(ROOT))
            from openmythos import MythosConfig, OpenMythos

            self.cfg = MythosConfig(**{"halting": "none", **cfg, **ours_overrides})
            self.net = OpenMythos(self.cfg)
        else:
            from open_mythos.main import MythosConfig, OpenMythos

            # an infinite threshold: cumulative_p + p >= threshold never holds, so it never halts
            self.cfg = MythosConfig(**cfg, act_threshold=float("inf"))
            self.net = OpenMythos(self.cfg)
        self.loops = self.cfg.max_loop_iters

    @classmethod
    def wrap(cls, net, loops: int | None = None) -> Model:
        """One of our models built elsewhere (the ours-only sections)."""
        m = cls.__new__(cls)
        m.impl, m.net, m.cfg = "ours", net, net.cfg
        m.loops = loops or net.cfg.max_loop_iters
        return m

    def n_params(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.net.parameters()}.values())

    def logits(self, ids, n_loops=None):
        out = self.net(ids, n_loops=n_loops or self.loops)
        return out if self.impl == "peer" else out.logits

    def prefill(self, ids):
        if self.impl == "ours":
            cache = self.net.new_cache(ids.shape[0], ids.shape[1])
            return self.net(ids, n_loops=self.loops, cache=cache).logits, cache
        cache: dict = {}
        return self.net(ids, n_loops=self.loops, kv_cache=cache, start_pos=0), cache

    def decode(self, prompt, new_tokens: int) -> float:
        """Greedy decoding; returns the seconds of the new_tokens - 1 single-token steps."""
        import torch

        if self.impl == "ours":
            from openmythos.generation import stream

            it = stream(self.net, prompt, new_tokens, n_loops=self.loops, temperature=0)
            next(it)  # the prompt's forward pass
            t0 = time.perf_counter()
            for _ in it:
                pass
            return time.perf_counter() - t0
        with torch.no_grad():
            cache: dict = {}
            logits = self.net(prompt, n_loops=self.loops, kv_cache=cache, start_pos=0)
            tok = logits[:, -1].argmax(-1, keepdim=True)
            pos = prompt.shape[1]
            t0 = time.perf_counter()
            for _ in range(new_tokens - 1):
                logits = self.net(tok, n_loops=self.loops, kv_cache=cache, start_pos=pos)
                tok = logits[:, -1].argmax(-1, keepdim=True)
                pos += 1
            return time.perf_counter() - t0


def timed(fn, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    """VmHWM: the peak resident set since the start or the last reset_peak_rss()."""
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1)) / 1024


def reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def register_missing_flop_formulas() -> None:
    """torch's FLOP counter has no formula for the CPU attention kernel nor for grouped mm."""
    import torch
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten

    def sdpa_cpu(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
        b, h, t, d = query_shape
        s, dv = key_shape[-2], value_shape[-1]
        return 2 * b * h * t * s * (d + dv)

    def sdpa_cpu_bwd(grad_out_shape, query_shape, key_shape, value_shape, *a, out_shape=None, **k):
        return 2 * sdpa_cpu(query_shape, key_shape, value_shape)

    def grouped_mm(a_shape, b_shape, *args, out_shape=None, **kwargs):
        # a 2-D operand's rows each belong to one group (the forward, and the weight gradient
        # (K, M) x (M, N) -> (E, K, N)): 2 x M x K x N in all; 3-D x 3-D is a plain batched mm
        return 2 * a_shape[0] * a_shape[1] * b_shape[-1] if len(a_shape) == 2 else \
            2 * math.prod(out_shape) * a_shape[-1]

    extra = {
        "_scaled_dot_product_flash_attention_for_cpu": sdpa_cpu,
        "_scaled_dot_product_flash_attention_for_cpu_backward": sdpa_cpu_bwd,
        "_grouped_mm": grouped_mm,
    }
    for name, formula in extra.items():
        op = getattr(aten, name, None)
        if op is not None and op not in fc.flop_registry:
            fc.register_flop_formula(op)(formula)


def train_step_fn(model: Model, ids, amp: bool):
    import torch
    import torch.nn.functional as F

    model.net.train()
    opt = torch.optim.AdamW(model.net.parameters(), lr=1e-4, fused=True)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            logits = model.logits(ids)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), ids.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def section_train(model: Model, args, amp: bool = False) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    ids = torch.randint(0, model.cfg.vocab_size, (TRAIN_B, TRAIN_T))
    step = train_step_fn(model, ids, amp)
    times = timed(step, args.warmup, args.repeats)
    register_missing_flop_formulas()
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    dt = statistics.median(times)
    return dict(tok_s=TRAIN_B * TRAIN_T / dt, step_s=dt, times=times,
                counted_flops_per_step=counter.get_total_flops())


def section_train_compiled(model: Model, args) -> dict:
    """Ours with `compile_blocks()` (inductor), the step otherwise as in `train`; the peer has no
    compiled path and trains eagerly, as in `train`. Compilation happens in the warm-up runs."""
    if model.impl == "peer":
        return section_train(model, args)
    import torch

    model.net.compile_blocks()
    step = train_step_fn(model, torch.randint(0, model.cfg.vocab_size, (TRAIN_B, TRAIN_T)), False)
    times = timed(step, max(args.warmup, 2), args.repeats)
    dt = statistics.median(times)
    return dict(tok_s=TRAIN_B * TRAIN_T / dt, step_s=dt, times=times)


def section_prefill(model: Model, args) -> dict:
    import torch

    model.net.eval()
    ids = torch.randint(0, model.cfg.vocab_size, (PREFILL_B, PREFILL_T))
    with torch.no_grad():
        times = timed(lambda: model.prefill(ids), args.warmup, args.repeats)
    return dict(tok_s=PREFILL_B * PREFILL_T / statistics.median(times), times=times)


def section_decode(model: Model, args, batches=(1, 8), warmup: int | None = None) -> dict:
    import torch

    model.net.eval()
    warmup = args.warmup if warmup is None else warmup
    out = {}
    for B in batches:
        prompt = torch.randint(0, model.cfg.vocab_size, (B, PROMPT))
        times = [model.decode(prompt, NEW_TOKENS) for _ in range(warmup + args.repeats)]
        times = times[warmup:]
        out[f"b{B}"] = dict(tok_s=B * (NEW_TOKENS - 1) / statistics.median(times), times=times)
    return out


def section_decode_compiled(model: Model, args) -> dict:
    """Ours with the whole decode step compiled (`compile_decode()`, inductor); the peer has no
    such path and decodes eagerly, as in `decode`. Each batch size compiles afresh in its
    warm-up run (static shapes), so no timed run includes compilation."""
    if model.impl == "peer":
        return section_decode(model, args)
    import torch._dynamo

    out = {}
    for B in (1, 8):
        torch._dynamo.reset()
        model.net.compile_decode(**({"options": json.loads(args.compile_options)} if args.compile_options else {}))
        out.update(section_decode(model, args, batches=(B,), warmup=max(args.warmup, 1)))
    return out


def section_kv(model: Model, args) -> dict:
    import torch

    model.net.eval()
    B, T = 2, 16
    with torch.no_grad():
        _, cache = model.prefill(torch.randint(0, model.cfg.vocab_size, (B, T)))
    if model.impl == "ours":
        total = cache.nbytes() * T / cache.max_len  # preallocated for max_len = T
    else:
        total = sum(t.numel() * t.element_size() for d in cache.values() for t in d.values())
    layers = model.cfg.prelude_layers + model.cfg.coda_layers + model.loops
    per_tok = total / (B * T)
    return dict(bytes_per_token=per_tok, bytes_per_token_layer=per_tok / layers, layers=layers)


def worker(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    if args.section == "peak":
        return {d: matmul_peak(args.threads, d) for d in ("float32", "bfloat16")}
    cfg = config_dict(args.config, args.attn)
    fn = {
        "train": section_train, "bf16": lambda m, a: section_train(m, a, amp=True),
        "prefill": section_prefill, "decode": section_decode, "kv": section_kv,
        "decode_compiled": section_decode_compiled, "train_compiled": section_train_compiled,
        "halting": section_halting, "memory": section_memory, "compile": section_compile,
        "cachepolicy": section_cachepolicy,
    }[args.section]
    if args.section == "memory":
        return fn(cfg, args)
    model = Model(args.impl, cfg)
    result = fn(model, args)
    result.update(n_params=model.n_params(), peak_rss_mb=peak_rss_mb(), torch=torch.__version__)
    return result


# ---- ours-only sections


def section_halting(model: Model, args) -> dict:
    """ACT on, at forced halting levels. A halting unit with zero weights and bias b gives every
    token p = sigmoid(b), so all of them stop after the same k loops ("uniform"). A halting unit
    with large random weights gives p near 0 or 1 per token, and the bias picks the fraction f
    that stops after one loop while the rest run every loop ("mixed": ragged rows)."""
    import torch

    from openmythos import OpenMythos

    base_cfg = model.cfg
    L = base_cfg.max_loop_iters
    out: dict = {"rows": []}
    ids = torch.randint(0, base_cfg.vocab_size, (PREFILL_B, PREFILL_T))
    prompt = torch.randint(0, base_cfg.vocab_size, (8, PROMPT))

    def measure(net, label, loops_run=None, **info):
        m = Model.wrap(net.eval(), loops_run)
        seen: list[tuple[int, float]] = []  # (new tokens, mean loops) of every forward pass
        hook = net.register_forward_hook(
            lambda mod, a, o: seen.append((a[0].shape[1], float(o.loops.float().mean()))))
        with torch.no_grad():
            p_times = timed(lambda: m.prefill(ids), args.warmup, args.repeats)
        p_loops = [lp for t, lp in seen if t > 1]
        seen.clear()
        d_times = [m.decode(prompt, NEW_TOKENS) for _ in range(args.warmup + args.repeats)]
        hook.remove()
        d_loops = [lp for t, lp in seen if t == 1]
        row = dict(label=label, **info, prefill_mean_loops=statistics.mean(p_loops),
                   prefill_tok_s=PREFILL_B * PREFILL_T / statistics.median(p_times),
                   decode_mean_loops=statistics.mean(d_loops),
                   decode8_tok_s=8 * (NEW_TOKENS - 1) / statistics.median(d_times[args.warmup:]))
        out["rows"].append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)

    def act_net(threshold, weight_std):
        torch.manual_seed(0)
        net = OpenMythos(base_cfg.replace(halting="act", act_threshold=threshold))
        with torch.no_grad():
            torch.nn.init.normal_(net.recurrent.act.halt.weight, std=weight_std)
        return net

    # halting off at full depth and at one loop: the linear cost model t(l) = fixed + l * per_loop
    for n in (L, 1):
        torch.manual_seed(0)
        measure(OpenMythos(base_cfg.replace(halting="none")), f"halting off, n_loops={n}",
                loops_run=n, threshold=None, halt_bias=None)
    threshold = 0.99
    for k in sorted({1, 2, L // 2, L - 1, L} - {0}):
        net = act_net(threshold, 0.0)
        p = min(threshold / k + 1e-3, 0.999)  # crosses the threshold at loop k exactly
        with torch.no_grad():
            net.recurrent.act.halt.bias.fill_(math.log(p / (1 - p)))
        measure(net, f"uniform: every token stops after {k}", threshold=threshold,
                halt_bias=math.log(p / (1 - p)))
    for frac in (0.25, 0.5, 0.75):
        net = act_net(threshold, 30.0 / math.sqrt(base_cfg.dim))
        logits: list = []
        hook = net.recurrent.act.register_forward_hook(
            lambda mod, a, o, seen=logits: seen.append(mod.halt(a[0]).detach().flatten()))
        with torch.no_grad():
            net(ids, n_loops=1)
        hook.remove()
        bias = -float(torch.quantile(logits[0], 1 - frac))
        with torch.no_grad():
            net.recurrent.act.halt.bias.fill_(bias)
        measure(net, f"mixed: {frac:.0%} stop after 1, the rest run on", threshold=threshold,
                halt_bias=bias)
    full, one = out["rows"][0], out["rows"][1]
    for row in out["rows"]:
        for kind, key in (("prefill", "prefill_tok_s"), ("decode", "decode8_tok_s")):
            loops = row[f"{kind}_mean_loops"]
            t_full, t_one, t = 1 / full[key], 1 / one[key], 1 / row[key]
            per_loop = (t_full - t_one) / (L - 1)
            ideal = t_one + (loops - 1) * per_loop  # seconds per token if cost ~ loops run
            # the share of the skipped loops' time that was really saved (1 = proportional)
            row[f"{kind}_saving_vs_ideal"] = (t_full - t) / (t_full - ideal) if loops < L - 0.05 \
                else None
            row[f"{kind}_time_ratio"] = t / t_full
    return out


def section_memory(cfg: dict, args) -> dict:
    """Peak resident memory of one training step at each depth, in a fresh process per point."""
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(ROOT))
    from openmythos import MythosConfig, OpenMythos

    n_loops, mode = args.mem_loops, args.mem_mode
    mc = MythosConfig(**{**cfg, "halting": "none", "max_seq_len": TRAIN_T})
    torch.manual_seed(0)
    net = OpenMythos(mc).train()
    if mode == "checkpoint":
        net.enable_activation_checkpointing()
    backprop = args.mem_backprop if mode == "truncated" else None
    ids = torch.randint(0, mc.vocab_size, (TRAIN_B, TRAIN_T))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=True)

    def step():
        out = net(ids, n_loops=n_loops, backprop_loops=backprop)
        F.cross_entropy(out.logits.flatten(0, 1), ids.flatten()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # optimizer state exists from here on
    base = rss_mb()
    reset_peak_rss()
    t0 = time.perf_counter()
    step()
    dt = time.perf_counter() - t0
    return dict(n_loops=n_loops, mode=mode, backprop_loops=backprop, base_rss_mb=base,
                peak_rss_mb=peak_rss_mb(), step_peak_mb=peak_rss_mb() - base, step_s=dt)


def section_compile(model: Model, args) -> dict:
    """Eager against `compile_blocks()` (inductor): train step, prefill, decode at batch 1 and 8,
    the compile time, the largest output difference and the graph breaks."""
    import torch
    import torch._dynamo

    # train, prefill and four decode shapes are legitimately different graphs
    torch._dynamo.config.recompile_limit = 64
    ids = torch.randint(0, model.cfg.vocab_size, (TRAIN_B, TRAIN_T))
    net = model.net

    def measure(tag: str) -> dict:
        step = train_step_fn(model, ids, amp=False)
        r = {f"train_{tag}_tok_s": TRAIN_B * TRAIN_T / statistics.median(
            timed(step, args.warmup, args.repeats))}
        net.eval()
        with torch.no_grad():
            r[f"prefill_{tag}_tok_s"] = PREFILL_B * PREFILL_T / statistics.median(
                timed(lambda: model.prefill(ids), args.warmup, args.repeats))
        for B in (1, 8):
            prompt = torch.randint(0, model.cfg.vocab_size, (B, PROMPT))
            times = [model.decode(prompt, NEW_TOKENS) for _ in range(args.warmup + args.repeats)]
            r[f"decode_b{B}_{tag}_tok_s"] = B * (NEW_TOKENS - 1) / statistics.median(
                times[args.warmup:])
        return r

    result = measure("eager")
    net.eval()
    with torch.no_grad():
        ref = net(ids).logits
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    net.compile_blocks()
    t0 = time.perf_counter()
    with torch.no_grad():
        same = net(ids).logits
    result["first_call_s"] = time.perf_counter() - t0
    result["max_abs_diff"] = float((same - ref).abs().max())
    result["max_abs_logit"] = float(ref.abs().max())
    result.update(measure("compiled"))
    result["graph_breaks"] = dict(counters["graph_break"])
    result["unique_graphs"] = counters["stats"]["unique_graphs"]
    for k in ("train", "prefill", "decode_b1", "decode_b8"):
        result[f"{k}_speedup"] = result[f"{k}_compiled_tok_s"] / result[f"{k}_eager_tok_s"]
    return result


def section_cachepolicy(model: Model, args) -> dict:
    """Cache bytes and batch-8 decode speed of each KV-cache policy on the benchmark config and,
    with --checkpoint, each policy's held-out loss when a trained model decodes token by token
    through the cache (the per-loop policy equals the full forward pass exactly)."""
    import torch

    from openmythos import OpenMythos

    policies = (("per_loop", None), ("ring", 1), ("ring", 2))
    prompt = torch.randint(0, model.cfg.vocab_size, (8, PROMPT))
    rows = []
    for policy, ring in policies:
        over = dict(kv_cache_policy=policy, **({"kv_cache_ring": ring} if ring else {}))
        torch.manual_seed(0)
        net = OpenMythos(model.cfg.replace(**over)).eval()
        m = Model.wrap(net)
        times = [m.decode(prompt, NEW_TOKENS) for _ in range(args.warmup + args.repeats)]
        rows.append(dict(policy=policy, ring=ring,
                         bytes_per_token=net.new_cache(1, 16).nbytes() / 16,
                         decode8_tok_s=8 * (NEW_TOKENS - 1) / statistics.median(times[args.warmup:])))
    out: dict = {"rows": rows}
    if args.checkpoint:
        out["quality"] = cache_policy_quality(args.checkpoint, policies)
    return out


def cache_policy_quality(checkpoint: str, policies, batch: int = 8, width: int = 192,
                         prefix: int = 32) -> dict:
    """Held-out next-token loss of a trained model decoding `width - prefix` tokens one at a time
    after a `prefix`-token prompt, through the cache of each policy."""
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(ROOT))
    from openmythos import OpenMythos
    from openmythos.data.corpus import load_corpus
    from openmythos.training.checkpoint import load_model

    trained, tokenizer, train_cfg = load_model(checkpoint)
    val = load_corpus(train_cfg.data.corpus).val
    stream = [t for doc in val for t in tokenizer.encode(doc.text)]
    ids = torch.tensor(stream[:batch * width]).view(batch, width)
    result = {"checkpoint": str(checkpoint), "n_loops": trained.cfg.max_loop_iters,
              "scored_tokens": batch * (width - prefix - 1), "rows": []}
    with torch.no_grad():
        full = trained(ids).logits
        ref = F.cross_entropy(full[:, prefix:-1].flatten(0, 1), ids[:, prefix + 1:].flatten())
        result["full_forward_loss"] = float(ref)
        for policy, ring in policies:
            over = dict(kv_cache_policy=policy, **({"kv_cache_ring": ring} if ring else {}))
            net = OpenMythos(trained.cfg.replace(**over)).eval()
            net.load_state_dict(trained.state_dict())
            cache = net.new_cache(batch, width)
            net(ids[:, :prefix], cache=cache)
            logits = torch.cat([net(ids[:, i:i + 1], cache=cache).logits
                                for i in range(prefix, width - 1)], dim=1)
            loss = F.cross_entropy(logits.flatten(0, 1), ids[:, prefix + 1:].flatten())
            agree = (logits.argmax(-1) == full[:, prefix:-1].argmax(-1)).float().mean()
            result["rows"].append(dict(policy=policy, ring=ring, loss=float(loss),
                                       loss_increase=float(loss - ref),
                                       top1_agreement_with_full=float(agree),
                                       cache_bytes_per_token=cache.nbytes() / (batch * width)))
            print(json.dumps(result["rows"][-1]), file=sys.stderr, flush=True)
    return result


# --------------------------------------------------------------------------------------------
# driver side


def matmul_peak(threads: int, dtype_name: str, n: int = 2048, reps: int = 10) -> float:
    """GFLOP/s of the best of `reps` (n x n) @ (n x n) products."""
    import torch

    torch.set_num_threads(threads)
    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    torch.mm(a, b)
    best = min(timed(lambda: torch.mm(a, b), 1, reps))
    return 2 * n ** 3 / best / 1e9


def run_worker(impl: str, config: str, attn: str, section: str, args, **extra) -> dict:
    python = sys.executable if impl == "ours" else str(args.peer_python)
    cmd = [python, str(Path(__file__).resolve()), "--worker", impl, "--configs", config,
           "--attn", attn, "--sections", section, "--threads", str(args.threads),
           "--warmup", str(args.warmup), "--repeats", str(args.repeats)]
    if args.checkpoint:
        cmd += ["--checkpoint", args.checkpoint]
    if args.compile_options:
        cmd += ["--compile-options", args.compile_options]
    for k, v in extra.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": ""}
    if args.omp_wait_policy:
        env["OMP_WAIT_POLICY"] = args.omp_wait_policy
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(ROOT))
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-8:]
        return {"error": "\n".join(tail)}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def merge_rounds(results: list[dict]) -> dict:
    """Median over rounds of every numeric leaf, every round's items for a list of floats (the
    timings behind the medians), the first round's value for the rest."""
    good = [r for r in results if "error" not in r]
    if not good:
        return results[0]

    def merge(values):
        if isinstance(values[0], dict):
            return {k: merge([v[k] for v in values]) for k in values[0]}
        if isinstance(values[0], (int, float)) and not isinstance(values[0], bool):
            return statistics.median(values)
        if isinstance(values[0], list) and all(isinstance(x, float) for v in values for x in v):
            return [x for v in values for x in v]
        return values[0]

    return merge(good)


def fmt(x, unit="") -> str:
    if x is None:
        return "-"
    return f"{x:,.0f}{unit}" if abs(x) >= 100 else f"{x:.3g}{unit}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="small,medium")
    p.add_argument("--attn", default="mla,gqa")
    p.add_argument("--sections", default=",".join(CORE_SECTIONS))
    p.add_argument("--vs-open-mythos", action="store_true")
    p.add_argument("--peer-python", type=Path, default=PEER_PYTHON)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rounds", type=int, default=1, help="process rounds per measurement")
    p.add_argument("--omp-wait-policy", default="PASSIVE",
                   help="OMP_WAIT_POLICY of every worker ('' keeps the environment's): on a shared "
                        "machine, spinning threads wait on descheduled ones and timings double")
    p.add_argument("--mem-loops-list", default="1,2,4,8,16")
    p.add_argument("--mem-backprop", type=int, default=2)
    p.add_argument("--checkpoint", default="",
                   help="a trained run or checkpoint directory: the cachepolicy section then also "
                        "measures each policy's held-out loss (quality cost)")
    p.add_argument("--compile-options", default="",
                   help="inductor options for decode_compiled as JSON, e.g. '{\"freezing\": true}'")
    p.add_argument("--worker", choices=("ours", "peer"), help=argparse.SUPPRESS)
    p.add_argument("--mem-loops", type=int, help=argparse.SUPPRESS)
    p.add_argument("--mem-mode", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.worker:
        args.impl, args.config, args.section = args.worker, args.configs, args.sections
        print(json.dumps(worker(args)))
        return

    sections = list(CORE_SECTIONS) + list(OURS_ONLY) if args.sections == "all" else \
        args.sections.split(",")
    unknown = set(sections) - set(CORE_SECTIONS) - set(OURS_ONLY)
    if unknown:
        p.error(f"unknown sections {sorted(unknown)}")
    for flag, given, known in (("--configs", args.configs, CONFIGS), ("--attn", args.attn, ATTN)):
        if set(given.split(",")) - set(known):
            p.error(f"{flag} {given!r}: choose among {sorted(known)}")
    small = [f"--{name} {getattr(args, name)}" for name in ("threads", "repeats", "rounds") if getattr(args, name) < 1]
    if small:
        p.error(f"{', '.join(small)}: must be at least 1")
    if args.vs_open_mythos and not args.peer_python.exists():
        p.error(f"{args.peer_python} not found: run bash benchmarks/setup_open_mythos.sh first")

    sys.path.insert(0, str(ROOT))
    import torch

    from openmythos import MythosConfig

    t_start = time.perf_counter()
    first = run_worker("ours", "small", "mla", "peak", args)
    peaks = {d: [v] for d, v in first.items()}
    print(f"matmul peak on {args.threads} threads: fp32 {peaks['float32'][0]:.0f} GFLOP/s, "
          f"bf16 {peaks['bfloat16'][0]:.0f} GFLOP/s (torch {torch.__version__})", flush=True)
    impls = ["ours", "peer"] if args.vs_open_mythos else ["ours"]
    results: dict = {}
    for config in args.configs.split(","):
        for attn in args.attn.split(","):
            key = f"{config}-{attn}"
            results[key] = {}
            for section in sections:
                if section == "memory":
                    results[key][section] = run_memory(config, attn, args)
                    continue
                per_impl: dict = {i: [] for i in impls}
                for r in range(args.rounds):
                    order = impls if r % 2 == 0 else impls[::-1]
                    for impl in order:
                        if impl == "peer" and section in OURS_ONLY:
                            continue
                        per_impl[impl].append(run_worker(impl, config, attn, section, args))
                results[key][section] = {i: merge_rounds(v) for i, v in per_impl.items() if v}
                print(f"  {key:12s} {section:10s} done ({time.perf_counter() - t_start:.0f}s)",
                      file=sys.stderr, flush=True)
    for d, v in run_worker("ours", "small", "mla", "peak", args).items():
        peaks[d].append(v)
    peak = {d: max(v) for d, v in peaks.items()}

    summary = summarise(results, peak, args, MythosConfig)
    print_tables(summary, peaks, args)
    print(json.dumps(dict(threads=args.threads, torch=torch.__version__,
                          omp_wait_policy=args.omp_wait_policy, load_average=os.getloadavg(),
                          matmul_peak_gflops=peak, matmul_peak_samples=peaks,
                          wall_s=time.perf_counter() - t_start, results=summary)))


def run_memory(config: str, attn: str, args) -> dict:
    rows = []
    for n in (int(v) for v in args.mem_loops_list.split(",")):
        for mode in ("plain", "checkpoint", "truncated"):
            rows.append(run_worker("ours", config, attn, "memory", args, mem_loops=n, mem_mode=mode,
                                   mem_backprop=args.mem_backprop))
    return {"ours": {"rows": rows}}


def summarise(results: dict, peak: dict, args, MythosConfig) -> dict:
    out = {}
    for key, sections in results.items():
        config, attn = key.split("-")
        cfg = MythosConfig(**{**config_dict(config, attn), "halting": "none"})
        flops_tok = cfg.flops_per_token(seq_len=TRAIN_T)
        s: dict = {"flops_per_token": flops_tok, "num_params": cfg.num_params()}
        for section, per_impl in sections.items():
            row = {}
            for impl, r in per_impl.items():
                if "error" in r:
                    row[impl] = r
                    continue
                if section in ("train", "train_compiled", "bf16"):
                    dtype = "bfloat16" if section == "bf16" else "float32"
                    r = dict(r, gflops=r["tok_s"] * flops_tok / 1e9,
                             mfu=r["tok_s"] * flops_tok / 1e9 / peak[dtype])
                    if "counted_flops_per_step" in r:
                        r["counted_gflops"] = r["counted_flops_per_step"] / r["step_s"] / 1e9
                    r.pop("times", None)
                if "n_params" in r:
                    r["params_match"] = r["n_params"] == cfg.num_params()
                row[impl] = r
            if "ours" in row and "peer" in row and "error" not in row["ours"] and \
                    "error" not in row["peer"]:
                row["ratio"] = ratios(row["ours"], row["peer"])
            s[section] = row
        out[key] = s
    return out


def ratios(ours: dict, peer: dict) -> dict:
    out = {}
    for k in ("tok_s",):
        if k in ours:
            out[k] = ours[k] / peer[k]
    for b in ("b1", "b8"):
        if b in ours:
            out[b] = ours[b]["tok_s"] / peer[b]["tok_s"]
    if "bytes_per_token_layer" in ours:
        out["kv_bytes"] = ours["bytes_per_token_layer"] / peer["bytes_per_token_layer"]
    return out


def print_tables(summary: dict, peaks: dict, args) -> None:
    vs = args.vs_open_mythos
    head = f"{'config':12s} {'measure':26s} {'ours':>12s}" + (f" {'open-mythos':>12s} {'ratio':>7s}" if vs else "")
    print("\n" + head + "\n" + "-" * len(head))

    def line(key, name, ours, peer=None, ratio=None, unit=""):
        s = f"{key:12s} {name:26s} {fmt(ours, unit):>12s}"
        if vs:
            s += f" {fmt(peer, unit):>12s} {f'{ratio:.2f}x' if ratio else '-':>7s}"
        print(s)

    for key, s in summary.items():
        for section in CORE_SECTIONS:
            if section not in s:
                continue
            row = s[section]
            o, pr, rt = row.get("ours", {}), row.get("peer", {}), row.get("ratio", {})
            for impl, r in (("ours", o), ("open-mythos", pr)):
                if "error" in r:
                    print(f"{key:12s} {section} {impl} FAILED:\n{r['error']}")
            if "error" in o:
                continue
            g = lambda r, *ks: _dig(r, ks)
            if section in ("train", "train_compiled", "bf16"):
                tag = {"train": "train", "bf16": "train bf16-autocast",
                       "train_compiled": "train, ours compiled,"}[section]
                line(key, f"{tag} tok/s", g(o, "tok_s"), g(pr, "tok_s"), rt.get("tok_s"))
                line(key, f"{tag} GFLOP/s (cfg)", g(o, "gflops"), g(pr, "gflops"), None)
                line(key, f"{tag} MFU", _pct(g(o, "mfu")), _pct(g(pr, "mfu")), None, "%")
                line(key, f"{tag} GFLOP/s (counted)", g(o, "counted_gflops"), g(pr, "counted_gflops"))
                line(key, f"{tag} peak RSS MB", g(o, "peak_rss_mb"), g(pr, "peak_rss_mb"))
                if section == "train":
                    line(key, "params (match cfg)", g(o, "n_params"), g(pr, "n_params"))
                    for impl, r in (("ours", o), ("open-mythos", pr)):
                        if r and not r.get("params_match", True):
                            print(f"{key:12s} WARNING: {impl} has {r['n_params']} parameters, "
                                  f"cfg.num_params() = {s['num_params']}")
            elif section == "prefill":
                line(key, "prefill tok/s", g(o, "tok_s"), g(pr, "tok_s"), rt.get("tok_s"))
            elif section in ("decode", "decode_compiled"):
                tag = "decode" if section == "decode" else "decode, ours compiled,"
                for b in ("b1", "b8"):
                    line(key, f"{tag} tok/s batch {b[1:]}", g(o, b, "tok_s"), g(pr, b, "tok_s"),
                         rt.get(b))
                if section == "decode":
                    line(key, "decode peak RSS MB", g(o, "peak_rss_mb"), g(pr, "peak_rss_mb"))
            elif section == "kv":
                line(key, "KV bytes/token/(layer,loop)", g(o, "bytes_per_token_layer"),
                     g(pr, "bytes_per_token_layer"), rt.get("kv_bytes"))
        for section in OURS_ONLY:
            if section in s:
                print(f"\n{key} {section}:")
                rows = s[section].get("ours", {})
                if "error" in rows:
                    print(rows["error"])
                    continue
                for r in rows.get("rows", [rows]):
                    print("  " + json.dumps(r))


def _dig(r, ks):
    for k in ks:
        if not isinstance(r, dict) or k not in r:
            return None
        r = r[k]
    return r


def _pct(x):
    return None if x is None else 100 * x


if __name__ == "__main__":
    main()
