"""The FastAPI application: the OpenAI routes, /health, /metrics, the chat page, API-key and body-size guards.

Request bodies are read and validated here rather than by FastAPI's injection, so every mistake (bad JSON,
invalid UTF-8, a wrong type, an unknown field) is an OpenAI error object with status 400, not a 422.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hmac
import json
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, ValidationError

from moekit.data.tokenizers import Tokenizer
from moekit.serve.chat import ChatTemplate
from moekit.serve.engine import Engine
from moekit.serve.metrics import Metrics
from moekit.serve.protocol import APIError
from moekit.serve.routes import ChatRoute, CompletionRoute
from moekit.serve.schemas import ChatRequest, CompletionRequest

OPEN_PATHS = ("/health",)
PAGE_REALM = 'Basic realm="moekit serve", charset="UTF-8"'  # a browser asks for the key (as the password)


@dataclasses.dataclass(frozen=True)
class ServerOptions:
    """The server's identity and hard caps."""

    model_name: str
    api_key: str | None = None
    max_tokens_limit: int = 2048
    max_body_bytes: int = 1 << 20
    max_n: int = 4
    max_stop: int = 4
    request_timeout_s: float = 600.0
    end_token_ids: tuple[int, ...] | None = None  # tokens that end an answer (None: the tokenizer's EOS)


def build_app(engine: Engine, tokenizer: Tokenizer, template: ChatTemplate, options: ServerOptions) -> FastAPI:
    """The application serving ``engine`` (already started; it is stopped when the app shuts down)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        engine.stop()

    app = FastAPI(title="moekit serve", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    metrics = Metrics()
    completions = CompletionRoute(engine, tokenizer, options, metrics)
    chat = ChatRoute(engine, tokenizer, options, metrics, template)
    app.state.engine = engine

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if options.api_key is not None and request.url.path not in OPEN_PATHS:
            if not _authorised(request.headers.get("authorization", ""), options.api_key):
                response = _error(APIError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')",
                                           "invalid_api_key"))  # fmt: skip
                if request.url.path == "/":
                    response.headers["www-authenticate"] = PAGE_REALM
                return response
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > options.max_body_bytes:
            return _error(_too_large(options), close=True)
        return await call_next(request)

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError):
        return _error(err)

    @app.exception_handler(404)
    async def not_found(request: Request, err):
        return _error(APIError(404, f"no route {request.method} {request.url.path}", "not_found"))

    @app.exception_handler(405)
    async def wrong_method(request: Request, err):
        return JSONResponse(APIError(405, f"{request.method} is not allowed on {request.url.path}").body(), 405)

    @app.get("/health")
    async def health():
        if not engine.alive:
            return _error(APIError(503, "the engine is not running", "unavailable"))
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(engine), media_type="text/plain; version=0.0.4")

    moe = engine.model.moe_layers()
    moe_info = {
        "moe_layers": [i for i, _ in moe],
        "num_experts": max((m.config.num_experts for _, m in moe), default=0),
    }

    @app.get("/v1/models")
    async def models():
        entry = {"id": options.model_name, "object": "model", "created": 0, "owned_by": "moekit", "moekit": moe_info}
        return {"object": "list", "data": [entry]}

    @app.post("/v1/completions")
    async def complete(request: Request):
        body = await _read_body(request, CompletionRequest, options)
        return await completions.answer(body, request)

    @app.post("/v1/chat/completions")
    async def chat_complete(request: Request):
        body = await _read_body(request, ChatRequest, options)
        return await chat.answer(body, request)

    @app.get("/")
    async def page():
        return HTMLResponse(resources.files("moekit.serve").joinpath("page.html").read_text(encoding="utf-8"))

    return app


async def _read_body(request: Request, schema: type[BaseModel], options: ServerOptions) -> Any:
    """The request body validated against ``schema``; any mistake is a 400 (413 past the size cap)."""
    chunks, size = [], 0
    async for chunk in request.stream():  # counted as it arrives: a body without Content-Length is capped too
        size += len(chunk)
        if size > options.max_body_bytes:
            raise _too_large(options)
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise APIError(400, f"the body is not valid UTF-8: {err}", "invalid_body") from None
    except ValueError as err:
        raise APIError(400, f"the body is not valid JSON: {err}", "invalid_body") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the body must be a JSON object, not {type(data).__name__}", "invalid_body")
    try:
        return schema.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        message = "unknown field" if first["type"] == "extra_forbidden" else first["msg"]
        raise APIError(400, f"{where}: {message}", "invalid_value", param=where) from None


def _authorised(header: str, key: str) -> bool:
    """``Bearer KEY``, or HTTP Basic auth with the key as the password (what a browser sends for the chat page
    and then for the page's own API calls)."""
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "basic":
        try:
            value = base64.b64decode(value, validate=True).decode("utf-8").partition(":")[2]
        except (ValueError, UnicodeDecodeError):
            return False
    elif scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(value.encode(), key.encode())


def _too_large(options: ServerOptions) -> APIError:
    return APIError(413, f"the body is larger than the server's limit of {options.max_body_bytes} bytes",
                    "request_too_large")  # fmt: skip


def _error(err: APIError, close: bool = False) -> Response:
    headers = {"connection": "close"} if close else None
    if err.status == 429:
        headers = {**(headers or {}), "retry-after": "1"}
    return JSONResponse(err.body(), status_code=err.status, headers=headers)
