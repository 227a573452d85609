"""Serving a Hugging Face folder: a tiny random Qwen3-MoE saved by transformers, with a byte-level BPE tokenizer
and a ChatML chat template; the `moekit serve` command itself in a subprocess."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from moekit.interop.hf.api import load_for_inference
from moekit.serve.chat import ChatTemplate, end_token_ids

from .server import free_port, live_server, request

transformers = pytest.importorskip("transformers")
openai = pytest.importorskip("openai")

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + "
    "'\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
TEXT = "the experts of a mixture route each token to a few of them, and the router learns which " * 20
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Which experts?"}]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    folder = tmp_path_factory.mktemp("qwen3moe")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=specials, show_progress=False)  # fmt: skip
    tok.train_from_iterator([TEXT], trainer)
    tok.save(str(folder / "tokenizer.json"))
    config = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "chat_template": CHATML,
              "tokenizer_class": "PreTrainedTokenizerFast"}  # fmt: skip
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    hf_config = transformers.Qwen3MoeConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=4,
        num_experts_per_tok=2, max_position_embeddings=128, initializer_range=0.1,
        eos_token_id=tok.token_to_id("<|im_end|>"),
    )  # fmt: skip
    transformers.AutoModelForCausalLM.from_config(hf_config).eval().save_pretrained(folder)
    return folder


def test_the_checkpoint_chat_template_renders_as_transformers_renders_it(hf_dir):
    ours = ChatTemplate.find(hf_dir).render(MESSAGES)
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    assert ours == hf_tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)


def test_answers_end_at_the_eos_of_the_tokenizer_and_the_generation_config(hf_dir, tmp_path):
    _, tokenizer = load_for_inference(hf_dir=hf_dir)
    im_end = tokenizer.eos_token_id
    assert end_token_ids(hf_dir, im_end) == (im_end,)  # config.json names the same token
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, im_end, 9]}))
    assert end_token_ids(tmp_path, im_end) == (im_end, 7, 9)


def test_a_template_cannot_escape_its_sandbox(tmp_path):
    (tmp_path / "chat_template.jinja").write_text("{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(ValueError, match="refused"):
        ChatTemplate.find(tmp_path).render(MESSAGES)


def test_chat_on_an_hf_folder_equals_transformers_greedy_generate(hf_dir):
    model, tokenizer = load_for_inference(hf_dir=hf_dir)
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    ids = hf_tok.apply_chat_template(MESSAGES, add_generation_prompt=True, return_dict=True, return_tensors="pt")
    with torch.no_grad():
        out = hf_model.generate(**ids, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
    expected = hf_tok.decode(out[0, ids["input_ids"].shape[1] :])
    with live_server(model, tokenizer, ChatTemplate.find(hf_dir), model_name="qwen") as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        answer = client.chat.completions.create(model="qwen", messages=MESSAGES, max_tokens=10, temperature=0)
    eos = "<|im_end|>"
    assert answer.choices[0].message.content == expected.split(eos)[0]
    assert answer.usage.prompt_tokens == ids["input_ids"].shape[1]


def test_moekit_serve_command_serves_an_hf_folder(hf_dir):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    env.pop("MOEKIT_API_KEY", None)
    cmd = [sys.executable, "-m", "moekit", "serve", "--model", str(hf_dir), "--port", str(port), "--dtype", "float32"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.communicate()[1].decode()
            try:
                if request(url, "GET", "/health", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "moekit serve did not come up"
            time.sleep(0.2)
        status, _, raw = request(url, "GET", "/v1/models")
        assert status == 200 and json.loads(raw)["data"][0]["id"] == hf_dir.name
        proc.terminate()  # SIGTERM: the engine and the HTTP server stop, the command returns 0
        assert proc.wait(timeout=30) == 0
        with socket.socket() as busy:  # a port in use is a one-line error, not a server serving nothing
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            cmd[cmd.index("--port") + 1] = str(busy.getsockname()[1])
            taken = subprocess.run(cmd, env=env, capture_output=True, timeout=120, text=True)
        assert taken.returncode == 2 and "could not listen" in taken.stderr
    finally:
        if proc.poll() is None:
            proc.kill()
