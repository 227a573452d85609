"""``--dtype`` wherever a model is loaded (generate, eval, analyze, serve, quantize) and ``moekit.load(dtype=)``:
a bf16 checkpoint loaded as float32 is the bf16 model cast by hand, in weights and in what every command prints."""

from __future__ import annotations

import json

import pytest
import torch

import moekit
from moekit.checkpoint import model_tensors, write_model_folder
from moekit.cli import main
from moekit.data.tokenizers import ByteTokenizer
from moekit.errors import ConfigError
from moekit.nn.quantized import is_quantized_tensor
from tests.serve.conftest import tiny_model

TEXT = "the quick brown fox jumps over the lazy dog; experts route tokens. " * 12


def _write(model, folder):
    write_model_folder(folder, model_tensors(model), {"model": model.config.to_dict()}, ByteTokenizer())
    return folder


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(a bf16 checkpoint, the same model cast to float32 by hand and saved, a text file)."""
    root = tmp_path_factory.mktemp("dtype")
    bf16 = _write(tiny_model().to(torch.bfloat16), root / "bf16")
    by_hand = moekit.load(bf16).float()
    text = root / "text.txt"
    text.write_text(TEXT)
    return bf16, _write(by_hand, root / "fp32"), text


def _floats(model) -> set[torch.dtype]:
    return {t.dtype for t in model.state_dict().values() if t.is_floating_point()}


def _run(capsys, *argv) -> str:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    assert code == 0, out.err
    return out.out


def test_load_with_dtype_is_the_checkpoint_cast_by_hand(checkpoints):
    bf16, _, _ = checkpoints
    assert _floats(moekit.load(bf16)) == {torch.bfloat16}  # as stored, unless asked
    model = moekit.load(bf16, dtype="float32")
    assert _floats(model) == {torch.float32}
    by_hand = moekit.load(bf16).float()
    mine, theirs = model.state_dict(), by_hand.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    ids = torch.arange(5, 40)[None]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, by_hand(ids).logits)
    assert _floats(moekit.load(bf16, dtype=torch.float16)) == {torch.float16}


def test_generate_eval_and_analyze_with_dtype_equal_the_model_cast_by_hand(checkpoints, tmp_path, capsys):
    bf16, fp32, text = checkpoints
    greedy = ["--prompt", "the quick", "--max-new-tokens", "24", "--temperature", "0"]
    cast = _run(capsys, "generate", "--checkpoint", bf16, "--dtype", "float32", *greedy)
    assert cast == _run(capsys, "generate", "--checkpoint", fp32, *greedy) and cast.startswith("the quick")
    loss = ["--data", text, "--block-size", "32", "--batch-size", "4"]
    assert _run(capsys, "eval", "--checkpoint", bf16, "--dtype", "float32", *loss) == _run(
        capsys, "eval", "--checkpoint", fp32, *loss
    )
    stats = []
    for source in ([bf16, "--dtype", "float32"], [fp32]):
        out = tmp_path / f"analysis{len(stats)}"
        _run(capsys, "analyze", "--checkpoint", *source, "--data", text, "--max-tokens", "256", "--out", out)
        stats.append(json.loads((out / "stats.json").read_text())["layers"])
    assert stats[0] == stats[1]


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "--checkpoint", "{bf16}"],
        ["eval", "--checkpoint", "{bf16}", "--data", "{text}"],
        ["analyze", "--checkpoint", "{bf16}", "--data", "{text}", "--out", "{out}"],
        ["serve", "--checkpoint", "{bf16}", "--port", "1"],
        ["quantize", "--checkpoint", "{bf16}", "--out", "{out}"],
    ],
    ids=lambda argv: argv[0],
)
def test_a_bad_dtype_name_is_a_one_line_error(checkpoints, tmp_path, capsys, argv):
    bf16, _, text = checkpoints
    paths = {"bf16": bf16, "text": text, "out": tmp_path / "out"}
    code = main([a.format(**paths) for a in argv] + ["--dtype", "float7"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "dtype='float7' is not one of" in err and "Traceback" not in err, err
    with pytest.raises(ConfigError, match="dtype='float7'"):
        moekit.load(bf16, dtype="float7")


def test_offload_keeps_the_stored_dtype(checkpoints):
    bf16, _, _ = checkpoints
    with pytest.raises(ConfigError, match="expert offload reads the experts"):
        moekit.load(bf16, expert_memory="64KiB", dtype="float32")
    offloaded = moekit.load(bf16, expert_memory="64KiB", dtype="bfloat16")  # the stored dtype: nothing to cast
    ids = torch.arange(5, 20)[None]
    with torch.no_grad():
        assert torch.equal(offloaded(ids).logits, moekit.load(bf16)(ids).logits)


def test_quantize_with_dtype_casts_the_float_weights_not_the_experts(checkpoints, tmp_path, capsys):
    bf16, _, _ = checkpoints
    _run(capsys, "quantize", "--checkpoint", bf16, "--bits", "8", "--out", tmp_path / "stored")
    _run(capsys, "quantize", "--checkpoint", bf16, "--bits", "8", "--dtype", "float32", "--out", tmp_path / "fp32")
    stored, cast = moekit.load(tmp_path / "stored").state_dict(), moekit.load(tmp_path / "fp32").state_dict()
    assert stored.keys() == cast.keys()
    for name, t in cast.items():
        if is_quantized_tensor(name):  # quantised from the stored bf16 experts either way
            assert torch.equal(t, stored[name]) and t.dtype == stored[name].dtype, name
        elif t.is_floating_point():
            assert t.dtype == torch.float32 and torch.equal(t, stored[name].float()), name
