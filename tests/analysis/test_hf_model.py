"""analyze works for a model imported from a Hugging Face folder (when moekit.interop.hf is installed)."""

from __future__ import annotations

import json

import pytest

from tests.analysis.conftest import CODE, PROSE
from tests.analysis.helpers import tiny_model

hf = pytest.importorskip("moekit.interop.hf", reason="moekit.interop.hf (Hugging Face import) is not installed")


def _byte_level_tokenizer(folder):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {c: i for i, c in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(folder / "tokenizer.json"))


def test_analyze_an_imported_hf_model(tmp_path):
    from moekit.analysis.pipeline import analyze

    folder = tmp_path / "hf"
    hf.to_hf(tiny_model(), folder)
    _byte_level_tokenizer(folder)
    (tmp_path / "code.py").write_text(CODE)
    (tmp_path / "prose.txt").write_text(PROSE)
    result = analyze(
        model=folder, data=[tmp_path / "code.py", tmp_path / "prose.txt"], out=tmp_path / "out", max_tokens=600,
        view_tokens=32, progress=False,
    )  # fmt: skip
    s = json.loads(result.stats.read_text())
    assert s["model"]["source"] == str(folder) and s["label_names"] == ["code", "prose"]
    assert len(s["layers"]) == 2 and all(sum(layer["load"]) == 2 * s["tokens"] for layer in s["layers"])
    assert "".join(s["token_view"][1]["tokens"]) == PROSE[: len("".join(s["token_view"][1]["tokens"]))]
