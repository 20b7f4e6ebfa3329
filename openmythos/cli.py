"""`mythos`: train, evaluate, sample from and describe OpenMythos models.

    mythos train [--config FILE] [--resume DIR] [--section.key VALUE ...]
    mythos eval --checkpoint DIR [--data PATH] [--n-loops 1,2,4,8,16] [--halting kl ...]
    mythos generate --checkpoint DIR --prompt TEXT [--n-loops N --temperature T --top-k K ...]
    mythos info (--preset NAME | --checkpoint DIR) [--n-loops N --seq-len S]
    mythos export-hf --checkpoint DIR --out DIR [--n-loops N]
    mythos serve (--checkpoint DIR | --preset NAME --random-init) [--host --port --max-batch]
    mythos experiment NAME [--smoke true] [--field value ...]

eval, generate, info and serve also take a directory written by export-hf as --checkpoint.

Each subcommand is a typed function here or in the library (`train_command`, `evaluate`,
`generate`, `info`); `main` only parses arguments and maps errors to exit codes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import socket
import sys
import textwrap
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

# Before torch loads OpenMP: threads that spin-wait for a descheduled partner made training 2.5x
# and decoding far slower on a shared CPU (docs/performance.md). An explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from openmythos.config import HALTINGS, MythosConfig, check_threads, is_int, preset_names
from openmythos.data import TextStream, path_documents, tokenize_documents, unigram_loss
from openmythos.evaluation import bits_per_byte, depth_table, perplexity, scored_targets
from openmythos.evaluation import evaluate as evaluate_split
from openmythos.generation import check_sampling
from openmythos.model import OpenMythos
from openmythos.model.model import EXIT_FIELDS
from openmythos.training import (
    TrainConfig,
    TrainingDiverged,
    load_config,
    load_model,
    open_checkpoint,
    parse_overrides,
    prepare_data,
    report,
    resolve_device,
    train,
)
from openmythos.training.checkpoint import is_hf_export, run_dir_of
from openmythos.training.config import AUTO_RESUME, coerce

log = logging.getLogger("openmythos")

EXIT_ERROR, EXIT_DIVERGED, EXIT_INTERRUPTED = 2, 1, 130


def train_command(config: str | None = None, resume: str | None = None,
                  overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """`mythos train`: the quickstart defaults, or a TOML recipe, then dotted overrides.

    Resuming without --config continues with the checkpoint's own config; with one, the two must
    agree (the trainer refuses and shows the difference otherwise).
    """
    overrides = dict(overrides or {})
    if resume is not None:
        overrides["checkpoint.resume"] = resume
    resume = None if resume == AUTO_RESUME else resume  # the config names the run: it may not exist yet
    if resume is not None and config is None:
        ckpt = open_checkpoint(resume)
        # the run goes on where its checkpoint lies now (the folder may have moved), unless told
        overrides.setdefault("run.out_dir", str(run_dir_of(ckpt)))
        cfg = ckpt.train_cfg.override(overrides)
    else:
        cfg = load_config(config, overrides)
        if resume is not None and "run.out_dir" not in overrides:
            ckpt = open_checkpoint(resume)
            if cfg.run.out_dir == ckpt.train_cfg.run.out_dir:  # the run's own config.toml: it goes
                cfg = cfg.override({"run.out_dir": str(run_dir_of(ckpt))})  # on where it lies now
    summary = train(cfg)
    if int(os.environ.get("RANK", 0)) == 0:  # one report from a torchrun launch
        print(report(summary))
    return summary


def evaluate(checkpoint: str, data: str | None = None, n_loops: Sequence[int] | None = None,
             max_tokens: int = 0, batch_size: int | None = None, device: str = "auto",
             exit_rule: dict[str, Any] | None = None) -> dict[str, Any]:
    """Validation loss, perplexity, bits/byte and the loops run per token at each depth, on the
    run's validation split or on the text file/folder `data`, next to the unigram baseline of
    the run's training split. exit_rule: halting fields to run the weights with instead of the
    run's (OpenMythos.with_exit), e.g. {"halting": "kl", "kl_threshold": 1e-3}."""
    model, tokenizer, cfg = _load(checkpoint, device)
    if exit_rule:
        model = model.with_exit(**exit_rule)
    if data is None:
        bundle = prepare_data(cfg.data, tokenizer)
        train, val = bundle.train, bundle.val
        changed = [] if is_hf_export(checkpoint) else open_checkpoint(checkpoint).changed_splits(train, val)
        if changed:  # a split recomputed from files added, removed or edited since
            log.warning("the run's %s split differs from the one it trained on: its files changed, "
                        "so this validation split may hold text the model trained on", " and ".join(changed))
    else:
        val = tokenize_documents(path_documents(data), tokenizer, cfg.data.cache_dir or None)
        try:  # only for the unigram baseline: --data needs no training corpus (an export's is elsewhere)
            train = prepare_data(cfg.data, tokenizer).train
        except ValueError as e:
            train = None
            log.warning("no unigram baseline: the run's training corpus is not available (%s)", e)
    depths = list(n_loops or cfg.eval.depths)
    runs = {n: evaluate_split(model, val, cfg.data.seq_len, batch_size or cfg.eval.batch_size, n_loops=n,
                              max_tokens=max_tokens,
                              autocast_dtype=torch.bfloat16 if cfg.run.dtype == "bf16" else None)
            for n in depths}
    losses, loops = {n: r[0] for n, r in runs.items()}, {n: r[1] for n, r in runs.items()}
    bpt = val.bytes_per_token
    print(depth_table(losses, bpt, loops))
    unigram = None
    if train is not None:
        unigram = unigram_loss(np.asarray(train.tokens), np.asarray(val.tokens), tokenizer.vocab_size)
        print(f"unigram baseline: {unigram:.4f} nats/token, {bits_per_byte(unigram, bpt):.4f} bits/byte "
              f"({bpt:.3f} bytes/token)")
    source = data if data is not None else cfg.data.val_path or f"{cfg.data.corpus} (validation split)"
    result = {"checkpoint": checkpoint, "data": source,
              "tokens": scored_targets(val, cfg.data.seq_len, max_tokens), "bytes_per_token": bpt,
              "unigram_loss": unigram, "unigram_bpb": None if unigram is None else bits_per_byte(unigram, bpt),
              "exit_rule": {k: getattr(model.cfg, k) for k in EXIT_FIELDS},
              "loss_per_depth": {str(n): {"loss": v, "ppl": perplexity(v), "bpb": bits_per_byte(v, bpt),
                                          "loops": loops[n]} for n, v in losses.items()}}
    print(json.dumps(result))
    return result


