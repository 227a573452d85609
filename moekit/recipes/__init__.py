"""Recipes that turn one model into another: distillation, expert pruning and expert merging."""

from moekit.recipes.calibration import Criterion, LayerStats, calibration_batches, collect_expert_stats
from moekit.recipes.distill import DistillConfig, DistillTrainer, distill, distillation_loss, kd_loss
from moekit.recipes.merge import cluster_experts, merge, merge_checkpoint
from moekit.recipes.prune import prune, prune_checkpoint, prune_experts, rebuild_with_experts, select_experts

__all__ = [
    "Criterion",
    "DistillConfig",
    "DistillTrainer",
    "LayerStats",
    "calibration_batches",
    "cluster_experts",
    "collect_expert_stats",
    "distill",
    "distillation_loss",
    "kd_loss",
    "merge",
    "merge_checkpoint",
    "prune",
    "prune_checkpoint",
    "prune_experts",
    "rebuild_with_experts",
    "select_experts",
]
