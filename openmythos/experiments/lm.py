"""Language-model runs for the experiments: one `train()` call per model on the bundled corpus,
with the experiment's overrides, and its logged metrics read back."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from openmythos.experiments.common import ExperimentConfig
from openmythos.training.config import load_config
from openmythos.training.trainer import METRICS, TrainingDiverged, train


@dataclass
class LMExperimentConfig(ExperimentConfig):
    corpus: str = "sotu"  # a named corpus or a text file / folder (see `mythos train`)
    tokenizer: str = "bpe"  # "bpe" (8192, trained on the train split), "gpt2" or "byte"


def lm_run(cfg: LMExperimentConfig, out_dir: Path, model: dict[str, Any],
           settings: dict[str, Any]) -> dict[str, Any]:
    """Train one model; returns its summary plus `metrics` (the JSONL records) and `diverged`.

    `model` holds MythosConfig overrides of the tiny preset; `settings` holds dotted TrainConfig
    overrides ("train.lr": 1e-3). A run that aborts on non-finite steps counts as diverged."""
    overrides = {f"model.{k}": v for k, v in model.items()}
    overrides.update({"run.out_dir": str(out_dir), "run.seed": cfg.seed, "run.progress": False,
                      "run.threads": cfg.threads, "data.corpus": cfg.corpus,
                      "data.tokenizer": cfg.tokenizer, "eval.samples": 0, **settings})
    cfg = load_config(None, overrides)
    shutil.rmtree(out_dir, ignore_errors=True)  # an experiment rerun starts its models afresh
    try:
        summary, diverged = train(cfg), False
    except TrainingDiverged as e:
        summary, diverged = {"error": str(e)}, True
    records = [json.loads(line) for line in (out_dir / METRICS).read_text().splitlines()
               if line.strip()] if (out_dir / METRICS).exists() else []
    return {**summary, "metrics": records, "diverged": diverged}