def generate(checkpoint: str, prompt: str, max_new_tokens: int = 128, n_loops: int | None = None,
             temperature: float = 0.8, top_k: int | None = 50, top_p: float | None = None,
             seed: int = 0, device: str = "auto", out: TextIO = sys.stdout,
             compile: bool = False, draft_loops: int | None = None, draft_tokens: int = 4,
             exit_rule: dict[str, Any] | None = None) -> str:
    """Sample a continuation of `prompt`, writing it to `out` as it is produced. compile: run
    the decode step as one torch.compile graph (OpenMythos.compile_decode). draft_loops:
    self-speculative decoding, drafting `draft_tokens` at a time at that depth (the output is
    the full-depth model's: generation.speculative_stream). exit_rule: as `evaluate`'s."""
    check_sampling(temperature, top_k, top_p)  # before the model loads
    model, tokenizer, _ = _load(checkpoint, device)
    if exit_rule:
        model = model.with_exit(**exit_rule)
    try:
        ids = tokenizer.encode(prompt) or [tokenizer.eos_id]
    except ValueError as e:  # e.g. bytes that are not UTF-8 in the argument
        raise ValueError(f"--prompt: {e}") from None
    if len(ids) + max_new_tokens > model.cfg.max_seq_len:
        raise ValueError(f"--prompt ({len(ids)} tokens) + --max-new-tokens ({max_new_tokens}) exceeds the "
                         f"model's context of {model.cfg.max_seq_len} tokens")
    n_loops = n_loops or _export_depth(checkpoint)
    depth = n_loops or model.cfg.max_loop_iters
    if draft_loops is not None and draft_loops > depth:
        raise ValueError(f"--draft-loops {draft_loops} exceeds the depth of {depth} loops it drafts for")
    if compile:
        model.compile_decode()
    device_ = model.embed.weight.device
    g = torch.Generator(device_).manual_seed(seed)
    text = TextStream(tokenizer)  # holds a multi-byte character back until it is whole
    out.write(prompt)
    prompt_ids = torch.tensor([ids], device=device_)
    if draft_loops is None:
        tokens = (int(t[0]) for t in model.stream(prompt_ids, max_new_tokens, n_loops=n_loops,
                                                   temperature=temperature, top_k=top_k, top_p=top_p,
                                                   eos_token_id=tokenizer.eos_id, generator=g,
                                                   vocab_size=tokenizer.vocab_size))
    else:
        tokens = model.speculative_stream(prompt_ids, max_new_tokens, n_loops=n_loops,
                                          draft_loops=draft_loops, draft_tokens=draft_tokens,
                                          temperature=temperature, top_k=top_k, top_p=top_p,
                                          eos_token_id=tokenizer.eos_id, generator=g,
                                          vocab_size=tokenizer.vocab_size)
    for token in tokens:
        if token == tokenizer.eos_id:
            break
        out.write(text.push(token))
        out.flush()
    out.write(text.flush() + "\n")
    return prompt + text.text


