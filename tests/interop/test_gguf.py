"""GGUF import against transformers: tiny random models written as llama.cpp lays them out (tests/interop/
gguf_files.py), imported by moekit, logits compared with transformers' on the same weights; tensor types; the
tokenizer; the command line; and the one-line errors for bad files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

import moekit
from moekit.cli import main
from moekit.errors import CheckpointError, ConfigError, DataError
from moekit.interop.gguf import GGUFFile, from_gguf, is_gguf_file, load_gguf
from moekit.interop.gguf.arch import unpermute_rope
from moekit.interop.gguf.vocab import tokenizer_json_from_gguf
from tests.interop.gguf_files import (
    TEXT,
    gguf,
    rope_permute,
    round_weights,
    tiny_model,
    train_byte_level_bpe,
    write_gguf,
)
from tests.interop.hf_models import one_torch_thread  # noqa: F401

IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 64, 128, 1, 33, 200], [8, 8, 9, 290, 11, 12, 13, 14, 15, 16, 17, 18]])
SAMPLES = ["Hello world", "  two  spaces\nand lines\n\n", "émigré café 東京 12345 3.14", "don't we'll THE Fox!!"]


def _logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "qwen2_moe", "olmoe"])
def test_fp32_gguf_matches_transformers(family, tmp_path):
    hf = tiny_model(family)
    path = tmp_path / "m.gguf"
    write_gguf(hf, path)
    model = from_gguf(path)
    assert model.config.hf_config["model_type"] == family
    assert next(model.parameters()).dtype == torch.float32
    torch.testing.assert_close(_logits(model), _logits(hf), rtol=0, atol=1e-5)


def test_rope_unpermute_inverts_the_converters_permutation():
    w = torch.randn(4 * 16, 8)
    assert torch.equal(unpermute_rope(rope_permute(w, 4), 4), w)
    assert not torch.equal(rope_permute(w, 4), w)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_quantised_tensors_are_dequantised_exactly(family, qtype, tmp_path):
    hf = tiny_model(family)
    round_weights(hf, qtype)  # transformers then holds exactly what the file stores
    path = tmp_path / "q.gguf"
    expect = write_gguf(hf, path, qtype=qtype)
    gg = GGUFFile(path)
    quantised = [n for n in gg.tensor_names() if gg.type_name(n) == qtype]
    assert "blk.0.ffn_gate_exps.weight" in quantised and "token_embd.weight" in quantised
    for name in gg.tensor_names():
        assert np.array_equal(gg.tensor(name).float().numpy(), expect[name]), name
    model = from_gguf(path)
    assert next(model.parameters()).dtype == torch.float32  # quantised types dequantise to fp32 by default
    torch.testing.assert_close(_logits(model), _logits(hf), rtol=0, atol=1e-5)
    bf16 = from_gguf(path, dtype="bfloat16")  # dequantised, then rounded once to bf16
    want = torch.from_numpy(expect["token_embd.weight"]).bfloat16()
    assert bf16.embed_tokens.weight.dtype == torch.bfloat16 and torch.equal(bf16.embed_tokens.weight, want)


def test_q4_k_tensor_reads_as_gguf_dequantises_it(tmp_path):
    qt = gguf.GGMLQuantizationType.Q4_K
    _, block_bytes = gguf.GGML_QUANT_SIZES[qt]
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, size=(3, 2 * block_bytes), dtype=np.uint8)  # 3 rows of 512 values
    raw.view(np.float16)[:, 0] = np.float16(0.01)  # every block's d and dmin: finite scales
    raw.view(np.float16)[:, 1] = np.float16(0.002)
    raw.view(np.float16)[:, block_bytes // 2] = np.float16(0.01)
    raw.view(np.float16)[:, block_bytes // 2 + 1] = np.float16(0.002)
    path = tmp_path / "k.gguf"
    w = gguf.GGUFWriter(str(path), "qwen3moe")
    w.add_tensor("blk.0.ffn_up_exps.weight", raw, raw_dtype=qt)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    gg = GGUFFile(path)
    assert gg.type_name("blk.0.ffn_up_exps.weight") == "Q4_K" and gg.shape("blk.0.ffn_up_exps.weight") == (3, 512)
    got = gg.tensor("blk.0.ffn_up_exps.weight")
    assert got.dtype == torch.float32
    assert np.array_equal(got.numpy(), gguf.quants.dequantize(raw, qt))
    assert gg.tensor("blk.0.ffn_up_exps.weight", torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("stored", ["BF16", "F16"])
def test_float_types_keep_their_dtype_and_map_the_file(stored, tmp_path):
    hf = tiny_model("qwen3_moe")
    path = tmp_path / "f.gguf"
    write_gguf(hf, path, stored=stored)
    dtype = {"BF16": torch.bfloat16, "F16": torch.float16}[stored]
    gg = GGUFFile(path)
    emb = gg.tensor("token_embd.weight")
    assert emb.dtype == dtype
    mapped = np.asarray(gg._reader.data)  # the file's mapping: a float tensor is a view into it, not a copy
    start = mapped.ctypes.data
    assert start <= emb.data_ptr() < start + mapped.nbytes
    model = from_gguf(path)
    assert model.embed_tokens.weight.dtype == dtype
    assert torch.equal(model.embed_tokens.weight, hf.model.embed_tokens.weight.to(dtype))
    fp32 = from_gguf(path, dtype="float32")
    exact = tiny_model("qwen3_moe")
    with torch.no_grad():
        for t in exact.state_dict().values():
            if t.ndim >= 2:
                t.copy_(t.to(dtype).float())
    torch.testing.assert_close(_logits(fp32), _logits(exact), rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------------ tokenizers


@pytest.fixture(scope="module")
def bpe():
    return train_byte_level_bpe()


def test_byte_level_vocab_gives_the_trained_tokenizers_ids(bpe, tmp_path):
    hf = tiny_model("qwen3_moe")
    path = tmp_path / "t.gguf"
    write_gguf(hf, path, tokenizer_json=json.loads(bpe.to_str()))
    model, tok = load_gguf(path)
    for text in [*SAMPLES, TEXT[:300]]:
        assert tok.encode(text) == bpe.encode(text).ids, text
        assert tok.decode(tok.encode(text)) == text
    assert tok.eos_token_id == 2
    assert max(bpe.encode(TEXT).ids) < model.config.vocab_size


def _spm_reference(text: str, pieces: dict[str, int], scores: list[float]) -> list[int]:
    """llama.cpp's SentencePiece tokenizer, spelled out: escape spaces, prepend one, then repeatedly merge the
    adjacent pair whose concatenation is a piece with the highest score (leftmost on ties); unknown -> bytes."""
    symbols = list("\u2581" + text.replace(" ", "\u2581"))
    while True:
        best = None
        for i in range(len(symbols) - 1):
            joined = symbols[i] + symbols[i + 1]
            if joined in pieces and (best is None or scores[pieces[joined]] > scores[pieces[best[1]]]):
                best = (i, joined)
        if best is None:
            break
        i, joined = best
        symbols[i : i + 2] = [joined]
    out = []
    for s in symbols:
        out.extend([pieces[s]] if s in pieces else [pieces[f"<0x{b:02X}>"] for b in s.encode()])
    return out


def test_sentencepiece_vocab_merges_by_score(tmp_path):
    chars = sorted(set("\u2581" + "abcdehlorw"))
    merged = ["\u2581h", "el", "lo", "\u2581w", "or", "ld", "ell", "hello", "\u2581hello", "\u2581wor", "\u2581world"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + chars + merged
    types = [2, 3, 3] + [6] * 256 + [1] * (len(chars) + len(merged))
    scores = [0.0] * (3 + 256) + [-100.0 - i for i in range(len(chars))]
    scores += [-1.0, -2.0, -3.0, -4.0, -5.0, -6.0, -7.0, -8.0, -9.0, -10.0, -11.0]
    w = gguf.GGUFWriter(str(tmp_path / "spm_vocab.gguf"), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_eos_token_id(2)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    tok = Tokenizer.from_str(json.dumps(tokenizer_json_from_gguf(GGUFFile(tmp_path / "spm_vocab.gguf"))))
    pieces = {t: i for i, t in enumerate(tokens)}
    for text in ["hello world", "hello", "world hello", "held cold", "hello wor ld", "zebra é", "ll ow"]:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert ids == _spm_reference(text, pieces, scores), text
        assert tok.decode(ids, skip_special_tokens=False) == text


# ------------------------------------------------------------------------------------------ command line


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    assert code == 0, out.err
    return out.out


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory, bpe):
    path = tmp_path_factory.mktemp("gguf_cli") / "model.gguf"
    write_gguf(tiny_model("qwen3_moe"), path, qtype="Q8_0", tokenizer_json=json.loads(bpe.to_str()))
    return path


def test_convert_from_gguf_then_generate_as_with_model(gguf_file, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    assert "moekit checkpoint" in _run(capsys, "convert", "--from-gguf", gguf_file, "--out", ckpt)
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in ckpt.iterdir()
    }
    torch.testing.assert_close(_logits(moekit.load(ckpt)), _logits(from_gguf(gguf_file)), rtol=0, atol=0)
    args = ["--prompt", "The quick", "--max-new-tokens", "8", "--temperature", "0"]
    from_ckpt = _run(capsys, "generate", "--checkpoint", ckpt, *args)
    from_file = _run(capsys, "generate", "--model", gguf_file, *args)
    assert from_file == from_ckpt and from_file.startswith("The quick")
    _run(capsys, "convert", "--from-gguf", gguf_file, "--out", tmp_path / "bf16", "--dtype", "bfloat16")
    assert moekit.load(tmp_path / "bf16").embed_tokens.weight.dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------------- errors


def _error(capsys, path, tmp_path) -> str:
    code = main(["convert", "--from-gguf", str(path), "--out", str(tmp_path / "never")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and str(path) in err and "Traceback" not in err, err
    return err


def test_bad_files_give_one_line_errors(gguf_file, tmp_path, capsys):
    blob = gguf_file.read_bytes()
    wrong = tmp_path / "wrong.gguf"
    wrong.write_bytes(b"GGML" + blob[4:])
    assert "is not a GGUF file" in _error(capsys, wrong, tmp_path)
    data_end = max(t.data_offset + t.n_bytes for t in GGUFFile(gguf_file)._reader.tensors)
    for cut in (10, 200, len(blob) // 2, data_end - 1):  # (past data_end lies only alignment padding)
        short = tmp_path / f"short{cut}.gguf"
        short.write_bytes(blob[:cut])
        assert "truncated" in _error(capsys, short, tmp_path)
    with pytest.raises(CheckpointError, match="no such GGUF file"):
        from_gguf(tmp_path / "absent.gguf")
    assert is_gguf_file(gguf_file) and not is_gguf_file(tmp_path)


def _small_file(path, arch="qwen3moe", tensors=None, **meta):
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in meta.items():
        w.add_string(key, value)
    for name, (data, qt) in (tensors or {}).items():
        w.add_tensor(name, data, raw_dtype=qt)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    return path


def test_unknown_architecture_and_tensor_types_are_refused(gguf_file, tmp_path, capsys):
    arch = _small_file(tmp_path / "arch.gguf", arch="mamba")
    assert "architecture 'mamba' is not supported" in _error(capsys, arch, tmp_path)
    with pytest.raises(ConfigError, match="mamba"):
        from_gguf(arch)
    ints = np.arange(64, dtype=np.int32).reshape(4, 16)
    odd = _small_file(tmp_path / "int.gguf", tensors={"blk.0.attn_q.weight": (ints, gguf.GGMLQuantizationType.I32)})
    with pytest.raises(CheckpointError, match="'blk.0.attn_q.weight' has GGML type I32"):
        GGUFFile(odd).tensor("blk.0.attn_q.weight")
    extra = tmp_path / "extra.gguf"
    hf = tiny_model("qwen3_moe")
    write_gguf(hf, extra)
    gg = GGUFFile(extra)
    w = gguf.GGUFWriter(str(tmp_path / "extra2.gguf"), "qwen3moe")
    for key, field in gg._reader.fields.items():
        if key.startswith("qwen3moe."):
            w.add_key_value(key, field.contents(), field.types[0], field.types[-1] if len(field.types) > 1 else None)
    for name in gg.tensor_names():
        w.add_tensor(name, gg.tensor(name).numpy())
    w.add_tensor("blk.0.ssm_conv1d.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    assert "'blk.0.ssm_conv1d.weight' has no place" in _error(capsys, tmp_path / "extra2.gguf", tmp_path)


def test_tokenizer_problems_are_data_errors(tmp_path):
    none = _small_file(tmp_path / "none.gguf")
    with pytest.raises(DataError, match="has no tokenizer"):
        tokenizer_json_from_gguf(GGUFFile(none))
    w = gguf.GGUFWriter(str(tmp_path / "pre.gguf"), "qwen3moe")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("deepseek-llm")
    w.add_token_list(["a", "b"])
    w.add_token_merges([])
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(DataError, match="tokenizer.ggml.pre='deepseek-llm' is not supported"):
        tokenizer_json_from_gguf(GGUFFile(tmp_path / "pre.gguf"))


def test_metadata_of_the_wrong_type_is_refused(tmp_path):
    path = tmp_path / "typed.gguf"
    w = gguf.GGUFWriter(str(path), "qwen3moe")
    w.add_string("qwen3moe.block_count", "two")
    w.add_uint32("qwen3moe.attention.head_count", 4)
    w.add_uint32("qwen3moe.embedding_length", 64)
    w.add_tensor("token_embd.weight", np.zeros((8, 64), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(CheckpointError, match="malformed GGUF metadata"):
        from_gguf(path)


def test_a_moe_file_without_expert_tensors_is_refused(tmp_path):
    path = tmp_path / "noexperts.gguf"
    w = gguf.GGUFWriter(str(path), "qwen3moe")
    for key, value in {"block_count": 1, "attention.head_count": 4, "embedding_length": 64}.items():
        w.add_uint32(f"qwen3moe.{key}", value)
    w.add_uint32("qwen3moe.expert_count", 4)
    w.add_uint32("qwen3moe.expert_used_count", 2)
    w.add_tensor("token_embd.weight", np.zeros((8, 64), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(CheckpointError, match="has no tensor 'blk.0.ffn_down_exps.weight'"):
        from_gguf(path)
