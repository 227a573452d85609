"""Start N copies of a command on this machine the way ``torchrun --standalone --nproc-per-node N`` does.

The launcher hosts the rendezvous store (like torchrun's agent, so it outlives any worker), gives each
worker RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT, and watches them. When one exits
with an error, the others get ``grace`` seconds to notice (their collectives fail at once and they
exit with an error naming the failed rank and step); any still running after that are terminated.
"""

from __future__ import annotations

import datetime
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

from moekit.errors import ConfigError

DEFAULT_GRACE = 30.0


def _threads_per_worker(nproc: int) -> int:
    return max(1, (os.cpu_count() or 1) // nproc)


def launch(
    command: Sequence[str],
    nproc: int,
    *,
    env: dict[str, str] | None = None,
    timeout: float | None = None,
    grace: float = DEFAULT_GRACE,
    capture: bool = False,
) -> tuple[int, list[str]]:
    """Run the command line ``command`` as ``nproc`` ranks on this machine, each with ``env`` added; returns the exit
    code (0, the first failing worker's, or 124 when ``timeout`` seconds ran out and every worker was killed) and,
    with ``capture``, each rank's combined stdout/stderr. After one worker fails, the others have ``grace``
    seconds to exit before they are terminated."""
    import torch.distributed as dist

    if nproc < 1:
        raise ConfigError(f"nproc={nproc} must be >= 1")
    store = dist.TCPStore(
        "127.0.0.1", 0, nproc, is_master=True, wait_for_workers=False, timeout=datetime.timedelta(seconds=60)
    )
    threads = str(_threads_per_worker(nproc))
    procs, logs = [], []
    for rank in range(nproc):
        worker_env = {
            **os.environ,
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", threads),
            **(env or {}),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(store.port),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(nproc),
            "LOCAL_WORLD_SIZE": str(nproc),
            "GROUP_RANK": "0",
            "TORCHELASTIC_USE_AGENT_STORE": "True",
        }
        out = None
        if capture:
            import tempfile

            out = tempfile.TemporaryFile()
            logs.append(out)
        procs.append(
            subprocess.Popen(list(command), env=worker_env, stdout=out, stderr=subprocess.STDOUT if capture else None)
        )
    try:
        code = _watch(procs, timeout, grace)
    except BaseException:  # Ctrl-C or a bug here: never leave workers behind
        _terminate(procs)
        raise
    outputs = []
    for f in logs:
        f.seek(0)
        outputs.append(f.read().decode(errors="replace"))
        f.close()
    del store
    return code, outputs


def _watch(procs: list[subprocess.Popen], timeout: float | None, grace: float) -> int:
    start = time.monotonic()
    first_failure: int | None = None
    stop_at: float | None = None
    while True:
        codes = [p.poll() for p in procs]
        if all(c is not None for c in codes):
            break
        now = time.monotonic()
        for rank, c in enumerate(codes):
            if c not in (None, 0) and first_failure is None:
                first_failure = c
                stop_at = now + grace
                print(f"moekit: rank {rank} exited with code {c}", file=sys.stderr, flush=True)
        if timeout is not None and now - start > timeout:
            print(f"moekit: workers still running after {timeout:.0f} s; terminating them", file=sys.stderr)
            _terminate(procs)
            return 124
        if stop_at is not None and now > stop_at:
            _terminate(procs)
            break
        time.sleep(0.05)
    if first_failure is not None:
        return first_failure
    failed = [(rank, p.poll()) for rank, p in enumerate(procs) if p.poll()]
    for rank, c in failed:
        print(f"moekit: rank {rank} exited with code {c}", file=sys.stderr, flush=True)
    return failed[0][1] if failed else 0


def _terminate(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 5
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