def info(preset: str | None = None, checkpoint: str | None = None, n_loops: int | None = None,
         seq_len: int | None = None) -> dict[str, Any]:
    """Parameters, active parameters per token, FLOPs per token and KV-cache bytes per token."""
    if (preset is None) == (checkpoint is None):
        raise ValueError("give exactly one of --preset NAME or --checkpoint DIR")
    cfg = MythosConfig.from_preset(preset) if preset else _model_config(checkpoint)
    n = n_loops or _export_depth(checkpoint) or cfg.max_loop_iters
    s = seq_len or cfg.max_seq_len
    result = {"source": preset or checkpoint, "params": cfg.num_params(),
              "active_params": cfg.active_params_per_token(), "n_loops": n, "seq_len": s,
              "flops_per_token_forward": cfg.flops_per_token(n, s, backward=False),
              "flops_per_token_train": cfg.flops_per_token(n, s, backward=True),
              "kv_bytes_per_token_bf16": cfg.kv_cache_bytes_per_token(n, torch.bfloat16)}
    width = max(len(k) for k in result)
    for key, value in result.items():
        print(f"{key:<{width}}  {_human(value) if isinstance(value, int) else value}")
    print(json.dumps(result))
    return result


def export_hf_command(checkpoint: str, out: str, n_loops: int | None = None) -> str:
    """`mythos export-hf`: a training checkpoint as a Hugging Face model directory, for
    AutoModelForCausalLM/AutoTokenizer/pipeline (after `import openmythos.hf`, or with
    trust_remote_code=True where openmythos is not installed)."""
    path = _hf().export_hf(checkpoint, out, n_loops)
    print(f"wrote {path}")
    return str(path)


def _hf():
    try:
        import openmythos.hf as hf
    except ImportError as e:  # the hf extra is not installed
        raise ValueError(str(e)) from e
    return hf


def _load(checkpoint: str, device: str):
    """A training run or checkpoint directory, or a Hugging Face directory from export-hf (whose
    TrainConfig, when it has none, is the quickstart's)."""
    if not is_hf_export(checkpoint):
        return load_model(checkpoint, resolve_device(device, "--device"))
    model, tokenizer, cfg = _hf().load_pretrained(checkpoint, resolve_device(device, "--device"))
    if tokenizer is None:
        raise ValueError(f"{checkpoint!r} has no tokenizer_meta.json, the record of its tokenizer: write the "
                         "folder with mythos export-hf or openmythos.hf.save_hf(model, dir, tokenizer)")
    if cfg is None:  # the quickstart's, in windows the model takes
        cfg = TrainConfig()
        cfg.data.seq_len = min(cfg.data.seq_len, model.cfg.max_seq_len)
    return model, tokenizer, cfg


