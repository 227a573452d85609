"""Training: config, optimizer and schedule, checkpoints, the loop."""

from moekit.checkpoint import load_model, resolve_checkpoint, save_checkpoint
from moekit.train.config import TrainConfig
from moekit.train.trainer import Trainer, TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "Trainer", "load_model", "resolve_checkpoint", "save_checkpoint", "train"]
