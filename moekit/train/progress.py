"""The training progress bar: loss, tokens/s, ETA and expert-load imbalance, via rich."""

from __future__ import annotations

from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class TrainProgress:
    """A context manager around rich's Progress; ``update(record)`` after each step. ``total`` is the run's
    last step, None while a time-budgeted run has not fixed it (``set_total`` then)."""

    def __init__(self, start_step: int, total: int | None, enabled: bool = True, console: Console | None = None):
        self.enabled = enabled
        self.console = console or Console(stderr=True)
        self._progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("steps  loss {task.fields[loss]}"),
            TextColumn("{task.fields[tps]} tok/s (steps)"),
            TextColumn("imb {task.fields[imb]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.console,
            disable=not enabled,
        )
        self._task = self._progress.add_task("train", total=total, completed=start_step, loss="-", tps="-", imb="-")

    def set_total(self, total: int) -> None:
        self._progress.update(self._task, total=total)

    def __enter__(self) -> TrainProgress:
        self._progress.__enter__()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._progress.__exit__(exc_type, exc, tb)

    def update(self, record: dict) -> None:
        self._progress.update(
            self._task,
            completed=record["step"],
            loss=f"{record['loss']:.4f}",
            tps=f"{record['tokens_per_sec']:,.0f}",
            imb=f"{record['imbalance']:.2f}",
        )

    def note(self, message: str) -> None:
        """A line printed above the bar (or plainly when the bar is off)."""
        if self.enabled:
            self._progress.console.print(message)
