"""Training a concept: the configuration (`config`), what the photos become (`data`), the Eq. 5
objective (`objective`), the stage partition's driver (`partition`), one concept's trainer (`trainer`), the
step and the loop of one or several identities (`group`), resumable checkpoints (`checkpoints`) and the
speed-ups that keep the arithmetic (`graph`, `face_patches`)."""

from .checkpoints import CHECKPOINT_FORMAT, checkpoint_name, latest_checkpoint
from .config import DEFAULT_PARTITION_WARMUP_STEPS, TrainConfig
from .data import Batch, TrainingData, prepare_training_data
from .group import GroupTrainer, TrainingDiverged
from .objective import Objective, StepLosses
from .trainer import Trainer

__all__ = [
    "Batch", "CHECKPOINT_FORMAT", "DEFAULT_PARTITION_WARMUP_STEPS", "GroupTrainer", "Objective", "StepLosses",
    "TrainConfig", "Trainer", "TrainingData", "TrainingDiverged", "checkpoint_name", "latest_checkpoint",
    "prepare_training_data",
]
