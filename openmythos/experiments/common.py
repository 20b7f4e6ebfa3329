"""What every experiment shares: its output folder, machine facts, a report writer and plots.

An experiment writes `report.md` (tables a person reads), `results.json` (the same numbers plus
the command, seed, wall time and machine) and PNG plots into its output directory.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import platform
import shlex
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from openmythos.config import check_threads
from openmythos.training.trainer import resolve_device

log = logging.getLogger(__name__)


@dataclass
class ExperimentConfig:
    """Fields every experiment has; each experiment extends it with its own."""

    out_dir: str = ""  # "" -> runs/experiments/<name>[-smoke]-<time>: a rerun never replaces a result
    seed: int = 0
    smoke: bool = False  # seconds-long run that exercises every code path and the report
    scale: float = 1.0  # multiplies training steps (and widths where the experiment says so)
    # torch intra-op threads, one as in the quickstart (docs/results.md: on a shared 2-core CPU,
    # two threads trained ~40x slower); 0 keeps torch's default
    threads: int = 1
    budget_minutes: float = 14.0  # wall-clock cap on all training; 0 = none (scaled runs)
    device: str = "auto"  # auto: a GPU when there is one, else the CPU
    repeats: int = 1  # seeds per model (seed, seed + 1, ...): differences under their spread are not evidence

    # numeric fields that may be 0; every other number (or list of them) must be positive
    NON_NEGATIVE = frozenset({"seed", "threads", "budget_minutes", "val_chars", "ponder_weight"})

    def __post_init__(self) -> None:
        """Every numeric field in range before anything trains: a bad value found minutes in
        would cost the training before it."""
        for f in fields(self):
            value = getattr(self, f.name)
            for x in value if isinstance(value, list) else [value]:
                if isinstance(x, bool) or not isinstance(x, (int, float)):
                    continue
                rule = ">= 0" if f.name in self.NON_NEGATIVE else "positive"
                if not (x >= 0 if rule == ">= 0" else x > 0):
                    raise ValueError(f"{f.name}={value!r} must be {rule}")
            if isinstance(value, list) and len(set(value)) < len(value):  # one folder, counted twice
                raise ValueError(f"{f.name}={value!r} lists a value twice")
        check_threads(self.threads, "threads")
        resolve_device(self.device, "device")  # e.g. cuda where there is none: before any folder

    @property
    def seeds(self) -> list[int]:
        return [self.seed + i for i in range(self.repeats)]

    def smoke_defaults(self, **settings: Any) -> None:
        """--smoke: seconds-long settings, for the fields the user did not set (`given`, which
        run_experiment records; else those still at their defaults)."""
        given = getattr(self, "given", None)
        for name, value in settings.items():
            f = self.__dataclass_fields__[name]
            default = f.default_factory() if f.default_factory is not MISSING else f.default
            unset = (name not in given) if given is not None else (getattr(self, name) == default)
            if unset:
                setattr(self, name, value)


def flag_value(value: Any) -> str:
    """A field's value as `mythos experiment` takes it on the command line."""
    if isinstance(value, list):
        return ",".join(map(flag_value, value))
    return str(value).lower() if isinstance(value, bool) else str(value)


MARKER = ".openmythos-experiment"  # in every folder an experiment made, and may empty again


def fresh_dir(path: Path) -> Path:
    """An empty folder at `path`: one an earlier run of an experiment made is emptied, one that
    holds anything else is refused, never deleted (an --out_dir may be a user's own folder)."""
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"{str(path)!r} is a file, not a folder: choose another --out_dir")
        if not (path / MARKER).is_file() and any(path.iterdir()):
            raise ValueError(f"{str(path)!r} exists without the {MARKER} file of a folder an "
                             "experiment made: move it (or delete it, if an earlier version of an "
                             "experiment wrote it), or choose another --out_dir")
        shutil.rmtree(path)
    path.mkdir(parents=True)
    (path / MARKER).touch()
    return path


