"""The engine in a child process: the model and the HTTP server no longer share one interpreter lock.

In one process the engine thread and the HTTP thread take turns on the GIL, so ``moekit serve`` used one core
however many it had (py-spy: 1.0 core busy of 2 at 16 streams, the engine step 1.7x slower than alone).
:class:`EngineProcess` forks after the model is loaded: the child runs :class:`~moekit.serve.engine.Engine`
on its main thread, the parent keeps the model object (shared copy-on-write, never touched) only for its
config, and the two talk JSON over a pipe:

* parent -> child: ``submit`` (id, prompt, sampling parameters), ``cancel`` (id), ``stop``;
* child -> parent: batches of events (a token, the scored prompt, the end of a request) and the engine's
  counters, at most every :data:`STATS_INTERVAL_S` when they change.

:class:`EngineProcess` has the methods and fields of :class:`Engine` that the routes and ``/metrics`` use.
Fork is taken only where it is safe: Linux, one Python thread, and no OpenMP thread team yet (a child forked
after a parallel region hangs in its first one; ``moekit serve`` loads with one intra-op thread for that).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import queue
import signal
import threading
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection, Pipe
from typing import Any

import torch

from moekit.models.lm import MoELM
from moekit.serve.engine import Engine, EngineStats, EngineStopped, Event, Finished, PromptScores, QueueFull, Sink
from moekit.serve.sampling import SamplingParams, TokenChoice

log = logging.getLogger(__name__)

STATS_INTERVAL_S = 0.1


def can_fork() -> bool:
    """Whether :meth:`EngineProcess.fork` is safe here (see the module docstring)."""
    return hasattr(os, "fork") and os.uname().sysname == "Linux" and threading.active_count() == 1


@dataclasses.dataclass(eq=False)
class RemoteRequest:
    """The parent's handle on a request in the child: :meth:`cancel` frees its row there."""

    id: int
    sink: Sink
    owner: EngineProcess
    started: bool = False

    def cancel(self) -> None:
        """Ask the engine to drop this request (thread-safe)."""
        self.owner._send({"op": "cancel", "id": self.id})


class EngineProcess:
    """An :class:`Engine` serving ``model`` in a forked child; create with :meth:`fork`."""

    def __init__(self, model: MoELM, max_batch: int, max_queue: int, vocab_limit: int | None, conn: Connection,
                 pid: int):  # fmt: skip
        self.model, self.max_batch, self.max_queue, self.vocab_limit = model, max_batch, max_queue, vocab_limit
        self.context = model.config.max_position_embeddings
        self.stats = EngineStats()
        self.queue_depth = 0
        self._conn, self._pid = conn, pid
        self._send_lock = threading.Lock()
        self._requests: dict[int, RemoteRequest] = {}
        self._next_id = 0
        self._stopping = False
        self._child_alive = True
        self._reader = threading.Thread(target=self._read, name="moekit-engine-reader", daemon=True)
        self._reader.start()

    @classmethod
    def fork(cls, model: MoELM, max_batch: int = 16, max_queue: int = 64, vocab_limit: int | None = None,
             threads: int = 1) -> EngineProcess:  # fmt: skip
        """Fork the engine's process (``threads`` intra-op threads there) and return the parent's handle."""
        parent_end, child_end = Pipe()
        pid = os.fork()
        if pid == 0:  # the child: serve until told to stop or the parent is gone, then exit without cleanup
            code = 1
            try:
                parent_end.close()
                signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent, which stops us
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                torch.set_num_threads(threads)
                _serve_child(Engine(model, max_batch, max_queue, vocab_limit), child_end)
                code = 0
            except BaseException:  # the parent sees the pipe close and fails every request
                log.exception("moekit serve: the engine process failed")
            finally:
                os._exit(code)
        child_end.close()
        return cls(model, max_batch, max_queue, vocab_limit, parent_end, pid)

    # -- what the routes use -------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return self._child_alive and not self._stopping

    @property
    def died(self) -> bool:
        """The child ended without being told to stop (a crash, the OOM killer)."""
        return not self._child_alive and not self._stopping

    def submit(self, prompt: Sequence[int], params: SamplingParams, sink: Sink) -> RemoteRequest:
        """Queue a request in the child; raises :class:`QueueFull` or :class:`EngineStopped` instead of waiting."""
        with self._send_lock:
            if not self.alive:
                raise EngineStopped("the engine is not running")
            waiting = sum(not r.started for r in self._requests.values())
            if waiting >= self.max_queue:
                raise QueueFull(f"{waiting} requests are already waiting (the queue cap)")
            request = RemoteRequest(self._next_id, sink, self)
            self._next_id += 1
            self._requests[request.id] = request
            message = {"op": "submit", "id": request.id, "prompt": [int(t) for t in prompt],
                       "params": dataclasses.asdict(params)}  # fmt: skip
            self._conn.send_bytes(json.dumps(message).encode())
        return request

    def stop(self) -> None:
        """End every request and the child process."""
        with self._send_lock:
            if self._stopping:
                return
            self._stopping = True
        self._send({"op": "stop"})
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if os.waitpid(self._pid, os.WNOHANG)[0]:
                break
            time.sleep(0.02)
        else:
            os.kill(self._pid, signal.SIGKILL)
            os.waitpid(self._pid, 0)
        self._reader.join(timeout=5)

    # -- the pipe ------------------------------------------------------------------------------------
    def _send(self, message: dict[str, Any]) -> None:
        with self._send_lock:
            try:
                self._conn.send_bytes(json.dumps(message).encode())
            except OSError:  # the child is gone: the reader fails what is left
                pass

    def _read(self) -> None:
        try:
            while True:
                batch = json.loads(self._conn.recv_bytes())
                for rid, kind, payload in batch["events"]:
                    self._deliver(rid, decode_event(kind, payload))
                if "stats" in batch:
                    self._update_stats(batch["stats"])
        except (EOFError, OSError):
            pass
        self._child_alive = False
        with self._send_lock:
            left, self._requests = list(self._requests.values()), {}
        for request in left:
            request.sink(Finished("error", "the engine process ended"))

    def _deliver(self, rid: int, event: Event) -> None:
        request = self._requests.get(rid)
        if request is None:
            return
        request.started = True
        if isinstance(event, Finished):
            with self._send_lock:
                self._requests.pop(rid, None)
        request.sink(event)

    def _update_stats(self, stats: dict[str, Any]) -> None:
        self.queue_depth = stats.pop("queue_depth")
        stats["expert_tokens"] = {int(layer): counts for layer, counts in stats["expert_tokens"].items()}
        self.stats = EngineStats(**stats)


