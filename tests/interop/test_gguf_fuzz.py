"""Fuzzing the GGUF import: truncations and byte mutations of a real small GGUF file (its header, metadata, tensor
table and data). Every input either imports or raises a moekit error; nothing else escapes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from moekit.interop.gguf import GGUFFile, load_gguf
from tests.fuzzing import fuzz, loaded_or_refused
from tests.interop.gguf_files import tiny_config, train_byte_level_bpe, transformers, write_gguf


@pytest.fixture(scope="module")
def original(tmp_path_factory) -> tuple[Path, bytes, int]:
    """A small Qwen3-MoE GGUF with a tokenizer: its folder, bytes, and where its tensor data starts."""
    folder = tmp_path_factory.mktemp("gguf_fuzz")
    cfg = tiny_config("qwen3_moe")
    cfg.num_hidden_layers = 1
    model = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
    tok = json.loads(train_byte_level_bpe().to_str())
    path = folder / "original.gguf"
    write_gguf(model, path, qtype="Q8_0", tokenizer_json=tok)
    data_start = min(t.data_offset for t in GGUFFile(path)._reader.tensors)
    return folder, path.read_bytes(), data_start


def _import(folder: Path, blob: bytes) -> None:
    path = folder / "mutant.gguf"
    path.write_bytes(blob)
    loaded_or_refused(lambda: load_gguf(path))


@fuzz(40)
@given(cut=st.floats(0.0, 1.0, exclude_max=True))
def test_truncated_files_import_or_are_refused(original, cut):
    folder, blob, _ = original
    _import(folder, blob[: int(cut * len(blob))])


@fuzz(60)
@given(data=st.data())
def test_mutated_headers_import_or_are_refused(original, data):
    folder, blob, data_start = original
    mutant = bytearray(blob)
    for _ in range(data.draw(st.integers(1, 4))):
        # the header and model metadata (first), the tensor table (last), or anywhere (the vocabulary, mostly)
        region = data.draw(st.sampled_from([(0, 600), (max(0, data_start - 3000), data_start), (0, data_start)]))
        at = data.draw(st.integers(region[0], min(region[1], data_start) - 1))
        mutant[at] = data.draw(st.integers(0, 255))
    _import(folder, bytes(mutant))
