"""A live ``moekit serve`` application on 127.0.0.1 in a background thread (real uvicorn, a free port)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import uvicorn

from moekit.data.tokenizers import ByteTokenizer, Tokenizer
from moekit.models import MoELM
from moekit.serve.app import ServerOptions, build_app
from moekit.serve.chat import ChatTemplate
from moekit.serve.engine import Engine

MODEL_NAME = "tiny-moe"


class LiveURL(str):
    """The server's base URL, carrying its engine for tests that look inside."""

    engine: Engine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def live_server(
    model: MoELM,
    tokenizer: Tokenizer | None = None,
    template: ChatTemplate | None = None,
    max_batch: int = 16,
    max_queue: int = 64,
    **options,
) -> Iterator[LiveURL]:
    """Serve ``model`` and yield its base URL; the server and its engine are stopped after."""
    tokenizer = tokenizer or ByteTokenizer()
    engine = Engine(model, max_batch=max_batch, max_queue=max_queue, vocab_limit=tokenizer.vocab_size).start()
    app = build_app(engine, tokenizer, template or ChatTemplate.find(None),
                    ServerOptions(model_name=options.pop("model_name", MODEL_NAME), **options))  # fmt: skip
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    url = LiveURL(f"http://127.0.0.1:{port}")
    url.engine = engine
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        engine.stop()


def request(url: str, method: str, path: str, body: bytes | None = None, headers: dict | None = None, timeout=60):
    """One raw HTTP exchange (stdlib http.client): (status, headers, body bytes)."""
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers={"content-type": "application/json", **(headers or {})})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def post_json(url: str, path: str, payload, headers: dict | None = None):
    """POST ``payload`` as JSON: (status, parsed JSON body)."""
    import json

    status, _, body = request(url, "POST", path, json.dumps(payload).encode(), headers)
    return status, json.loads(body)
