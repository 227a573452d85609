"""Process groups for expert x data parallelism, set up from torchrun's environment variables.

World of W processes, expert-parallel degree P (P divides W), laid out as a (dp, ep) device mesh of
shape (W / P, P): ``rank = dp_rank * P + ep_rank``.

* ``ep`` group (a row, P consecutive ranks, i.e. one node's GPUs when P <= GPUs per node): together
  they hold one copy of every expert, E / P each; tokens travel between them by all-to-all.
* ``dp`` group (a column, W / P ranks): the replicas of the same experts; expert gradients are
  summed over it.
* the whole world: every rank holds the non-expert parameters and a different slice of the global
  batch; their gradients and the balancing-loss statistics are summed over all W ranks.

Failure handling: every rank writes its step to the rendezvous store once per step, and a rank that
raises writes its error there before exiting. A rank whose collective then fails (the peer's sockets
closed, or the timeout expired) reads the store and raises :class:`DistributedError` naming the rank
and step that failed first. Collectives time out after ``timeout`` seconds, so nothing waits forever.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import time
from typing import Any

import torch
import torch.distributed as dist

from moekit.distributed.collectives import DistributedError, PeerFailure, all_gather_bytes, all_reduce_, collective
from moekit.errors import ConfigError, MoekitError

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 300.0  # seconds a collective may wait for a peer
_STORE: list = []  # the rendezvous store of the process group this module created (for later meshes)


@dataclasses.dataclass
class DistContext:
    """Where this process sits in the (dp, ep) mesh, and its groups."""

    rank: int
    world_size: int  # W
    ep_size: int  # the expert-parallel degree P
    dp_size: int  # W / P
    ep_rank: int  # this rank's place in its ep group
    dp_rank: int  # ... and in its dp group (the replicas of its experts)
    ep_group: Any  # process groups (None stands for the whole world in torch.distributed)
    dp_group: Any
    device: torch.device  # cuda:LOCAL_RANK on GPU nodes, else cpu
    timeout: float  # seconds a collective waits before failing
    store: Any = None
    mesh: Any = None
    step: int | str = "startup"  # the training step in progress, for error messages (set by the trainer)
    owns_process_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- small collectives ------------------------------------------------------------------------------
    def all_reduce_mean(self, value: float) -> float:
        """Mean of a python float over all ranks."""
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        return float(all_reduce_(t)) / self.world_size

    def broadcast_float(self, value: float) -> float:
        """Rank 0's ``value``, on every rank."""
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        collective("broadcast", dist.broadcast, t, src=0)
        return float(t)

    def check_same(self, what: str, value: dict[str, Any]) -> None:
        """Raise ConfigError on every rank unless every rank passed the same ``value`` (a JSON-able dict).

        The message names the first differing key and the ranks and values involved.
        """
        payload = json.dumps(value, sort_keys=True, default=str).encode()
        gathered = all_gather_bytes(payload, device=self.device)
        reference = json.loads(gathered[0])
        for r, raw in enumerate(gathered):
            if raw == gathered[0]:
                continue
            other = json.loads(raw)
            keys = sorted(set(reference) | set(other), key=str)
            diff = [k for k in keys if reference.get(k) != other.get(k)]
            k = diff[0]
            raise ConfigError(
                f"ranks disagree on the {what}: {k} is {other.get(k)!r} on rank {r} but {reference.get(k)!r} on "
                f"rank 0 (differing: {', '.join(map(str, diff))}); start every rank with the same command and files"
            )

    # -- failure reports --------------------------------------------------------------------------------
    def heartbeat(self, step: int) -> None:
        """Record the step this rank is on (read when a peer disappears)."""
        self.step = step
        if self.store is not None:
            try:
                self.store.set(f"step/{self.rank}", str(step))
            except Exception:  # noqa: BLE001 - the store host may be gone; the next collective will say so
                pass

    def report_failure(self, exc: BaseException) -> None:
        """Tell the other ranks (through the store) that this rank failed, at which step and why."""
        if self.store is None:
            return
        info = {"rank": self.rank, "step": self.step, "error": f"{type(exc).__name__}: {exc}", "time": time.time()}
        try:
            self.store.set(f"failed/{self.rank}", json.dumps(info))
        except Exception:  # noqa: BLE001
            pass

    def failures(self, wait: float = 1.0) -> list[dict[str, Any]]:
        """Failure reports of other ranks, earliest first (waits up to ``wait`` s for one to arrive)."""
        if self.store is None:
            return []
        deadline = time.monotonic() + wait
        while True:
            found = []
            try:
                for r in range(self.world_size):
                    if r != self.rank and self.store.check([f"failed/{r}"]):
                        found.append(json.loads(self.store.get(f"failed/{r}")))
            except Exception:  # noqa: BLE001 - store unreachable
                return found
            if found or time.monotonic() >= deadline:
                return sorted(found, key=lambda f: f["time"])
            time.sleep(0.1)

    def last_steps(self) -> dict[int, str]:
        """The step each rank last reported ('?' when unknown)."""
        out = {}
        for r in range(self.world_size):
            try:
                out[r] = self.store.get(f"step/{r}").decode() if self.store.check([f"step/{r}"]) else "?"
            except Exception:  # noqa: BLE001
                out[r] = "?"
        return out

    def where(self, step: int | str | None = None) -> str:
        step = self.step if step is None else step
        return f"at step {step}" if isinstance(step, int) else f"at {step}"

    def error_for(self, exc: BaseException) -> DistributedError:
        """The error this rank exits with after ``exc``: its own failure, or the peer failure behind it."""
        if isinstance(exc, PeerFailure):
            reports = self.failures()
            if reports:
                f = reports[0]
                return DistributedError(
                    f"rank {f['rank']} failed {self.where(f['step'])}: {f['error']} "
                    f"(rank {self.rank} stopped {self.where()})"
                )
            steps = self.last_steps() if self.store is not None else {}
            known = {r: int(v) for r, v in steps.items() if v.isdigit()}
            behind = ""
            if known and len(set(known.values())) > 1:
                low = min(known.values())
                ranks = ", ".join(str(r) for r, v in known.items() if v == low)
                behind = f"; rank {ranks} reported the lowest step ({low}): probably the one that died or hung"
            return DistributedError(
                f"rank {self.rank} lost its peers {self.where()}: {exc}. No rank reported an error, so one "
                f"died or hung; last step reported by each rank: {steps}{behind}"
            )
        self.report_failure(exc)
        if isinstance(exc, DistributedError):
            return exc
        return DistributedError(f"rank {self.rank} failed {self.where()}: {type(exc).__name__}: {exc}")

    def close(self) -> None:
        """Destroy the process group if this context created it."""
        if self.owns_process_group and dist.is_initialized():
            dist.destroy_process_group()
            _STORE.clear()


