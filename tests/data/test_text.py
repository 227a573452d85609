"""load_text / load_labeled_files on real files: text, folders, JSONL, and the errors users will hit."""

from __future__ import annotations

import json

import pytest

from moekit.data.corpus import builtin_corpus
from moekit.data.text import load_labeled_files, load_text
from moekit.errors import DataError


def test_text_file_and_bom(tmp_path):
    (tmp_path / "a.txt").write_text("héllo\nworld\n", encoding="utf-8")
    assert load_text(tmp_path / "a.txt") == "héllo\nworld\n"
    (tmp_path / "b.txt").write_bytes(b"\xef\xbb\xbfwith bom")
    assert load_text(tmp_path / "b.txt") == "with bom"


def test_folder_sorted_recursive_skips_binary_and_hidden(tmp_path, caplog):
    (tmp_path / "b.md").write_text("B")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "z.py").write_text("A/Z")
    (tmp_path / "c.jsonl").write_text('{"text": "C1"}\n\n{"text": "C2"}\n')
    (tmp_path / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD").write_text("ref: refs/heads/main")
    assert load_text(tmp_path, separator="|") == "A/Z|B|C1|C2"
    assert "image.png" in caplog.text


def test_folder_with_latin1_file_is_an_error(tmp_path):
    (tmp_path / "ok.txt").write_text("fine")
    (tmp_path / "old.txt").write_bytes("caf\u00e9".encode("latin-1"))
    with pytest.raises(DataError, match=r"old.txt is not valid UTF-8: byte 0xe9 at byte offset 3"):
        load_text(tmp_path)


def test_jsonl_field_and_errors(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps({"question": f"q{i}", "answer": f"a{i}"}) for i in range(3)))
    assert load_text(p, text_field="question", separator="\n") == "q0\nq1\nq2"
    with pytest.raises(DataError, match=r"d.jsonl, line 1: no field 'text' \(fields: answer, question\)"):
        load_text(p)
    p.write_text('{"text": "ok"}\n{"text": 3}\n')
    with pytest.raises(DataError, match="line 2: field 'text' is int"):
        load_text(p)
    p.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(DataError, match="line 2: not valid JSON"):
        load_text(p)


def test_missing_empty_binary(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_text(tmp_path / "nope.txt")
    (tmp_path / "e.txt").write_text("")
    with pytest.raises(DataError, match="e.txt is empty") as e:
        load_text(tmp_path / "e.txt")
    assert type(e.value) is DataError
    (tmp_path / "w.txt").write_text(" \n\t")
    with pytest.raises(DataError, match="only whitespace"):
        load_text(tmp_path / "w.txt")
    (tmp_path / "bin.dat").write_bytes(b"abc\x00def")
    with pytest.raises(DataError, match="bin.dat looks binary: NUL byte at byte offset 3"):
        load_text(tmp_path / "bin.dat")
    empty = tmp_path / "emptydir"
    empty.mkdir()
    with pytest.raises(DataError, match="holds no text files"):
        load_text(empty)


def test_labeled_files(tmp_path):
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "x.py").write_text("def f(): pass")
    (tmp_path / "prose.txt").write_text("Once upon a time")
    assert load_labeled_files([tmp_path / "code", tmp_path / "prose.txt"]) == [
        ("code", "def f(): pass"),
        ("prose", "Once upon a time"),
    ]
    (tmp_path / "code" / "prose.md").write_text("dup")
    with pytest.raises(DataError, match="label 'prose' is used by both"):
        load_labeled_files([tmp_path / "prose.txt", tmp_path / "code" / "prose.md"])
    assert load_labeled_files({"a": tmp_path / "prose.txt"}) == [("a", "Once upon a time")]


def test_builtin_corpus():
    text = builtin_corpus()
    assert len(text) == 1_115_394
    assert text.startswith("First Citizen:\nBefore we proceed any further, hear me speak.")
    assert len(set(text)) == 65
    with pytest.raises(DataError, match="unknown built-in corpus"):
        builtin_corpus("wikitext")
