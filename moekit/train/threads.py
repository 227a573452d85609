"""How many threads a training run uses: what it was told, else the cores that are free when it starts.

Each multi-threaded op ends when its slowest OpenMP thread does; a thread without a free core waits for a
scheduler time slice, so beside other busy processes a run with a thread per core slows many times over
(benchmarks/results/contention.md). A run therefore counts the busy cores for a moment before it starts
and takes the rest, at least one. The count is fixed for the run and kept in its checkpoints: MKL's GEMMs
round differently on different thread counts, so a resumed run takes the same count and continues
bit-exactly. ``threads`` pins it, for runs that must match each other bit for bit.
"""

from __future__ import annotations

import time

import torch

SAMPLE_SECONDS = 0.3
# torch's choice (a thread per core, or OMP_NUM_THREADS), before any run of this process set its own count.
DEFAULT_THREADS = torch.get_num_threads()


def _cpu_times() -> tuple[int, int, int]:
    """(all jiffies, idle jiffies, CPUs) summed over the machine, from /proc/stat."""
    with open("/proc/stat", encoding="ascii") as f:
        lines = f.read().splitlines()
    values = [int(v) for v in lines[0].split()[1:9]]  # user nice system idle iowait irq softirq steal
    cpus = sum(1 for line in lines[1:] if line.startswith("cpu"))
    return sum(values), values[3] + values[4], cpus


def free_cores(seconds: float = SAMPLE_SECONDS) -> float | None:
    """Cores no process used over the next ``seconds`` (None where /proc/stat is not there to tell)."""
    try:
        total, idle, cpus = _cpu_times()
        time.sleep(seconds)
        total2, idle2, _ = _cpu_times()
    except (OSError, ValueError, IndexError):
        return None
    return cpus * (idle2 - idle) / max(total2 - total, 1)


def threads_for(free: float | None, most: int) -> int:
    """Threads to use with ``free`` cores and at most ``most`` (torch's choice): the free cores, a core that is
    free 30% of the time or more counted (a busy process takes a whole core; light noise must not cost one)."""
    return most if free is None else max(1, min(most, int(free + 0.7)))


def use_threads(requested: int | None, recorded: int | None, choose: bool = True) -> int:
    """Set and return this run's intra-op threads: ``requested``, else the ``recorded`` count of the run being
    resumed, else (``choose``) what the free cores allow, else torch's default."""
    threads = requested or recorded  # given: no need to look at the machine
    if not threads:
        threads = threads_for(free_cores(), DEFAULT_THREADS) if choose else DEFAULT_THREADS
    torch.set_num_threads(threads)
    return threads
