"""Grouped matrix multiply over contiguous row slices: out[rows of e] = x[rows of e] @ w[e].

A hand-written backward writes each expert's weight gradient straight into one [E, ...] buffer.
Indexing ``w[e]`` inside autograd would instead materialise a full-size zero gradient per expert
and sum them (what makes per-expert loops slow in backward at many experts).

Also the two CPU helpers every per-expert loop of moekit uses:

* :func:`run_jobs` runs per-expert jobs inline, one multi-threaded op after another (the default),
  or on a small pool of worker threads, each with ONE intra-op thread (see :class:`_ScheduleChooser`).
  On an idle machine inline wins: the caller's OpenMP threads spin after each parallel op and take
  a core from the workers. When other processes share the cores the workers win: each op's OpenMP
  barrier waits for a descheduled thread (measured on a loaded 2-core box: 2.4 GF/s for a loop of
  64 [192, 512] x [512, 256] GEMMs on 2 OpenMP threads vs 20 GF/s with two single-threaded workers).
* :func:`compute_dtype` is the dtype the GEMMs run in. bf16/fp16 GEMMs on a CPU without native
  support (no AVX512-BF16/AMX: oneDNN is not used and ATen falls back to scalar loops, 1-10 GF/s
  vs 60 GF/s for fp32 on AVX2) are done in fp32 on the widened operands; this is exactly a bf16
  GEMM with fp32 accumulation (the products of two bf16 values are exact in fp32), only faster.

Shape legend: N rows (kept assignments sorted by expert), E experts, I input, O output features.
"""

from __future__ import annotations

import contextlib
import functools
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence

import torch

from moekit.errors import ConfigError


def _slices(counts: tuple[int, ...]):
    start = 0
    for expert, n in enumerate(counts):
        if n:
            yield expert, start, start + n
        start += n


# -- GEMM dtype policy -----------------------------------------------------------------------------
@functools.cache
def _cpu_has_native(dtype: torch.dtype) -> bool:
    try:
        if dtype == torch.bfloat16:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        if dtype == torch.float16:
            return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):  # pragma: no cover - builds without oneDNN
        return False
    return True


def compute_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype moekit runs a GEMM of ``dtype`` operands in on ``device`` (see module docstring)."""
    if device.type == "cpu" and dtype in (torch.bfloat16, torch.float16) and not _cpu_has_native(dtype):
        return torch.float32
    return dtype


def _to(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


# -- threads -------------------------------------------------------------------------------------
@functools.cache
def _openmp_backend() -> bool:
    """ATen on OpenMP: intra-op thread counts are per calling thread, so workers can each use one."""
    return "parallel backend: OpenMP" in torch.__config__.parallel_info()


@contextlib.contextmanager
def intra_op_threads(n: int):
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
      hold the cores: no per-op OpenMP barrier waits for a descheduled thread.
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

    def choose(self, site) -> str:
        state = self.sites.setdefault(site, {"calls": 0, "workers": None, "inline": None})
        state["calls"] += 1
        for schedule in ("workers", "inline"):
            if state[schedule] is None:
                return schedule
        fast, slow = sorted(("workers", "inline"), key=state.get)
        return slow if state["calls"] % self.EXPLORE_EVERY == 0 else fast

    def record(self, site, schedule: str, seconds_per_cost: float) -> None:
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
def expert_schedule(name: str):
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


# -- grouped GEMM ----------------------------------------------------------------------------------
class _GroupedMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_NI: torch.Tensor, w_EIO: torch.Tensor, counts: tuple[int, ...]) -> torch.Tensor:
        cdt = compute_dtype(x_NI.dtype, x_NI.device)
        out_NO = x_NI.new_empty(x_NI.shape[0], w_EIO.shape[-1])

        def job(s):
            e, lo, hi = s
            if cdt == x_NI.dtype:
                torch.mm(x_NI[lo:hi], w_EIO[e], out=out_NO[lo:hi])
            else:
                out_NO[lo:hi] = torch.mm(_to(x_NI[lo:hi], cdt), _to(w_EIO[e], cdt))

        slices = list(_slices(counts))
        run_jobs(job, slices, x_NI.device, cost=[hi - lo for _, lo, hi in slices])
        ctx.save_for_backward(x_NI, w_EIO)
        ctx.counts = counts
        return out_NO

    @staticmethod
    def backward(ctx, grad_NO: torch.Tensor):
        x_NI, w_EIO = ctx.saved_tensors
        grad_NO = grad_NO.contiguous()
        cdt = compute_dtype(x_NI.dtype, x_NI.device)
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_x = x_NI.new_empty(x_NI.shape) if need_x else None
        grad_w = None
        if need_w:
            grad_w = torch.empty_like(w_EIO)
            empty = [e for e, n in enumerate(ctx.counts) if n == 0]
            if empty:
                grad_w[empty] = 0

        def job(s):
            e, lo, hi = s
            g = _to(grad_NO[lo:hi], cdt)
            if need_x:
                if cdt == x_NI.dtype:
                    torch.mm(g, w_EIO[e].t(), out=grad_x[lo:hi])
                else:
                    grad_x[lo:hi] = torch.mm(g, _to(w_EIO[e], cdt).t())
            if need_w:
                if cdt == x_NI.dtype:
                    torch.mm(x_NI[lo:hi].t(), g, out=grad_w[e])
                else:
                    grad_w[e] = torch.mm(_to(x_NI[lo:hi], cdt).t(), g)

        slices = list(_slices(ctx.counts))
        run_jobs(job, slices, x_NI.device, cost=[hi - lo for _, lo, hi in slices])
        return grad_x, grad_w, None


def grouped_mm(x_NI: torch.Tensor, w_EIO: torch.Tensor, counts: tuple[int, ...]) -> torch.Tensor:
    """Rows of x in expert-sorted slices of sizes ``counts``, each times its expert's matrix.

    Args:
        x_NI: [N, I] rows sorted by expert, N == sum(counts).
        w_EIO: [E, I, O] stacked weights.
        counts: rows per expert (python ints), len(counts) == E.

    Returns:
        [N, O], in x's dtype.
    """
    if x_NI.dtype != w_EIO.dtype:
        w_EIO = w_EIO.to(x_NI.dtype)
    return _GroupedMM.apply(x_NI.contiguous(), w_EIO, counts)


def grouped_mm_reference(x_NI: torch.Tensor, w_EIO: torch.Tensor, counts: tuple[int, ...]) -> torch.Tensor:
    """Plain-autograd version of :func:`grouped_mm`, the oracle its tests compare with."""
    pieces = torch.split(x_NI, list(counts))
    return torch.cat([p @ w_EIO[e] for e, p in enumerate(pieces)], dim=0)
