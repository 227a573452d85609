"""Atomic file writes: a crash leaves the old file or the new one, never half of one.

Bytes go to a temporary file in the destination folder (``os.replace`` is only atomic within one
filesystem), are flushed and fsynced, then renamed over the destination; the folder is fsynced so the
rename itself survives a power cut. :mod:`moekit.io.safe_io` builds its weight writes on this.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["atomic_target", "atomic_write_bytes", "atomic_write_json", "atomic_write_text", "fsync_file", "fsync_tree"]


@contextlib.contextmanager
def atomic_target(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success fsync it and move it over ``path``.

    On any exception the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Same folder as the destination: os.replace is only atomic within one filesystem.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def fsync_file(path: str | os.PathLike) -> None:
    """Flush one file's data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable on POSIX; directories cannot be opened this way on Windows.
    if os.name != "posix":
        return
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file, fsync, rename).

    Args:
        path: destination file; missing parent folders are created.
        data: the bytes to write.
    """
    with atomic_target(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically.

    Args:
        path: destination file; missing parent folders are created.
        text: the text to write (newlines are written as given, no translation).
        encoding: text encoding.
    """
    atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int = 2, sort_keys: bool = False) -> None:
    """Write ``obj`` as JSON to ``path`` atomically, with a trailing newline.

    Args:
        path: destination file.
        obj: a JSON-serialisable object.
        indent: indentation (2 by default, readable in a diff).
        sort_keys: sort object keys.
    """
    text = json.dumps(obj, indent=indent, sort_keys=sort_keys, ensure_ascii=False)
    atomic_write_text(path, text + "\n")


def fsync_tree(folder: str | os.PathLike) -> None:
    """Flush every file directly in ``folder`` and the folder itself to disk: call before renaming a
    temporary folder into place, so the new name never points at half-written files."""
    folder = Path(folder)
    for path in folder.iterdir():
        if path.is_file():
            fsync_file(path)
    _fsync_dir(folder)
