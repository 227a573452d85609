"""Safetensors files mapped into memory instead of read: tensors are views of the file's pages.

Loading then costs no copy: the operating system reads a page the first time a tensor touches it, and the
pages belong to the page cache (dropped under memory pressure and re-read, never swapped). The mapping is
private (copy-on-write): a write to a tensor (training, ``copy_``) copies that page into this process and
never reaches the file. Alignment: a view's start must be a multiple of its dtype's size; a file whose
tensor offsets are not (safetensors does not require it) is copied tensor by tensor instead.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
import weakref
from pathlib import Path

import torch

from moekit.io.safetensors_header import read_safetensors_header

_TORCH_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "U16": torch.uint16,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "F32": torch.float32,
    "I64": torch.int64,
    "U64": torch.uint64,
    "F64": torch.float64,
    "C64": torch.complex64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E4M3FNUZ": torch.float8_e4m3fnuz,
    "F8_E5M2FNUZ": torch.float8_e5m2fnuz,
}


# The tensors map_tensors returned that view the file (not the copied unaligned ones): release_pages' guard.
# (WeakSet would compare tensors with ==, so: id -> weak reference, removed when the tensor dies.)
_VIEWS: dict[int, weakref.ref] = {}
_PAGE = mmap.PAGESIZE


def map_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """name -> CPU tensor viewing ``path``'s bytes through a private memory map (header validated first)."""
    path = Path(path)
    header, _ = read_safetensors_header(path)
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if not header:
            return {}
        buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # the fd may close: the map stays
    base = 8 + n
    out: dict[str, torch.Tensor] = {}
    for name, entry in header.items():
        dtype = _TORCH_DTYPES[entry["dtype"]]
        begin, end = entry["data_offsets"]
        if end == begin:
            out[name] = torch.empty(entry["shape"], dtype=dtype)
            continue
        # One storage per tensor, starting at its own bytes (some torch functions, e.g. set_rng_state, read a
        # storage from its start); each keeps `buffer` alive as long as it lives.
        raw = torch.frombuffer(buffer, dtype=torch.uint8, count=end - begin, offset=base + begin)
        aligned = (base + begin) % dtype.itemsize == 0
        out[name] = (raw if aligned else raw.clone()).view(dtype).view(entry["shape"])  # unaligned: copied
        if aligned:
            key = id(out[name])
            _VIEWS[key] = weakref.ref(out[name], lambda _, key=key: _VIEWS.pop(key, None))
    return out


def release_pages(t: torch.Tensor) -> None:
    """Drop the whole pages under mapped tensor ``t`` from this process's resident memory (they are read from
    the file again if ``t`` is used later). For tensors an import has copied out of and never wrote to: a
    write's private copy would be dropped too. Does nothing for a tensor :func:`map_tensors` did not map."""
    ref = _VIEWS.get(id(t))
    if ref is None or ref() is not t or not hasattr(mmap, "MADV_DONTNEED"):
        return
    begin, end = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
    first, last = -(-begin // _PAGE) * _PAGE, end // _PAGE * _PAGE  # pages wholly inside t
    if last > first:
        ctypes.CDLL(None).madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), mmap.MADV_DONTNEED)
