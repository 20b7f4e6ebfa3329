"""Checkpoints: one directory per step under `<run>/checkpoints/step_XXXXXXXX/`.

    model.safetensors   weights and buffers (the MoE balancing bias included)
    trainer_state.pt    optimizer, step counters, every RNG (torch, numpy, python, data, loops)
    dcp/                FSDP2 runs instead: model and optimizer state as DCP shards
                        (torch.distributed.checkpoint), one file per rank; model.safetensors,
                        the consolidated weights, is added to the run's final checkpoint only
    config.json         the TrainConfig and the resolved MythosConfig
    tokenizer/          the tokenizer the run trained with
    manifest.json       size and sha256 of every file above, written last

A checkpoint is written into a hidden temporary directory, fsynced, and renamed into place, so a
crash mid-write never leaves a directory that looks finished (for DCP every rank writes its shard
into the same temporary directory, which needs a filesystem shared by all nodes). The manifest is
the proof of completion: a step directory whose manifest is missing or disagrees with its files is rejected,
and loading the newest checkpoint of a run falls back to the previous good one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import FSDPModule

from openmythos.config import MythosConfig
from openmythos.data import PackedTokens, Tokenizer, load_tokenizer
from openmythos.data.tokenizer import check_fits
from openmythos.model import OpenMythos
from openmythos.training.config import TrainConfig
from openmythos.training.optim import fused_groups

FORMAT_VERSION = 1
STEP_PREFIX = "step_"
TMP_PREFIX = ".tmp-"
CHECKPOINTS = "checkpoints"
WEIGHTS = "model.safetensors"
STATE = "trainer_state.pt"
CONFIG = "config.json"
TOKENIZER = "tokenizer"
MANIFEST = "manifest.json"
SHARDED = "dcp"


@dataclass
class Checkpoint:
    path: Path
    step: int
    train_cfg: TrainConfig
    model_cfg: MythosConfig
    data: dict[str, str] = field(default_factory=dict)  # split -> PackedTokens.digest, as trained

    def changed_splits(self, train: PackedTokens, val: PackedTokens) -> list[str]:
        """The splits, recomputed from the run's files now, that differ from those it trained on
        (files added, removed or edited since; a checkpoint from before the record: none)."""
        return [name for name, split in (("train", train), ("val", val))
                if name in self.data and self.data[name] != split.digest]

    @property
    def sharded(self) -> bool:
        """Written by an FSDP2 run: model and optimizer live in DCP shards."""
        return (self.path / SHARDED).is_dir()

    def load_weights(self, model: OpenMythos) -> None:
        """Into a plain (unsharded) model; DCP shards are gathered here, in this process."""
        if self.sharded and not (self.path / WEIGHTS).is_file():
            state = {"model": get_model_state_dict(model)}
            self._load_shards(state)
            set_model_state_dict(model, state["model"])
            return
        weights = self._read_weights(str(model.embed.weight.device))
        try:
            model.load_state_dict(weights)
        except RuntimeError as e:  # missing, unexpected or mis-shaped tensors
            raise ValueError(f"checkpoint {str(self.path)!r} does not match its model config: {e}") from e

    def load_training_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Weights and optimizer state into a plain or FSDP2-sharded model, from a checkpoint
        that holds DCP shards or whole tensors; DCP reshards, so the world size may differ."""
        if self.sharded:
            msd, osd = get_state_dict(model, optimizer)
            saved = self._shard_keys()
            # a parameter that never had a gradient (the ACT unit with halting off) has no
            # optimizer state in the checkpoint: it keeps the empty state the fresh optimizer gave
            # it (non-strict), and with no gradient it is never stepped. The model's keys are
            # checked in _load_shards.
            osd["state"] = {name: v for name, v in osd["state"].items()
                            if any(k.startswith(f"optim.state.{name}.") for k in saved)}
            state = {"model": msd, "optim": osd}
            self._load_shards(state)
            set_state_dict(model, optimizer, model_state_dict=state["model"],
                           optim_state_dict=state["optim"], options=StateDictOptions(strict=False))
            return
        whole = fused_groups(self.trainer_state["optimizer"])
        if not isinstance(model, FSDPModule):
            self.load_weights(model)
            optimizer.load_state_dict(whole)
            return
        # whole tensors into shards: rank 0 reads them and every rank takes its shard
        main = dist.get_rank() == 0
        weights = self._read_weights("cpu") if main else {}
        opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_model_state_dict(model, weights, options=opts)
        opts.strict = False  # parameters that never had a gradient have no optimizer state
        whole = _by_name(model, optimizer, whole) if main else {}
        set_optimizer_state_dict(model, optimizer, whole, options=opts)

    def _read_weights(self, device: str) -> dict[str, torch.Tensor]:
        try:
            return load_file(self.path / WEIGHTS, device=device)
        except (SafetensorError, OSError) as e:
            raise ValueError(f"checkpoint weights {str(self.path / WEIGHTS)!r} are unreadable: "
                             f"{e}") from e

    def _shard_keys(self) -> set[str]:
        return set(dcp.FileSystemReader(self.path / SHARDED).read_metadata().state_dict_metadata)

    def _load_shards(self, state: dict[str, Any]) -> None:
        saved = self._shard_keys()
        missing = sorted(k for k in state["model"] if f"model.{k}" not in saved)
        if missing:
            raise ValueError(f"checkpoint {str(self.path)!r} does not match its model config: "
                             f"its shards lack {missing[:5]}")
        try:
            dcp.load(state, checkpoint_id=self.path / SHARDED, no_dist=not dist.is_initialized())
        except (CheckpointException, RuntimeError, OSError) as e:  # truncated or mis-shaped shards
            raise ValueError(f"checkpoint shards {str(self.path / SHARDED)!r} are unreadable: "
                             f"{e}") from e

    @cached_property
    def trainer_state(self) -> dict[str, Any]:
        """Optimizer, counters and RNGs, read once (a resume consults them three times)."""
        return torch.load(self.path / STATE, map_location="cpu", weights_only=True)

    def tokenizer(self) -> Tokenizer:
        return load_tokenizer(self.path / TOKENIZER)


