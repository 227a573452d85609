"""``moekit serve`` with the model in a forked process of its own (the default on Linux): a real command, real
HTTP. Batched answers equal lone ones, disconnects free rows, the child's counters reach /metrics, SIGTERM ends
both processes, and a dead engine process ends the server instead of leaving it to hang."""

from __future__ import annotations

import concurrent.futures
import contextlib
import http.client
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from moekit.checkpoint import save_checkpoint
from moekit.data.tokenizers import ByteTokenizer
from moekit.inference import generate

from .conftest import tiny_model
from .server import free_port, request


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("run")
    save_checkpoint(folder, 0, tiny_model(context=256), ByteTokenizer())
    return folder


@contextlib.contextmanager
def served(checkpoint, *extra: str):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    env.pop("MOEKIT_API_KEY", None)
    cmd = [sys.executable, "-m", "moekit", "serve", "--checkpoint", str(checkpoint), "--port", str(port),
           "--served-model-name", "tiny", "--max-tokens-limit", "200", *extra]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.communicate()[1]
            with contextlib.suppress(OSError):
                if request(url, "GET", "/health", timeout=2)[0] == 200:
                    break
            assert time.monotonic() < deadline, "moekit serve did not come up"
            time.sleep(0.1)
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def children(pid: int) -> list[int]:
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            found += [int(c) for c in f.read().split()]
    return found


def complete(url: str, prompt: str, max_tokens: int) -> str:
    status, _, raw = request(url, "POST", "/v1/completions", json.dumps(
        {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}).encode())  # fmt: skip
    assert status == 200, raw
    return json.loads(raw)["choices"][0]["text"]


def metric(url: str, name: str) -> float:
    text = request(url, "GET", "/metrics")[2].decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def test_engine_process_answers_batched_as_alone_and_reports_its_counters(checkpoint):
    model, tokenizer = tiny_model(context=256), ByteTokenizer()
    prompts = [f"prompt number {i}: " * (1 + i % 3) for i in range(16)]
    expected = [tokenizer.decode(generate(model, [tokenizer.encode(p)], max_new_tokens=12, temperature=0)[0])
                for p in prompts]  # fmt: skip
    with served(checkpoint) as (proc, url):
        assert len(children(proc.pid)) == 1  # the engine's process
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda p: complete(url, p, 12), prompts))
        assert answers == expected
        deadline = time.monotonic() + 10
        while metric(url, "moekit_generation_tokens_total") < 16 * 12 and time.monotonic() < deadline:
            time.sleep(0.05)  # the child sends its counters at most every 0.1 s
        assert metric(url, "moekit_generation_tokens_total") == 16 * 12
        assert metric(url, "moekit_expert_tokens_total") > 0

        port = int(url.rsplit(":", 1)[1])  # a client that walks away frees its row in the child
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        payload = {"model": "tiny", "prompt": "go", "max_tokens": 200, "temperature": 0, "stream": True}
        conn.request("POST", "/v1/completions", json.dumps(payload), {"content-type": "application/json"})
        assert conn.getresponse().read(50)
        conn.sock.close()
        conn.close()
        while metric(url, "moekit_running_requests") != 0 and time.monotonic() < deadline + 20:
            time.sleep(0.05)
        assert metric(url, "moekit_running_requests") == 0
        assert metric(url, "moekit_generation_tokens_total") < 16 * 12 + 200

        engine_pid = children(proc.pid)[0]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert not os.path.exists(f"/proc/{engine_pid}")  # reaped, not left behind


def test_a_dead_engine_process_ends_the_server(checkpoint):
    with served(checkpoint) as (proc, url):
        assert complete(url, "alive", 4)
        os.kill(children(proc.pid)[0], signal.SIGKILL)
        proc.wait(timeout=30)  # the server goes rather than accept requests nobody will answer
        assert proc.returncode == 1 and "engine process ended" in proc.stderr.read()


def test_single_process_flag_keeps_the_model_in_the_server_and_answers_alike(checkpoint):
    """Everything an answer carries (logprobs, the echoed prompt's scores, routed experts) crosses the pipe intact."""
    payload = json.dumps({"model": "tiny", "prompt": "same answer", "max_tokens": 6, "temperature": 0, "echo": True,
                          "logprobs": 2, "return_routed_experts": True}).encode()  # fmt: skip

    def answer(url: str) -> dict:
        status, _, raw = request(url, "POST", "/v1/completions", payload)
        assert status == 200, raw
        return json.loads(raw)["choices"]

    with served(checkpoint, "--single-process") as (proc, url), served(checkpoint) as (_, forked_url):
        assert children(proc.pid) == []
        single = answer(url)
        assert single == answer(forked_url) and len(single[0]["routed_experts"]) == 6
        assert len(single[0]["logprobs"]["tokens"]) == len("same answer") + 6
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
