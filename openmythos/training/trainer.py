"""The training loop behind `mythos train`: data, model, Muon or AdamW, sampled depth, telemetry,
periodic evaluation, atomic checkpoints with exact resume, and the end-of-run report.

The loop is written for one process; distributed training (torchrun) passes its rank and world
size in a `DistEnv`. Data windows and loop depths are drawn from generators seeded identically on
every rank and sliced by rank, so ranks agree on each step's depth and never share a window.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

try:
    import fcntl  # the run-folder lock: POSIX
except ImportError:
    fcntl = None

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from openmythos.config import MythosConfig, check_threads
from openmythos.data import (
    PackedTokens,
    Tokenizer,
    get_tokenizer,
    load_corpus,
    load_tokenizer,
    tokenize_documents,
    train_bpe,
    unigram_loss,
)
from openmythos.data.corpus import atomic_write
from openmythos.evaluation import (
    autocast,
    bits_per_byte,
    depth_table,
    evaluate_loss,
    loss_per_depth,
    perplexity,
    scored_targets,
)
from openmythos.model import OpenMythos
from openmythos.training.checkpoint import (
    CHECKPOINTS,
    Checkpoint,
    checkpoints_after,
    has_checkpoint,
    open_checkpoint,
    run_dir_of,
    save_checkpoint,
    save_sharded,
)
from openmythos.training.config import (
    AUTO_RESUME,
    RESUME_MUTABLE,
    TOKENIZERS,
    DataConfig,
    TrainConfig,
    absolute_data_path,
    is_tokenizer_source,
    to_toml,
)
from openmythos.training.distributed import (
    DistEnv,
    any_rank,
    broadcast_full_weights,
    destroy_distributed,
    gathered,
    global_max,
    init_distributed,
    no_gradient_sync,
    parallelize,
    per_rank,
)
from openmythos.training.loops import LoopSampler
from openmythos.training.optim import build_optimizer, has_fast_bf16, lr_at

log = logging.getLogger(__name__)

METRICS = "metrics.jsonl"
SUMMARY = "summary.json"


class TrainingDiverged(RuntimeError):
    """Too many non-finite steps in a row."""


@dataclass
class Data:
    tokenizer: Tokenizer
    train: PackedTokens
    val: PackedTokens


def build_tokenizer(cfg: DataConfig, train_texts: list[str]) -> Tokenizer:
    if cfg.tokenizer == "bpe":
        tokenizer = train_bpe(train_texts, cfg.vocab_size)
        if tokenizer.vocab_size < cfg.vocab_size:
            log.warning("data.vocab_size=%d, but this corpus gives a BPE vocabulary of only %d "
                        "tokens, which the model is built for", cfg.vocab_size, tokenizer.vocab_size)
        return tokenizer
    if cfg.tokenizer in TOKENIZERS:  # those that need no training
        return get_tokenizer(cfg.tokenizer)
    return load_tokenizer(cfg.tokenizer)


def prepare_data(cfg: DataConfig, tokenizer: Tokenizer | None = None) -> Data:
    """Corpus -> split -> tokenizer (trained here unless given) -> cached token streams."""
    cache = cfg.cache_dir or None
    if cache and Path(cache).expanduser().exists() and not Path(cache).expanduser().is_dir():
        raise ValueError(f"data.cache_dir={cache!r} is a file, not a folder")
    corpus = load_corpus(cfg.corpus, val_path=cfg.val_path or None)
    if tokenizer is None:
        tokenizer = build_tokenizer(cfg, [d.text for d in corpus.train])
    return Data(tokenizer, tokenize_documents(corpus.train, tokenizer, cache),
                tokenize_documents(corpus.val, tokenizer, cache))


def resolve_device(name: str, field: str = "run.device") -> torch.device:
    """auto (a GPU when there is one, else the CPU), cpu, cuda or cuda:N; `field` names the
    setting in errors (--device on the command line)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"{field}={name!r} is not a device this library runs on: use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{field}={name!r} but CUDA is not available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"{field}={name!r} but there are {torch.cuda.device_count()} CUDA devices")
    return device


def model_config(cfg: TrainConfig, tokenizer: Tokenizer) -> MythosConfig:
    """The recipe's model with the tokenizer's vocabulary, or a larger (padded) one, whose
    padding ids sampling leaves out (generate's vocab_size)."""
    vocab = cfg.model.overrides.get("vocab_size", tokenizer.vocab_size)
    if vocab < tokenizer.vocab_size:
        raise ValueError(f"model.vocab_size={vocab} is smaller than the {tokenizer.name} "
                         f"tokenizer's vocab_size {tokenizer.vocab_size}")
    return cfg.model_config(vocab_size=vocab)


