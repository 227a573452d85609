"""Tokenizers: round trips, save/load through tokenizer.json, HF files built on the spot, helpful errors."""

from __future__ import annotations

import json

import pytest

from moekit.data.tokenizers import (
    ByteTokenizer,
    CharTokenizer,
    HFTokenizer,
    build_tokenizer,
    load_tokenizer,
    tokenizer_from_dict,
)
from moekit.errors import ConfigError, DataError

TEXT = "Hello, wörld! 你好 🙂\nsecond line"


def test_byte_round_trip_and_invalid_utf8():
    tok = ByteTokenizer()
    ids = tok.encode(TEXT)
    assert tok.vocab_size == 256 and tok.eos_token_id is None
    assert len(ids) == len(TEXT.encode("utf-8")) and max(ids) < 256
    assert tok.decode(ids) == TEXT
    assert tok.decode([0xF0, 0x9F]) == "\ufffd"  # half an emoji: replaced, not a crash
    with pytest.raises(DataError, match="id 300 at position 1"):
        tok.decode([65, 300])


def test_char_vocab_sorted_and_round_trip():
    tok = CharTokenizer.from_text("hello world")
    assert tok.chars == sorted(set("hello world"))
    assert tok.vocab_size == 8
    assert tok.encode("hello") == [tok.chars.index(c) for c in "hello"]
    assert tok.decode(tok.encode("world hello")) == "world hello"


def test_char_unknown_character_names_it_and_position():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(DataError, match=r"'z' \(U\+007A\) at position 3"):
        tok.encode("abcz")
    with pytest.raises(DataError, match="empty"):
        CharTokenizer.from_text("")


@pytest.mark.parametrize("tok", [ByteTokenizer(), CharTokenizer.from_text(TEXT)], ids=["byte", "char"])
def test_save_load_round_trip(tmp_path, tok):
    path = tok.save(tmp_path)
    assert path.name == "tokenizer.json"
    assert json.loads(path.read_text())["type"] == tok.kind
    again = load_tokenizer(tmp_path)
    assert type(again) is type(tok) and again.vocab_size == tok.vocab_size
    assert again.encode(TEXT) == tok.encode(TEXT)
    assert tokenizer_from_dict(tok.to_dict()).encode(TEXT) == tok.encode(TEXT)


def _hf_wordlevel(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "</s>": 1, "hello": 2, "world": 3, "moe": 4, "!": 5}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["</s>"])
    folder = tmp_path / "hf"
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    return folder


def test_hf_wordlevel_load_encode_decode_save(tmp_path):
    folder = _hf_wordlevel(tmp_path)
    tok = HFTokenizer(folder)
    assert tok.vocab_size == 6
    assert tok.eos_token_id == 1  # found among common EOS names
    assert tok.encode("hello moe world") == [2, 4, 3]
    assert tok.encode("hello unknown") == [2, 0]
    assert tok.decode([2, 4]) == "hello moe"
    out = tmp_path / "ckpt"
    tok.save(out)
    again = load_tokenizer(out)  # detected as HF by content
    assert isinstance(again, HFTokenizer) and again.encode("world hello") == [3, 2]
    assert tok.to_dict()["type"] == "hf" and len(tok.to_dict()["sha256"]) == 64
    assert isinstance(build_tokenizer(str(folder)), HFTokenizer)


def test_hf_bpe_trained_in_test_with_config_eos(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<end>"], show_progress=False)
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20, trainer)
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<end>"}}))
    hf = load_tokenizer(tmp_path / "tokenizer.json")
    assert hf.eos_token_id == tok.token_to_id("<end>")
    ids = hf.encode("the lazy fox")
    assert ids and hf.decode(ids) == "the lazy fox"
    hf.save(tmp_path / "copy")
    assert load_tokenizer(tmp_path / "copy").eos_token_id == hf.eos_token_id  # config copied along


def test_hf_bad_file(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "Nonsense"}}')
    with pytest.raises(DataError, match="not a valid Hugging Face tokenizer.json"):
        load_tokenizer(tmp_path)


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(DataError, match="no tokenizer file"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("not json")
    with pytest.raises(DataError, match="not valid JSON"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"type": "sentencepiece"}')
    with pytest.raises(DataError, match="neither a moekit tokenizer"):
        load_tokenizer(tmp_path)


def test_build_tokenizer():
    assert isinstance(build_tokenizer("byte"), ByteTokenizer)
    assert build_tokenizer("char", text="abca").vocab_size == 3
    with pytest.raises(ConfigError, match="pass text="):
        build_tokenizer("char")
    with pytest.raises(ConfigError, match="did you mean 'byte'"):
        build_tokenizer("bytes")
