"""Reading a safetensors header and checking every claim in it before any tensor data is trusted.

A hostile or truncated file can lie about sizes and offsets, and a pickle can hide behind a
``.safetensors`` name; :func:`read_safetensors_header` refuses both with a message naming the file and
the tensor. Layout: ``u64 little-endian N`` | ``N bytes of JSON header`` | data section; the header maps
each tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` and may hold ``"__metadata__"``.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Any

from moekit.errors import CheckpointError, UnsafeFileError

# Bytes per element of each safetensors dtype that torch can hold (names as the format spells them).
SAFETENSORS_DTYPES: dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E4M3FNUZ": 1,
    "F8_E5M2": 1,
    "F8_E5M2FNUZ": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
    "C64": 8,
}

# The safetensors library's own cap on header size (100 MB); a bigger claim is a corrupt or hostile file.
MAX_HEADER_BYTES = 100_000_000

_PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".tar"}
_ZIP_MAGIC = b"PK\x03\x04"
_CONVERT_HINT = (
    "To convert it, load it once in a trusted environment, e.g. "
    "`transformers.AutoModel.from_pretrained(path).save_pretrained(out, safe_serialization=True)`, "
    "or `safetensors.torch.save_file(torch.load(path, weights_only=True), 'model.safetensors')`, "
    "and point moekit at the .safetensors output."
)


def _refuse_pickle(path: Path, head: bytes) -> None:
    """Raise UnsafeFileError when ``path`` is (or is named like) a pickle-based checkpoint."""
    why = None
    if head.startswith(_ZIP_MAGIC):
        why = "it is a zip archive (the torch.save format), which holds a pickle"
    elif len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        why = f"it is a pickle (protocol {head[1]}), the legacy torch.save format"
    elif path.suffix.lower() in _PICKLE_SUFFIXES:
        why = f"its '{path.suffix}' name marks a pickle-based PyTorch checkpoint"
    if why:
        raise UnsafeFileError(
            f"refusing to load {path}: {why}. Loading pickles can run arbitrary code, so moekit only reads "
            f"safetensors. {_CONVERT_HINT}"
        )


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_entry(path: Path, name: str, entry: Any) -> tuple[int, int]:
    """Validate one tensor's header entry; return its (begin, end) offsets."""
    where = f"{path}: tensor {name!r}"
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise CheckpointError(f"{where}: header entry must have exactly dtype, shape, data_offsets; got {entry!r}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        raise CheckpointError(f"{where}: unknown or unsupported dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise CheckpointError(f"{where}: shape {shape!r} is not a list of non-negative ints")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
        raise CheckpointError(f"{where}: data_offsets {offsets!r} is not [begin, end]")
    begin, end = offsets
    if not 0 <= begin <= end:
        raise CheckpointError(f"{where}: data_offsets {offsets!r} need 0 <= begin <= end")
    expected = math.prod(shape) * SAFETENSORS_DTYPES[dtype]
    if end - begin != expected:
        raise CheckpointError(
            f"{where}: shape {shape} x {dtype} needs {expected} bytes but data_offsets span {end - begin}"
        )
    return begin, end


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Read and validate a safetensors header without touching the tensor data.

    Checks, in order: the file exists and is not a pickle/zip; the header length is sane and fits in the
    file; the header is a JSON object (no duplicate keys); every tensor's dtype is known and its byte span
    equals shape x itemsize; spans lie inside the data section, do not overlap, leave no gaps and cover
    it exactly.

    Args:
        path: a ``.safetensors`` file.

    Returns:
        ``(tensors, metadata)``: name -> {"dtype", "shape", "data_offsets"}, and the ``__metadata__`` dict.

    Raises:
        UnsafeFileError: the file is a pickle/zip or named like a pickle checkpoint.
        CheckpointError: missing file or any inconsistency, naming the file and the tensor.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint file {path} does not exist")
    if not path.is_file():
        raise CheckpointError(f"{path} is not a file")
    file_size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        _refuse_pickle(path, head)
        if len(head) < 8:
            raise CheckpointError(
                f"{path} is not a safetensors file: only {file_size} bytes, shorter than the 8-byte header length"
            )
        (n,) = struct.unpack("<Q", head)
        if n < 2 or n > MAX_HEADER_BYTES or n > file_size - 8:
            raise CheckpointError(
                f"{path} is not a valid safetensors file: header length {n} is impossible "
                f"(file has {file_size} bytes; the limit is {MAX_HEADER_BYTES})"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path}: safetensors header is not valid JSON: {e}") from None
    except RecursionError:  # Python's JSON reader recurses once per nesting level
        raise CheckpointError(f"{path}: safetensors header is nested too deeply to be a tensor table") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header must be a JSON object, got {type(header).__name__}")
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata  # null is allowed, an empty list or string is not
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise CheckpointError(f"{path}: __metadata__ must map str -> str")

    data_size = file_size - 8 - n
    spans = sorted((*_check_entry(path, name, entry), name) for name, entry in header.items())
    cursor, prev = 0, None
    for begin, end, name in spans:
        if end > data_size:
            raise CheckpointError(
                f"{path} is truncated or corrupt: tensor {name!r} needs bytes {begin}..{end} of the data section "
                f"but the file holds only {data_size}"
            )
        if begin < cursor:
            raise CheckpointError(f"{path}: tensor {name!r} overlaps tensor {prev!r} (offset {begin} < {cursor})")
        if begin > cursor:
            raise CheckpointError(f"{path}: {begin - cursor} unexplained bytes before tensor {name!r}")
        cursor, prev = end, name
    if cursor != data_size:
        raise CheckpointError(f"{path}: {data_size - cursor} unexplained bytes after the last tensor")
    return header, metadata