def _model_config(checkpoint: str) -> MythosConfig:
    if not is_hf_export(checkpoint):
        return open_checkpoint(checkpoint).model_cfg
    file = Path(checkpoint).expanduser() / "config.json"
    return MythosConfig.from_saved(json.loads(file.read_text()), str(file))


def _export_depth(checkpoint: str | None) -> int | None:
    """An HF export's generation depth (export-hf --n-loops, in generation_config.json), which
    transformers' generate runs at: the default here too. None for a training checkpoint."""
    if checkpoint is None or not is_hf_export(checkpoint):
        return None
    file = Path(checkpoint).expanduser() / "generation_config.json"
    try:
        depth = json.loads(file.read_text()).get("n_loops") if file.is_file() else None
    except (ValueError, AttributeError) as e:
        raise ValueError(f"{str(file)!r} cannot be read as a JSON object: {e}") from e
    return depth if is_int(depth) and depth >= 1 else None


def _human(n: int) -> str:
    for unit, size in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n:,} ({n / size:.2f}{unit})"
    return f"{n:,}"


def int_at_least(least: int) -> typing.Callable[[str], int]:
    """An argparse type: an integer >= least."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from e
        if value < least:
            raise argparse.ArgumentTypeError(f"expected an integer >= {least}, got {value}")
        return value
    return parse


def _port(text: str) -> int:
    port = int_at_least(0)(text)
    if port > 65535:
        raise argparse.ArgumentTypeError(f"expected a port in [0, 65535], got {port}")
    return port


def _seed(text: str) -> int:
    seed = int_at_least(0)(text)
    if seed >= 2**64:
        raise argparse.ArgumentTypeError(f"expected a seed in [0, 2**64), got {seed}")
    return seed


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from e
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text!r}")
    return value


def _flags(args: list[str]) -> dict[str, str | bool]:
    """["--smoke", "--scale=4", "--out_dir", "x"] -> {"smoke": True, "scale": "4", "out_dir": "x"}:
    a flag with no value is a true boolean."""
    out, i = {}, 0
    while i < len(args):
        if not args[i].startswith("--"):
            raise ValueError(f"expected --field [value], got {args[i]!r}")
        key, eq, value = args[i][2:].partition("=")
        if not eq:
            bare = i + 1 == len(args) or args[i + 1].startswith("--")
            value = True if bare else args[i + 1]
            i += not bare
        out[key.replace("-", "_")] = value
        i += 1
    return out


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from e
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def serve_command(checkpoint: str | None, preset: str | None, random_init: bool, host: str,
                  port: int, max_batch: int, device: str = "auto", max_queue: int = 64,
                  max_loops: int | None = None, limits: dict | None = None,
                  exit_rule: dict[str, Any] | None = None) -> None:
    """`mythos serve`: the OpenAI-compatible server over the continuous batching engine.
    limits: fields of serving.server.Limits (max_tokens, max_prompt_tokens, timeout_s).
    exit_rule: as `evaluate`'s (usage.loops_executed then reports what it saves)."""
    from openmythos.data import ByteTokenizer
    from openmythos.serving import Engine

    try:
        from openmythos.serving.server import Limits, serve
    except ImportError as e:
        raise ValueError(f"serving needs the serve extra: pip install 'openmythos[serve]' ({e})") from e

    if checkpoint and (preset or random_init):
        raise ValueError("--preset and --random-init go without --checkpoint: give one model")
    _check_address(host, port)
    if checkpoint:
        model, tokenizer, _ = _load(checkpoint, device)
        name = Path(checkpoint).expanduser().resolve().name  # "." names its folder
    else:
        if not (preset and random_init):
            raise ValueError("give --checkpoint DIR, or --preset NAME with --random-init")
        tokenizer = ByteTokenizer()
        cfg = MythosConfig.from_preset(preset, vocab_size=tokenizer.vocab_size)
        model, name = OpenMythos(cfg).to(resolve_device(device, "--device")), f"{preset}-random"
    if exit_rule:
        model = model.with_exit(**exit_rule)
    depth = _export_depth(checkpoint)  # an export's generation depth: requests default to it
    if max_loops is None and depth:
        max_loops = max(depth, model.cfg.max_loop_iters)
    engine = Engine(model, tokenizer, max_batch=max_batch, max_queue=max_queue, max_loops=max_loops,
                    default_loops=depth)
    serve(engine, host, port, name, Limits(**(limits or {})))


