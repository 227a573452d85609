"""Metrics sinks (JSONL always, TensorBoard when installed) and expert-load statistics."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from moekit.io.atomic import atomic_write_text

log = logging.getLogger(__name__)


def load_imbalance(tokens_per_expert: torch.Tensor) -> float:
    """max / mean of an expert-load vector: 1.0 is perfect balance, E means one expert takes all."""
    load = tokens_per_expert.float()
    mean = load.mean()
    return float(load.max() / mean) if mean > 0 else float("nan")


class MetricsLogger:
    """Appends one JSON object per record to ``metrics.jsonl``; mirrors scalars to TensorBoard."""

    def __init__(self, run_dir: str | os.PathLike, tensorboard: bool = True, resumed_at: int | None = None):
        """``resumed_at``: the step a resumed run continues from; records of later steps (written after that
        checkpoint by the run that was stopped) are dropped, since the resumed run writes them again."""
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resumed_at is not None and self.path.is_file():
            kept = [line for line in self.path.read_text(encoding="utf-8").splitlines() if _step(line) <= resumed_at]
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tb"))
            except ImportError:
                log.warning("tensorboard is not installed; metrics go to %s only", self.path)

    def log(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None and "step" in record:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, record["step"])
                elif isinstance(value, list) and value and all(isinstance(v, (int, float)) for v in value):
                    for i, v in enumerate(value):
                        self._tb.add_scalar(f"{key}/{i}", v, record["step"])

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def _step(line: str) -> float:
    """The step of one metrics.jsonl line; a torn last line (a kill mid-write) counts as past every step."""
    try:
        return float(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return float("inf")


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Every record of a run's ``metrics.jsonl``, in order."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
