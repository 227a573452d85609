"""Weights on huge pages: anonymous memory that the kernel may back with 2 MiB pages (transparent huge pages,
asked for with ``madvise``; ordinary pages where the system gives none). Opt-in: ``MOEKIT_HUGE_PAGES=1``.

A batch-1 decode step streams every weight it uses, ~0.3-0.55 GB a step on the 1.72B-shaped model. With the
switch on, loaders read the weights a step streams (not the experts of HF folders, already in anonymous memory)
into one huge-page arena, from the file straight into place: the resident set stays about one copy.
Measured side by side, separate processes alternating, best of 3 (``MOEKIT_HUGE_PAGES=0|1 python
benchmarks/decode_profile.py --checkpoint /work/bench/q3-1.7b-int8L``): a moekit int8 checkpoint decodes 59.3
against 55.7 tok/s mapped (1.06x); the bf16 HF folder with its experts moved too, 37.9 against 36.9 (noise).
The price is at load: the kernel zeroes (and may compact memory for) each huge page, 1.9-2.4 s for 1.76 GB
against 0.9 s on ordinary pages; the int8 checkpoint loads in 1.4 s instead of 0.4 s. Hence off by default.
"""

from __future__ import annotations

import mmap
import os
import weakref
from collections.abc import Callable

import torch
from torch import nn

from moekit.io.mapped import copy_from_file, release_pages

HUGE_PAGE = 2 << 20
SMALLEST = 64 << 10  # tensors below this (norms, biases) stay where they are: a huge page would not help them
_ALIGN = 64  # each tensor's first byte in an arena: a cache line

# live arenas: (first byte, end, the map): what is_huge() checks a tensor against
_ARENAS: list[tuple[int, int, weakref.ref]] = []


def switched_on() -> bool:
    """True with ``MOEKIT_HUGE_PAGES=1`` (off by default: see the module docstring)."""
    return os.environ.get("MOEKIT_HUGE_PAGES", "0") == "1"


class _Arena:
    """Anonymous memory asked to be on huge pages, starting on a huge-page boundary; :meth:`take` hands out
    pieces of it, each a tensor with its own storage (so that no two look tied: savers compare storages)."""

    def __init__(self, size: int):
        self.buffer = mmap.mmap(-1, size + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if hasattr(mmap, "MADV_HUGEPAGE") and switched_on():
            try:
                self.buffer.madvise(mmap.MADV_HUGEPAGE)
            except OSError:  # no transparent huge pages here: ordinary pages
                pass
        whole = torch.frombuffer(self.buffer, dtype=torch.uint8)
        self.start = -whole.data_ptr() % HUGE_PAGE
        _ARENAS[:] = [a for a in _ARENAS if a[2]() is not None]
        _ARENAS.append((whole.data_ptr(), whole.data_ptr() + whole.numel(), weakref.ref(self.buffer)))

    def take(self, offset: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised tensor at ``offset`` bytes from the arena's start (it keeps the arena alive)."""
        numel = 1
        for n in shape:
            numel *= n
        begin = self.start + offset
        piece = memoryview(self.buffer)[begin : begin + numel * dtype.itemsize]
        return torch.frombuffer(piece, dtype=torch.uint8).view(dtype).view(shape)


def is_huge(t: torch.Tensor) -> bool:
    """Whether ``t`` lives in a huge-page arena of :func:`move_to_huge_pages`."""
    return t.device.type == "cpu" and any(lo <= t.data_ptr() < hi and ref() is not None for lo, hi, ref in _ARENAS)


def move_to_huge_pages(model: nn.Module, skip: Callable[[str], bool] | None = None) -> int:
    """Move ``model``'s CPU parameters and buffers of at least :data:`SMALLEST` bytes (but those whose names
    ``skip`` picks, and those already there) into one huge-page arena, keeping values, layouts (contiguous, or
    the last two dims transposed) and tied tensors; return the bytes moved. A tensor mapped from a file has its
    pages in this process dropped, then is read from the file into place, so that the resident set never holds
    it twice; any other is copied. Nothing moves
    with ``MOEKIT_HUGE_PAGES=0``."""
    if not switched_on():
        return 0
    chosen: dict[tuple, list[tuple[nn.Module, str, bool]]] = {}  # one entry per distinct tensor (ties share)
    tensors: dict[tuple, torch.Tensor] = {}
    for prefix, module in model.named_modules():
        for table, is_param in ((module._parameters, True), (module._buffers, False)):
            for name, t in table.items():
                if t is None or t.device.type != "cpu" or t.numel() * t.element_size() < SMALLEST:
                    continue
                if (skip and skip(f"{prefix}.{name}" if prefix else name)) or is_huge(t) or _base(t) is None:
                    continue
                key = (t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
                chosen.setdefault(key, []).append((module, name, is_param))
                tensors[key] = t
    if not tensors:
        return 0
    offsets, total = {}, 0
    for key, t in tensors.items():
        offsets[key] = total
        total += -(-t.numel() * t.element_size() // _ALIGN) * _ALIGN
    arena = _Arena(total)
    for key, t in tensors.items():
        base = _base(t)
        assert base is not None
        dst = arena.take(offsets[key], tuple(base.shape), t.dtype)
        # A mapped source's pages that this process touched (a load's checks) are dropped first: the read below
        # comes from the page cache, and the resident set never holds the tensor twice.
        if not (release_pages(base) and copy_from_file(dst, base)):
            dst.copy_(base)
        moved = dst if t.is_contiguous() else dst.transpose(-1, -2)
        param = nn.Parameter(moved, requires_grad=t.requires_grad)  # one object for tied parameters, as before
        for module, name, is_param in chosen[key]:
            if is_param:
                module._parameters[name] = param
            else:
                module._buffers[name] = moved
    return total


def _base(t: torch.Tensor) -> torch.Tensor | None:
    """``t`` as a contiguous tensor over the same bytes (itself, or its last two dims transposed), or None."""
    if t.is_contiguous():
        return t
    if t.dim() >= 2 and t.transpose(-1, -2).is_contiguous():
        return t.transpose(-1, -2)
    return None