def _check_address(host: str, port: int) -> None:
    """The address the server will listen on, tried before the model loads: a bad --host or a
    port in use is named now, not after the load (uvicorn's own error exits with status 3)."""
    try:  # IPv6 for a host with a colon, as uvicorn decides
        with socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET):
            pass
    except OSError as e:
        raise ValueError(f"cannot listen on --host {host!r} --port {port}: {e.strerror or e}") from e


def experiment_command(name: str, overrides: dict[str, str | bool]) -> dict:
    """`mythos experiment NAME [--smoke] [--field value ...]`: see openmythos/experiments."""
    from openmythos.experiments import EXPERIMENTS, run_experiment

    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; choose one of {sorted(EXPERIMENTS)}")
    config_cls = EXPERIMENTS[name][0]
    types = typing.get_type_hints(config_cls)
    fields = {}
    for key, text in overrides.items():
        if key not in types:
            raise ValueError(f"experiment {name!r} has no field {key!r}; fields: {sorted(types)}")
        if text is True and types[key] is not bool:  # `--out_dir` with its value forgotten
            raise ValueError(f"--{key} needs a value: only a true/false field may stand alone")
        fields[key] = coerce(key, text, types[key])
    payload = run_experiment(name, **fields)
    out = Path(payload["config"]["out_dir"]).expanduser()
    print((out / "report.md").read_text())
    return payload


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mythos", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model (no arguments: the CPU quickstart)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="any other --section.key VALUE overrides the config, e.g. "
                              "--train.lr 3e-4 --model.dim 384 --loops.sampler poisson;\n"
                              "the sections' keys, with the quickstart's values:\n\n" + _train_fields())
    t.add_argument("--config", help="a TOML recipe, e.g. configs/tiny-cpu.toml")
    t.add_argument("--resume", metavar="DIR",
                   help="continue a run exactly from its newest checkpoint (a run or checkpoint dir); "
                        "'auto': --run.out_dir's if it has one, else start it (one command for a job's retries)")

    e = sub.add_parser("eval", help="validation loss, perplexity and bits/byte per depth")
    e.add_argument("--checkpoint", required=True, help="a run, checkpoint or export-hf directory")
    e.add_argument("--data", help="a text file or folder to evaluate on (default: the run's "
                                  "validation split)")
    e.add_argument("--n-loops", type=_int_list, help="depths, e.g. 1,2,4,8,16 (default: the run's)")
    e.add_argument("--max-tokens", type=int_at_least(0), default=0,
                   help="evaluate about N tokens, in windows spread over the data (0: all)")
    e.add_argument("--batch-size", type=int_at_least(1))
    e.add_argument("--device", default="auto")
    _threads_flag(e, 0, "whole-sequence forward passes gain from every core")
    _exit_flags(e)

    g = sub.add_parser("generate", help="stream a sampled continuation of a prompt")
    g.add_argument("--checkpoint", required=True, help="a run, checkpoint or export-hf directory")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int_at_least(1), default=128)
    g.add_argument("--n-loops", type=int_at_least(1),
                   help="depth (default: an export's generation depth, else max_loop_iters)")
    g.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    g.add_argument("--top-k", type=int_at_least(0), default=50, help="0 keeps every token")
    g.add_argument("--top-p", type=float)
    g.add_argument("--seed", type=_seed, default=0)
    g.add_argument("--device", default="auto")
    g.add_argument("--compile", action="store_true",
                   help="compile the whole decode step (torch.compile; the first token waits for "
                        "it, the rest run faster: needs a model trained with halting none)")
    g.add_argument("--draft-loops", type=int_at_least(1),
                   help="self-speculative decoding: draft at this many loops, verify at --n-loops")
    g.add_argument("--draft-tokens", type=int_at_least(1), help="tokens per draft (default 4; with --draft-loops)")
    _threads_flag(g, 1, DECODE_THREADS)
    _exit_flags(g)

    i = sub.add_parser("info", help="parameters, FLOPs and KV-cache bytes per token")
    src = i.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", choices=preset_names())
    src.add_argument("--checkpoint", help="a run, checkpoint or export-hf directory")
    i.add_argument("--n-loops", type=int_at_least(1), help="depth for FLOPs and KV bytes (default: an export's "
                                                     "generation depth, else max_loop_iters)")
    i.add_argument("--seq-len", type=int_at_least(1), help="context for attention FLOPs (default: max_seq_len)")

    x = sub.add_parser("export-hf", help="convert a checkpoint to a Hugging Face model directory")
    x.add_argument("--checkpoint", required=True, help="a run or checkpoint directory")
    x.add_argument("--out", required=True, help="the directory to write")
    x.add_argument("--n-loops", type=int_at_least(1), help="the depth transformers' generate, and mythos generate, "
                                                     "info and serve on the export, run by default "
                                                     "(default: max_loop_iters)")

    sv = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (the `serve` extra)")
    src = sv.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a run, checkpoint or export-hf directory")
    src.add_argument("--preset", choices=preset_names())
    sv.add_argument("--random-init", action="store_true", help="serve an untrained --preset model")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=_port, default=8000)
    sv.add_argument("--max-batch", type=int_at_least(1), default=8, help="requests decoded together")
    sv.add_argument("--max-queue", type=int_at_least(1), default=64,
                    help="requests waiting for a row; past it the server answers 429")
    sv.add_argument("--max-loops", type=int_at_least(1),
                    help="the deepest n_loops a request may ask (default: the model's max_loop_iters)")
    sv.add_argument("--max-tokens", type=int_at_least(1), help="cap on a request's max_tokens (default: 512)")
    sv.add_argument("--max-prompt-tokens", type=int_at_least(1), help="(default: 2048)")
    sv.add_argument("--timeout", type=_positive_float,
                    help="seconds a request may take before a 504 (default: 120)")
    sv.add_argument("--device", default="auto")
    _threads_flag(sv, 1, DECODE_THREADS)
    _exit_flags(sv)

    xp = sub.add_parser("experiment", help="reproduce a claim: depth-extrapolation, "
                                           "param-efficiency, stability, act-pareto",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        epilog="fields of the experiment's config as --field value, e.g. "
                               "--smoke --scale 4 --out_dir runs/x (a bare flag is true);\n"
                               "each experiment's fields, with their defaults:\n\n"
                               + _experiment_fields())
    xp.add_argument("name")
    return p


