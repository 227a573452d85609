"""POST /v1/completions and /v1/chat/completions: checks and caps, then one answer or a server-sent event stream."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from moekit.data.tokenizers import Tokenizer
from moekit.serve import protocol
from moekit.serve.chat import ChatTemplate
from moekit.serve.choices import Piece, run_choices
from moekit.serve.engine import Engine
from moekit.serve.metrics import Metrics
from moekit.serve.protocol import APIError
from moekit.serve.sampling import SamplingParams
from moekit.serve.schemas import ChatRequest, CompletionRequest, _Sampling

if TYPE_CHECKING:  # app imports this module
    from moekit.serve.app import ServerOptions

SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


def sse(data: Any) -> bytes:
    """One server-sent event: ``data: {json}\\n\\n`` (or ``data: [DONE]\\n\\n``)."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


class _Route:
    """What both routes share: the caps, the sampling parameters, the stream and the metrics."""

    path = ""
    object_name = ""
    chunk_name = ""
    id_prefix = ""

    def __init__(self, engine: Engine, tokenizer: Tokenizer, options: ServerOptions, metrics: Metrics):
        self.engine, self.tokenizer, self.options, self.metrics = engine, tokenizer, options, metrics
        eos = tuple(t for t in (tokenizer.eos_token_id,) if t is not None)
        self.stop_token_ids = options.end_token_ids if options.end_token_ids is not None else eos

    # -- checks --------------------------------------------------------------------------------------
    def check(self, body: _Sampling, prompt: list[int], max_tokens: int | None) -> list[SamplingParams]:
        """Every cap, in the order a client would fix them; one SamplingParams per choice."""
        o = self.options
        if body.model != o.model_name:
            raise APIError(404, f"the model '{body.model}' does not exist; this server serves '{o.model_name}'",
                           "model_not_found", "model")  # fmt: skip
        if body.n > o.max_n:
            raise APIError(400, f"n={body.n} is over this server's limit of {o.max_n}", "invalid_value", "n")
        if len(body.stop_strings()) > o.max_stop:
            raise APIError(400, f"{len(body.stop_strings())} stop strings; at most {o.max_stop} are allowed",
                           "invalid_value", "stop")  # fmt: skip
        if body.presence_penalty or body.frequency_penalty:
            raise APIError(400, "presence_penalty and frequency_penalty are not supported (use 0)", "unsupported")
        context = self.engine.context
        if not prompt:
            raise APIError(400, "the prompt is empty", "invalid_value", "prompt")
        if len(prompt) >= context:
            raise APIError(400, f"the prompt has {len(prompt)} tokens; the model's context is {context} tokens "
                           "and the answer needs at least one", "context_length_exceeded")  # fmt: skip
        vocab = self.engine.vocab_limit or self.engine.model.config.vocab_size
        if any(not 0 <= t < vocab for t in prompt):
            raise APIError(400, f"the prompt holds token ids outside the vocabulary 0..{vocab - 1}", "invalid_value")
        room = min(context - len(prompt), o.max_tokens_limit)
        if max_tokens is None:
            max_tokens = room
        echo = self.echoes(body)
        if max_tokens < (0 if echo else 1):  # 0 with echo: score the prompt only (as lm-evaluation-harness asks)
            least = "0 (with echo)" if echo else "1 (0 with echo, to score the prompt)"
            raise APIError(400, f"max_tokens must be at least {least}, got {max_tokens}", "invalid_value",
                           "max_tokens")  # fmt: skip
        if max_tokens > room:
            raise APIError(400, f"max_tokens={max_tokens} is too large: the prompt has {len(prompt)} tokens, the "
                           f"context {context} and the server's limit is {o.max_tokens_limit}, so at most {room} "
                           "fit", "invalid_value", "max_tokens")  # fmt: skip
        logprobs = self.logprobs(body)
        return [
            SamplingParams(
                max_tokens=max_tokens,
                temperature=body.temperature,
                top_p=body.top_p,
                seed=None if body.seed is None else body.seed + i,  # n choices differ, and repeat with the seed
                stop_token_ids=self.stop_token_ids,
                logprobs=logprobs,
                prompt_logprobs=echo and logprobs is not None,
                return_routed_experts=body.return_routed_experts,
                timeout_s=o.request_timeout_s,
            )
            for i in range(body.n)
        ]

    def logprobs(self, body: Any) -> int | None:
        raise NotImplementedError

    def echoes(self, body: Any) -> bool:
        """Whether the answer repeats the prompt (completions' ``echo``)."""
        return False

    def choice_body(self, piece: Piece, text: str, body: Any, offset: int, stream: bool) -> dict[str, Any]:
        raise NotImplementedError

    # -- answering -----------------------------------------------------------------------------------
    async def run(self, body: _Sampling, request: Request, prompt: list[int], params: list[SamplingParams],
                  stop: list[str], prefix: str = ""):  # fmt: skip
        """The response: JSON, or a stream of chunks ending in ``data: [DONE]``."""
        started = time.monotonic()
        pieces = run_choices(self.engine, self.tokenizer, prompt, params, stop,
                             None if body.stream else request.is_disconnected)  # fmt: skip
        if body.stream:
            first = await self._first(pieces, started)  # errors before the first byte keep their status
            events = self._events(body, prompt, first, pieces, prefix)
            return StreamingResponse(events, media_type="text/event-stream",
                                     headers=SSE_HEADERS)  # fmt: skip
        texts = [prefix] * len(params)
        tokens: list[list] = [[] for _ in params]
        echoed: list[list | None] = [None] * len(params)
        finish: list[str | None] = [None] * len(params)
        first_seen = False
        try:
            async for piece in pieces:
                if piece.echo is not None:
                    echoed[piece.index] = piece.echo
                    continue
                if not first_seen:
                    self.metrics.first_token(time.monotonic() - started)
                    first_seen = True
                texts[piece.index] += piece.text
                tokens[piece.index].extend(piece.tokens)
                finish[piece.index] = piece.finish_reason or finish[piece.index]
        except APIError as err:
            self.metrics.request_done(self.path, err.status)
            raise
        choices = []
        for i in range(len(params)):
            whole = Piece(i, texts[i], tokens[i], finish[i], echo=echoed[i])
            choices.append(self.choice_body(whole, texts[i], body, 0, stream=False))
        usage = protocol.usage(len(prompt), sum(len(t) for t in tokens))
        self.metrics.request_done(self.path, 200)
        rid = protocol.new_id(self.id_prefix)
        return JSONResponse(protocol.envelope(rid, self.object_name, body.model, choices, usage=usage))

    async def _first(self, pieces: AsyncIterator[Piece], started: float) -> Piece | None:
        try:
            first = await anext(pieces)
        except StopAsyncIteration:
            return None
        except APIError as err:
            self.metrics.request_done(self.path, err.status)
            raise
        self.metrics.first_token(time.monotonic() - started)
        return first

    async def _events(self, body: _Sampling, prompt: list[int], first: Piece | None, pieces: AsyncIterator[Piece],
                      prefix: str):  # fmt: skip
        rid = protocol.new_id(self.id_prefix)
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        extra = {"usage": None} if include_usage else {}
        generated = 0
        offsets = [len(prefix)] * body.n
        status = 200
        try:
            for opening in self.openings(body, prefix):
                yield sse(protocol.envelope(rid, self.chunk_name, body.model, [opening], **extra))
            piece = first
            while piece is not None:
                if piece.echo is not None:  # the prompt, scored: its text and logprobs in one chunk
                    yield sse(protocol.envelope(rid, self.chunk_name, body.model,
                                                [self.echo_body(piece, prefix)], **extra))  # fmt: skip
                    piece = await anext(pieces, None)
                    continue
                generated += len(piece.tokens)
                choice = self.choice_body(piece, piece.text, body, offsets[piece.index], stream=True)
                offsets[piece.index] += len(piece.text)
                yield sse(protocol.envelope(rid, self.chunk_name, body.model, [choice], **extra))
                piece = await anext(pieces, None)
            if include_usage:
                yield sse(protocol.envelope(rid, self.chunk_name, body.model, [],
                                            usage=protocol.usage(len(prompt), generated)))  # fmt: skip
        except APIError as err:  # after the 200 went out: the error travels as an event
            status = err.status
            yield sse(err.body())
        finally:
            await pieces.aclose()  # type: ignore[attr-defined]  # an async generator: cancels the requests
            self.metrics.request_done(self.path, status)
        yield sse("[DONE]")

    def openings(self, body: Any, prefix: str) -> list[dict[str, Any]]:
        """Choices of the chunks sent before the first token: chat announces the role, completions echo."""
        return []

    def echo_body(self, piece: Piece, prefix: str) -> dict[str, Any]:
        """The streamed choice that echoes a scored prompt."""
        raise NotImplementedError