def save_checkpoint(run_dir: Path, step: int, model: OpenMythos, train_cfg: TrainConfig,
                    tokenizer: Tokenizer, state: dict[str, Any], keep: int) -> Path:
    """Write `<run_dir>/checkpoints/step_<step>` atomically, then keep only the newest `keep`.
    One process writes it: the single-process and DDP layout (model.safetensors)."""
    model = getattr(model, "_orig_mod", model)  # torch.compile(model): its weights, without the prefix
    # what loading it needs to hold (a hand-built TrainConfig may describe another model)
    if train_cfg.data.seq_len > model.cfg.max_seq_len:
        raise ValueError(f"train_cfg.data.seq_len={train_cfg.data.seq_len} exceeds the model's max_seq_len="
                         f"{model.cfg.max_seq_len}: pass the TrainConfig the model trains with")
    check_fits(tokenizer, model.cfg.vocab_size)
    root, tmp = Path(run_dir) / CHECKPOINTS, None
    try:
        tmp = _new_tmp(root, step)
        weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        return _finish(root, tmp, step, model, train_cfg, tokenizer, state, keep, weights)
    except (OSError, RuntimeError, SafetensorError) as e:  # torch.save reports a full disk as a RuntimeError
        raise _write_failed(root, tmp, step, e) from e


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full disk, a read-only folder); nothing half-written is
    left, and the checkpoints before it are untouched."""


def _write_failed(root: Path, tmp: Path | None, step: int,
                  error: Exception | CheckpointException) -> CheckpointWriteError:
    """The error for a failed save, after removing its half-written folder, which would otherwise
    keep a full disk full and block the resume."""
    if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)
    # a collective that failed (a rank died, its connection broke) is not the disk's doing
    hint = ("did another rank fail?" if isinstance(error, dist.DistError)
            or any(s in str(error) for s in ("gloo", "NCCL", "Connection reset"))
            else "is the disk full or the folder read-only?")
    if isinstance(error, CheckpointException):  # DCP's: each failed rank's exception and traceback
        error = "; ".join(f"rank {rank}: {exc!r}" for rank, (exc, _) in error.failures.items())
    kept = next(iter(_step_dirs(root)), None) if root.is_dir() else None
    return CheckpointWriteError(
        f"could not write checkpoint step {step} in {str(root)!r}: {error} ({hint}); "
        + (f"the newest checkpoint is still {kept.name}" if kept else "no checkpoint was written yet"))


def save_sharded(run_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                 train_cfg: TrainConfig, tokenizer: Tokenizer, state: dict[str, Any], keep: int,
                 consolidate: bool = False) -> Path:
    """The FSDP2 layout, written collectively by every rank: DCP shards of the model and the
    optimizer in `dcp/`, plus (with `consolidate`) the whole weights as model.safetensors,
    which `mythos eval` and `mythos generate` read. Rank 0 writes the rest and renames."""
    root = Path(run_dir) / CHECKPOINTS
    main = dist.get_rank() == 0
    shared = [None]
    if main:
        try:
            shared = [_new_tmp(root, step)]
        except OSError as e:
            shared = [_write_failed(root, None, step, e)]
    dist.broadcast_object_list(shared, src=0)  # every rank writes into rank 0's directory
    if isinstance(shared[0], Exception):  # every rank stops with rank 0's error
        raise shared[0]
    tmp = Path(shared[0])
    try:
        msd, osd = get_state_dict(model, optimizer)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=tmp / SHARDED)
        weights = None
        if consolidate:  # collective: every rank sends its shards, rank 0 alone receives
            weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                           cpu_offload=True))
    except (OSError, RuntimeError, CheckpointException) as e:  # DCP raises a failed write on every rank
        raise _write_failed(root, tmp if main else None, step, e) from e
    final = None
    if main:
        try:
            final = _finish(root, tmp, step, model, train_cfg, tokenizer, state, keep, weights)
        except (OSError, RuntimeError, SafetensorError) as e:
            final = _write_failed(root, tmp, step, e)
    shared = [final]
    dist.broadcast_object_list(shared, src=0)  # also a barrier: nobody reads it unfinished
    if isinstance(shared[0], Exception):
        raise shared[0]
    return Path(shared[0])


def _new_tmp(root: Path, step: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f"{TMP_PREFIX}{STEP_PREFIX}{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def readable_as_umask(path: Path) -> None:
    """The permissions any other file written here gets (0644 under the usual umask): safetensors
    writes its files owner-only (0600), so a colleague could read a run's config and tokenizer
    but not its weights."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)