def _experiment_fields() -> str:
    """Each experiment's fields and their defaults, for `mythos experiment --help`."""
    from openmythos.experiments import EXPERIMENTS

    return _field_lines({name: dataclasses.asdict(config()) for name, (config, _) in EXPERIMENTS.items()})


def _train_fields() -> str:
    """Each config section's keys and the quickstart's values, for `mythos train --help`: the
    model's are its preset's, each of which a recipe may override."""
    from openmythos.training.config import TrainConfig

    cfg = TrainConfig()
    return _field_lines({**cfg.to_dict(), "model": {"preset": cfg.model.preset,
                                                     **dataclasses.asdict(cfg.model_config())}})


def _field_lines(tables: dict[str, dict]) -> str:
    """name: key=value, ... per table, wrapped, as the command line takes the values (quoted
    where a space or comma would make them ambiguous)."""
    from openmythos.experiments.common import flag_value

    def shown(value) -> str:
        text = flag_value(value)
        return json.dumps(text) if isinstance(value, str) and any(c in text for c in " ,") else text

    return "\n".join(textwrap.fill(", ".join(f"{key}={shown(value)}" for key, value in table.items()),
                                   initial_indent=f"{name}: ", subsequent_indent="    ", width=96)
                     for name, table in tables.items())


# decoding is hundreds of small ops per token, each paying a hand-off between threads: on a
# 2-core CPU two threads decoded 1.5-2.7x slower than one (benchmarks/threads.py, docs/serving.md)
DECODE_THREADS = "decoding's small ops pay a hand-off between threads"


