"""``moekit quantize``: the checkpoint it writes loads as the quantised model, a Hugging Face folder is
quantised while read exactly as after a full load, routing-aware widths follow the load, and bad input."""

from __future__ import annotations

import json

import pytest
import torch

import moekit
from moekit.analysis.load import expert_load
from moekit.checkpoint import load_model
from moekit.cli import main
from moekit.interop.hf.api import from_hf
from moekit.models.quantization import expert_bytes, quantize_model, uniform_spec
from moekit.nn.quantized import QuantizedExperts, QuantLinear
from moekit.recipes.calibration import calibration_batches
from moekit.recipes.quantize import quantize
from tests.analysis.helpers import save_tiny_checkpoint
from tests.interop.hf_models import save_hf_model, write_tokenizer

TEXT = "the quick brown fox jumps over the lazy dog; " * 40


@pytest.mark.parametrize("bits", [8, 4])
def test_the_written_checkpoint_loads_as_the_quantised_model(tmp_path, bits):
    run = save_tiny_checkpoint(tmp_path / "run")
    report = quantize(tmp_path / "q", checkpoint=run, bits=bits, group_size=32)
    expected, _ = load_model(run)
    float_bytes = expert_bytes(expected)
    quantize_model(expected, uniform_spec(expected.config, bits, 32))
    loaded = moekit.load(tmp_path / "q")
    assert all(isinstance(layer.mlp.experts, QuantizedExperts) for layer in loaded.layers if layer.is_moe)
    ids = torch.arange(3, 19)[None]
    with torch.inference_mode():
        assert torch.equal(loaded(ids).logits, expected(ids).logits)
    spec = json.loads((tmp_path / "q" / "config.json").read_text())["quantization"]
    assert spec == report["spec"] and {b for widths in spec["bits"].values() for b in widths} == {bits}
    assert report["expert_bytes"] < float_bytes / (3 if bits == 8 else 5)


def test_a_hugging_face_folder_is_quantised_while_read_as_after_a_full_load(tmp_path):
    src = save_hf_model("qwen3_moe", tmp_path / "hf")
    write_tokenizer(src)
    quantize(tmp_path / "q", hf_dir=src, bits=8)
    full = from_hf(src)
    quantize_model(full, uniform_spec(full.config, 8))
    streamed = moekit.load(tmp_path / "q")
    mine, theirs = streamed.state_dict(), full.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_routing_aware_widths_keep_the_most_routed_experts_at_8_bits(tmp_path):
    run = save_tiny_checkpoint(tmp_path / "run")
    data = tmp_path / "calib.txt"
    data.write_text(TEXT)
    report = quantize(tmp_path / "q", checkpoint=run, calibration_data=data, fraction_8bit=0.5)
    model, tokenizer = load_model(run)
    layers, load = expert_load(model, calibration_batches(tokenizer, data, 64, 8, 8, model.config.vocab_size))
    for row, layer in enumerate(layers):
        widths = report["spec"]["bits"][str(layer)]
        assert widths.count(8) == 2  # half of 4 experts
        eights = [load[row, e] for e in range(4) if widths[e] == 8]
        fours = [load[row, e] for e in range(4) if widths[e] == 4]
        assert min(eights) >= max(fours)


def test_cli_quantize_then_generate(tmp_path, capsys):
    run = save_tiny_checkpoint(tmp_path / "run")
    assert main(["quantize", "--checkpoint", str(run), "--bits", "4", "--out", str(tmp_path / "q")]) == 0
    assert "4 bits" in capsys.readouterr().out
    assert main(["generate", "--checkpoint", str(tmp_path / "q"), "--prompt", "ab", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.startswith("ab")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--bits", "4", "--group-size", "64"], "does not divide the input width 32"),
        (["--calibration-data", "missing.txt"], "missing.txt"),
    ],
)
def test_cli_bad_input_is_a_one_line_error(tmp_path, capsys, extra, message):
    run = save_tiny_checkpoint(tmp_path / "run")
    argv = ["quantize", "--checkpoint", str(run), "--out", str(tmp_path / "q"), *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "q" / "config.json").exists()


def test_an_existing_checkpoint_is_never_overwritten(tmp_path, capsys):
    run = save_tiny_checkpoint(tmp_path / "run")
    assert main(["quantize", "--checkpoint", str(run), "--out", str(tmp_path / "q")]) == 0
    before = (tmp_path / "q" / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert main(["quantize", "--checkpoint", str(run), "--bits", "4", "--out", str(tmp_path / "q")]) == 2
    assert "already holds a checkpoint" in capsys.readouterr().err
    assert (tmp_path / "q" / "model.safetensors").read_bytes() == before


@pytest.mark.parametrize("linear_bits", [8, 4])
def test_linear_bits_quantise_attention_and_head_and_load_back(tmp_path, linear_bits):
    """--linear-bits: the attention projections and the untied head are stored quantised too; the checkpoint
    loads as quantising in memory does, and its logits stay near the float model's."""
    run = save_tiny_checkpoint(tmp_path / "run")
    quantize(tmp_path / "q", checkpoint=run, bits=8, linear_bits=linear_bits)
    float_model, _ = load_model(run)
    expected, _ = load_model(run)
    quantize_model(expected, uniform_spec(expected.config, 8, 32, linear_bits))
    loaded = moekit.load(tmp_path / "q")
    attn = loaded.layers[0].self_attn
    assert all(isinstance(getattr(attn, n), QuantLinear) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
    assert isinstance(loaded.lm_head, QuantLinear) == (not loaded.config.tie_word_embeddings)
    ids = torch.arange(3, 19)[None]
    with torch.inference_mode():
        got, want, ref = loaded(ids).logits, expected(ids).logits, float_model(ids).logits
        one = loaded(ids[:, :1]).logits  # one row: the native int8 GEMV where it is built
    assert torch.equal(got, want)
    torch.testing.assert_close(one[0, 0], want[0, 0], rtol=2e-2, atol=2e-2 * want[0, 0].abs().max().item())
    assert (got - ref).abs().max() < 0.1 * ref.abs().max()


def test_linear_bits_on_a_hugging_face_folder_match_a_full_load(tmp_path):
    src = save_hf_model("qwen3_moe", tmp_path / "hf")
    write_tokenizer(src)
    quantize(tmp_path / "q", hf_dir=src, bits=8, linear_bits=8)
    full = from_hf(src)
    quantize_model(full, uniform_spec(full.config, 8, 32, 8))
    streamed = moekit.load(tmp_path / "q")
    mine, theirs = streamed.state_dict(), full.state_dict()
    assert any(".quantized." in k for k in mine)
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
