"""Bad requests get the OpenAI error object with the right status and a clear message; the server keeps serving."""

from __future__ import annotations

import base64
import json
import socket
import threading

import pytest

from moekit.cli import main
from moekit.commands.serve import check_bind
from moekit.errors import ConfigError

from .conftest import tiny_model
from .server import MODEL_NAME, live_server, request

GOOD = {"model": MODEL_NAME, "prompt": "hi", "max_tokens": 2}


def body(**changes) -> bytes:
    return json.dumps({**GOOD, **changes}).encode()


CASES = [
    ("malformed JSON", "/v1/completions", b'{"model": ', 400, "not valid JSON"),
    ("invalid UTF-8", "/v1/completions", b'{"model": "\xff\xfe"}', 400, "not valid UTF-8"),
    ("not an object", "/v1/completions", b"[1, 2]", 400, "must be a JSON object"),
    ("wrong type", "/v1/completions", body(max_tokens="5"), 400, "max_tokens"),
    ("wrong type temperature", "/v1/completions", body(temperature="hot"), 400, "temperature"),
    ("temperature out of range", "/v1/completions", body(temperature=3), 400, "temperature"),
    ("unknown field", "/v1/completions", body(best_of_everything=1), 400, "best_of_everything: unknown field"),
    ("missing field", "/v1/completions", json.dumps({"model": MODEL_NAME}).encode(), 400, "prompt"),
    ("unknown model", "/v1/completions", body(model="gpt-9"), 404, "gpt-9"),
    ("max_tokens 0", "/v1/completions", body(max_tokens=0), 400, "at least 1"),
    ("max_tokens negative", "/v1/completions", body(max_tokens=-5), 400, "at least 1"),
    ("max_tokens huge", "/v1/completions", body(max_tokens=100_000_000), 400, "at most"),
    ("max_tokens past the limit", "/v1/completions", body(max_tokens=65), 400, "limit is 64"),
    ("prompt over the context", "/v1/completions", body(prompt="x" * 200), 400, "context is 96"),
    ("empty prompt", "/v1/completions", body(prompt=""), 400, "empty"),
    ("token ids outside the vocabulary", "/v1/completions", body(prompt=[1, 999]), 400, "vocabulary"),
    ("too many stop strings", "/v1/completions", body(stop=["a", "b", "c", "d", "e"]), 400, "stop strings"),
    ("n over the cap", "/v1/completions", body(n=50), 400, "n=50"),
    ("penalties", "/v1/completions", body(presence_penalty=1.0), 400, "not supported"),
    ("chat without messages", "/v1/chat/completions", json.dumps({"model": MODEL_NAME, "messages": []}).encode(),
     400, "messages"),  # fmt: skip
    ("chat bad role", "/v1/chat/completions",
     json.dumps({"model": MODEL_NAME, "messages": [{"role": "wizard", "content": "x"}]}).encode(), 400, "role"),
    ("chat both token limits", "/v1/chat/completions", json.dumps({"model": MODEL_NAME, "max_tokens": 2,
     "max_completion_tokens": 2, "messages": [{"role": "user", "content": "x"}]}).encode(), 400, "not both"),
]  # fmt: skip


@pytest.mark.parametrize("name, path, payload, status, message", CASES, ids=[c[0] for c in CASES])
def test_bad_request_gets_its_status_and_a_clear_message(server, name, path, payload, status, message):
    got, headers, raw = request(server, "POST", path, payload)
    assert got == status
    error = json.loads(raw)["error"]
    assert message in error["message"]
    assert set(error) == {"message", "type", "param", "code"}
    assert request(server, "GET", "/health")[0] == 200  # still serving


def test_a_50_mb_body_is_refused_with_413(server):
    port = int(server.rsplit(":", 1)[1])
    size = 50 << 20
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(f"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: {size}\r\n\r\n".encode())
        try:  # the server answers before the body is in: it may close while we still send
            for _ in range(size // (1 << 20)):
                sock.sendall(b" " * (1 << 20))
        except (BrokenPipeError, ConnectionResetError):
            pass
        reply = sock.makefile("rb").read()
    head, _, payload = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413")
    assert "larger than the server's limit" in json.loads(payload)["error"]["message"]
    status, _, _ = request(server, "POST", "/v1/completions", body())
    assert status == 200


def test_unknown_route_and_method_are_openai_errors(server):
    status, _, raw = request(server, "GET", "/v1/nothing")
    assert status == 404 and "no route" in json.loads(raw)["error"]["message"]
    assert request(server, "GET", "/v1/completions")[0] == 405


def test_api_key_guards_every_route_but_health(model):
    basic = {"authorization": "Basic " + base64.b64encode(b"anyone:s3cret").decode()}
    with live_server(model, api_key="s3cret") as url:
        for method, path, payload in [("GET", "/v1/models", None), ("GET", "/metrics", None),
                                      ("POST", "/v1/completions", body()), ("GET", "/", None)]:  # fmt: skip
            wrong_basic = {"authorization": "Basic " + base64.b64encode(b"s3cret:wrong").decode()}
            for headers in [{}, {"authorization": "Bearer wrong"}, {"authorization": "s3cret"}, wrong_basic,
                            {"authorization": "Basic %%%"}, {"authorization": "Token s3cret"}]:  # fmt: skip
                status, _, raw = request(url, method, path, payload, headers)
                assert status == 401 and json.loads(raw)["error"]["code"] == "invalid_api_key"
            assert request(url, method, path, payload, {"authorization": "Bearer s3cret"})[0] == 200
            assert request(url, method, path, payload, basic)[0] == 200  # a browser's login, key as password
        status, headers, _ = request(url, "GET", "/")
        assert status == 401 and headers["www-authenticate"].startswith('Basic realm="moekit serve"')
        assert request(url, "GET", "/health")[0] == 200


def test_queue_full_is_429_with_retry_after():
    with live_server(tiny_model(), max_batch=1, max_queue=1) as url:
        results = []

        def call():
            results.append(request(url, "POST", "/v1/completions", body(max_tokens=60, prompt="a")))

        threads = [threading.Thread(target=call) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        statuses = sorted(r[0] for r in results)
        assert 200 in statuses and 429 in statuses and set(statuses) <= {200, 429}
        busy = next(r for r in results if r[0] == 429)
        assert busy[1].get("retry-after") == "1" and "busy" in json.loads(busy[2])["error"]["message"]


def test_non_loopback_bind_without_a_key_is_refused(capsys, monkeypatch):
    monkeypatch.delenv("MOEKIT_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="--api-key or MOEKIT_API_KEY"):
        check_bind("0.0.0.0", None)
    check_bind("127.0.0.1", None)
    check_bind("::1", None)
    check_bind("0.0.0.0", "key")
    assert main(["serve", "--checkpoint", "nowhere", "--host", "0.0.0.0"]) == 2
    assert "MOEKIT_API_KEY" in capsys.readouterr().err


def test_timeout_is_504_and_a_stopped_engine_is_503(model):
    with live_server(model, request_timeout_s=0.0) as url:
        status, _, raw = request(url, "POST", "/v1/completions", body(max_tokens=50))
        assert status == 504 and "timed out" in json.loads(raw)["error"]["message"]
        status, _, raw = request(url, "POST", "/v1/completions", body(max_tokens=50, stream=True))
        assert status == 504
    with live_server(model) as url:
        url.engine.stop()
        assert request(url, "GET", "/health")[0] == 503
        status, _, raw = request(url, "POST", "/v1/completions", body())
        assert status == 503 and "cannot take requests" in json.loads(raw)["error"]["message"]
