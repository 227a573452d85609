"""The README's path: train the ``demo`` preset (dense first layer, byte tokenizer), ``moekit convert --to-hf``,
then transformers reads and writes the same text, and ``convert --from-hf`` gives the same model back."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import moekit
from moekit.checkpoint import load_model
from moekit.cli import main
from moekit.data import builtin_corpus
from moekit.data.tokenizers import ByteTokenizer, Tokenizer
from moekit.errors import ConfigError
from tests.interop.hf_models import one_torch_thread, transformers  # noqa: F401

LINES = ["First Citizen:", "Before we proceed any further, hear me speak.", "All:", "Speak, speak."]


def _train(root, tokenizer: str, steps: int):
    """A demo run on a small repetitive text: a few dozen steps learn it well enough that greedy text varies."""
    data = root / "data.txt"
    data.write_text("\n".join(LINES * 150) + "\n")
    run = root / f"run-{tokenizer}"
    argv = ["train", "--model", "demo", "--data", data, "--tokenizer", tokenizer, "--max-steps", steps]
    argv += ["--batch-size", 16, "--block-size", 32, "--lr", 0.01, "--warmup-steps", 2, "--eval-interval", steps]
    argv += ["--eval-batches", 1, "--progress", "false", "--tensorboard", "false", "--out", run]
    assert main([str(a) for a in argv]) == 0
    return run


@pytest.fixture(scope="module")
def byte_run(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("demo"), "byte", steps=60)


@pytest.fixture(scope="module")
def char_run(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("demo"), "char", steps=5)


def _run(capsys, *argv) -> str:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    assert code == 0, out.err
    return out.out


def test_transformers_generate_writes_what_moekit_generate_writes(byte_run, tmp_path, capsys):
    export = tmp_path / "hf"
    _run(capsys, "convert", "--to-hf", byte_run, "--out", export)
    prompt, new = "First", 40
    mine = _run(
        capsys, "generate", "--checkpoint", byte_run, "--prompt", prompt, "--max-new-tokens", new, "--temperature", 0
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(export).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(export)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False)
    theirs = tokenizer.decode(out[0])
    assert mine.rstrip("\n") == theirs
    assert len(set(theirs[len(prompt) :])) > 3, theirs  # the trained model writes varied text, not one character


def test_convert_round_trip_keeps_logits_and_tokenizer_ids(byte_run, char_run, tmp_path, capsys):
    text = "".join(builtin_corpus().splitlines(keepends=True)[:6])
    for run in (byte_run, char_run):
        export, back = tmp_path / f"{run.name}-hf", tmp_path / f"{run.name}-back"
        _run(capsys, "convert", "--to-hf", run, "--out", export)
        assert json.loads((export / "config.json").read_text())["model_type"] == "qwen2_moe"
        _run(capsys, "convert", "--from-hf", export, "--out", back)
        (model, tokenizer), (again, tokenizer_again) = load_model(run), load_model(back)
        ids = tokenizer.encode(text)
        assert tokenizer_again.encode(text) == ids and tokenizer_again.decode(ids) == text
        assert transformers.AutoTokenizer.from_pretrained(back)(text)["input_ids"] == ids
        with torch.no_grad():
            assert torch.equal(model(torch.tensor([ids[:100]])).logits, again(torch.tensor([ids[:100]])).logits)


def test_convert_on_the_command_line_prints_no_tokenizer_warning(byte_run, tmp_path):
    out = tmp_path / "hf"
    cmd = [sys.executable, "-m", "moekit", "convert", "--to-hf", str(byte_run), "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert "tokenizer" not in done.stderr and done.stdout.count("wrote Hugging Face model") == 1
    assert transformers.AutoTokenizer.from_pretrained(out)("To be")["input_ids"] == ByteTokenizer().encode("To be")


class _Words(Tokenizer):
    """A tokenizer with no Hugging Face form."""

    kind = "words"

    @property
    def vocab_size(self) -> int:
        return 256


def test_a_tokenizer_without_hf_form_is_warned_about_once(byte_run, tmp_path, caplog):
    model = moekit.load(byte_run)
    with caplog.at_level("WARNING"):
        moekit.to_hf(model, tmp_path / "hf", tokenizer=_Words())
    assert [r.getMessage() for r in caplog.records].count(
        "the words tokenizer has no Hugging Face form; the export carries no tokenizer"
    ) == 1
    assert not (tmp_path / "hf" / "tokenizer.json").exists()


def test_the_family_hint_names_the_command_line_flag(byte_run, tmp_path, capsys):
    assert main(["convert", "--to-hf", str(byte_run), "--out", str(tmp_path / "hf"), "--family", "mixtral"]) == 2
    err = capsys.readouterr().err
    assert "sparse_layers" in err and "pass --family one of" in err and "family=" not in err
    model = moekit.load(byte_run)
    with pytest.raises(ConfigError, match="pass family= one"):
        moekit.to_hf(model, tmp_path / "api", family="mixtral")