class CompletionRoute(_Route):
    path, object_name, chunk_name, id_prefix = "/v1/completions", "text_completion", "text_completion", "cmpl"

    async def answer(self, body: CompletionRequest, request: Request):
        """Answer one /v1/completions request."""
        prompt_text = ""
        if isinstance(body.prompt, str):
            prompt_text, prompt = body.prompt, self.tokenizer.encode(body.prompt)
        elif body.prompt and all(isinstance(p, str) for p in body.prompt):
            if len(body.prompt) != 1:
                raise APIError(400, "send one prompt per request (a list of prompts is not supported)",
                               "unsupported", "prompt")  # fmt: skip
            prompt_text = str(body.prompt[0])
            prompt = self.tokenizer.encode(prompt_text)
        else:
            prompt = [int(t) for t in body.prompt]
            if body.echo:
                prompt_text = self.tokenizer.decode([t for t in prompt if 0 <= t < self.tokenizer.vocab_size])
        params = self.check(body, prompt, body.max_tokens)
        return await self.run(body, request, prompt, params, body.stop_strings(), prompt_text if body.echo else "")

    def logprobs(self, body: CompletionRequest) -> int | None:
        return body.logprobs

    def echoes(self, body: CompletionRequest) -> bool:
        return body.echo

    def openings(self, body: CompletionRequest, prefix: str) -> list[dict[str, Any]]:
        if not prefix or body.logprobs is not None:  # with logprobs the scored prompt comes as its own chunk
            return []
        return [{"index": i, "text": prefix, "logprobs": None, "finish_reason": None} for i in range(body.n)]

    def echo_body(self, piece: Piece, prefix: str) -> dict[str, Any]:
        logprobs = protocol.completion_logprobs(self.tokenizer, piece.echo or [], 0)
        return {"index": piece.index, "text": prefix, "logprobs": logprobs, "finish_reason": None}

    def choice_body(self, piece: Piece, text: str, body: CompletionRequest, offset: int, stream: bool):
        choice: dict[str, Any] = {"index": piece.index, "text": text, "logprobs": None,
                                  "finish_reason": piece.finish_reason}  # fmt: skip
        if body.logprobs is not None:  # the scored prompt first, when echoed (whole answers only)
            scored = (piece.echo or []) + piece.tokens
            choice["logprobs"] = protocol.completion_logprobs(self.tokenizer, scored, 0 if piece.echo else offset)
        if body.return_routed_experts:
            choice["routed_experts"] = protocol.routed_experts(piece.tokens)
        return choice


