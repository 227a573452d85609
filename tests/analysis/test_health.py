"""CollapseMonitor, and the trainer's per-layer validation imbalance and collapse warning."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from moekit.analysis.health import CollapseMonitor

BALANCED = [100, 98, 103, 99]
DOMINATED = [700, 100, 100, 100]  # top-1: expert 0 takes 70% of the tokens
DEAD = [150, 150, 100, 0]


def test_warns_once_after_patience_evaluations(caplog):
    monitor = CollapseMonitor(patience=3)
    with caplog.at_level(logging.WARNING, logger="moekit.analysis.health"):
        results = [monitor.update([BALANCED, DOMINATED], top_k=1, layers=[0, 3], step=s) for s in range(6)]
    assert results[:2] == [None, None]
    message = results[2]
    assert message is not None and results[3:] == [None, None, None]
    assert "layer 3" in message and "layer 0" not in message
    assert "expert 0 takes 70% of the tokens" in message and "step 2" in message
    for remedy in ("aux_loss_coef", "sigmoid_topk", "z_loss", "learning rate"):
        assert remedy in message
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1


def test_balanced_layers_never_warn():
    monitor = CollapseMonitor(patience=1)
    assert all(monitor.update([BALANCED, BALANCED], top_k=2) is None for _ in range(5))


def test_dead_experts_warn_and_a_broken_streak_restarts():
    monitor = CollapseMonitor(patience=2)
    assert monitor.update({5: DEAD}) is None
    assert monitor.update({5: BALANCED}) is None  # streak broken
    assert monitor.update({5: DEAD}) is None
    message = monitor.update({5: torch.tensor(DEAD)})
    assert message is not None and "layer 5" in message and "expert 3 is dead" in message


def test_top_k_turns_loads_into_token_shares():
    # Top-2 over 4 experts: 0.5 of the tokens is every expert's fair share, not a collapse.
    assert CollapseMonitor().diagnose([100, 100, 100, 100], top_k=2) is None
    # Top-2 over 8 experts: expert 0 in 90% of tokens (3.6x its fair share) is.
    assert "expert 0 takes 90%" in CollapseMonitor().diagnose([180, 40, 40, 40, 30, 30, 30, 10], top_k=2)


def test_trainer_logs_val_layer_imbalance_and_warns_on_collapse(tmp_path, caplog):
    from moekit.train.config import TrainConfig
    from moekit.train.trainer import Trainer

    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    cfg = TrainConfig.from_dict(
        {"model": "tiny", "data": str(text), "batch_size": 2, "block_size": 16, "max_steps": 4, "eval_interval": 2,
         "eval_batches": 2, "progress": False, "tensorboard": False, "out_dir": str(tmp_path / "run")}
    )  # fmt: skip
    trainer = Trainer(cfg)
    trainer.run()
    evals = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if "val_loss" in r]
    assert len(evals) == 2
    for r in evals:
        assert len(r["val_layer_imbalance"]) == 2 and all(v >= 1.0 for v in r["val_layer_imbalance"])
    # A collapsed validation load, three evaluations in a row: one warning naming the layer.
    trainer.task.val_loads = [torch.tensor([100, 100, 100, 100]), torch.tensor([0, 0, 380, 20])]
    with caplog.at_level(logging.WARNING, logger="moekit.analysis.health"):
        records = [trainer.task.health(trainer.step) for _ in range(4)]
    assert records[0]["val_layer_imbalance"] == pytest.approx([1.0, 3.8])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "layer 1:" in warnings[0] and "experts 0, 1 are dead" in warnings[0]