def _finish(root: Path, tmp: Path, step: int, model: nn.Module, train_cfg: TrainConfig,
            tokenizer: Tokenizer, state: dict[str, Any], keep: int,
            weights: dict[str, torch.Tensor] | None) -> Path:
    """Everything but the shards, then the manifest, fsync, and the rename that publishes it."""
    final = root / f"{STEP_PREFIX}{step:08d}"
    if weights is not None:
        weights = {k: v.detach().contiguous().cpu() for k, v in weights.items()}
        save_file(weights, tmp / WEIGHTS, metadata={"step": str(step)})
        readable_as_umask(tmp / WEIGHTS)
    torch.save(state, tmp / STATE)
    config = {"format": FORMAT_VERSION, "step": step, "train": train_cfg.to_dict(),
              "model": model.cfg.to_dict(), "data": state.get("data", {})}
    (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    tokenizer.save(tmp / TOKENIZER)
    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    manifest = {"format": FORMAT_VERSION, "step": step,
                "files": {p.relative_to(tmp).as_posix(): _describe(p) for p in files}}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    for p in [*files, tmp / MANIFEST, *(d for d in tmp.rglob("*") if d.is_dir())]:
        _fsync(p)
    _fsync(tmp)
    if final.exists():  # re-saving a step (Ctrl-C right after a periodic save): replace it
        old = root / f"{TMP_PREFIX}old-{final.name}-{os.getpid()}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    try:  # published: what fails from here on costs old checkpoints' space, not this one
        _fsync(root)
        _prune(root, keep, step)
    except OSError as e:
        warnings.warn(f"checkpoint {final.name} is written, but pruning older ones failed: {e}", stacklevel=2)
    return final


def _by_name(model: nn.Module, optimizer: torch.optim.Optimizer,
             state: dict[str, Any]) -> dict[str, Any]:
    """`optimizer.state_dict()` (parameters numbered in group order) keyed by parameter name
    instead, the form `set_optimizer_state_dict` takes."""
    names = {p: n for n, p in model.named_parameters()}
    order = [names[p] for group in optimizer.param_groups for p in group["params"]]
    return {"state": {order[i]: v for i, v in state["state"].items()},
            "param_groups": [{**g, "params": [order[i] for i in g["params"]]}
                             for g in state["param_groups"]]}


def _describe(path: Path) -> dict[str, Any]:
    return {"bytes": path.stat().st_size, "sha256": _sha256(path)}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _is_step_name(name: str) -> bool:
    return name.startswith(STEP_PREFIX) and name[len(STEP_PREFIX):].isdecimal()


def _step_dirs(root: Path) -> list[Path]:
    """Finished-looking step directories, newest first."""
    dirs = [p for p in root.glob(f"{STEP_PREFIX}*") if p.is_dir() and _is_step_name(p.name)]
    return sorted(dirs, key=_step_of, reverse=True)


def has_checkpoint(run_dir: str | Path) -> bool:
    """Whether a run directory holds a finished-looking checkpoint (find_checkpoint verifies it)."""
    return bool(_step_dirs(Path(run_dir).expanduser() / CHECKPOINTS))


def checkpoints_after(run_dir: Path, step: int) -> list[Path]:
    """The complete step directories of `run_dir` past `step`, newest first (an incomplete one,
    a save that crashed, is replaced when the run saves that step again)."""
    return [p for p in _step_dirs(run_dir / CHECKPOINTS) if _step_of(p) > step and _verifies(p)]


def _step_of(path: Path) -> int:
    return int(path.name[len(STEP_PREFIX):])


def _verifies(path: Path) -> bool:
    try:
        verify(path)
        return True
    except ValueError:
        return False


def _prune(root: Path, keep: int, step: int) -> None:
    """Keep the newest `keep` checkpoints up to `step`, the one just written; a later one (a
    save that crashed before a resume from an earlier step) waits to be replaced at its step."""
    for old in [p for p in _step_dirs(root) if _step_of(p) <= step][keep:]:
        shutil.rmtree(old)
    for tmp in root.glob(f"{TMP_PREFIX}*"):  # left by a save that crashed
        shutil.rmtree(tmp, ignore_errors=True)


# (checkpoint, each file's size and mtime) -> its manifest: a resume opens the checkpoint twice
# (the command line for its config, then the trainer), and each read of a large one is minutes
_VERIFIED: dict[tuple, dict[str, Any]] = {}


def verify(path: Path) -> dict[str, Any]:
    """The manifest of a complete checkpoint, or ValueError saying what is wrong. Each file's
    sha256 is checked once per process while its size and mtime stay the same."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise ValueError(f"checkpoint {str(path)!r} is incomplete: it has no {MANIFEST} "
                         "(the write was interrupted, or this is not a checkpoint)")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = {str(name): (int(want["bytes"]), str(want["sha256"]))
                 for name, want in manifest["files"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # JSON, UTF-8 or its shape
        raise ValueError(f"checkpoint manifest {str(manifest_path)!r} is corrupt: {e!r}") from e
    stamps = []
    for name, (size, _) in files.items():
        p = path / name
        if not p.is_file():
            raise ValueError(f"checkpoint {str(path)!r} is missing {name}")
        stat = p.stat()
        if stat.st_size != size:
            raise ValueError(f"checkpoint file {str(p)!r} has {stat.st_size} bytes, the manifest "
                             f"says {size}: it is truncated or was overwritten")
        stamps.append((name, stat.st_mtime_ns))
    key = (str(path.resolve()), tuple(stamps))
    if key not in _VERIFIED:
        for name, (_, digest) in files.items():
            if _sha256(path / name) != digest:
                raise ValueError(f"checkpoint file {str(path / name)!r} fails its sha256 check: it is corrupt")
        _VERIFIED[key] = manifest
    return manifest


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory itself, or the newest complete one in a run (or checkpoints) dir.

    A newer checkpoint that fails verification is skipped with a warning, so a crash during a
    save costs one checkpoint interval, never the run.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise ValueError(f"checkpoint path {str(path)!r} does not exist")
    # a checkpoint itself: its manifest, or a step_N folder whose save was cut short (verify then
    # names what is missing); not a run folder named like one (it holds checkpoints/)
    if (path / MANIFEST).is_file() or (_is_step_name(path.name) and not (path / CHECKPOINTS).is_dir()):
        verify(path)
        return path
    root = path / CHECKPOINTS if (path / CHECKPOINTS).is_dir() else path
    candidates = _step_dirs(root)
    if not candidates:
        raise ValueError(f"no checkpoint found in {str(path)!r} (looked for {STEP_PREFIX}* "
                         f"directories in {str(root)!r})")
    errors = []
    for candidate in candidates:
        try:
            verify(candidate)
        except ValueError as e:
            errors.append(str(e))
            continue
        for error in errors:  # said once: in the error below when no checkpoint is left
            warnings.warn(f"skipping {error}", stacklevel=2)
        return candidate
    raise ValueError(f"no complete checkpoint in {str(root)!r}: " + "; ".join(errors))


def open_checkpoint(path: str | Path) -> Checkpoint:
    ckpt = find_checkpoint(path)
    try:
        meta = json.loads((ckpt / CONFIG).read_text())
        model_cfg = MythosConfig.from_dict(meta["model"])
        train_cfg = TrainConfig.from_dict(meta["train"])
        step, data = int(meta["step"]), dict(meta.get("data", {}))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"checkpoint config {str(ckpt / CONFIG)!r} is corrupt: {e!r}") from e
    return Checkpoint(ckpt, step, train_cfg, model_cfg, data)


def is_hf_export(path: str | Path) -> bool:
    """A directory written by `mythos export-hf` (save_hf): its config.json names the openmythos
    model type. A config.json that is not JSON is named, not taken for a missing checkpoint."""
    file = Path(path).expanduser() / "config.json"
    if not file.is_file():
        return False
    try:
        config = json.loads(file.read_text())
    except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ValueError(f"{str(file)!r} cannot be read as JSON: {e}") from e
    return isinstance(config, dict) and config.get("model_type") == "openmythos"


def run_dir_of(ckpt: Checkpoint) -> Path:
    """The run directory a checkpoint belongs to (`<run>/checkpoints/step_N` -> `<run>`)."""
    return ckpt.path.parent.parent if ckpt.path.parent.name == CHECKPOINTS else ckpt.path.parent


def load_model(checkpoint: str | Path, device: str | torch.device = "cpu"
               ) -> tuple[OpenMythos, Tokenizer, TrainConfig]:
    """The model (in eval mode), its tokenizer and the TrainConfig it was trained with, from a
    checkpoint directory or a run directory (its newest complete checkpoint)."""
    ckpt = open_checkpoint(checkpoint)
    tokenizer = ckpt.tokenizer()
    check_fits(tokenizer, ckpt.model_cfg.vocab_size, f"checkpoint {str(ckpt.path)!r}: ")
    # built on the device, not on meta: meta init imports torch._dynamo, seconds that a small
    # model's random init does not cost
    with torch.device(device):
        model = OpenMythos(ckpt.model_cfg)
    ckpt.load_weights(model)
    return model.eval(), tokenizer, ckpt.train_cfg
