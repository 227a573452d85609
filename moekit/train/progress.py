"""The training progress bar: loss, tokens/s, ETA and expert-load imbalance, via rich."""

from __future__ import annotations

import time
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from moekit.train.config import RunConfig


class TrainProgress:
    """A context manager around rich's Progress; ``update(record)`` after each step."""

    def __init__(self, config: RunConfig, start_step: int, enabled: bool = True, console: Console | None = None):
        self.config = config
        self.enabled = enabled
        self.console = console or Console(stderr=True)
        self.budget = config.time_budget
        self._start = time.perf_counter()
        self._progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn() if self.budget is None else TextColumn("{task.fields[step]} steps"),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[tps]} tok/s"),
            TextColumn("imb {task.fields[imb]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.console,
            disable=not enabled,
        )
        total = config.max_steps if self.budget is None else self.budget
        done = start_step if self.budget is None else 0
        self._task = self._progress.add_task(
            "train", total=total, completed=done, step=start_step, loss="-", tps="-", imb="-"
        )

    def __enter__(self) -> TrainProgress:
        self._progress.__enter__()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._progress.__exit__(exc_type, exc, tb)

    def update(self, record: dict) -> None:
        completed = record["step"] if self.budget is None else min(time.perf_counter() - self._start, self.budget)
        self._progress.update(
            self._task,
            completed=completed,
            step=record["step"],
            loss=f"{record['loss']:.4f}",
            tps=f"{record['tokens_per_sec']:,.0f}",
            imb=f"{record['imbalance']:.2f}",
        )

    def note(self, message: str) -> None:
        """A line printed above the bar (or plainly when the bar is off)."""
        if self.enabled:
            self._progress.console.print(message)
