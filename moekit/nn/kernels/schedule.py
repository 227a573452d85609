"""The CPU job scheduler every per-expert loop of moekit runs on: :func:`run_jobs` runs the jobs inline or on
single-threaded workers (:class:`_ScheduleChooser` says which wins when), :func:`intra_op_threads` sets
this thread's OpenMP threads. On other devices the jobs run inline (the device queues them).
"""

from __future__ import annotations

import contextlib
import functools
import os
import queue
import threading
import time
from collections.abc import Callable, Hashable, Iterator, Sequence

import torch

from moekit.errors import ConfigError


# -- threads -------------------------------------------------------------------------------------
@functools.cache
def _openmp_backend() -> bool:
    """ATen on OpenMP: intra-op thread counts are per calling thread, so workers can each use one."""
    return "parallel backend: OpenMP" in torch.__config__.parallel_info()


@contextlib.contextmanager
def intra_op_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` intra-op threads in this thread (OpenMP builds; else a no-op).

    moekit runs its many small ops (routing, dispatch, losses, the combine) with one thread: each
    multi-threaded op is an OpenMP fork/join, which costs microseconds on an idle machine but up to
    a scheduler time slice when other processes hold the cores (measured on a loaded 2-core box:
    routing + dispatch + losses of 2048 tokens x 64 experts 116 ms on 2 threads vs 21 ms on one).
    """
    before = torch.get_num_threads()
    if n == before or not _openmp_backend():
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class _Workers:
    """Daemon threads that each run with one intra-op thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()

    def reset_after_fork(self) -> None:
        self._lock = threading.Lock()
        self._threads = []
        self._tasks = queue.SimpleQueue()

    def _loop(self, ready: threading.Event) -> None:
        torch.get_num_threads()  # run ATen's lazy per-thread init now, so it cannot undo the next line
        torch.set_num_threads(1)
        ready.set()
        while True:
            task = self._tasks.get()
            task()
            del task  # drop the job's references (e.g. gradient buffers autograd wants to own) now

    def ensure(self, n: int) -> None:
        """Start threads until there are n; keeps the caller's intra-op thread count intact."""
        if len(self._threads) >= n:
            return
        with self._lock:
            if len(self._threads) >= n:
                return
            caller_threads = torch.get_num_threads()
            while len(self._threads) < n:
                ready = threading.Event()
                t = threading.Thread(target=self._loop, args=(ready,), name="moekit-expert", daemon=True)
                t.start()
                ready.wait()
                self._threads.append(t)
            # set_num_threads(1) in a worker also set ATen's process-wide default; put it back.
            torch.set_num_threads(caller_threads)

    def submit(self, fn: Callable[[], None]) -> None:
        self._tasks.put(fn)


_WORKERS = _Workers()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_WORKERS.reset_after_fork)


# -- schedules -------------------------------------------------------------------------------------
SCHEDULES = ("inline", "workers", "auto")


class _ScheduleChooser:
    """Which CPU schedule a call site of :func:`run_jobs` uses, from the speed it measured.

    * ``workers``: the jobs spread over single-threaded worker threads. Wins when other processes
      hold the cores: no per-op OpenMP barrier waits for a descheduled thread (measured on a loaded
      2-core box: 2.4 GF/s for a loop of 64 [192, 512] x [512, 256] GEMMs on 2 OpenMP threads vs
      20 GF/s with two single-threaded workers).
    * ``inline``: the jobs one after another in the caller, each op on the caller's intra-op
      threads. Wins on an idle machine: after each parallel op the caller's OpenMP threads
      spin-wait for a few milliseconds, and while they spin they take a core from the workers.

    Measured on a 2-core box (benchmarks/expert_schedule.py), one training step of the demo MoE (4,096
    tokens): idle, 125 ms inline vs 140 ms on workers; beside one busy process, 431 ms vs 281 ms.
    Neither wins everywhere, so each call site keeps a moving average of seconds per unit of job
    cost for both, runs the faster and re-tries the other every ``EXPLORE_EVERY``-th call. The two
    round differently in the last bits (MKL's GEMMs do not give the same bits on 1 and N threads for
    every shape), so a run under ``auto`` is not bit-reproducible; ``inline``, the default, is.
    """

    EXPLORE_EVERY = 16
    SMOOTHING = 0.3

    def __init__(self) -> None:
        self.sites: dict = {}

    def choose(self, site: Hashable) -> str:
        state = self.sites.setdefault(site, {"calls": 0, "workers": None, "inline": None})
        state["calls"] += 1
        for schedule in ("workers", "inline"):
            if state[schedule] is None:
                return schedule
        fast, slow = sorted(("workers", "inline"), key=state.get)
        return slow if state["calls"] % self.EXPLORE_EVERY == 0 else fast

    def record(self, site: Hashable, schedule: str, seconds_per_cost: float) -> None:
        state = self.sites[site]
        old = state[schedule]
        state[schedule] = seconds_per_cost if old is None else old + self.SMOOTHING * (seconds_per_cost - old)


def _checked_schedule(name: str, source: str) -> str:
    if name not in SCHEDULES:
        raise ConfigError(f"{source} must be one of {', '.join(SCHEDULES)}; got {name!r}")
    return name


_CHOOSER = _ScheduleChooser()
_schedule = _checked_schedule(os.environ.get("MOEKIT_EXPERT_SCHEDULE", "inline"), "MOEKIT_EXPERT_SCHEDULE")


@contextlib.contextmanager
def expert_schedule(name: str) -> Iterator[None]:
    """:func:`run_jobs`' CPU schedule in the block: ``inline`` (the default; deterministic), ``workers``
    (for a machine shared with other busy processes) or ``auto`` (the faster of the two by measurement,
    not bit-reproducible). ``MOEKIT_EXPERT_SCHEDULE`` sets it for a whole process."""
    global _schedule
    before, _schedule = _schedule, _checked_schedule(name, "expert schedule")
    try:
        yield
    finally:
        _schedule = before


def run_jobs(
    fn: Callable,
    jobs: Sequence,
    device: torch.device,
    cost: Sequence[int] | None = None,
    threads: int | None = None,
    worker_jobs: Sequence | None = None,
    worker_cost: Sequence[int] | None = None,
) -> None:
    """Call ``fn(job)`` for every job, on CPU by one of two schedules (:class:`_ScheduleChooser`).

    Jobs must write disjoint outputs. ``threads`` (default: the caller's intra-op thread count) is
    how many workers, or intra-op threads inline, to use. On workers, jobs are handed out largest
    ``cost`` first, each to whichever worker is free, so a worker slowed by other processes just
    takes fewer; ``worker_jobs`` / ``worker_cost``, when given, are the same work cut finer for
    that balance. The caller waits; workers run with its grad and inference mode, and their
    exceptions are re-raised here. With one thread, fewer jobs than threads, a non-CPU device or a
    non-OpenMP build, the jobs run inline.
    """
    nthreads = torch.get_num_threads() if threads is None else threads
    if device.type != "cpu" or nthreads <= 1 or len(jobs) < nthreads or not _openmp_backend():
        _run_inline(fn, jobs, device, nthreads)
        return
    schedule, site = _schedule, fn.__code__  # one site per call site: its job function
    measured = schedule == "auto"
    if measured:
        schedule = _CHOOSER.choose(site)
        t0 = time.perf_counter()
    if schedule == "inline":
        _run_inline(fn, jobs, device, nthreads)
    elif worker_jobs is not None:
        _run_on_workers(fn, worker_jobs, worker_cost, nthreads)
    else:
        _run_on_workers(fn, jobs, cost, nthreads)
    if measured:
        work = sum(cost) if cost is not None else len(jobs)
        _CHOOSER.record(site, schedule, (time.perf_counter() - t0) / max(1, work))


def _run_inline(fn: Callable, jobs: Sequence, device: torch.device, nthreads: int) -> None:
    with intra_op_threads(nthreads) if device.type == "cpu" else contextlib.nullcontext():
        for job in jobs:
            fn(job)


def _run_on_workers(fn: Callable, jobs: Sequence, cost: Sequence[int] | None, nthreads: int) -> None:
    if cost is not None:
        jobs = [jobs[i] for i in sorted(range(len(jobs)), key=lambda i: -cost[i])]
    helpers = min(nthreads, len(jobs))
    _WORKERS.ensure(helpers)
    grad_enabled = torch.is_grad_enabled()
    inference = torch.is_inference_mode_enabled()
    lock = threading.Lock()
    pending = iter(jobs)
    errors: list[BaseException] = []
    done = threading.Semaphore(0)

    def drain() -> None:
        try:
            with torch.inference_mode(inference), torch.set_grad_enabled(grad_enabled):
                while not errors:
                    with lock:
                        job = next(pending, None)
                    if job is None:
                        return
                    fn(job)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            errors.append(exc)
        finally:
            done.release()

    # The caller only waits: running jobs here would need its intra-op thread count changed.
    for _ in range(helpers):
        _WORKERS.submit(drain)
    for _ in range(helpers):
        done.acquire()
    if errors:
        raise errors[0]
