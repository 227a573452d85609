"""Stopping a training run cleanly on SIGINT (Ctrl-C) or SIGTERM (a cluster's preemption notice)."""

from __future__ import annotations

import signal
import threading
from typing import Any


class StopOnSignal:
    """While active, SIGINT and SIGTERM (Ctrl-C, a cluster's preemption) only ask the loop to stop after the
    current step; the first one restores the previous handlers, so a second one stops the process at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum
        self._restore()

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():  # Python delivers signals to the main thread
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        self._restore()
