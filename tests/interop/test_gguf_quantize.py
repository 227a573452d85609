"""GGUF straight into moekit's int8/int4 experts (``moekit convert --from-gguf FILE --bits 8|4``): the same model
as importing the GGUF as floats and then running ``moekit quantize``, made one expert at a time (the float
experts of a stack never exist as a whole)."""

from __future__ import annotations

import json
import weakref

import pytest
import torch

import moekit
from moekit.cli import main
from moekit.interop.gguf import GGUFFile, convert_from_gguf, from_gguf
from moekit.nn.quantized import QuantizedExperts
from tests.interop.gguf_files import tiny_model, train_byte_level_bpe, write_gguf
from tests.interop.hf_models import one_torch_thread  # noqa: F401

IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 64, 128, 1, 33, 200], [8, 8, 9, 290, 11, 12, 13, 14, 15, 16, 17, 18]])


@pytest.fixture(scope="module")
def tokenizer_json():
    return json.loads(train_byte_level_bpe().to_str())


def _cli(capsys, *argv) -> str:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    assert code == 0, out.err
    return out.out


def _same_model(a, b) -> None:
    mine, theirs = a.state_dict(), b.state_dict()
    assert mine.keys() == theirs.keys()
    for name in mine:
        assert mine[name].dtype == theirs[name].dtype and torch.equal(mine[name], theirs[name]), name
    with torch.no_grad():
        torch.testing.assert_close(a(IDS).logits, b(IDS).logits, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("family", "qtype", "bits", "group"),
    [("qwen3_moe", "Q8_0", 8, None), ("mixtral", "Q8_0", 8, None), ("qwen3_moe", "Q4_0", 4, 32)],
)
def test_gguf_to_int_equals_gguf_to_float_then_quantize(family, qtype, bits, group, tokenizer_json, tmp_path, capsys):
    path = tmp_path / "m.gguf"
    write_gguf(tiny_model(family), path, qtype=qtype, tokenizer_json=tokenizer_json)
    extra = ["--group-size", group] if group else []
    out = _cli(capsys, "convert", "--from-gguf", path, "--bits", bits, *extra, "--out", tmp_path / "direct")
    assert f"experts in int{bits}" in out
    _cli(capsys, "convert", "--from-gguf", path, "--out", tmp_path / "float")
    _cli(capsys, "quantize", "--checkpoint", tmp_path / "float", "--bits", bits, *extra, "--out", tmp_path / "ref")
    direct, reference = moekit.load(tmp_path / "direct"), moekit.load(tmp_path / "ref")
    assert all(isinstance(layer.mlp.experts, QuantizedExperts) for layer in direct.layers if layer.is_moe)
    spec = json.loads((tmp_path / "direct" / "config.json").read_text())["quantization"]
    assert spec == json.loads((tmp_path / "ref" / "config.json").read_text())["quantization"]
    _same_model(direct, reference)  # the same int8/int4 bytes and scales, so the same logits
    _same_model(from_gguf(path, bits=bits, group_size=group or 32), reference)  # the Python API, no file
    greedy = ["--prompt", "The quick", "--max-new-tokens", "8", "--temperature", "0"]
    text = _cli(capsys, "generate", "--checkpoint", tmp_path / "direct", *greedy)
    assert text == _cli(capsys, "generate", "--checkpoint", tmp_path / "ref", *greedy)
    assert (tmp_path / "direct" / "tokenizer.json").is_file()


class ReadLog:
    """Spies on :meth:`GGUFFile.tensor` (calling through): which expert tensors were read whole, and the most
    bytes of dequantised expert matrices alive at once (each tracked until it is freed)."""

    def __init__(self, monkeypatch):
        self.whole: list[str] = []
        self.alive = self.peak = 0
        read = GGUFFile.tensor

        def spy(gg, name, dtype=None, index=None):
            t = read(gg, name, dtype, index)
            if "_exps." in name:
                if index is None:
                    self.whole.append(name)
                size = t.numel() * t.element_size()
                self.alive += size
                self.peak = max(self.peak, self.alive)
                weakref.finalize(t, self._freed, size)
            return t

        monkeypatch.setattr(GGUFFile, "tensor", spy)

    def _freed(self, size: int) -> None:
        self.alive -= size


def test_quantising_reads_one_expert_at_a_time(tokenizer_json, tmp_path, monkeypatch):
    hf = tiny_model("qwen3_moe")
    path = tmp_path / "m.gguf"
    write_gguf(hf, path, qtype="Q8_0", tokenizer_json=tokenizer_json)
    cfg = hf.config
    one_expert = 3 * cfg.moe_intermediate_size * cfg.hidden_size * 4  # gate, up and down in float32
    stack = cfg.num_experts * cfg.moe_intermediate_size * cfg.hidden_size * 4  # one of them, all experts

    floats = ReadLog(monkeypatch)  # the float import reads each stack whole (the spy sees them)
    convert_from_gguf(path, tmp_path / "float")
    assert len(floats.whole) == 3 * cfg.num_hidden_layers and floats.peak >= 2 * stack

    streamed = ReadLog(monkeypatch)
    convert_from_gguf(path, tmp_path / "q8", bits=8)
    assert streamed.whole == []  # no stack is dequantised as a whole...
    assert 0 < streamed.peak <= one_expert  # ...only one expert's matrices exist at a time
    assert streamed.alive == 0


def test_bad_bits_and_group_sizes_are_one_line_errors(tokenizer_json, tmp_path, capsys):
    path = tmp_path / "m.gguf"
    write_gguf(tiny_model("qwen3_moe"), path, qtype="Q8_0", tokenizer_json=tokenizer_json)
    cases = [
        (["--from-gguf", path, "--bits", "4", "--group-size", "64"], "does not divide the input width 32"),
        (["--from-gguf", path, "--group-size", "32"], "--group-size needs --bits 4"),
        (["--from-hf", tmp_path, "--bits", "8"], "--bits and --group-size apply to --from-gguf"),
    ]
    for i, (args, message) in enumerate(cases):
        code = main(["convert", *map(str, args), "--out", str(tmp_path / f"out{i}")])
        err = capsys.readouterr().err.strip()
        assert code == 2 and "\n" not in err and message in err and "Traceback" not in err, err
