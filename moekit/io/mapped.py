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

# storage address -> (file, byte offset of the storage's first byte, the map it lives in): where a mapped
# tensor's bytes are in its file (expert offload re-reads them from there). The weak reference tells a
# live entry from a stale one whose address a later allocation reuses.
_SOURCES: dict[int, tuple[str, int, weakref.ref]] = {}


def mapped_source(tensor: torch.Tensor) -> tuple[str, int] | None:
    """(file, byte offset of ``tensor``'s first element) for a view of a file mapped by :func:`map_tensors`."""
    if tensor.device.type != "cpu":
        return None
    entry = _SOURCES.get(tensor.untyped_storage().data_ptr())
    if entry is None or entry[2]() is None:
        return None
    return entry[0], entry[1] + int(tensor.storage_offset()) * tensor.element_size()


def register_mapped(tensor: torch.Tensor, path: str | os.PathLike, offset: int, buffer: mmap.mmap) -> None:
    """Record that ``tensor``'s first element is at byte ``offset`` of ``path``, mapped whole by ``buffer``
    (another reader's map, e.g. a GGUF's), so that :func:`mapped_source` and :func:`release_pages` know it."""
    start = offset - int(tensor.storage_offset()) * tensor.element_size()
    _SOURCES[tensor.untyped_storage().data_ptr()] = (str(path), start, weakref.ref(buffer))


def release_pages(tensor: torch.Tensor) -> bool:
    """Drop this process's pages of a mapped ``tensor`` whose bytes are one span (contiguous, or its last two
    dims transposed), only whole pages inside it; the next touch re-reads them from the file, so writes made
    to them are lost. False when ``tensor`` is not such a view."""
    source = mapped_source(tensor)
    if source is None or not (tensor.is_contiguous() or tensor.transpose(-1, -2).is_contiguous()):
        return False
    buffer = _SOURCES[tensor.untyped_storage().data_ptr()][2]()
    start = -(-source[1] // mmap.PAGESIZE) * mmap.PAGESIZE
    end = (source[1] + tensor.numel() * tensor.element_size()) // mmap.PAGESIZE * mmap.PAGESIZE
    if buffer is not None and end > start:
        buffer.madvise(mmap.MADV_DONTNEED, start, end - start)
    return True


def copy_from_file(dst: torch.Tensor, src: torch.Tensor) -> bool:
    """dst.copy_(src) for a contiguous mapped ``src`` of dst's dtype and shape, by reading its bytes from the file
    straight into ``dst`` (one kernel copy from the page cache; no page of the mapping is touched, so none needs
    releasing). False, ``dst`` untouched, when ``src`` is not such a view."""
    source = mapped_source(src)
    if source is None or not (src.is_contiguous() and dst.is_contiguous()) or dst.device.type != "cpu":
        return False
    if dst.dtype != src.dtype or dst.shape != src.shape:
        return False
    size = dst.numel() * dst.element_size()
    target = memoryview((ctypes.c_char * size).from_address(dst.data_ptr())).cast("B")
    done = 0
    with open(source[0], "rb", buffering=0) as f:
        while done < size:
            got = os.preadv(f.fileno(), [target[done:]], source[1] + done)
            if got <= 0:
                raise OSError(f"{source[0]}: file ended {size - done} bytes early")
            done += got
    return True


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
    registered: list[int] = []
    for name, entry in header.items():
        dtype = _TORCH_DTYPES[entry["dtype"]]
        begin, end = entry["data_offsets"]
        if end == begin:
            out[name] = torch.empty(entry["shape"], dtype=dtype)
            continue
        # One storage per tensor, starting at its own bytes (some torch functions, e.g. set_rng_state, read a
        # storage from its start); each keeps `buffer` alive as long as it lives.
        raw = torch.frombuffer(buffer, dtype=torch.uint8, count=end - begin, offset=base + begin)
        if (base + begin) % dtype.itemsize:  # unaligned: a view would be invalid, copy this one
            raw = raw.clone()
        else:
            registered.append(raw.untyped_storage().data_ptr())
            _SOURCES[registered[-1]] = (str(path), base + begin, weakref.ref(buffer))
        out[name] = raw.view(dtype).view(entry["shape"])
    weakref.finalize(buffer, _forget, registered)
    return out


def _forget(addresses: list[int]) -> None:
    for address in addresses:
        _SOURCES.pop(address, None)
