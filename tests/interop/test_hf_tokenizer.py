"""moekit's byte and char tokenizers written in Hugging Face form: ``AutoTokenizer`` gives the same ids both ways."""

from __future__ import annotations

import json

import pytest

from moekit.data import builtin_corpus
from moekit.data.tokenizers import ByteTokenizer, CharTokenizer, HFTokenizer, Tokenizer
from moekit.interop.hf.tokenizer_export import byte_stand_ins, save_hf_tokenizer
from tests.interop.hf_models import transformers


@pytest.fixture(scope="module")
def shakespeare():
    """A few lines from each end of the built-in corpus."""
    text = builtin_corpus()
    lines = text.splitlines(keepends=True)
    return text, "".join(lines[:40]) + "".join(lines[-40:])


def _exported(tokenizer: Tokenizer, folder):
    save_hf_tokenizer(tokenizer, folder, max_length=128)
    return transformers.AutoTokenizer.from_pretrained(folder)


def _same_ids_both_ways(mine: Tokenizer, theirs, text: str) -> None:
    ids = mine.encode(text)
    assert theirs(text)["input_ids"] == ids  # no BOS/EOS added, same ids
    assert theirs.decode(ids) == mine.decode(ids) == text
    assert HFTokenizer(theirs.name_or_path).encode(text) == ids  # moekit's own reader of HF files agrees


def test_byte_tokenizer_in_hf_form(tmp_path, shakespeare):
    mine = ByteTokenizer()
    theirs = _exported(mine, tmp_path)
    assert len(theirs) == 256 and theirs.all_special_ids == []
    _, lines = shakespeare
    for text in (lines, "naïve café — ✓ 日本語 🙂\r\n\ttabs  and  spaces ", "", " ", "\x00\x7f"):
        _same_ids_both_ways(mine, theirs, text)
    broken = [0xE6, 0x97, 0x41, 0xFF, 0xC3]  # invalid UTF-8 decodes to U+FFFD the same way
    assert theirs.decode(broken) == mine.decode(broken)


def test_byte_stand_ins_are_256_distinct_printable_characters():
    chars = byte_stand_ins()
    assert len(set(chars)) == 256 and all(c.isprintable() and not c.isspace() for c in chars)
    assert chars[ord("A")] == "A" and chars[ord(" ")] == "Ġ"  # GPT-2's stand-in for a space


def test_char_tokenizer_in_hf_form(tmp_path, shakespeare):
    text, lines = shakespeare
    mine = CharTokenizer.from_text(text)
    theirs = _exported(mine, tmp_path)
    assert theirs.get_vocab() == {c: i for i, c in enumerate(mine.chars)}
    _same_ids_both_ways(mine, theirs, lines)
    odd = CharTokenizer("ab \n\t🙂é")  # whitespace and characters beyond the BMP are single tokens too
    theirs_odd = _exported(odd, tmp_path / "odd")
    _same_ids_both_ways(odd, theirs_odd, "a b\n\t🙂é ba")
    with pytest.raises(Exception, match="(?i)unk|missing"):  # neither has an unknown token
        theirs_odd("xyz")


def test_tokenizer_config_names_no_special_tokens(tmp_path):
    save_hf_tokenizer(ByteTokenizer(), tmp_path, max_length=96)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["model_max_length"] == 96 and config["eos_token"] is None
    assert HFTokenizer(tmp_path).eos_token_id is None