def window_means(records: list[dict]) -> dict:
    """The last step's record, with the loss, loops, ponder cost and tokens/s (the global and
    each rank's) averaged over the steps since the last log (`steps_logged`): one step's sampled
    depth and loss, held for log_every steps, read as the run's. A skipped step's non-finite loss
    stays out of the mean."""
    def mean(key: str) -> float:
        values = [r[key] for r in records if math.isfinite(r[key])]
        return sum(values) / len(values) if values else math.nan

    def rate(values: list[float]) -> float:  # every step trains as many tokens: a harmonic mean
        return len(values) / sum(1 / v for v in values)

    means = {"loss": mean("loss"), "loops": mean("loops"), "ponder": mean("ponder"),
             "tok_per_s": rate([r["tok_per_s"] for r in records]), "steps_logged": len(records)}
    if "tok_per_s_rank" in records[-1]:  # each rank's own, over the steps this world size ran
        # (a window restored from a checkpoint written on another world size holds other ranks)
        world = len(records[-1]["tok_per_s_rank"])
        per_rank = zip(*(r["tok_per_s_rank"] for r in records
                         if len(r.get("tok_per_s_rank", ())) == world), strict=True)
        means["tok_per_s_rank"] = [rate(list(steps)) for steps in per_rank]
    return {**records[-1], **means}


def _entropy(load: torch.Tensor) -> float:
    """Entropy of the expert-load distribution over log(E): 1.0 is perfectly balanced."""
    p = load.float() / load.sum().clamp(min=1)
    return float(-(p * p.clamp(min=1e-12).log()).sum() / math.log(len(p))) if len(p) > 1 else 1.0


class _Stopped(Exception):
    """A signal during the final evaluation: it has nothing to keep, so it ends at once."""