def env_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment variables ((0, 1, 0) when unset)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def _device(local_rank: int) -> torch.device:
    if torch.cuda.is_available() and os.environ.get("MOEKIT_DEVICE", "") != "cpu":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _store(rank: int, world_size: int, timeout: float):
    """The rendezvous TCPStore: a client of the launcher's (torchrun agent's) store, or hosted by rank 0."""
    addr = os.environ.get("MASTER_ADDR")
    port = os.environ.get("MASTER_PORT")
    if not addr or not port:
        raise ConfigError(
            "a distributed run needs MASTER_ADDR and MASTER_PORT (set by torchrun or `moekit train --nproc N`)"
        )
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    return dist.TCPStore(
        addr,
        int(port),
        world_size,
        is_master=(rank == 0 and not agent),
        timeout=datetime.timedelta(seconds=timeout),
    )


def init_distributed(ep: int = 1, timeout: float | None = None, backend: str | None = None) -> DistContext:
    """Join the process group described by torchrun's environment and build the (dp, ep) mesh of expert-parallel
    degree ``ep`` (it must divide the world size); with WORLD_SIZE unset, a one-process context (no groups).
    ``timeout``: seconds a collective or the rendezvous may wait for a peer (default 300, or the
    ``MOEKIT_DIST_TIMEOUT`` environment variable); ``backend``: default gloo on CPU, ``cpu:gloo,cuda:nccl`` on GPUs."""
    rank, world, local_rank = env_world()
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    timeout = float(timeout or os.environ.get("MOEKIT_DIST_TIMEOUT") or DEFAULT_TIMEOUT)
    if not isinstance(ep, int) or ep < 1:
        raise ConfigError(f"ep={ep!r} must be a positive integer")
    if world % ep:
        raise ConfigError(
            f"ep={ep} does not divide the number of processes ({world}): the (dp, ep) mesh needs ep | world size"
        )
    device = _device(local_rank)
    owns = False
    store = None
    if not dist.is_initialized():
        if world == 1:
            raise ConfigError("init_distributed() needs several processes: launch with torchrun or --nproc N")
        store = _store(rank, world, timeout)
        if backend is None:
            backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend, store=store, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout)
        )
        _STORE[:] = [store]
        owns = True
    else:
        store = _STORE[0] if _STORE else None
    dp = world // ep
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (dp, ep), mesh_dim_names=("dp", "ep"))
    my_store = None
    if store is not None:
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        my_store = dist.PrefixStore(f"moekit/{restart}/", store)
    return DistContext(
        rank=rank,
        world_size=world,
        ep_size=ep,
        dp_size=dp,
        ep_rank=rank % ep,
        dp_rank=rank // ep,
        ep_group=mesh.get_group("ep"),
        dp_group=mesh.get_group("dp"),
        device=device,
        timeout=timeout,
        store=my_store,
        mesh=mesh,
        owns_process_group=owns,
    )


def run_guarded(ctx: DistContext, fn, *args, **kwargs):
    """Call ``fn``; any failure becomes a DistributedError naming the rank and step (see module docstring)."""
    try:
        return fn(*args, **kwargs)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: BLE001 - re-raised as a DistributedError
        err = ctx.error_for(exc)
        if not isinstance(exc, (MoekitError, PeerFailure)):
            log.error("rank %d failed %s", ctx.rank, ctx.where(), exc_info=exc)
        if err is exc:
            raise
        raise err from exc
