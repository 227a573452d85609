"""Read training text: a file, a folder of text files, or JSON Lines, with errors that name file and place.

Text must be UTF-8. A file with NUL bytes or invalid UTF-8 is rejected with the byte offset of the first
bad byte, so the user can look at it (``xxd -s OFFSET``). In a folder, files containing NUL bytes
(images, archives, compiled files) are skipped with a warning; a NUL-free file that is not valid UTF-8 is
still an error, since it is probably text in another encoding that the user meant to include.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from moekit.errors import DataError

__all__ = ["DEFAULT_SEPARATOR", "load_labeled_files", "load_text"]

logger = logging.getLogger(__name__)

DEFAULT_SEPARATOR = "\n\n"
JSONL_SUFFIXES = (".jsonl",)


class _SkippableFile(DataError):
    """Internal: a binary or empty file, an error on its own but skipped inside a folder."""


def _decode(path: Path, data: bytes) -> str:
    nul = data.find(b"\x00")
    if nul != -1:
        raise _SkippableFile(f"{path} looks binary: NUL byte at byte offset {nul}; expected UTF-8 text")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path} is not valid UTF-8: byte 0x{data[e.start]:02x} at byte offset {e.start} ({e.reason}); "
            f"convert it to UTF-8 (e.g. iconv -f latin1 -t utf-8)"
        ) from None
    return text.removeprefix("\ufeff")  # a UTF-8 BOM is an encoding marker, not text


def _read_jsonl(path: Path, text: str, text_field: str) -> list[str]:
    docs = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as e:
            raise DataError(f"{path}, line {lineno}: not valid JSON ({e})") from None
        except RecursionError:  # the JSON reader recurses once per nesting level
            raise DataError(f"{path}, line {lineno}: JSON nested too deeply") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}, line {lineno}: expected a JSON object, got {type(record).__name__}")
        if text_field not in record:
            keys = ", ".join(sorted(record)) or "none"
            raise DataError(f"{path}, line {lineno}: no field {text_field!r} (fields: {keys}); set text_field=")
        value = record[text_field]
        if not isinstance(value, str):
            raise DataError(f"{path}, line {lineno}: field {text_field!r} is {type(value).__name__}, not a string")
        docs.append(value)
    return docs


def _read_file(path: Path, text_field: str, separator: str) -> str:
    """One file -> text (JSONL records joined with ``separator``); empty -> DataError."""
    data = path.read_bytes()
    if not data.strip():
        raise _SkippableFile(f"{path} is empty" + (" (only whitespace)" if data else ""))
    text = _decode(path, data)
    if not text.strip():  # e.g. only a byte-order mark
        raise _SkippableFile(f"{path} is empty (only whitespace)")
    if path.suffix.lower() in JSONL_SUFFIXES:
        docs = _read_jsonl(path, text, text_field)
        if not any(docs):
            raise DataError(f"{path} has no non-empty {text_field!r} values")
        return separator.join(docs)
    return text


def _folder_files(folder: Path) -> list[Path]:
    # Sorted by relative path so the corpus (and every split of it) is the same on every machine.
    files = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # skip .git, .cache, ...
        files.extend(Path(root) / n for n in names if not n.startswith("."))
    return sorted(files, key=lambda p: p.relative_to(folder).as_posix())


def load_text(path: str | os.PathLike, text_field: str = "text", separator: str = DEFAULT_SEPARATOR) -> str:
    """Read a corpus as one string.

    Args:
        path: a UTF-8 text file; a ``.jsonl`` file whose records hold ``text_field``; or a folder, read
            recursively in sorted path order (hidden files skipped, files with NUL bytes skipped with a
            warning, ``.jsonl`` files read as JSONL).
        text_field: the JSONL field holding the text.
        separator: what joins documents (JSONL records, files of a folder).

    Returns:
        The text.

    Raises:
        DataError: missing path, empty file or folder, binary or non-UTF-8 file (with byte offset),
            malformed JSONL (with line number).
    """
    p = Path(path)
    if not p.exists():
        raise DataError(f"data path {p} does not exist")
    if p.is_file():
        try:
            return _read_file(p, text_field, separator)
        except _SkippableFile as e:
            raise DataError(str(e)) from None  # a lone file is never skipped; show the public type
    if not p.is_dir():
        raise DataError(f"data path {p} is neither a file nor a folder")
    parts, skipped = [], []
    for f in _folder_files(p):
        try:
            parts.append(_read_file(f, text_field, separator))
        except _SkippableFile as e:
            logger.warning("skipping %s: %s", f, e)
            skipped.append(f.name)
    if not parts:
        detail = f" ({len(skipped)} binary or empty files skipped: {', '.join(skipped[:5])})" if skipped else ""
        raise DataError(f"folder {p} holds no text files{detail}")
    return separator.join(parts)


def load_labeled_files(
    paths: Sequence[str | os.PathLike] | Mapping[str, str | os.PathLike],
    text_field: str = "text",
    separator: str = DEFAULT_SEPARATOR,
) -> list[tuple[str, str]]:
    """Read several corpora, each labelled with its domain (for domain-specialisation experiments).

    Args:
        paths: files or folders; the label is the folder name, or the file name without its suffix.
            Pass a mapping ``{label: path}`` to choose labels (e.g. several ``train.txt`` files).
        text_field: the JSONL field holding the text.
        separator: what joins documents inside one corpus.

    Returns:
        ``[(label, text), ...]`` in the given order.

    Raises:
        DataError: two paths give the same label, or any :func:`load_text` error.
    """
    if isinstance(paths, Mapping):
        pairs = [(str(label), Path(p)) for label, p in paths.items()]
    else:
        pairs = [(Path(p).name if Path(p).is_dir() else Path(p).stem, Path(p)) for p in paths]
    seen: dict[str, Path] = {}
    for label, p in pairs:
        if label in seen:
            raise DataError(
                f"label {label!r} is used by both {seen[label]} and {p}; pass a mapping {{label: path}} instead"
            )
        seen[label] = p
    return [(label, load_text(p, text_field, separator)) for label, p in pairs]