class _StopRequest:
    """The first Ctrl-C (or SIGTERM) asks the loop to stop at the next step boundary, where the
    state is consistent, checkpoint and exit; a second Ctrl-C interrupts at once. Once `at_once`
    is set (the final evaluation, after the last checkpoint), a signal raises _Stopped."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self) -> _StopRequest:
        self.requested = self.at_once = False
        self._previous = {}
        if threading.current_thread() is threading.main_thread():  # signals need the main thread
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.at_once:  # once: a second signal, while the first unwinds, is only noted
            self.at_once, self.requested = False, True
            raise _Stopped
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("\nstopping after this step: writing a checkpoint, then exiting "
                    "(Ctrl-C again to abort without one)")

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


class Trainer:
    def __init__(self, cfg: TrainConfig, env: DistEnv | None = None):
        self.device = resolve_device(cfg.run.device)
        if cfg.model_config().halting == "kl":  # here, not in the config: such a checkpoint still loads
            # at init the readout barely moves between loops, so every token would stop after
            # about 2 and the model would never learn to use more
            raise ValueError("model.halting='kl' cannot train: the KL exit needs a trained readout (an "
                             "untrained model stops every token after ~2 loops); train with 'none' or 'act', "
                             "then run the trained weights with it (mythos eval --halting kl, OpenMythos.with_exit)")
        if cfg.model_config().halting == "act" and cfg.loops.backprop:
            # the window is the last k of the sampled loops, and ACT may stop a token before it:
            # such a token trains no loop, and under FSDP2 a rank whose tokens all did skipped the
            # looped block's reduce-scatter that the others issued (a collective mismatch)
            raise ValueError(f"loops.backprop={cfg.loops.backprop} with model.halting='act': ACT decides each "
                             "token's depth as it runs, so a window placed by the sampled depth may leave a "
                             "token no loop to learn from; train ACT with loops.backprop 0")
        if env is None:
            if cfg.dist.strategy == "none" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
                # each rank would train the whole run alone, into the same folder
                raise ValueError(f"dist.strategy='none' under a launch of {os.environ['WORLD_SIZE']} processes "
                                 "(torchrun): set --dist.strategy ddp or fsdp")
            env = (init_distributed(self.device.type, cfg.dist.strategy)
                   if cfg.dist.strategy != "none" else DistEnv())
        self.cfg = cfg = cfg.with_absolute_data_paths()
        self.env = env
        if not env.is_main:  # rank 0 alone reports; the other ranks speak only on errors
            logging.getLogger("openmythos").setLevel(logging.ERROR)
        resume = cfg.checkpoint.resume
        if resume == AUTO_RESUME:  # a first launch starts afresh, a restart continues
            resume = cfg.run.out_dir if has_checkpoint(cfg.run.out_dir) else ""
        ckpt = open_checkpoint(resume) if resume else None
        if ckpt is not None:
            self._check_resume(ckpt)
        elif not is_tokenizer_source(cfg.data.tokenizer):
            # checked here, not in the config: a checkpoint carries its own copy of the tokenizer,
            # so loading one must not depend on the folder it was first read from
            raise ValueError(f"data.tokenizer={cfg.data.tokenizer!r} is neither one of {TOKENIZERS} "
                             "nor a directory holding a saved tokenizer")
        self.amp_dtype = torch.bfloat16 if cfg.run.dtype == "bf16" else None
        head = cfg.run.head_dtype
        if head == "auto":
            head = "bf16" if has_fast_bf16(self.device) else "fp32"
        # named, not None: under FSDP2 in bf16 the gathered weight is bf16, and "the weight's dtype"
        # ran an fp32 head in bf16
        self.head_dtype = torch.bfloat16 if head == "bf16" else torch.float32
        if cfg.run.threads:
            check_threads(cfg.run.threads, "run.threads")
            torch.set_num_threads(cfg.run.threads)

        self.data = prepare_data(cfg.data, ckpt.tokenizer() if ckpt else None)
        if ckpt is not None:
            self._check_moved_data(ckpt)
        if len(self.data.train) < cfg.data.seq_len + 1:  # before the run folder exists
            raise ValueError(f"data.seq_len={cfg.data.seq_len} needs at least {cfg.data.seq_len + 1} "
                             f"training tokens; the train split of {cfg.data.corpus!r} has "
                             f"{len(self.data.train)}")
        if ckpt is not None and Path(cfg.data.tokenizer).expanduser().is_dir():
            given = load_tokenizer(cfg.data.tokenizer)
            if given.fingerprint != self.data.tokenizer.fingerprint:
                raise ValueError(f"data.tokenizer {cfg.data.tokenizer!r} ({given.fingerprint}) is "
                                 f"not the checkpoint's tokenizer ({self.data.tokenizer.fingerprint})")
        mcfg = model_config(cfg, self.data.tokenizer)
        if ckpt is not None and mcfg != ckpt.model_cfg:
            raise ValueError(f"checkpoint {str(ckpt.path)!r} holds a different model: "
                             f"{ckpt.model_cfg} vs {mcfg}")
        self._lock_file = None
        self._made: list[Path] = []  # the folders _run_dir made: a start that fails removes them
        self.run_dir = self._run_dir(ckpt)  # once the data and model are known good: no empty run folder
        try:
            self._build(cfg, ckpt, mcfg)
        except BaseException:  # e.g. a model too large for memory
            self.close()
            if self._made:  # a run that never started leaves no folder behind
                (self.run_dir / ".lock").unlink(missing_ok=True)
                for folder in reversed(self._made):
                    with contextlib.suppress(OSError):  # it holds files after all: kept
                        folder.rmdir()
            raise

    def _build(self, cfg: TrainConfig, ckpt: Checkpoint | None, mcfg: MythosConfig) -> None:
        """The model, optimizer and training state: a fresh run's, or the checkpoint's."""
        self.sharded = cfg.dist.strategy == "fsdp"
        torch.manual_seed(cfg.run.seed)
        # FSDP2 shards the model on the meta device and materialises only each rank's shards
        with torch.device("meta" if self.sharded else self.device):
            self.model = OpenMythos(mcfg)
        # the module a training step calls: the model itself (sharded in place), or its DDP replica
        self.engine = parallelize(self.model, cfg.dist, device=self.device,
                                  param_dtype=self.amp_dtype)
        if self.sharded and ckpt is None:
            self._broadcast_init(mcfg)
        self.optimizer = build_optimizer(self.model, cfg.train)
        # windows and depths have generators of their own: changing one never shifts the other
        self.data_gen = torch.Generator().manual_seed(cfg.run.seed)
        self.loop_sampler = LoopSampler(cfg.loops, cfg.run.seed + 1)
        self.step = 0
        self.tokens_seen = 0
        self.skipped = 0
        self.bad_in_row = 0
        self.train_time = 0.0
        self.log_window: list[dict] = []  # the steps since the last log: a checkpoint keeps them
        self.last_saved = -1
        if ckpt is not None:
            self._restore(ckpt)

    # setup
    def _broadcast_init(self, mcfg: MythosConfig) -> None:
        """Rank 0 initialises the whole model exactly as a single process would (same seed, same
        device), and every rank takes its shard: a run's numbers do not depend on its world
        size. The whole model must fit on rank 0's device once, at start-up."""
        full = {}
        if self.env.is_main:
            torch.manual_seed(self.cfg.run.seed)
            with torch.device(self.device):
                full = OpenMythos(mcfg).state_dict()
        broadcast_full_weights(self.model, full)
        del full

    def _check_resume(self, ckpt: Checkpoint) -> None:
        """Refuse a resume that would not continue the same run. The world size may change as
        long as the global batch (batch_size x world_size) does not."""
        cfg = self.cfg
        changed = ckpt.train_cfg.diff(cfg, ignore=(*RESUME_MUTABLE, "train.batch_size"))
        saved_world = ckpt.trainer_state.get("world_size", 1)
        saved_batch = ckpt.train_cfg.train.batch_size * saved_world
        if saved_batch != cfg.train.batch_size * self.env.world_size:
            changed.append(f"global batch (train.batch_size x world size): {saved_batch} -> "
                           f"{cfg.train.batch_size * self.env.world_size}")
        step = ckpt.trainer_state["step"]
        if cfg.train.steps < step:  # a shorter run is another run: its end has passed
            raise ValueError(f"train.steps={cfg.train.steps} is below the step of the checkpoint "
                             f"resumed from ({step}, {str(ckpt.path)!r}): a resume trains on from there")
        if changed:
            raise ValueError(f"refusing to resume from {str(ckpt.path)!r}: the config differs "
                             "from the one it was trained with (saved -> now):\n  "
                             + "\n  ".join(changed) + "\nA resume continues the same run (its "
                             "settings fix its schedule and numbers); it may change only "
                             + ", ".join([k for k in RESUME_MUTABLE if not k.startswith("eval.")] + ["eval.*"])
                             + ". For other settings, start a new run without --resume.")

    def _check_moved_data(self, ckpt: Checkpoint) -> None:
        """A resume may find the run's data at another path (a corpus that moved) only if it is
        the same data: the splits' digests, which the checkpoint records, must match."""
        moved = [f"data.{key}" for key in ("corpus", "val_path")  # an older run kept its path as typed
                 if absolute_data_path(getattr(ckpt.train_cfg.data, key)) != getattr(self.cfg.data, key)]
        if not moved:
            return
        given = " and ".join(moved)
        if not {"train", "val"} <= set(ckpt.data):
            raise ValueError(f"{given}: not the checkpoint's, which records no digest of its data to check "
                             "a new path against: resume with the run's own")
        changed = ckpt.changed_splits(self.data.train, self.data.val)
        if changed:
            raise ValueError(f"{given}: other data than the run trained on (its {' and '.join(changed)} "
                             "split differs): a resume continues on the same data")

    def _run_dir(self, ckpt: Checkpoint | None) -> Path:
        cfg = self.cfg.run
        if cfg.out_dir:
            run_dir = Path(cfg.out_dir).expanduser()
        elif ckpt is not None:
            run_dir = run_dir_of(ckpt)
        else:
            run_dir = Path("runs") / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        if self.env.is_main:
            for folder in (run_dir, run_dir / CHECKPOINTS):  # not only at the first save, hours in
                try:
                    if not folder.exists():
                        self._made.append(folder)
                    folder.mkdir(parents=True, exist_ok=True)
                    probe = folder / f".write-test-{self.env.rank}"
                    probe.write_text("ok")
                    probe.unlink()
                except OSError as e:
                    raise ValueError(f"run directory {str(folder)!r} is not writable: {e}") from e
            saved = any((run_dir / CHECKPOINTS).glob("step_*"))
            if ckpt is None and saved:
                raise ValueError(f"run directory {str(run_dir)!r} already holds checkpoints: "
                                 f"continue it with --resume {run_dir}, or pick another "
                                 "--run.out_dir")
            if ckpt is not None and saved and run_dir.resolve() != run_dir_of(ckpt).resolve():
                # a resume into another run's folder: its checkpoints would be pruned as ours,
                # its metrics mixed into ours
                raise ValueError(f"run directory {str(run_dir)!r} holds another run than the "
                                 f"checkpoint's ({str(run_dir_of(ckpt))!r}): resume into an empty "
                                 "--run.out_dir, or into the checkpoint's own run")
            newer = checkpoints_after(run_dir, ckpt.trainer_state["step"]) if ckpt else []
            if newer:  # their steps would be run again, and pruning would keep theirs over ours
                raise ValueError(f"run directory {str(run_dir)!r} holds checkpoints past the one "
                                 f"resumed from ({', '.join(p.name for p in newer)}): move or "
                                 "delete them, or resume into another --run.out_dir")
            self._lock(run_dir)
        return run_dir

    def _lock(self, run_dir: Path) -> None:
        """Hold an exclusive lock on the run folder while this job trains in it: a second one (a
        resume started twice) would delete the other's saves in progress when it prunes, and
        interleave its metrics. The OS drops the lock when the process ends, however it ends."""
        if fcntl is None:  # not POSIX: no advisory locks
            return
        lock = open(run_dir / ".lock", "w")  # noqa: SIM115 (held open while the trainer lives)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise ValueError(f"run directory {str(run_dir)!r} is in use by another training "
                             "process") from None
        except OSError as e:  # a file system without locks: train on, unguarded
            log.warning("cannot lock %s (%s): nothing stops a second job from using it", run_dir, e)
        self._lock_file = lock

    def close(self) -> None:
        """Release the run folder (fit() does, once the run is over)."""
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def _restore(self, ckpt: Checkpoint) -> None:
        ckpt.load_training_state(self.model, self.optimizer)
        state = ckpt.trainer_state
        self.loop_sampler.load_state_dict(state["loops"])
        self.data_gen.set_state(state["rng"]["data"])
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        np_state = state["rng"]["numpy"]
        np.random.set_state((np_state[0], np.asarray(np_state[1], dtype=np.uint32), *np_state[2:]))
        random.setstate(state["rng"]["python"])
        for key in ("step", "tokens_seen", "skipped", "bad_in_row", "train_time"):
            setattr(self, key, state[key])
        self.log_window = state.get("log_window", [])  # absent from older checkpoints
        # this step is saved, unless the run continues in another folder, which then gets its own
        same_dir = run_dir_of(ckpt).resolve() == self.run_dir.resolve()
        self.last_saved = self.step if same_dir else -1
        log.info("resumed from %s at step %d", ckpt.path, self.step)
        saved, now = (lr_at(self.step, c.train, self.train_time) for c in (ckpt.train_cfg, self.cfg))
        if not math.isclose(now, saved, rel_tol=0.01):  # the run's new length moved a decaying rate
            lengths = ", ".join(f"train.{key} {getattr(ckpt.train_cfg.train, key)} -> {getattr(self.cfg.train, key)}"
                                for key in ("steps", "max_minutes")
                                if getattr(ckpt.train_cfg.train, key) != getattr(self.cfg.train, key))
            log.warning("%s %s the learning-rate schedule to the new end: the rate %s from %.3g to %.3g at "
                        "this step and follows the new schedule from there", lengths,
                        "stretches" if now > saved else "shortens", "rises" if now > saved else "falls", saved, now)
        changed = ckpt.changed_splits(self.data.train, self.data.val)
        if changed:
            log.warning("the run's %s split differs from the one it trained on (its files changed): "
                        "the run continues, but not as it would have", " and ".join(changed))

    def state_dict(self) -> dict[str, Any]:
        """Everything but the weights; the optimizer too unless DCP shards hold it."""
        np_state = np.random.get_state()
        rng = {"data": self.data_gen.get_state(), "torch": torch.get_rng_state(),
               "numpy": (np_state[0], np_state[1].tolist(), *np_state[2:]),
               "python": random.getstate()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        state = {"loops": self.loop_sampler.state_dict(),
                 "data": {"train": self.data.train.digest, "val": self.data.val.digest},
                 "rng": rng, "step": self.step, "tokens_seen": self.tokens_seen,
                 "world_size": self.env.world_size,
                 "skipped": self.skipped, "bad_in_row": self.bad_in_row,
                 "train_time": self.train_time, "log_window": self.log_window}
        if not self.sharded:
            state["optimizer"] = self.optimizer.state_dict()
        return state

    def save(self, final: bool = False) -> Path | None:
        """A checkpoint of this step (once). Under FSDP2 every rank writes its shards, and the
        final checkpoint also gets the consolidated weights for eval and generate."""
        if self.last_saved == self.step or not (self.sharded or self.env.is_main):
            return None
        c = self.cfg.checkpoint
        if self.sharded:
            path = save_sharded(self.run_dir, self.step, self.model, self.optimizer, self.cfg,
                                self.data.tokenizer, self.state_dict(), c.keep, consolidate=final)
        else:
            path = save_checkpoint(self.run_dir, self.step, self.model, self.cfg,
                                   self.data.tokenizer, self.state_dict(), c.keep)
        self.last_saved = self.step
        return path

    # one optimizer step
    def _schedule_clock(self) -> float:
        """Training seconds so far, for a schedule that ends at train.max_minutes; under
        torch.distributed rank 0's clock, so that every rank steps with the same learning rate."""
        t = self.cfg.train
        if self.env.world_size == 1 or not (t.max_minutes and t.time_schedule):
            return self.train_time
        clock = torch.tensor([self.train_time], dtype=torch.float64, device=self.device)
        dist.broadcast(clock, src=0)
        return float(clock)

    def train_step(self) -> dict[str, Any]:
        cfg, model = self.cfg, self.model
        t0 = time.perf_counter()
        lr = lr_at(self.step, cfg.train, self._schedule_clock())
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        B, T, accum = cfg.train.batch_size, cfg.data.seq_len, cfg.train.grad_accum
        # dropout draws from torch's generator: seeded from (seed, step, rank) at every step, each
        # rank draws its own masks and a resume continues them exactly, whatever start-up drew
        # (FSDP's rank 0 initialises the whole model alone) and whichever rank's state was saved
        seeds = np.random.SeedSequence([cfg.run.seed, self.step, self.env.rank])
        torch.manual_seed(int(seeds.generate_state(1)[0]))
        # summed over micro-batches, read back in one transfer: cross-entropy, loops per token,
        # state norm, ponder cost
        stats = torch.zeros(5, device=self.device)
        load = torch.zeros(model.cfg.n_experts, device=self.device, dtype=torch.long)
        for micro in range(accum):
            x, y = self.data.train.sample_batch(B, T, self.data_gen, rank=self.env.rank,
                                                world_size=self.env.world_size)
            x, y = x.to(self.device), y.to(self.device)
            n_loops = self.loop_sampler.sample(B, self.env.rank, self.env.world_size)
            with no_gradient_sync(self.engine, inner_step=micro < accum - 1):
                with autocast(self.device.type, self.amp_dtype):
                    out = self.engine(x, n_loops=n_loops, backprop_loops=cfg.loops.backprop or None,
                                      targets=y, head_dtype=self.head_dtype)
                ce = out.loss
                loss = ce + cfg.train.ponder_weight * out.ponder_loss + out.aux_loss
                (loss / accum).backward()
            load += out.expert_load
            corr = ce.new_tensor(math.nan) if out.token_corr is None else out.token_corr  # seq_len 1
            stats += torch.stack([ce, out.loops.float().mean(), out.state_norm, corr,
                                  out.ponder_loss]).detach().float()
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        # under FSDP2 the norm is a replicated DTensor, computed over every rank's shards
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip or math.inf))
        if self.env.world_size > 1:
            dist.all_reduce(load)  # every rank moves the router bias by the global load
            dist.all_reduce(stats)  # report the global means, identical on every rank
            stats /= self.env.world_size
        loss_value, loops, state_norm, token_corr, ponder = (stats / accum).tolist()
        finite = math.isfinite(loss_value) and math.isfinite(grad_norm)
        if finite:
            self.optimizer.step()
            model.update_router_bias(load)
            self.bad_in_row = 0
        else:
            self._bad_step(loss_value, grad_norm)
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        tokens = B * T * accum * self.env.world_size
        self.tokens_seen += tokens
        dt = time.perf_counter() - t0
        self.train_time += dt
        with torch.no_grad():  # a sharded A gives each rank the max of its own shard
            rho = global_max(model.spectral_radius(), self.env, self.device)
        record = {"step": self.step, "loss": loss_value, "lr": lr, "grad_norm": grad_norm,
                  "tokens": self.tokens_seen, "tok_per_s": tokens / dt, "loops": loops, "rho": rho,
                  "state_norm": state_norm, "token_corr": token_corr, "load_entropy": _entropy(load),
                  "ponder": ponder,
                  "skipped": self.skipped, "time": self.train_time}
        if self.env.world_size > 1:  # the global load above, and each rank's own tokens/s
            record["tok_per_s_rank"] = per_rank(tokens / self.env.world_size / dt, self.env,
                                                self.device)
        return record

    def _bad_step(self, loss: float, grad_norm: float) -> None:
        self.skipped += 1
        self.bad_in_row += 1
        log.warning("step %d: non-finite loss %s / grad norm %s, update skipped "
                    "(%d in a row, %d in total)", self.step + 1, loss, grad_norm, self.bad_in_row,
                    self.skipped)
        if self.bad_in_row >= self.cfg.train.max_bad_steps:
            last = f"; the last checkpoint is at step {self.last_saved}" if self.last_saved >= 0 else ""
            raise TrainingDiverged(
                f"training diverged: {self.bad_in_row} non-finite steps in a row up to step "
                f"{self.step + 1} (loss {loss}, grad norm {grad_norm}){last}. Lower train.lr, "
                "raise train.warmup_steps, set train.grad_clip, or try run.dtype='fp32'.")

    # evaluation
    def evaluate(self, max_tokens: int) -> float:
        c = self.cfg
        return evaluate_loss(self.model, self.data.val, c.data.seq_len, c.eval.batch_size,
                             n_loops=c.eval.n_loops or None, max_tokens=max_tokens,
                             autocast_dtype=self.amp_dtype, rank=self.env.rank,
                             world_size=self.env.world_size)

    def samples(self) -> list[str]:
        c, tok = self.cfg.eval, self.data.tokenizer
        if not c.samples:
            return []
        prompt = tok.encode(c.prompt) or [tok.eos_id]
        prompt = prompt[-(self.model.cfg.max_seq_len - 1):]
        new = min(c.sample_tokens, self.model.cfg.max_seq_len - len(prompt))
        g = torch.Generator(self.device).manual_seed(self.cfg.run.seed)
        ids = torch.tensor([prompt] * c.samples, device=self.device)
        out = self.model.generate(ids, new, n_loops=c.n_loops or None, temperature=c.temperature,
                                  top_k=c.top_k or None, eos_token_id=tok.eos_id, generator=g,
                                  vocab_size=tok.vocab_size)
        texts = []
        for row in out[:, len(prompt):].tolist():
            row = row[:row.index(tok.eos_id)] if tok.eos_id in row else row
            texts.append(c.prompt + tok.decode(row))
        return texts

    # the run
    def fit(self) -> dict[str, Any]:
        """Train until train.steps, the time limit or a signal; save; evaluate (unless a signal
        stopped the run). The run folder is released at the end, however it ends."""
        try:
            return self._fit()
        finally:
            self.close()

    def _fit(self) -> dict[str, Any]:
        cfg, main = self.cfg, self.env.is_main
        metrics = _Metrics(self.run_dir / METRICS, keep_until=self.step) if main else None
        if main:
            (self.run_dir / "config.toml").write_text(to_toml(cfg), encoding="utf-8")
            # an earlier attempt's summary must not outlive this one: a retry loop reads its status
            self._write_summary({"status": "running", "run_dir": str(self.run_dir), "steps": self.step})
            log.info("run dir %s | %s | %.2fM params (%.2fM active) | %d train / %d val tokens",
                     self.run_dir, self.data.tokenizer.name, self.model.cfg.num_params() / 1e6,
                     self.model.cfg.active_params_per_token() / 1e6, len(self.data.train),
                     len(self.data.val))
        status = "completed"
        if self.step >= cfg.train.steps:
            log.warning("the run is already at train.steps=%d: nothing to train; its final "
                        "evaluation runs again", cfg.train.steps)
        spent = bool(cfg.train.max_minutes) and self.train_time >= 60 * cfg.train.max_minutes
        if spent and self.step < cfg.train.steps:  # a resume of a run the clock stopped
            log.warning("train.max_minutes=%s is spent (%.1f minutes trained): nothing to train, raise "
                        "--train.max_minutes to go on; its final evaluation runs again",
                        cfg.train.max_minutes, self.train_time / 60)
            status = "time_limit"
        bar = tqdm(total=cfg.train.steps, initial=self.step, unit="step", dynamic_ncols=True,
                   disable=not (cfg.run.progress and main))
        with _StopRequest() as stop, logging_redirect_tqdm(), bar:
            while self.step < cfg.train.steps and not spent:
                self.log_window.append(self.train_step())
                if cfg.train.max_minutes:  # where the clock will stop the run, for the bar's ETA
                    pace = self.step / max(self.train_time, 1e-9)
                    bar.total = min(cfg.train.steps, max(self.step, round(pace * 60 * cfg.train.max_minutes)))
                bar.update(1)
                # the clock the schedule follows and a checkpoint keeps: training steps only, so
                # periodic evaluations and saves neither cut the cosine short nor let each
                # resume of a finished run train a few more steps. Ranks see the clock and the
                # signal at different steps: they stop together (any_rank), or the ones still
                # training wait forever on the others' collectives
                (over_time,) = any_rank([bool(cfg.train.max_minutes) and self.train_time >= 60 * cfg.train.max_minutes],
                                        self.env, self.device)
                if over_time:  # the last steps logged before a save at this step keeps them
                    self._flush_log(metrics, bar)
                self._log_evaluate_save(metrics, bar)
                (interrupted,) = any_rank([stop.requested], self.env, self.device)
                if interrupted:
                    status = "interrupted"
                    break
                if over_time:
                    log.warning("train.max_minutes=%s reached at step %d", cfg.train.max_minutes,
                                self.step)
                    status = "time_limit"
                    break
            # the final save under the handler too: a signal during it (often the run's only
            # checkpoint) is noted rather than fatal, and skips the final evaluation
            checkpoint = self.save(final=True) or (self.run_dir / CHECKPOINTS / f"step_{self.step:08d}")
            (stopped,) = any_rank([stop.requested], self.env, self.device)
            evaluation = None
            if not stopped and self.env.world_size == 1:
                # in one process a signal during the final evaluation (a minute of the
                # quickstart) ends it at once: the checkpoint is written, a resume runs it again
                stop.at_once = True
                try:
                    if not stop.requested:  # one that came since the any_rank above
                        evaluation = self._final_evaluation(status, checkpoint)
                    stop.at_once = False
                except _Stopped:
                    pass
                stopped = evaluation is None
        if not stopped and evaluation is None:
            # ranks evaluate under the default handlers, as a signal could reach them at
            # different points of its collectives: it ends the processes
            evaluation = self._final_evaluation(status, checkpoint)
        if stopped and status != "interrupted":
            log.warning("stopping: the checkpoint is written, the final evaluation skipped "
                        "(--resume runs it)")
            status = "interrupted"
        summary = self._summary(status, checkpoint)
        if not stopped:
            summary.update(evaluation)
        if main:
            self._write_summary(summary)
            _plot(self.run_dir / METRICS, self.run_dir / "loss.png")
        if self.env.world_size > 1:
            # the ranks leave together: one that tore its process group down while rank 0 still
            # wrote the summary and the plot sometimes aborted in gloo's teardown (SIGABRT), and
            # torchrun then killed rank 0 before its files were written
            dist.barrier()
        return summary

    def _final_evaluation(self, status: str, checkpoint: Path) -> dict[str, Any]:
        """final_eval, with the summary written first: a run killed during the evaluation then
        reads as trained and checkpointed, not as one still running at step 0."""
        if self.env.is_main:
            self._write_summary({**self._summary(status, checkpoint), "final_eval": "running"})
        with gathered(self.engine, self.cfg.dist.reshard_recurrent):
            return self.final_eval()

    def _log_evaluate_save(self, metrics: _Metrics | None, bar: tqdm) -> None:
        """After a step: its log record, evaluation and checkpoint, each when its schedule says."""
        cfg = self.cfg
        if self.log_window and (self.step % cfg.run.log_every == 0 or self.step == cfg.train.steps):
            self._flush_log(metrics, bar)
        if cfg.eval.every and self.step % cfg.eval.every == 0:
            with gathered(self.engine, cfg.dist.reshard_recurrent):
                val = self.evaluate(cfg.eval.max_tokens)
            log.info("step %d: val loss %.4f", self.step, val)
            if metrics:
                metrics.write({"step": self.step, "val_loss": val})
        if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0:
            self.save(final=self.step == cfg.train.steps)

    def _flush_log(self, metrics: _Metrics | None, bar: tqdm) -> None:
        """Log the steps since the last log as one record (window_means)."""
        record, self.log_window = window_means(self.log_window), []
        bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tok_per_s']:.0f}",
                        loops=f"{record['loops']:.1f}", refresh=False)
        if metrics:
            metrics.write(record)

    def _write_summary(self, summary: dict[str, Any]) -> None:
        atomic_write(self.run_dir / SUMMARY, lambda f: f.write((json.dumps(summary, indent=2) + "\n").encode()))

    def _summary(self, status: str, checkpoint: Path) -> dict[str, Any]:
        return {"status": status, "run_dir": str(self.run_dir), "checkpoint": str(checkpoint),
                "steps": self.step, "tokens_seen": self.tokens_seen,
                "train_time_s": round(self.train_time, 2),
                "tok_per_s": round(self.tokens_seen / max(self.train_time, 1e-9), 1),
                "skipped_steps": self.skipped, "params": self.model.cfg.num_params(),
                "active_params": self.model.cfg.active_params_per_token(), "world_size": self.env.world_size,
                "local_world_size": int(os.environ.get("LOCAL_WORLD_SIZE", self.env.world_size)),
                "strategy": self.cfg.dist.strategy}

    def final_eval(self) -> dict[str, Any]:
        """Full validation loss, the unigram baseline, the depth sweep and a few samples."""
        c = self.cfg.eval
        bpt = self.data.val.bytes_per_token
        val = self.evaluate(0)
        unigram = unigram_loss(np.asarray(self.data.train.tokens), np.asarray(self.data.val.tokens),
                               self.data.tokenizer.vocab_size)
        depths = loss_per_depth(self.model, self.data.val, c.depths, seq_len=self.cfg.data.seq_len,
                                batch_size=c.batch_size, max_tokens=c.depth_max_tokens,
                                autocast_dtype=self.amp_dtype, rank=self.env.rank,
                                world_size=self.env.world_size)
        return {"val_loss": val, "val_ppl": perplexity(val), "val_bpb": bits_per_byte(val, bpt),
                "val_n_loops": c.n_loops or self.model.cfg.max_loop_iters,
                "unigram_loss": unigram, "unigram_bpb": bits_per_byte(unigram, bpt),
                "bytes_per_token": bpt,
                "depth_tokens": scored_targets(self.data.val, self.cfg.data.seq_len, c.depth_max_tokens),
                "loss_per_depth": {str(n): v for n, v in depths.items()},
                "samples": self.samples()}


