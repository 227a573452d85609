"""Parallel text: two line-aligned files (plain or ``.gz``), sentence ``i`` of one translating line ``i`` of the other.

Every error names the file and, where there is one, the line (1-based): a missing or empty file, bytes that
are not UTF-8, an empty line, and two files whose line counts differ (both names and both counts).
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import zlib
from pathlib import Path

from moekit.errors import DataError

BUILTIN_DIR = Path(__file__).parent / "builtin"
BUILTIN_SOURCE = BUILTIN_DIR / "parallel.en"
BUILTIN_TARGET = BUILTIN_DIR / "parallel.de"
_GZIP_MAGIC = b"\x1f\x8b"


@dataclasses.dataclass
class ParallelText:
    """Sentence pairs ``(sources[i], targets[i])`` read from line ``lines[i]`` of both files."""

    source_path: str
    target_path: str
    sources: list[str]
    targets: list[str]
    lines: list[int]

    def __len__(self) -> int:
        return len(self.sources)

    def subset(self, rows: list[int]) -> ParallelText:
        return ParallelText(
            self.source_path,
            self.target_path,
            [self.sources[i] for i in rows],
            [self.targets[i] for i in rows],
            [self.lines[i] for i in rows],
        )


def _read_bytes(p: Path) -> bytes:
    if not p.exists():
        raise DataError(f"{p}: no such file")
    if not p.is_file():
        raise DataError(f"{p}: not a file")
    with open(p, "rb") as f:
        data = f.read()
    if data[:2] == _GZIP_MAGIC:  # by content, so a .gz without the suffix (or a renamed one) still reads
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{p}: not a valid gzip file ({e})") from None
    elif p.suffix == ".gz":
        raise DataError(f"{p}: named .gz but not gzip-compressed")
    return data


def read_lines(path: str | os.PathLike, allow_empty_lines: bool = False) -> list[str]:
    """The lines of a UTF-8 text file (plain or gzip), without line endings and surrounding whitespace.

    Lines end at ``\\n`` only (``\\r\\n`` works too), so a stray U+2028 inside a sentence cannot shift the
    alignment with the other file. A final newline does not start another line.

    Args:
        path: the file.
        allow_empty_lines: keep blank lines as ``""`` (input to translate) instead of raising.

    Raises:
        DataError: the file is missing, empty, not UTF-8 (naming the line), or has a blank line.
    """
    p = Path(path)
    data = _read_bytes(p)
    raw = data.split(b"\n")
    if raw and raw[-1] == b"":
        raw.pop()
    if not raw:
        raise DataError(f"{p}: the file is empty")
    lines = []
    for number, chunk in enumerate(raw, start=1):
        try:
            text = chunk.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(
                f"{p}:{number}: not UTF-8 text (byte {chunk[e.start]:#04x} at column {e.start + 1})"
            ) from None
        if number == 1:
            text = text.removeprefix("\ufeff")  # a byte-order mark is not part of the first sentence
        text = text.strip()
        if not text and not allow_empty_lines:
            raise DataError(f"{p}:{number}: empty line; every line of a parallel file must hold a sentence")
        lines.append(text)
    return lines


def read_parallel(source: str | os.PathLike, target: str | os.PathLike) -> ParallelText:
    """Read two line-aligned files into sentence pairs.

    Raises:
        DataError: either file is unreadable (see :func:`read_lines`), the line counts differ, or a line is
            empty in either file (named by file and line).
    """
    src_lines = read_lines(source, allow_empty_lines=True)
    tgt_lines = read_lines(target, allow_empty_lines=True)
    if len(src_lines) != len(tgt_lines):
        hint = _first_empty(source, src_lines) or _first_empty(target, tgt_lines)
        raise DataError(
            f"{source} has {len(src_lines)} lines but {target} has {len(tgt_lines)}; parallel files must be "
            f"line-aligned (one sentence per line, line i of one translating line i of the other)"
            + (f"; the first empty line is {hint}" if hint else "")
        )
    for path, lines in ((source, src_lines), (target, tgt_lines)):
        hint = _first_empty(path, lines)
        if hint:
            raise DataError(f"{hint}: empty line; every line of a parallel file must hold a sentence")
    return ParallelText(str(source), str(target), src_lines, tgt_lines, list(range(1, len(src_lines) + 1)))


def _first_empty(path, lines: list[str]) -> str | None:
    for number, text in enumerate(lines, start=1):
        if not text:
            return f"{path}:{number}"
    return None


def builtin_parallel() -> ParallelText:
    """The built-in English-German sentence pairs (see ``moekit/data/builtin/README.md``)."""
    return read_parallel(BUILTIN_SOURCE, BUILTIN_TARGET)
