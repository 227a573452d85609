"""Reading a GGUF file with the ``gguf`` package: its metadata, and its tensors as PyTorch tensors.

F32, F16 and BF16 tensors are views of the mapped file (copy-on-write, so nothing is read until used and the
file is never written). Quantised tensors (Q8_0, Q4_0, Q4_K and every other type ``gguf.quants`` knows) are
dequantised here into a float dtype: moekit computes in floats, and its own int8/int4 experts are made from
those floats (``moekit quantize``, or ``moekit convert --from-gguf --bits``, one expert at a time), not
from llama.cpp's block formats.

GGUF lists a tensor's dimensions fastest-first (ggml's ``ne``); the ``gguf`` package already gives numpy's order,
which is PyTorch's: ``token_embd.weight`` is [vocab, hidden], ``blk.N.ffn_gate_exps.weight`` [experts, I, hidden].
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moekit.errors import CheckpointError
from moekit.io.mapped import register_mapped

GGUF_MAGIC = b"GGUF"
# Stored float types: mapped as they are.
_FLOAT_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def is_gguf_file(path: str | os.PathLike) -> bool:
    """True for a file that starts with GGUF's magic bytes (or is named ``*.gguf``)."""
    p = Path(path)
    if not p.is_file():
        return False
    if p.suffix.lower() == ".gguf":
        return True
    with open(p, "rb") as f:
        return f.read(4) == GGUF_MAGIC


class GGUFFile:
    """One GGUF file, opened and checked; ``meta(key)`` reads metadata, ``tensor(name, dtype)`` a weight."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: no such GGUF file")
        with open(self.path, "rb") as f:
            magic = f.read(4)
        if magic != GGUF_MAGIC:
            raise CheckpointError(f"{self.path} is not a GGUF file (starts with {magic!r}, not {GGUF_MAGIC!r})")
        try:
            from gguf import GGUFReader
        except ImportError:
            raise CheckpointError(
                f"{self.path}: reading GGUF files needs the `gguf` package (pip install 'moekit[gguf]')"
            ) from None
        try:
            # "c": copy-on-write mapping; the arrays are writable (as torch wants) but the file never changes.
            self._reader = GGUFReader(self.path, "c")
        except Exception as e:  # the gguf package raises ValueError, IndexError, KeyError... on damaged files
            raise CheckpointError(f"{self.path} is not a valid GGUF file (truncated or damaged?): {e}") from None
        self._tensors = {t.name: t for t in self._reader.tensors}
        self._check_extents()

    def _check_extents(self) -> None:
        size = self.path.stat().st_size
        for t in self._tensors.values():
            if t.data_offset + t.n_bytes > size:
                raise CheckpointError(f"{self.path} is truncated: tensor {t.name!r} runs past the end of the file")

    # ---------------------------------------------------------------------------------------------- metadata

    def has(self, key: str) -> bool:
        """True when the metadata holds ``key``."""
        return key in self._reader.fields

    def meta(self, key: str, default: Any = ...) -> Any:
        """The metadata value ``key`` (str, number, bool or list); CheckpointError when absent and no default."""
        field = self._reader.fields.get(key)
        if field is None:
            if default is ...:
                raise CheckpointError(f"{self.path}: GGUF metadata lacks {key!r}")
            return default
        try:
            return field.contents()
        except (UnicodeDecodeError, IndexError, ValueError) as e:
            raise CheckpointError(f"{self.path}: GGUF metadata {key!r} cannot be read: {e}") from None

    def meta_array(self, key: str) -> np.ndarray | None:
        """A numeric metadata array (token scores, token types) as one numpy array, without a Python list."""
        field = self._reader.fields.get(key)
        if field is None:
            return None
        if not field.data:
            return np.zeros(0)
        return np.concatenate([field.parts[i] for i in field.data])

    # ----------------------------------------------------------------------------------------------- tensors

    def tensor_names(self) -> list[str]:
        """Every tensor name, in file order."""
        return list(self._tensors)

    def _info(self, name: str) -> Any:
        if name not in self._tensors:
            raise CheckpointError(f"{self.path} has no tensor {name!r}")
        return self._tensors[name]

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape in PyTorch order."""
        return tuple(int(d) for d in reversed(self._info(name).shape.tolist()))

    def type_name(self, name: str) -> str:
        """A tensor's GGML type name (``F32``, ``BF16``, ``Q8_0``...)."""
        return self._info(name).tensor_type.name

    def stored_dtype(self, name: str) -> torch.dtype:
        """The float dtype a tensor is stored in; quantised types count as float32 (what they dequantise to)."""
        return _FLOAT_TYPES.get(self.type_name(name), torch.float32)

    def tensor(self, name: str, dtype: torch.dtype | None = None, index: int | None = None) -> torch.Tensor:
        """Tensor ``name`` in PyTorch order; float types are views of the mapped file (cast only to ``dtype``),
        quantised ones are dequantised into ``dtype`` (float32 when None). ``index``: only ``name[index]`` (one
        expert of a stacked tensor), read and dequantised alone (llama.cpp's blocks never cross a row)."""
        info = self._info(name)
        kind = info.tensor_type.name
        shape = self.shape(name)
        data = info.data if index is None else info.data[index]
        shape = shape if index is None else shape[1:]
        if kind in ("F32", "F16"):
            t = torch.from_numpy(data).reshape(shape)
        elif kind == "BF16":  # the gguf package hands BF16 over as raw bytes
            t = torch.from_numpy(data.view(np.uint16)).view(torch.bfloat16).reshape(shape)
        else:
            t = torch.from_numpy(self._dequantize(info, data)).reshape(shape)
            return t if dtype is None or t.dtype == dtype else t.to(dtype)
        mapping = getattr(self._reader.data, "_mmap", None)  # numpy's memmap of the whole file
        if mapping is not None:  # a view of the file: expert offload reads it from there
            register_mapped(t, self.path, info.data_offset + data.ctypes.data - info.data.ctypes.data, mapping)
        return t if dtype is None or t.dtype == dtype else t.to(dtype)

    def is_float(self, name: str) -> bool:
        """Whether tensor ``name`` is stored as F32, F16 or BF16 (read as a view of the file)."""
        return self.type_name(name) in _FLOAT_TYPES

    def _dequantize(self, info: Any, data: np.ndarray) -> np.ndarray:
        from gguf.quants import dequantize

        try:
            return np.asarray(dequantize(data, info.tensor_type), dtype=np.float32)
        except NotImplementedError:
            raise CheckpointError(
                f"{self.path}: tensor {info.name!r} has GGML type {info.tensor_type.name}, which moekit cannot read as "
                "float weights; convert the model to a supported type (F32, F16, BF16, Q8_0, Q4_0, Q4_K...)"
            ) from None

    def iter_tensors(self, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) for every tensor, in file order (see :meth:`tensor`)."""
        for name in self._tensors:
            yield name, self.tensor(name, dtype)