def read_metrics(path: Path) -> list[dict]:
    """A run's metrics.jsonl as records ([] before its first logged step); a line cut short by
    a crash mid-write is skipped."""
    if not path.exists():
        return []
    records = []
    for line in filter(str.strip, path.read_text().splitlines()):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


class _Metrics:
    """metrics.jsonl, one JSON object per line. On resume, lines past the checkpoint's step
    (logged after it by the run that died) are dropped, so the file reads as one clean run."""

    def __init__(self, path: Path, keep_until: int):
        self.path = path
        if path.exists():
            kept = []
            for line in path.read_text().splitlines():
                try:
                    record = json.loads(line) if line.strip() else None
                except json.JSONDecodeError:  # a line cut short by a crash mid-write
                    log.warning("%s: dropping a line that is not JSON: %.80r", path, line)
                    continue
                if record is not None and record["step"] <= keep_until:
                    kept.append(line + "\n")
            atomic_write(path, lambda f: f.write("".join(kept).encode()))

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def _plot(metrics: Path, out: Path) -> None:
    """loss.png: training and validation loss against step, if matplotlib is installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib is not installed: no loss.png (pip install 'openmythos[plot]')")
        return
    records = read_metrics(metrics)
    if not records:  # a run stopped before its first logged step
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("loss", "train"), ("val_loss", "validation")):
        points = [(r["step"], r[key]) for r in records if key in r]
        if points:
            ax.plot(*zip(*points, strict=True), label=label, marker="o" if key == "val_loss" else None)
    ax.set(xlabel="step", ylabel="loss (nats/token)", title=metrics.parent.name)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def train(cfg: TrainConfig, env: DistEnv | None = None) -> dict[str, Any]:
    """Train (or resume) a run; returns the summary also written to `<run>/summary.json`.
    Under torchrun with dist.strategy='ddp' every rank calls this; the process group is
    joined here and left at the end."""
    try:
        return Trainer(cfg, env).fit()
    finally:
        if env is None and cfg.dist.strategy != "none":
            destroy_distributed()


def report(summary: dict[str, Any]) -> str:
    """The end-of-run text: validation loss and bits/byte beside the unigram baseline, the loss
    per depth and the samples."""
    lines = [f"run: {summary['run_dir']} ({summary['status']}, {summary['steps']} steps, "
             f"{summary['tokens_seen'] / 1e6:.2f}M tokens, {summary['train_time_s']:.0f} s, "
             f"{summary['tok_per_s']:.0f} tok/s)",
             f"checkpoint: {summary['checkpoint']}"]
    if "val_loss" not in summary:
        # the same global batch: the same number of processes
        world, local = summary.get("world_size", 1), summary.get("local_world_size", 1)
        launch = "mythos train"
        if world > 1 or summary.get("strategy", "none") != "none":  # DDP and FSDP2 need torchrun
            nodes = f"--nnodes={world // local} (and its rendezvous flags) " if world > local else ""
            launch = f"torchrun {nodes}--nproc_per_node={local} -m openmythos.cli train"
        lines.append(f"resume with: {launch} --resume {summary['run_dir']}")
        return "\n".join(lines)
    lines += [
        f"validation (n_loops={summary['val_n_loops']}): {summary['val_loss']:.4f} nats/token, "
        f"ppl {summary['val_ppl']:.1f}, {summary['val_bpb']:.4f} bits/byte",
        f"unigram baseline: {summary['unigram_loss']:.4f} nats/token, "
        f"{summary['unigram_bpb']:.4f} bits/byte  ({summary['bytes_per_token']:.3f} bytes/token)",
        f"loss per depth ({summary['depth_tokens']} validation tokens, spread over the split):",
        depth_table({int(n): v for n, v in summary["loss_per_depth"].items()},
                    summary["bytes_per_token"]),
    ]
    for i, text in enumerate(summary["samples"]):
        lines += [f"--- sample {i + 1}", text]
    return "\n".join(lines)

