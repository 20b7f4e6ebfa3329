"""Language-model runs for the experiments: one `train()` call per model on the bundled corpus,
with the experiment's overrides, a share of its time budget, and its logged metrics read back."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from openmythos.config import MythosConfig
from openmythos.data.corpus import NAMED_CORPORA, load_corpus
from openmythos.experiments.common import ExperimentConfig, TimeBudget, fresh_dir
from openmythos.training.config import TOKENIZERS, is_tokenizer_source, load_config
from openmythos.training.trainer import METRICS, TrainingDiverged, read_metrics, train


@dataclass
class LMExperimentConfig(ExperimentConfig):
    corpus: str = "sotu"  # a named corpus or a text file / folder (see `mythos train`)
    tokenizer: str = "bpe"  # "bpe" (8192, trained on the train split), "gpt2" or "byte"
    val_chars: int = 100_000  # validate on this much of the held-out split; 0 = all of it

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.corpus not in NAMED_CORPORA and not (self.corpus.strip() and Path(self.corpus).expanduser().exists()):
            raise ValueError(f"corpus={self.corpus!r} is neither one of {NAMED_CORPORA} nor an existing path")
        if not is_tokenizer_source(self.tokenizer):
            raise ValueError(f"tokenizer={self.tokenizer!r} is neither one of {TOKENIZERS} nor a saved "
                             "tokenizer's directory")


def check_models(*models: dict[str, Any]) -> None:
    """Models given as overrides of the tiny preset (as `lm_run` takes them), checked before any
    folder is made: a bad width found after the corpus copy, or a first model's training, would
    cost that time and leave the folder behind."""
    for model in models:
        MythosConfig.from_preset("tiny", **model)


def width(dim: int) -> dict[str, int]:
    """Overrides that make the tiny preset `dim` wide, its latent ranks and experts in proportion."""
    return {"dim": dim, "kv_lora_rank": dim // 4, "q_lora_rank": dim // 2, "expert_dim": dim // 2}


def corpus_split(cfg: LMExperimentConfig, out: Path) -> dict[str, str]:
    """Data overrides: train on the corpus's train split, validate on the first `val_chars`
    characters of its held-out split. The trainer's final evaluation reads the whole validation
    set, which for sotu takes longer than a short run's training."""
    if not cfg.val_chars:
        return {"data.corpus": cfg.corpus}
    corpus = load_corpus(cfg.corpus)
    data = fresh_dir(out / "data")
    train_dir, val_file = data / "train", data / "val.txt"
    train_dir.mkdir()
    for i, doc in enumerate(corpus.train):
        (train_dir / f"{i:05d}.txt").write_text(doc.text)
    val_file.write_text("\n\n".join(d.text for d in corpus.val)[:cfg.val_chars])
    return {"data.corpus": str(train_dir), "data.val_path": str(val_file)}


def lm_run(cfg: LMExperimentConfig, out_dir: Path, model: dict[str, Any],
           settings: dict[str, Any], budget: TimeBudget) -> dict[str, Any]:
    """Train one model; returns its summary plus `metrics` (the JSONL records) and `diverged`.

    `model` holds MythosConfig overrides of the tiny preset; `settings` holds dotted TrainConfig
    overrides ("train.lr": 1e-3) including the data ones from `corpus_split`. A run that aborts on
    non-finite steps counts as diverged; one cut short by the budget has status "time_limit"."""
    overrides = {f"model.{k}": v for k, v in model.items()}
    # the experiments' own training settings, not the quickstart's (Muon, random depth): a
    # fixed n_loops and AdamW, so that an lr sweep and a depth mean what they say
    overrides.update({"train.optimizer": "adamw", "loops.sampler": "fixed", "run.dtype": "fp32"})
    overrides.update({"run.out_dir": str(out_dir), "run.seed": cfg.seed, "run.progress": not cfg.smoke,
                      "run.threads": cfg.threads, "run.device": cfg.device, "data.tokenizer": cfg.tokenizer,
                      "eval.samples": 0, "train.max_minutes": budget.next_minutes(), **settings})
    train_cfg = load_config(None, overrides)
    fresh_dir(out_dir)  # an experiment rerun starts its models afresh
    start = time.perf_counter()
    try:
        summary, diverged = train(train_cfg), False
    except TrainingDiverged as e:
        summary, diverged = {"error": str(e)}, True
    wall = time.perf_counter() - start
    budget.finished(wall, summary.get("train_time_s", wall))
    return {**summary, "metrics": read_metrics(out_dir / METRICS), "diverged": diverged}
