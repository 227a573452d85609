"""`moekit serve` loads what `moekit generate` loads: a llama.cpp ``.gguf`` file (with its tokenizer and chat
template) and a checkpoint with its experts offloaded; each answers as the resident float model does. The command
itself runs in a subprocess; the oracle is the resident model served in-process."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

import moekit
from moekit.cli import main
from moekit.data.tokenizers import HFTokenizer
from moekit.interop.gguf import convert_from_gguf
from moekit.serve.chat import ChatTemplate

from .server import free_port, live_server, post_json, request

gguf_files = pytest.importorskip("tests.interop.gguf_files")

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + "
    "'\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
MESSAGES = [{"role": "user", "content": "Which experts?"}]
PROMPTS = ["The quick brown", "Mixture-of-Experts models route", "émigré café"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """(a Q8_0 GGUF of a tiny Qwen3-MoE with a tokenizer and a chat template, its float32 moekit checkpoint)."""
    root = tmp_path_factory.mktemp("serve_sources")
    path = root / "tiny.gguf"
    tokenizer_json = json.loads(gguf_files.train_byte_level_bpe().to_str())
    hf = gguf_files.tiny_model("qwen3_moe")
    gguf_files.write_gguf(hf, path, qtype="Q8_0", tokenizer_json=tokenizer_json, chat_template=CHATML)
    return path, convert_from_gguf(path, root / "ckpt")


@contextlib.contextmanager
def serve_command(*args) -> Iterator[str]:
    """`moekit serve ARGS` in a subprocess on a free port: its base URL once /health answers."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    env.pop("MOEKIT_API_KEY", None)
    cmd = [sys.executable, "-m", "moekit", "serve", *map(str, args), "--port", str(port), "--threads", "1"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.communicate()[1].decode()
            with contextlib.suppress(OSError):
                if request(url, "GET", "/health", timeout=2)[0] == 200:
                    break
            assert time.monotonic() < deadline, "moekit serve did not come up"
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0


def _completions(url: str, prompts=PROMPTS) -> list[str]:
    name = json.loads(request(url, "GET", "/v1/models")[2])["data"][0]["id"]
    answers = []
    for prompt in prompts:
        body = {"model": name, "prompt": prompt, "max_tokens": 12, "temperature": 0}
        status, answer = post_json(url, "/v1/completions", body)
        assert status == 200, answer
        answers.append(answer["choices"][0]["text"])
    return answers


@pytest.fixture(scope="module")
def resident(files) -> list[str]:
    """The resident float model's greedy completions (its checkpoint served in-process)."""
    _, ckpt = files
    with live_server(moekit.load(ckpt), HFTokenizer(ckpt), model_name="ckpt") as url:
        answers = _completions(url)
    assert any(answers)  # some text, not an answer that stops at once
    return answers


def test_a_gguf_file_is_served_as_the_resident_float_model(files, resident):
    path, _ = files
    with serve_command("--model", path) as url:
        assert _completions(url) == resident
        # the file's chat template renders the messages: a chat is the completion of the rendered prompt
        rendered = ChatTemplate(CHATML).render(MESSAGES)
        status, chat = post_json(url, "/v1/chat/completions", {"model": path.name, "messages": MESSAGES,
                                                                "max_tokens": 12, "temperature": 0})  # fmt: skip
        assert status == 200, chat
        assert chat["choices"][0]["message"]["content"] == _completions(url, [rendered])[0]


def test_an_offloaded_checkpoint_is_served_as_the_resident_model(files, resident):
    _, ckpt = files
    with serve_command("--checkpoint", ckpt, "--expert-memory", "32KiB") as url:  # about one expert of 16
        assert _completions(url) == resident


def test_bad_sources_and_sizes_are_one_line_errors(files, capsys):
    path, ckpt = files
    cases = [
        (["--checkpoint", ckpt, "--expert-memory", "lots"], "expert memory 'lots' is not a size"),
        (["--model", path, "--expert-memory", "1GiB"], "convert the GGUF first"),
        (["--model", path.with_name("absent.gguf")], "absent.gguf"),
    ]
    for args, message in cases:
        code = main(["serve", *map(str, args), "--port", "1"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and "\n" not in err and message in err and "Traceback" not in err, err
