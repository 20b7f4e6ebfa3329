"""Training: TrainConfig recipes, the trainer, loop-depth sampling and checkpoints."""

from openmythos.training.checkpoint import (
    Checkpoint,
    find_checkpoint,
    load_model,
    open_checkpoint,
    save_checkpoint,
)
from openmythos.training.config import (
    CheckpointConfig,
    DataConfig,
    DistConfig,
    EvalConfig,
    LoopsConfig,
    ModelSection,
    OptimConfig,
    RunConfig,
    TrainConfig,
    load_config,
    parse_overrides,
    read_toml,
    to_toml,
)
from openmythos.training.loops import LoopSampler
from openmythos.training.optim import build_optimizer, lr_at
from openmythos.training.trainer import (
    DistEnv,
    Trainer,
    TrainingDiverged,
    prepare_data,
    read_metrics,
    report,
    resolve_device,
    train,
)

__all__ = [
    "Checkpoint",
    "CheckpointConfig",
    "DataConfig",
    "DistConfig",
    "DistEnv",
    "EvalConfig",
    "LoopSampler",
    "LoopsConfig",
    "ModelSection",
    "OptimConfig",
    "RunConfig",
    "TrainConfig",
    "Trainer",
    "TrainingDiverged",
    "build_optimizer",
    "find_checkpoint",
    "load_config",
    "load_model",
    "lr_at",
    "open_checkpoint",
    "parse_overrides",
    "prepare_data",
    "read_metrics",
    "read_toml",
    "report",
    "resolve_device",
    "save_checkpoint",
    "to_toml",
    "train",
]
