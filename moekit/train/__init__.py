"""Training: configs, the one loop and its language-model task, optimizers and schedules."""

from moekit.checkpoint import load_model, resolve_checkpoint, save_checkpoint
from moekit.train.config import RunConfig, TaskTrainConfig, TrainConfig
from moekit.train.loop import Loop, StepLoss, TrainResult
from moekit.train.trainer import Trainer, train

__all__ = [
    "Loop",
    "RunConfig",
    "StepLoss",
    "TaskTrainConfig",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "load_model",
    "resolve_checkpoint",
    "save_checkpoint",
    "train",
]
