"""Teacher logits cached on disk, so that distilling for many steps runs the teacher once per micro-batch.

Layout: ``cache.json`` (what the cache was made with) and ``chunk-XXXXX.safetensors`` holding ``x`` [n, B, S]
int32 and ``values`` [n, B, S, K] fp16 + ``ids`` [n, B, S, K] int32 (top-k logits), or ``logits``
[n, B, S, V] fp16.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from moekit.data.loader import TokenLoader
from moekit.errors import CheckpointError
from moekit.io.atomic import atomic_write_json
from moekit.io.safe_io import load_tensors, save_tensors

logger = logging.getLogger(__name__)

CACHE_FORMAT = "moekit-teacher-cache"
CACHE_META = "cache.json"
# The teacher's targets for one micro-batch: full logits, or top-k (values, ids).
Targets = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


class TeacherCache:
    """Teacher targets for micro-batches 0..steps-1 of a deterministic :class:`TokenLoader`, on disk."""

    CHUNK = 64

    def __init__(self, path: str | os.PathLike, meta: dict[str, Any]):
        self.path = Path(path)
        self.meta = meta
        self._chunk_index = -1
        self._chunk: dict[str, torch.Tensor] = {}

    @property
    def steps(self) -> int:
        return int(self.meta["steps"])

    @classmethod
    def open_or_build(
        cls,
        path: str | os.PathLike,
        key: dict[str, Any],
        loader: TokenLoader,
        targets: Callable[[torch.Tensor], Targets],
        steps: int,
    ) -> TeacherCache:
        """Open the cache at ``path``, checking it was made with ``key`` (what the targets depend on besides the
        loader: teacher, top-k, vocabulary, precision) and this loader's batches, or build it for ``steps``
        micro-batches by replaying a fresh copy of the loader's stream through ``targets``."""
        meta = {
            "format": CACHE_FORMAT,
            "version": 1,
            **key,
            "batch_size": loader.batch_size,
            "block_size": loader.block_size,
            "num_tokens": len(loader.tokens),
            "seed": loader.seed,
        }
        path = Path(path)
        meta_file = path / CACHE_META
        if meta_file.is_file():
            stored = _read_meta(meta_file)
            changed = [k for k in meta if k != "teacher" and stored.get(k) != meta[k]]
            if stored.get("format") != CACHE_FORMAT or changed:
                k = changed[0] if changed else "format"
                raise CheckpointError(
                    f"teacher cache {path} was made with {k}={stored.get(k)!r}, this run has {meta[k]!r}; "
                    "use another --cache-teacher folder"
                )
            cache = cls(path, stored)
            cache._check_teacher(targets)
            if cache.steps < steps:
                logger.warning(
                    "teacher cache %s covers %d micro-batches; later ones are computed on the fly", path, cache.steps
                )
            return cache
        if path.exists() and any(path.iterdir()):
            raise CheckpointError(f"--cache-teacher {path} exists and is not a teacher cache")
        cls._build(path, meta, loader, targets, steps)
        return cls(path, {**meta, "steps": steps})

    @classmethod
    @torch.no_grad()
    def _build(
        cls, path: Path, meta: dict[str, Any], src: TokenLoader, targets: Callable[[torch.Tensor], Targets], steps: int
    ) -> None:
        path.mkdir(parents=True, exist_ok=True)
        loader = TokenLoader(src.tokens, src.block_size, src.batch_size, seed=src.seed)
        for start in range(0, steps, cls.CHUNK):
            xs, firsts, seconds = [], [], []
            for _ in range(start, min(start + cls.CHUNK, steps)):
                x, _ = loader.next_batch()
                made = targets(x)
                xs.append(x.to(torch.int32))
                if isinstance(made, tuple):
                    firsts.append(made[0].half())
                    seconds.append(made[1].to(torch.int32))
                else:
                    firsts.append(made.half())
            tensors = {"x": torch.stack(xs)}
            if seconds:
                tensors["values"], tensors["ids"] = torch.stack(firsts), torch.stack(seconds)
            else:
                tensors["logits"] = torch.stack(firsts)
            save_tensors(tensors, path / f"chunk-{start // cls.CHUNK:05d}.safetensors")
        atomic_write_json(path / CACHE_META, {**meta, "steps": steps, "chunk": cls.CHUNK})

    def _check_teacher(self, targets: Callable[[torch.Tensor], Targets]) -> None:
        """The teacher at hand must reproduce the cached logits of the first micro-batch (fp16 tolerance)."""
        self._load_chunk(0)
        mine = targets(self._chunk["x"][0].long())
        cached = self._chunk["values"][0] if "values" in self._chunk else self._chunk["logits"][0]
        mine = mine[0] if isinstance(mine, tuple) else mine
        if not torch.allclose(mine.half().float(), cached.float(), rtol=1e-2, atol=1e-2):
            raise CheckpointError(
                f"teacher cache {self.path} was made by another teacher: its logits for the first batch differ "
                "from this teacher's; use another --cache-teacher folder"
            )

    def _load_chunk(self, index: int) -> None:
        if index != self._chunk_index:
            self._chunk = load_tensors(self.path / f"chunk-{index:05d}.safetensors")
            self._chunk_index = index

    def get(self, step: int, x: torch.Tensor) -> Targets | None:
        """The cached targets of micro-batch ``step`` (checked against its input ids ``x``), or None."""
        if step >= self.steps:
            return None
        chunk = int(self.meta.get("chunk", self.CHUNK))
        index, row = divmod(step, chunk)
        self._load_chunk(index)
        if not torch.equal(self._chunk["x"][row].long(), x.cpu()):
            raise CheckpointError(
                f"teacher cache {self.path} does not match micro-batch {step}: its input ids differ "
                "(different data, tokenizer or loader)"
            )
        if "values" in self._chunk:
            return self._chunk["values"][row].to(x.device), self._chunk["ids"][row].to(x.device)
        return self._chunk["logits"][row].to(x.device)


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise CheckpointError(
            f"teacher cache file {path} is not valid JSON ({e}); use another --cache-teacher folder"
        ) from None
    if not isinstance(data, dict):
        raise CheckpointError(f"teacher cache file {path} does not hold a JSON object")
    return data