class ChatRoute(_Route):
    path, object_name, chunk_name, id_prefix = (
        "/v1/chat/completions",
        "chat.completion",
        "chat.completion.chunk",
        "chatcmpl",
    )

    def __init__(self, engine, tokenizer, options, metrics, template: ChatTemplate):
        super().__init__(engine, tokenizer, options, metrics)
        self.template = template

    async def answer(self, body: ChatRequest, request: Request):
        """Answer one /v1/chat/completions request."""
        messages = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})}
                    for m in body.messages]  # fmt: skip
        try:
            prompt = self.tokenizer.encode(self.template.render(messages))
        except ValueError as err:
            raise APIError(400, str(err), "invalid_value", "messages") from None
        if body.max_tokens is not None and body.max_completion_tokens is not None:
            raise APIError(400, "give max_tokens or max_completion_tokens, not both", "invalid_value")
        limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        params = self.check(body, prompt, limit)
        return await self.run(body, request, prompt, params, [*body.stop_strings(), *self.template.stop])

    def logprobs(self, body: ChatRequest) -> int | None:
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", "invalid_value", "top_logprobs")
        return (body.top_logprobs or 0) if body.logprobs else None

    def openings(self, body: ChatRequest, prefix: str) -> list[dict[str, Any]]:
        return [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                for i in range(body.n)]  # fmt: skip

    def choice_body(self, piece: Piece, text: str, body: ChatRequest, offset: int, stream: bool):
        logprobs = protocol.chat_logprobs(self.tokenizer, piece.tokens) if body.logprobs else None
        if stream:
            delta = {"content": text} if text or piece.finish_reason is None else {}
            choice: dict[str, Any] = {"index": piece.index, "delta": delta}
        else:
            choice = {"index": piece.index, "message": {"role": "assistant", "content": text}}
        choice.update(logprobs=logprobs, finish_reason=piece.finish_reason)
        if body.return_routed_experts:
            choice["routed_experts"] = protocol.routed_experts(piece.tokens)
        return choice
