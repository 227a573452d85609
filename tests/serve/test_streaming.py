"""Server-sent events at the byte level, and a bounded load test with clients that walk away."""

from __future__ import annotations

import gc
import http.client
import json
import os
import threading
import time

from moekit.data.tokenizers import ByteTokenizer
from moekit.inference import generate
from moekit.serve.engine import Request

from .conftest import tiny_model
from .server import MODEL_NAME, live_server, request


def raw_stream(url: str, path: str, payload: dict) -> tuple[int, dict, bytes]:
    return request(url, "POST", path, json.dumps(payload).encode())


def parse_sse(raw: bytes) -> list[bytes]:
    """The data fields of a text/event-stream body, checking its framing byte for byte."""
    assert raw.endswith(b"data: [DONE]\n\n")
    events = raw.split(b"\n\n")
    assert events[-1] == b""  # every event ends with a blank line
    datas = []
    for event in events[:-1]:
        assert event.startswith(b"data: ") and b"\n" not in event, event
        datas.append(event[len(b"data: ") :])
    return datas


def test_chat_stream_bytes_follow_the_openai_format(server):
    status, headers, raw = raw_stream(server, "/v1/chat/completions", {
        "model": MODEL_NAME, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 6,
        "temperature": 0, "stream": True, "stream_options": {"include_usage": True},
    })  # fmt: skip
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    datas = parse_sse(raw)
    assert datas[-1] == b"[DONE]"
    chunks = [json.loads(d) for d in datas[:-1]]
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content, usage = chunks[:-1], chunks[-1]
    finishes = [c["choices"][0]["finish_reason"] for c in content]
    assert finishes[:-1] == [None] * (len(finishes) - 1) and finishes[-1] in ("stop", "length")
    assert all(c["usage"] is None for c in content)
    assert (
        usage["choices"] == []
        and usage["usage"]["total_tokens"] == usage["usage"]["prompt_tokens"] + usage["usage"]["completion_tokens"]
    )
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in content)
    assert 0 < usage["usage"]["completion_tokens"] <= 6 and isinstance(text, str)


def test_completion_stream_without_usage_has_no_usage_field(server):
    status, _, raw = raw_stream(server, "/v1/completions", {
        "model": MODEL_NAME, "prompt": "abc", "max_tokens": 3, "temperature": 0, "stream": True,
    })  # fmt: skip
    chunks = [json.loads(d) for d in parse_sse(raw)[:-1]]
    assert status == 200 and all("usage" not in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_error_before_streaming_keeps_its_status(server):
    status, headers, raw = raw_stream(server, "/v1/completions", {
        "model": "other", "prompt": "abc", "stream": True,
    })  # fmt: skip
    assert status == 404 and headers["content-type"] == "application/json"


def load_round(port: int, requests: int = 200, at_once: int = 32) -> dict[int, str]:
    """``requests`` clients, ``at_once`` at a time: most stream, every 7th asks for a whole answer, every 5th walks
    away after a few events. Each outcome: ``complete``, ``left`` or what went wrong."""
    outcomes: dict[int, str] = {}
    gate = threading.Semaphore(at_once)

    def client(i: int) -> None:
        with gate:
            stream = i % 7 != 0
            payload = {"model": MODEL_NAME, "prompt": f"request {i}:", "max_tokens": 40 + i % 40,
                       "temperature": 0.8, "seed": i, "stream": stream}  # fmt: skip
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            conn.request("POST", "/v1/completions", json.dumps(payload), {"content-type": "application/json"})
            response = conn.getresponse()
            if stream and i % 5 == 0:  # walk away midway
                response.read(200)
                conn.sock.close()
                conn.close()
                outcomes[i] = "left"
                return
            raw = response.read()
            conn.close()
            if not stream:
                body = json.loads(raw)
                whole = response.status == 200 and body["usage"]["completion_tokens"] == payload["max_tokens"]
                outcomes[i] = "complete" if whole else f"bad {response.status} {body}"
                return
            done = response.status == 200 and raw.endswith(b"data: [DONE]\n\n")
            finishes = [json.loads(d)["choices"][0]["finish_reason"] for d in parse_sse(raw)[:-1]] if done else []
            outcomes[i] = "complete" if done and finishes[-1] == "length" else f"bad {response.status}"

    threads = [threading.Thread(target=client, args=(i,)) for i in range(requests)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a client hung"
    return outcomes


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def live_requests() -> int:
    gc.collect()
    return sum(type(o) is Request for o in gc.get_objects())


def test_load_with_disconnecting_clients_ends_every_request_frees_its_memory_and_stays_healthy():
    model = tiny_model(context=128)
    tokenizer = ByteTokenizer()
    with live_server(model, max_batch=32, max_queue=64) as url:
        port = int(url.rsplit(":", 1)[1])
        load_round(port, requests=64)  # warm-up: the allocator's pools and the thread pools settle
        before = resident_bytes()
        outcomes = load_round(port)
        assert len(outcomes) == 200 and sorted(set(outcomes.values())) == ["complete", "left"], outcomes
        deadline = time.monotonic() + 20
        status, _, metrics = request(url, "GET", "/metrics")
        while b"moekit_running_requests 0" not in metrics and time.monotonic() < deadline:
            time.sleep(0.1)
            status, _, metrics = request(url, "GET", "/metrics")
        assert b"moekit_running_requests 0" in metrics and b"moekit_queue_depth 0" in metrics
        assert request(url, "GET", "/health")[0] == 200
        assert url.engine._cache is None and url.engine._running == []  # every row's KV cache is released
        assert live_requests() == 0  # and no request is kept alive by a queue, a sink or a stream
        grown = resident_bytes() - before
        assert grown < 32 << 20, f"resident memory grew by {grown >> 20} MiB over 200 requests"
        status, _, raw = request(url, "POST", "/v1/completions", json.dumps(
            {"model": MODEL_NAME, "prompt": "after", "max_tokens": 8, "temperature": 0}).encode())  # fmt: skip
        expected = tokenizer.decode(generate(model, [tokenizer.encode("after")], max_new_tokens=8, temperature=0)[0])
        assert status == 200 and json.loads(raw)["choices"][0]["text"] == expected


def test_a_client_that_disconnects_frees_its_row_long_before_max_tokens():
    with live_server(tiny_model(context=1024), max_tokens_limit=1000) as url:
        port = int(url.rsplit(":", 1)[1])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        payload = {"model": MODEL_NAME, "prompt": "go", "max_tokens": 1000, "temperature": 0, "stream": True}
        conn.request("POST", "/v1/completions", json.dumps(payload), {"content-type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200 and response.read(50)
        conn.sock.close()
        conn.close()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            metrics = request(url, "GET", "/metrics")[2].decode()
            if "moekit_running_requests 0" in metrics:
                break
            time.sleep(0.02)
        total = next(line for line in metrics.splitlines() if line.startswith("moekit_generation_tokens_total "))
        generated = int(total.split()[1])
        assert "moekit_running_requests 0" in metrics and generated < 1000
