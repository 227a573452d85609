"""Expert offload of GGUF files: float experts (F32, F16, BF16) are read from the file's stacked ``ffn_*_exps``
one expert at a time, with the resident model's tokens and decode bits; quantised experts are a one-line error
that says how to convert them."""

from __future__ import annotations

import json

import pytest
import torch

from moekit.cli import main
from moekit.errors import CheckpointError, ConfigError
from moekit.interop.gguf import from_gguf, load_gguf
from moekit.nn.offload import OffloadedExperts
from tests.nn.test_offload import decode_logits, greedy

gguf_files = pytest.importorskip("tests.interop.gguf_files")

PROMPT = [5, 17, 99, 3, 100, 42, 8, 61, 7, 7, 110]


@pytest.mark.parametrize(
    ("family", "stored"),
    [("qwen3_moe", "F32"), ("qwen3_moe", "BF16"), ("mixtral", "F16"), ("mixtral", "BF16"), ("qwen2_moe", "F32")],
)
def test_float_gguf_experts_offload_with_the_resident_bits(tmp_path, family, stored):
    path = tmp_path / "tiny.gguf"
    gguf_files.write_gguf(gguf_files.tiny_model(family), path, stored=stored)
    resident = from_gguf(path)
    offloaded, _ = load_gguf_without_tokenizer(path, "1GiB")
    one = offloaded.expert_cache.expert_bytes((0, 0))
    offloaded, _ = load_gguf_without_tokenizer(path, 3 * one // 2)  # below one layer's 4 experts
    experts = [m for m in offloaded.modules() if isinstance(m, OffloadedExperts)]
    assert len(experts) == 2 and not any(e.fused_kernel for e in experts)
    assert not [n for n in offloaded.state_dict() if ".experts.w_" in n]  # nothing stacked
    spans = experts[0].spans[1]  # expert 1: its gate and up rows of two stacks, its down rows of a third
    assert len(spans[0].pieces) == 2 and len(spans[1].pieces) == 1
    assert {piece[0] for span in spans for piece in span.pieces} == {str(path)}
    w_in, w_out = offloaded.expert_cache.get((0, 1))
    want = resident.layers[0].mlp.experts
    assert torch.equal(w_in, want.w_in[1]) and torch.equal(w_out, want.w_out[1])
    for prompt in (PROMPT, [1]):
        assert greedy(offloaded, prompt) == greedy(resident, prompt)
    assert torch.equal(decode_logits(offloaded, PROMPT), decode_logits(resident, PROMPT))
    assert offloaded.expert_cache.held_bytes() <= 3 * one // 2


def load_gguf_without_tokenizer(path, expert_memory):
    """The model :func:`load_gguf` builds (the tiny files here have no vocabulary)."""
    from moekit.interop.gguf.api import _model
    from moekit.interop.gguf.reader import GGUFFile

    return _model(GGUFFile(path), "cpu", None, expert_memory=expert_memory)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])  # (the gguf package cannot write Q4_K)
def test_quantised_gguf_experts_are_a_one_line_error_naming_the_conversion(tmp_path, capsys, qtype):
    path = tmp_path / "tiny.gguf"
    tokenizer_json = json.loads(gguf_files.train_byte_level_bpe().to_str())
    gguf_files.write_gguf(gguf_files.tiny_model("qwen3_moe"), path, qtype=qtype, tokenizer_json=tokenizer_json)
    with pytest.raises(ConfigError, match=f"is {qtype}"):
        load_gguf(path, expert_memory="1MiB")
    assert main(["generate", "--model", str(path), "--expert-memory", "1MiB", "--prompt", "a"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"moekit convert --from-gguf {path} --bits 8|4" in err


def test_a_cast_is_refused_and_the_cli_generates_the_resident_text(tmp_path, capsys):
    path = tmp_path / "tiny.gguf"
    tokenizer_json = json.loads(gguf_files.train_byte_level_bpe().to_str())
    gguf_files.write_gguf(gguf_files.tiny_model("qwen3_moe"), path, stored="BF16", tokenizer_json=tokenizer_json)
    with pytest.raises(CheckpointError, match="own dtype"):
        load_gguf(path, dtype="float32", expert_memory="1MiB")
    argv = ["generate", "--model", str(path), "--prompt", "The quick", "--temperature", "0", "--max-new-tokens", "12"]
    assert main(argv) == 0
    resident = capsys.readouterr()
    assert main([*argv, "--expert-memory", "64KiB"]) == 0
    offloaded = capsys.readouterr()
    assert offloaded.out == resident.out and "expert cache: hit rate" in offloaded.err