def _serve_child(engine: Engine, conn: Connection) -> None:
    """The child's threads: the engine on the main one, a reader of the parent's orders, a writer of events."""
    outbox: queue.SimpleQueue = queue.SimpleQueue()
    handles: dict[int, Any] = {}

    def read_orders() -> None:
        try:
            while True:
                order = json.loads(conn.recv_bytes())
                if order["op"] == "stop":
                    break
                rid = order["id"]
                if order["op"] == "cancel":
                    if rid in handles:
                        handles[rid].cancel()
                    continue
                sink = _sink(outbox, handles, rid)
                params = SamplingParams(
                    **{**order["params"], "stop_token_ids": tuple(order["params"]["stop_token_ids"])}
                )
                started = time.monotonic()
                while not engine.alive and time.monotonic() - started < 10:  # the main thread is entering run()
                    time.sleep(0.001)
                try:
                    handles[rid] = engine.submit(order["prompt"], params, sink)
                except (QueueFull, EngineStopped) as err:
                    sink(Finished("queue_full" if isinstance(err, QueueFull) else "error", str(err)))
        except (EOFError, OSError):
            pass  # the parent is gone
        engine.stop()
        outbox.put(None)

    def write_events() -> None:
        sent_stats: Any = None
        stats_at = 0.0
        while True:
            try:
                items = [outbox.get(timeout=STATS_INTERVAL_S)]
            except queue.Empty:
                items = []
            while not outbox.empty():
                items.append(outbox.get())
            done = None in items
            batch: dict[str, Any] = {"events": [encode_event(rid, e) for rid, e in (i for i in items if i)]}
            # The counters (every expert of every layer) at most every STATS_INTERVAL_S, and once idle.
            if not items or done or time.monotonic() - stats_at >= STATS_INTERVAL_S:
                stats, stats_at = _stats(engine), time.monotonic()
                if stats != sent_stats:
                    batch["stats"] = sent_stats = stats
            if batch["events"] or "stats" in batch:
                conn.send_bytes(json.dumps(batch).encode())
            if done:
                return

    threading.Thread(target=read_orders, name="moekit-orders", daemon=True).start()
    writer = threading.Thread(target=write_events, name="moekit-events", daemon=True)
    writer.start()
    engine.run()
    outbox.put(None)
    writer.join(timeout=10)


def _sink(outbox: queue.SimpleQueue, handles: dict[int, Any], rid: int) -> Sink:
    def sink(event: Event) -> None:
        if isinstance(event, Finished):
            handles.pop(rid, None)
        outbox.put((rid, event))

    return sink


def _stats(engine: Engine) -> dict[str, Any]:
    s = engine.stats
    experts = {str(layer): list(counts) for layer, counts in dict(s.expert_tokens).items()}
    return {"prompt_tokens": s.prompt_tokens, "generated_tokens": s.generated_tokens, "steps": s.steps,
            "running": s.running, "expert_tokens": experts, "queue_depth": engine.queue_depth}  # fmt: skip


def encode_event(rid: int, event: Event) -> list[Any]:
    """``[request id, kind, payload]``: JSON-ready."""
    if isinstance(event, Finished):
        return [rid, "finished", [event.reason, event.message]]
    if isinstance(event, PromptScores):
        return [rid, "prompt", [_fields(t) for t in event.tokens]]
    return [rid, "token", _fields(event)]


def _fields(t: TokenChoice) -> list[Any]:
    return [t.token_id, t.logprob, t.top_logprobs, t.experts]


def decode_event(kind: str, payload: Any) -> Event:
    """The event :func:`encode_event` wrote (tuples come back as lists, which the routes read alike)."""
    if kind == "finished":
        return Finished(*payload)
    if kind == "prompt":
        return PromptScores([TokenChoice(*fields) for fields in payload])
    return TokenChoice(*payload)
