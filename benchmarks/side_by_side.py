"""Run a benchmark's models at the same time, each pinned to its own core: equal time under equal load.

On a small machine, training model A and then model B lets whatever else runs meanwhile favour one of
them; side by side, each gets one core for the same wall-clock budget.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable


def _child(fn: Callable[..., dict], args: tuple, core: int, queue) -> None:
    os.sched_setaffinity(0, {core})
    queue.put(fn(*args))


def run_side_by_side(fn: Callable[..., dict], jobs: list[tuple]) -> list[dict]:
    """``[fn(*job) for job in jobs]``, each call in its own process on its own core; results in job order.

    ``fn`` must be importable (a module-level function) and return a picklable dict.
    """
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < len(jobs):
        raise SystemExit(f"side by side needs {len(jobs)} cores, this process may use {cores}")
    ctx = multiprocessing.get_context("spawn")
    queues = [ctx.Queue() for _ in jobs]
    procs = [ctx.Process(target=_child, args=(fn, job, core, q)) for job, core, q in zip(jobs, cores, queues)]
    for proc in procs:
        proc.start()
    results = [q.get() for q in queues]
    for proc in procs:
        proc.join()
    return results
