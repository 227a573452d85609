"""The command line on Hugging Face folders: convert both ways, generate/eval --model, train --init-from."""

from __future__ import annotations

import json
import re

import pytest
import torch

import moekit
from moekit.cli import main
from moekit.io.safe_io import load_weights
from tests.interop.hf_models import corpus, one_torch_thread, save_hf_model, transformers, write_tokenizer  # noqa: F401


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    folder = save_hf_model("deepseek_v3", root / "hf")
    write_tokenizer(folder)
    (root / "data.txt").write_text(corpus())
    return folder


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    assert code == 0, out.err
    return out.out


def test_convert_from_hf_and_back_is_lossless(hf_dir, tmp_path, capsys):
    ckpt, back = tmp_path / "ckpt", tmp_path / "back"
    assert "moekit checkpoint" in _run(capsys, "convert", "--from-hf", hf_dir, "--out", ckpt)
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in ckpt.iterdir()
    }
    ids = torch.tensor([[4, 5, 6, 7, 8]])
    loaded, imported = moekit.load(ckpt), moekit.from_hf(hf_dir)
    mine, theirs = loaded.state_dict(), imported.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    with torch.no_grad():  # same weights; imported experts are transposed views of the file (another GEMM layout)
        torch.testing.assert_close(loaded(ids).logits, imported(ids).logits, rtol=1e-5, atol=1e-6)
    _run(capsys, "convert", "--to-hf", ckpt, "--out", back)
    a, b = load_weights(hf_dir), load_weights(back)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((back / "config.json").read_text()) == json.loads((hf_dir / "config.json").read_text())
    assert (back / "tokenizer.json").read_bytes() == (hf_dir / "tokenizer.json").read_bytes()


def test_convert_keeps_bf16_and_can_shard(hf_dir, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    _run(capsys, "convert", "--from-hf", hf_dir, "--out", ckpt)
    _run(
        capsys,
        "convert",
        "--to-hf",
        ckpt,
        "--out",
        tmp_path / "bf16",
        "--dtype",
        "bfloat16",
        "--max-shard-size",
        "20KB",
    )
    assert (tmp_path / "bf16" / "model.safetensors.index.json").is_file()
    tensors = load_weights(tmp_path / "bf16")
    assert {t.dtype for n, t in tensors.items() if "e_score" not in n} == {torch.bfloat16}
    ckpt16 = tmp_path / "ckpt16"
    _run(capsys, "convert", "--from-hf", tmp_path / "bf16", "--out", ckpt16)
    assert {t.dtype for n, t in load_weights(ckpt16).items() if "e_score" not in n} == {torch.bfloat16}
    _run(capsys, "convert", "--to-hf", ckpt16, "--out", tmp_path / "again")  # default: the checkpoint's dtype
    again = load_weights(tmp_path / "again")
    assert all(torch.equal(again[k], tensors[k]) and again[k].dtype == tensors[k].dtype for k in tensors)


def test_generate_and_eval_take_an_hf_folder(hf_dir, tmp_path, capsys):
    argv = ["--prompt", "the cat sat", "--max-new-tokens", "8", "--temperature", "0"]
    text = _run(capsys, "generate", "--model", hf_dir, *argv)
    assert text.startswith("the cat sat") and len(text.split()) > 3
    ckpt = tmp_path / "ckpt"
    _run(capsys, "convert", "--from-hf", hf_dir, "--out", ckpt)
    assert _run(capsys, "generate", "--checkpoint", ckpt, *argv) == text
    data = hf_dir.parent / "data.txt"
    scores = [
        _run(capsys, "eval", flag, path, "--data", data, "--block-size", "32", "--max-batches", "2")
        for flag, path in (("--model", hf_dir), ("--checkpoint", ckpt))
    ]
    assert re.search(r"val_loss=[0-9.]+", scores[0]) and scores[0] == scores[1]


def test_train_fine_tunes_an_hf_folder_and_exports_the_result(hf_dir, tmp_path, capsys):
    run = tmp_path / "run"
    data = hf_dir.parent / "data.txt"
    _run(
        capsys,
        "train",
        "--init-from", hf_dir,
        "--data", data,
        "--max-steps", "4",
        "--batch-size", "4",
        "--block-size", "32",
        "--eval-interval", "4",
        "--eval-batches", "2",
        "--lr", "0.001",
        "--progress", "false",
        "--tensorboard", "false",
        "--out", run,
    )  # fmt: skip
    tuned = moekit.load(run)
    assert tuned.config.hf_config["model_type"] == "deepseek_v3"
    base = moekit.from_hf(hf_dir)
    assert not torch.equal(tuned.layers[1].mlp.experts.w_in, base.layers[1].mlp.experts.w_in)
    bias = tuned.layers[1].mlp.router.e_score_correction_bias
    assert not torch.equal(bias, base.layers[1].mlp.router.e_score_correction_bias)  # aux-free balancing ran
    out = tmp_path / "tuned-hf"
    _run(capsys, "convert", "--to-hf", run, "--out", out)
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert all(not v for v in info.values()), info
    assert torch.equal(hf.model.layers[1].mlp.gate.e_score_correction_bias, bias)
    ids = torch.tensor([[4, 5, 6, 7, 8, 9]])
    with torch.no_grad():
        assert (hf.eval()(ids).logits - tuned(ids).logits).abs().max() <= 1e-4
    assert (out / "tokenizer.json").read_bytes() == (hf_dir / "tokenizer.json").read_bytes()
