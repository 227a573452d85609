"""Labelled text: TSV, CSV and JSONL files with a text and a label column, and a word vocabulary.

Every error names the file and the line (1-based, counting the header) of the bad row.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from moekit.errors import DataError

TEXT_COLUMNS = ("text", "sentence", "review", "content", "document")
LABEL_COLUMNS = ("label", "labels", "class", "category", "target")
BUILTIN_SENTIMENT = Path(__file__).parent / "builtin" / "sentiment.tsv"


@dataclasses.dataclass
class LabelledText:
    """Rows of one file: ``texts[i]`` with label ``labels[i]`` (a string; None without a label column)
    read from line ``lines[i]`` of ``path``."""

    path: str
    texts: list[str]
    labels: list[str | None]
    lines: list[int]

    def __len__(self) -> int:
        return len(self.texts)


def _pick(columns: Sequence[str], wanted: str | None, defaults: Sequence[str], path, what: str) -> str | None:
    if wanted is not None:
        if wanted not in columns:
            raise DataError(f"{path}:1: no {what} column {wanted!r}; the columns are {list(columns)}")
        return wanted
    lowered = {c.lower(): c for c in columns}
    return next((lowered[d] for d in defaults if d in lowered), None)


def read_labelled(
    path: str | os.PathLike,
    text_column: str | None = None,
    label_column: str | None = None,
    require_labels: bool = True,
) -> LabelledText:
    """Read a ``.tsv``, ``.csv`` or ``.jsonl`` file of labelled text (TSV/CSV need a header row).

    Columns default to the first of ``text``/``sentence``/... and ``label``/``class``/...; a file
    with two columns and no such names takes the first as text and the second as label.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: no such file")
    if p.suffix in (".jsonl", ".json"):
        rows = _jsonl_rows(p)
    elif p.suffix in (".tsv", ".csv", ".txt"):
        rows = _delimited_rows(p, "," if p.suffix == ".csv" else "\t")
    else:
        raise DataError(f"{p}: unknown labelled-text format {p.suffix!r}; use .tsv, .csv or .jsonl")
    try:
        line, first = next(rows)
    except StopIteration:
        raise DataError(f"{p}: the file is empty") from None
    columns = list(first)
    text_col = _pick(columns, text_column, TEXT_COLUMNS, p, "text")
    label_col = _pick(columns, label_column, LABEL_COLUMNS, p, "label")
    if text_col is None and len(columns) == 2 and label_col is None:
        text_col, label_col = columns
    if text_col is None:
        raise DataError(f"{p}:{line}: no text column among {columns}; name one with --text-column")
    if label_col is None and require_labels:
        raise DataError(f"{p}:{line}: no label column among {columns}; name one with --label-column")
    out = LabelledText(str(p), [], [], [])
    is_json = p.suffix in (".jsonl", ".json")
    for row_line, row in _chain_first(is_json, line, first, rows):
        line = row_line
        text = row.get(text_col)
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{p}:{line}: empty or missing text in column {text_col!r}")
        label = row.get(label_col) if label_col is not None else None
        if label_col is not None and (label is None or str(label).strip() == ""):
            if require_labels:
                raise DataError(f"{p}:{line}: missing label in column {label_col!r}")
            label = None
        out.texts.append(text.strip())
        out.labels.append(None if label is None else str(label).strip())
        out.lines.append(line)
    if not out.texts:
        raise DataError(f"{p}: no rows after the header")
    return out


def _chain_first(is_json: bool, line: int, first: dict, rows):
    """JSONL's first record is data (its keys are the columns); a delimited file's first row is the header."""
    if is_json:
        yield line, first
    yield from rows


def _utf8_text(p: Path) -> str:
    """The file's text; invalid UTF-8 is a DataError naming the first bad byte."""
    data = p.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{p}: not valid UTF-8: byte 0x{data[e.start]:02x} at byte offset {e.start} ({e.reason}); "
            "convert it to UTF-8 (e.g. iconv -f latin1 -t utf-8)"
        ) from None


def _jsonl_rows(p: Path):
    for line, raw in enumerate(io.StringIO(_utf8_text(p), newline=None), start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as e:
            raise DataError(f"{p}:{line}: not valid JSON ({e.msg})") from None
        except RecursionError:  # the JSON reader recurses once per nesting level
            raise DataError(f"{p}:{line}: JSON nested too deeply") from None
        if not isinstance(record, dict):
            raise DataError(f"{p}:{line}: expected a JSON object, got {type(record).__name__}")
        yield line, record


def _delimited_rows(p: Path, delimiter: str):
    """Yields (line, dict) after checking each row has as many fields as the header (first yield: the header)."""
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    reader = csv.reader(io.StringIO(_utf8_text(p), newline=""), delimiter=delimiter, quoting=quoting)
    header = None
    try:
        for row in reader:
            line = reader.line_num
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if header is None:
                header = [c.strip() for c in row]
                yield line, dict.fromkeys(header)
                continue
            if len(row) != len(header):
                raise DataError(f"{p}:{line}: expected {len(header)} fields ({', '.join(header)}), got {len(row)}")
            yield line, dict(zip(header, row))
    except csv.Error as e:  # e.g. a field over csv's size limit (an unclosed quote swallowing the file)
        raise DataError(f"{p}:{reader.line_num}: {e}") from None


def label_names(labels: Sequence[str | None]) -> list[str]:
    """The distinct labels, sorted numerically when they are all integers."""
    names = {label for label in labels if label is not None}
    if all(re.fullmatch(r"-?\d+", n) for n in names):
        return sorted(names, key=int)
    return sorted(names)


def label_ids(data: LabelledText, names: Sequence[str]) -> list[int]:
    """Each row's label as an index into ``names``; an unknown label is an error naming file and line."""
    index = {n: i for i, n in enumerate(names)}
    out = []
    for label, line in zip(data.labels, data.lines):
        if label not in index:
            raise DataError(f"{data.path}:{line}: label {label!r} is not one of the training labels {list(names)}")
        out.append(index[label])
    return out


# -- words ------------------------------------------------------------------------------------
_WORD = re.compile(r"\w+|[^\w\s]")
PAD, UNK = "<pad>", "<unk>"


class WordVocab:
    """Lower-cased words and punctuation -> ids; 0 is padding, 1 unknown."""

    def __init__(self, words: Sequence[str]):
        self.words = [PAD, UNK, *words]
        self.index = {w: i for i, w in enumerate(self.words)}

    @staticmethod
    def split(text: str) -> list[str]:
        return _WORD.findall(text.lower())

    @classmethod
    def build(cls, texts: Sequence[str], min_count: int = 1, max_size: int = 50_000) -> WordVocab:
        counts = Counter(w for t in texts for w in cls.split(t))
        words = [w for w, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if n >= min_count]
        return cls(words[:max_size])

    @property
    def size(self) -> int:
        return len(self.words)

    def encode(self, text: str, max_length: int) -> list[int]:
        ids = [self.index.get(w, 1) for w in self.split(text)][:max_length]
        return ids or [1]

    def to_dict(self) -> dict:
        return {"kind": "words", "words": self.words[2:]}

    @classmethod
    def from_dict(cls, data: dict) -> WordVocab:
        if data.get("kind") != "words" or not isinstance(data.get("words"), list):
            raise DataError("not a moekit word vocabulary")
        return cls(data["words"])
