"""Training: TrainConfig recipes, the trainer, loop-depth sampling and checkpoints."""

from openmythos.training.checkpoint import (
    Checkpoint,
    find_checkpoint,
    load_model,
    open_checkpoint,
    save_checkpoint,
)
from openmythos.training.config import (
    TrainConfig,
    load_config,
    parse_overrides,
    read_toml,
    to_toml,
)
from openmythos.training.loops import LoopSampler
from openmythos.training.trainer import (
    DistEnv,
    Trainer,
    TrainingDiverged,
    prepare_data,
    report,
    resolve_device,
    train,
)

__all__ = [
    "Checkpoint",
    "DistEnv",
    "LoopSampler",
    "TrainConfig",
    "Trainer",
    "TrainingDiverged",
    "find_checkpoint",
    "load_config",
    "load_model",
    "open_checkpoint",
    "parse_overrides",
    "prepare_data",
    "read_toml",
    "report",
    "resolve_device",
    "save_checkpoint",
    "to_toml",
    "train",
]
