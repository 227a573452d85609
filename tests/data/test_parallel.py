"""Parallel text files and the joint BPE: alignment, gzip, and errors that name the file and line."""

import gzip

import pytest

from moekit.data.bpe import BOS_ID, EOS_ID, PAD_ID, SubwordTokenizer
from moekit.data.parallel import builtin_parallel, read_lines, read_parallel
from moekit.errors import DataError


def test_plain_and_gzip_files_read_the_same_pairs(tmp_path):
    (tmp_path / "a.en").write_text("A dog runs.\r\nTwo cats sleep.\n", encoding="utf-8")
    (tmp_path / "a.de").write_bytes(gzip.compress("Ein Hund läuft.\nZwei Katzen schlafen.".encode()))
    pairs = read_parallel(tmp_path / "a.en", tmp_path / "a.de")
    assert pairs.sources == ["A dog runs.", "Two cats sleep."]
    assert pairs.targets == ["Ein Hund läuft.", "Zwei Katzen schlafen."]  # no final newline: still 2 lines
    assert pairs.lines == [1, 2] and len(pairs) == 2


def test_mismatched_line_counts_name_both_files_and_counts(tmp_path):
    (tmp_path / "train.en").write_text("one\ntwo\nthree\n")
    (tmp_path / "train.de").write_text("eins\nzwei\n")
    with pytest.raises(DataError, match=r"train\.en has 3 lines but .*train\.de has 2; parallel files must be"):
        read_parallel(tmp_path / "train.en", tmp_path / "train.de")
    # The likely cause, a blank line, is pointed at.
    (tmp_path / "gap.de").write_text("eins\n\nzwei\ndrei\nvier\n")
    with pytest.raises(DataError, match=r"has 3 lines but .*gap\.de has 5.*first empty line is .*gap\.de:2"):
        read_parallel(tmp_path / "train.en", tmp_path / "gap.de")


def test_empty_lines_empty_files_and_missing_files_are_errors(tmp_path):
    (tmp_path / "a.en").write_text("one\ntwo\nthree\n")
    (tmp_path / "a.de").write_text("eins\n   \ndrei\n")
    with pytest.raises(DataError, match=r"a\.de:2: empty line"):
        read_parallel(tmp_path / "a.en", tmp_path / "a.de")
    (tmp_path / "empty.de").write_text("")
    with pytest.raises(DataError, match=r"empty\.de: the file is empty"):
        read_parallel(tmp_path / "a.en", tmp_path / "empty.de")
    with pytest.raises(DataError, match=r"missing\.de: no such file"):
        read_parallel(tmp_path / "a.en", tmp_path / "missing.de")


def test_bad_bytes_and_bad_gzip_name_the_file(tmp_path):
    (tmp_path / "bad.en").write_bytes(b"fine\nbad \xff byte\n")
    with pytest.raises(DataError, match=r"bad\.en:2: not UTF-8 text \(byte 0xff at column 5\)"):
        read_lines(tmp_path / "bad.en")
    (tmp_path / "fake.gz").write_text("plain text\n")
    with pytest.raises(DataError, match=r"fake\.gz: named \.gz but not gzip-compressed"):
        read_lines(tmp_path / "fake.gz")
    (tmp_path / "cut.gz").write_bytes(gzip.compress(b"some text\n" * 100)[:30])
    with pytest.raises(DataError, match=r"cut\.gz: not a valid gzip file"):
        read_lines(tmp_path / "cut.gz")
    (tmp_path / "input.en").write_text("\ufeffFirst.\n\nThird.\n")  # translation input keeps blank lines
    assert read_lines(tmp_path / "input.en", allow_empty_lines=True) == ["First.", "", "Third."]


def test_builtin_pairs_are_aligned_and_distinct():
    pairs = builtin_parallel()
    assert len(pairs) >= 300 and len(set(pairs.sources)) == len(pairs)
    assert all(s.endswith(".") and t.endswith(".") for s, t in zip(pairs.sources, pairs.targets))


def test_joint_bpe_round_trips_text_and_keeps_special_ids(tmp_path):
    pairs = builtin_parallel()
    tok = SubwordTokenizer.train(pairs.sources + pairs.targets, vocab_size=400)
    assert tok.vocab_size <= 400 and (tok.pad_id, tok.bos_id, tok.eos_id) == (PAD_ID, BOS_ID, EOS_ID)
    text = "Zwei müde Männer warten im Schnee. Ω"  # an unseen character still encodes (byte level)
    ids = tok.encode(text)
    assert min(ids) > EOS_ID and tok.decode(ids) == text
    assert tok.decode([BOS_ID, *ids, EOS_ID, *ids]) == text  # stops at EOS, drops BOS
    tok.save(tmp_path)
    again = SubwordTokenizer.load(tmp_path)
    assert again.encode(text) == ids and again.vocab_size == tok.vocab_size
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "tokenizer.json").write_text("{not json")
    with pytest.raises(DataError, match="not a valid tokenizer.json"):
        SubwordTokenizer.load(tmp_path / "broken")
