"""Running one HTTP request's ``n`` choices on the engine from asyncio, as text pieces ready to send."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

from moekit.data.tokenizers import Tokenizer
from moekit.serve.engine import Engine, EngineStopped, Finished, PromptScores, QueueFull, Request
from moekit.serve.protocol import APIError
from moekit.serve.sampling import SamplingParams, TokenChoice
from moekit.serve.text import TextStream

DISCONNECT_POLL_S = 0.5


@dataclasses.dataclass
class Piece:
    """New text of one choice, the tokens that produced it, and the finish reason on its last piece; or, first
    and on its own, the scored prompt tokens (``echo``) when the prompt's logprobs were asked for."""

    index: int
    text: str
    tokens: list[TokenChoice]
    finish_reason: str | None = None
    echo: list[TokenChoice] | None = None


async def run_choices(
    engine: Engine,
    tokenizer: Tokenizer,
    prompt: Sequence[int],
    params: Sequence[SamplingParams],
    stop: Sequence[str],
    disconnected: Callable[[], Awaitable[bool]] | None = None,
) -> AsyncIterator[Piece]:
    """Submit one engine request per choice and yield their pieces as they come; every request is cancelled when
    this generator ends early (a client went away) and an engine failure becomes an :class:`APIError`."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[int, TokenChoice | PromptScores | Finished]] = asyncio.Queue()
    requests: list[Request] = []

    mailbox = _mailbox(loop)

    def sink_for(i: int):
        return lambda event: mailbox.post(queue, (i, event))

    try:
        for i, p in enumerate(params):
            try:
                requests.append(engine.submit(prompt, p, sink_for(i)))
            except QueueFull as err:
                raise APIError(429, f"the server is busy: {err}; retry later", "queue_full") from None
            except EngineStopped as err:
                raise APIError(503, f"the server cannot take requests: {err}", "unavailable") from None
        texts = [TextStream(tokenizer, stop) for _ in params]
        # Tokens with routed experts stay one per piece: a reader (the chat page) colours each by its experts.
        mergeable = [not p.return_routed_experts for p in params]
        pending: list[list[TokenChoice]] = [[] for _ in params]
        open_requests = len(params)
        while open_requests:
            # Every event already queued is taken at once and a choice's new tokens go out as one piece: when
            # the HTTP side falls behind the engine (many streams), it sends fewer, larger chunks, not a backlog.
            events = [await _next_event(queue, disconnected)]
            while not queue.empty():
                events.append(queue.get_nowait())
            ready: list[Piece] = []
            for i, event in events:
                stream = texts[i]
                if isinstance(event, Finished):
                    open_requests -= 1
                    if stream.stopped:
                        continue  # already finished at its stop string
                    if event.reason in ("stop", "length"):
                        _add(ready, mergeable[i], Piece(i, stream.flush(), pending[i], event.reason))
                    elif event.reason == "queue_full":  # an engine in another process refuses when it gets there
                        raise APIError(429, f"the server is busy: {event.message}; retry later", "queue_full")
                    elif event.reason == "timeout":
                        raise APIError(504, f"the request timed out after {params[i].timeout_s:g} s", "timeout")
                    else:
                        raise APIError(503, event.message or f"the request ended early ({event.reason})", event.reason)
                    continue
                if isinstance(event, PromptScores):
                    _add(ready, mergeable[i], Piece(i, "", [], echo=event.tokens))
                    continue
                if stream.stopped:
                    continue  # tokens decoded before the cancellation reached the engine
                pending[i].append(event)
                text = stream.push(event.token_id)
                if stream.stopped:
                    requests[i].cancel()
                    _add(ready, mergeable[i], Piece(i, text, pending[i], "stop"))
                elif text:
                    _add(ready, mergeable[i], Piece(i, text, pending[i]))
                else:
                    continue
                pending[i] = []
            for piece in ready:
                yield piece
    finally:
        for request in requests:
            request.cancel()


class _Mailbox:
    """Events from the engine thread to one event loop's queues, with one wake-up of the loop per batch of events
    instead of one per token (each wake-up writes to the loop's self-pipe: py-spy put 5% of the engine thread
    there at 16 streams)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.lock = threading.Lock()
        self.items: list[tuple[asyncio.Queue, Any]] = []

    def post(self, queue: asyncio.Queue, item: Any) -> None:
        """Put ``item`` on ``queue`` from any thread."""
        with self.lock:
            self.items.append((queue, item))
            first = len(self.items) == 1
        if first:  # later posts ride on the wake-up already scheduled
            self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self.lock:
            items, self.items = self.items, []
        for queue, item in items:
            queue.put_nowait(item)


_mailboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Mailbox] = weakref.WeakKeyDictionary()


def _mailbox(loop: asyncio.AbstractEventLoop) -> _Mailbox:
    if loop not in _mailboxes:
        _mailboxes[loop] = _Mailbox(loop)
    return _mailboxes[loop]


def _add(ready: list[Piece], merge: bool, piece: Piece) -> None:
    """Append ``piece``, or (``merge``) join it to its choice's last unfinished text piece in ``ready``."""
    last = next((p for p in reversed(ready) if p.index == piece.index), None) if merge else None
    if last is None or last.finish_reason is not None or last.echo is not None or piece.echo is not None:
        ready.append(piece)
        return
    last.text += piece.text
    last.tokens = last.tokens + piece.tokens
    last.finish_reason = piece.finish_reason


async def _next_event(queue: asyncio.Queue, disconnected: Callable[[], Awaitable[bool]] | None):
    if disconnected is None:
        return await queue.get()
    while True:
        try:
            return await asyncio.wait_for(queue.get(), DISCONNECT_POLL_S)
        except asyncio.TimeoutError:
            if await disconnected():
                raise APIError(499, "the client disconnected", "client_closed") from None