def _threads_flag(parser: argparse.ArgumentParser, default: int, why: str) -> None:
    parser.add_argument("--threads", type=int_at_least(0), default=default,
                        help=f"torch intra-op threads, 0: one per core (default {default}: {why})")


def _exit_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--halting", choices=HALTINGS,
                        help="run the weights with this exit rule instead of the run's (e.g. the KL exit "
                             "on a model trained without halting; act only for a run trained with it)")
    parser.add_argument("--act-threshold", type=float, help="with --halting act (default: the run's)")
    parser.add_argument("--kl-threshold", type=float, help="with --halting kl (default: the run's)")
    parser.add_argument("--min-loops", type=int_at_least(1), help="with --halting kl (default: the run's)")


def _exit_rule(args: argparse.Namespace) -> dict[str, Any]:
    """The exit fields given on the command line (OpenMythos.with_exit)."""
    given = (("halting", args.halting), ("act_threshold", args.act_threshold),
             ("kl_threshold", args.kl_threshold), ("min_loops", args.min_loops))
    return {k: v for k, v in given if v is not None}


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command not in ("train", "experiment"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    threads = torch.get_num_threads()  # put back on return, for a caller in the same process
    try:
        if getattr(args, "threads", 0):  # eval, generate and serve (train: run.threads)
            check_threads(args.threads, "--threads")
            torch.set_num_threads(args.threads)
        if args.command == "train":
            summary = train_command(args.config, args.resume, parse_overrides(extra))
            # under torchrun a stop that saved is a success: a failure would start the workers
            # again under a restart policy (--max-restarts)
            stopped = summary["status"] == "interrupted" and "TORCHELASTIC_RUN_ID" not in os.environ
            return EXIT_INTERRUPTED if stopped else 0
        if args.command == "eval":
            evaluate(args.checkpoint, args.data, args.n_loops, args.max_tokens, args.batch_size,
                     args.device, _exit_rule(args))
        elif args.command == "generate":
            if args.draft_tokens is not None and args.draft_loops is None:
                raise ValueError("--draft-tokens needs --draft-loops (self-speculative decoding)")
            generate(args.checkpoint, args.prompt, args.max_new_tokens, args.n_loops,
                     args.temperature, args.top_k or None, args.top_p, args.seed, args.device,
                     compile=args.compile, draft_loops=args.draft_loops,
                     draft_tokens=args.draft_tokens or 4, exit_rule=_exit_rule(args))
        elif args.command == "export-hf":
            export_hf_command(args.checkpoint, args.out, args.n_loops)
        elif args.command == "serve":
            serve_command(args.checkpoint, args.preset, args.random_init, args.host, args.port,
                          args.max_batch, args.device, args.max_queue, args.max_loops,
                          {k: v for k, v in (("max_tokens", args.max_tokens), ("timeout_s", args.timeout),
                                             ("max_prompt_tokens", args.max_prompt_tokens)) if v is not None},
                          _exit_rule(args))
        elif args.command == "experiment":
            experiment_command(args.name, _flags(extra))
        else:
            info(args.preset, args.checkpoint, args.n_loops, args.seq_len)
    except (ValueError, OSError) as e:  # OSError: a full disk, a read-only folder, a file gone
        print(f"mythos {args.command}: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except TrainingDiverged as e:  # a RuntimeError: before the clause below
        print(f"mythos train: {e}", file=sys.stderr)
        return EXIT_DIVERGED
    except RuntimeError as e:
        if not (isinstance(e, torch.OutOfMemoryError) or "can't allocate memory" in str(e)):
            raise
        print(f"mythos {args.command}: error: out of memory ({str(e).splitlines()[0][:200]}): choose a "
              "smaller model (--model.preset, --preset), batch or sequence, or a larger device", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        torch.set_num_threads(threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