def machine(threads: int = 0) -> dict[str, Any]:
    """Facts about this machine; `threads` is what the run used (0: torch's default)."""
    return {
        "platform": platform.platform(), "python": platform.python_version(),
        "torch": torch.__version__, "cpu_count": os.cpu_count(),
        "threads": threads or torch.get_num_threads(), "load_average": os.getloadavg(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


@dataclass
class Report:
    name: str
    cfg: ExperimentConfig
    sections: list[str] = field(default_factory=list)
    results: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.time)
    out: Path = field(init=False)

    def __post_init__(self) -> None:
        if not self.cfg.out_dir:  # a new folder per run, as mythos train's: a smoke check after a
            # long run must not replace its results
            smoke = "-smoke" if self.cfg.smoke else ""
            base = f"runs/experiments/{self.name}{smoke}-{time.strftime('%Y%m%d-%H%M%S')}"
            names = itertools.chain([base], (f"{base}-{n}" for n in itertools.count(2)))
            self.cfg.out_dir = next(name for name in names if not Path(name).exists())
        # a folder of its own: an --out_dir that holds a user's files is refused, never written
        # into; one an earlier run of an experiment made is emptied (the user named it)
        self.out = fresh_dir(Path(self.cfg.out_dir).expanduser())
        log.info("%s: writing to %s", self.name, self.out)

    def add(self, text: str) -> None:
        self.sections.append(text)

    def figure(self, filename: str, draw: Callable[[Any], None], caption: str) -> None:
        """Draw with matplotlib (the `plot` extra) into filename; skipped if it is missing."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            self.add(f"*(plot {filename} skipped: matplotlib is not installed; "
                     "`pip install openmythos[plot]`)*")
            return
        fig = plt.figure(figsize=(7, 4.5), layout="constrained")
        draw(fig)
        fig.savefig(self.out / filename, dpi=110)
        plt.close(fig)
        self.add(f"![{caption}]({filename})\n\n*{caption}*")

    def command(self) -> str:
        """The `mythos experiment` command that repeats this run: its name and the fields the
        caller set (run_experiment records them), whether it came from the shell or from Python."""
        given = sorted(getattr(self.cfg, "given", ()))
        return " ".join(["mythos experiment", self.name,
                         *(f"--{name} {shlex.quote(flag_value(getattr(self.cfg, name)))}" for name in given)])

    def write(self) -> dict[str, Any]:
        wall = time.time() - self.started
        meta = {"experiment": self.name, "command": self.command(),
                "config": asdict(self.cfg), "wall_seconds": round(wall, 1), "machine": machine(self.cfg.threads)}
        payload = {**meta, "results": self.results}
        (self.out / "results.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
        head = (f"# {self.name}\n\nCommand: `{meta['command']}` · seed {self.cfg.seed} · "
                f"wall time {wall / 60:.1f} min · {meta['machine']['platform']}, "
                f"{meta['machine']['cpu_count']} cores, {meta['machine']['threads']} threads, "
                f"load average {' / '.join(f'{x:.1f}' for x in meta['machine']['load_average'])} "
                f"at the end, torch {torch.__version__}"
                + (" · **smoke run: numbers are meaningless**" if self.cfg.smoke else "") + "\n")
        (self.out / "report.md").write_text("\n\n".join([head, *self.sections]) + "\n")
        return payload


@dataclass
class TimeBudget:
    """Shares a wall-clock budget among an experiment's runs so that each trains for the same
    time, and the models compare at equal time: an even share of the budget less a fifth, held
    back for setup and evaluation (time the cap does not stop). A run gets less only when the
    runs before it overran that fifth (its overhead is the largest seen so far), so that the
    experiment still ends in time on a slow or shared machine. A run cut short says so."""

    minutes: float
    runs: int
    done: int = 0
    overhead_s: float = 0.0
    share_s: float | None = None  # every run's training time, set by the first
    start: float = field(default_factory=time.perf_counter)

    def next_minutes(self) -> float:
        """Training minutes for the next run; 0 means no limit."""
        if not self.minutes:
            return 0.0
        left = 60 * self.minutes - (time.perf_counter() - self.start)
        if self.share_s is None:
            self.share_s = 0.8 * left / self.runs
        fits = left / (self.runs - self.done) - self.overhead_s
        return max(min(self.share_s, fits), 5.0) / 60

    def finished(self, wall_s: float, train_s: float) -> None:
        self.done += 1
        self.overhead_s = max(self.overhead_s, wall_s - train_s)


@contextmanager
def threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
