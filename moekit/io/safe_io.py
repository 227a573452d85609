"""The one place moekit reads or writes weights: safetensors files, validated before they are trusted.

Why a choke point: a checkpoint from the internet is untrusted input. Pickle-based formats (``torch.save``
``.pt``/``.pth``/``.bin``) run arbitrary code when loaded, so moekit never unpickles. Safetensors files are plain
data, but a hostile or truncated one can still lie about sizes and offsets; :func:`read_safetensors_header`
checks every claim in the header against the file before the ``safetensors`` library maps any data.

Writes are atomic (see :mod:`moekit.io.atomic`, whose helpers are re-exported here): a crash leaves
either the old file or the new one, never half of one.

The header checks live in :mod:`moekit.io.safetensors_header`.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from moekit.errors import CheckpointError, ConfigError, UnsafeFileError
from moekit.io.atomic import atomic_target, atomic_write_bytes, atomic_write_json, atomic_write_text
from moekit.io.mapped import map_tensors
from moekit.io.safetensors_header import SAFETENSORS_DTYPES, read_safetensors_header

__all__ = [
    "INDEX_NAME",
    "SAFETENSORS_DTYPES",
    "SHARD_FILE_RE",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "load_sharded",
    "load_tensors",
    "load_weights",
    "read_safetensors_header",
    "save_sharded",
    "save_tensors",
]

logger = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_FILE_NAME = "model.safetensors"

# The names save_sharded gives its shards (Hugging Face's): model-00001-of-00003.safetensors.
SHARD_FILE_RE = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")

# ------------------------------------------------------------------------------------------------------ saving


def _check_tensors(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None) -> None:
    if not isinstance(tensors, Mapping):
        raise ConfigError(f"tensors must be a dict of name -> Tensor, got {type(tensors).__name__}")
    for name, t in tensors.items():
        if not isinstance(name, str) or not name or name == "__metadata__":
            raise ConfigError(f"tensor name {name!r} is not allowed (need a non-empty str, not '__metadata__')")
        if not isinstance(t, torch.Tensor):
            raise ConfigError(f"tensor {name!r} is a {type(t).__name__}, not a torch.Tensor")
        if t.is_sparse or t.layout != torch.strided:
            raise ConfigError(f"tensor {name!r} has layout {t.layout}; only dense tensors can be saved")
    for key, value in (metadata or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ConfigError(f"metadata must map str -> str; got {key!r}: {type(value).__name__}")
    # safetensors refuses tensors that share memory (tied weights); say which ones and what to do.
    owners: dict[tuple[str, int], str] = {}
    for name, t in tensors.items():
        if t.numel() == 0 or t.device.type == "meta":
            continue
        storage = (str(t.device), t.untyped_storage().data_ptr())
        if storage in owners:
            raise CheckpointError(
                f"tensors {owners[storage]!r} and {name!r} share memory (tied weights?); save only one of them "
                f"and re-tie after loading, or pass a .clone() of one"
            )
        owners[storage] = name


def save_tensors(
    tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: Mapping[str, str] | None = None
) -> None:
    """Save tensors to one safetensors file, atomically.

    Args:
        tensors: name -> dense tensor (any device; copied to CPU; non-contiguous tensors are packed).
            Tensors must not share memory (drop tied duplicates first).
        path: destination ``.safetensors`` file. The previous file, if any, survives a crash mid-write.
        metadata: optional str -> str pairs stored in the header's ``__metadata__``.

    Raises:
        ConfigError: a bad name, value or metadata entry.
        CheckpointError: tensors share memory, or the write failed.
    """
    from safetensors.torch import save_file

    _check_tensors(tensors, metadata)
    cpu = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    path = Path(path)
    try:
        with atomic_target(path) as tmp:
            save_file(cpu, str(tmp), metadata=dict(metadata) if metadata else None)
    except (ValueError, RuntimeError) as e:  # safetensors reports its own refusals this way
        raise CheckpointError(f"could not save {path}: {e}") from e


def _plan_shards(tensors: Mapping[str, torch.Tensor], max_shard_bytes: int) -> list[list[str]]:
    """Greedy packing in the given order; a tensor bigger than the limit gets a shard of its own."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def save_sharded(
    tensors: Mapping[str, torch.Tensor],
    folder: str | os.PathLike,
    max_shard_bytes: int = 5 * 2**30,
    metadata: Mapping[str, str] | None = None,
) -> list[Path]:
    """Save tensors as HF-style shards ``model-0000i-of-0000N.safetensors`` plus ``model.safetensors.index.json``.

    Each file is written atomically; the index is written last, so it only ever names complete shards.
    Shards of an earlier save that the new index no longer names are removed afterwards.

    Args:
        tensors: name -> tensor, packed into shards in this order.
        folder: output folder (created if missing).
        max_shard_bytes: soft limit per shard (a single bigger tensor gets a shard of its own).
        metadata: str -> str stored in every shard's header.

    Returns:
        The shard paths, in order.
    """
    if max_shard_bytes < 1:
        raise ConfigError(f"max_shard_bytes={max_shard_bytes} must be >= 1")
    _check_tensors(tensors, metadata)
    folder = Path(folder)
    plan = _plan_shards(tensors, max_shard_bytes)
    n = len(plan)
    weight_map: dict[str, str] = {}
    paths = []
    for i, names in enumerate(plan, start=1):
        fname = f"model-{i:05d}-of-{n:05d}.safetensors"
        save_tensors({k: tensors[k] for k in names}, folder / fname, metadata)
        weight_map.update(dict.fromkeys(names, fname))
        paths.append(folder / fname)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    atomic_write_json(folder / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})
    keep = {p.name for p in paths}
    for old in folder.iterdir():
        if SHARD_FILE_RE.match(old.name) and old.name not in keep:
            logger.info("removing stale shard %s", old)
            old.unlink()
    return paths


# ----------------------------------------------------------------------------------------------------- loading


def load_tensors(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Load a safetensors file after validating its header (see :func:`read_safetensors_header`).

    Never unpickles: pickle/zip checkpoints raise :class:`UnsafeFileError` with conversion instructions.

    Args:
        path: a ``.safetensors`` file.
        device: where to put the tensors. On the CPU they are mapped (:func:`moekit.io.mapped.map_tensors`).

    Returns:
        name -> tensor.
    """
    from safetensors.torch import load_file

    if torch.device(device).type == "cpu":
        return map_tensors(path)  # views of the file's pages: no copy, no read until used
    read_safetensors_header(path)
    try:
        return load_file(str(path), device=str(device))
    except Exception as e:  # the library's own checks; keep the file name in the message
        raise CheckpointError(f"could not load {path}: {e}") from e


def _read_index(index_path: Path) -> dict[str, str]:
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"could not read shard index {index_path}: {e}") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise CheckpointError(f"{index_path}: 'weight_map' must map tensor name -> shard file name")
    for name, shard in weight_map.items():
        # A shard is a plain file beside the index; anything else could read files elsewhere on disk.
        if Path(shard).name != shard or shard in ("", ".", ".."):
            raise UnsafeFileError(f"{index_path}: tensor {name!r} points at {shard!r}, which is not a plain file name")
    return weight_map


def load_sharded(dir_or_index: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Load an HF-style sharded checkpoint (``model.safetensors.index.json`` + shards).

    Args:
        dir_or_index: the checkpoint folder or the index file itself.
        device: where to put the tensors.

    Returns:
        name -> tensor, for every tensor the index names.

    Raises:
        CheckpointError: missing index or shard (naming the shard and a tensor in it), or a shard lacking a
            tensor the index assigns to it.
    """
    p = Path(dir_or_index)
    index_path = p / INDEX_NAME if p.is_dir() else p
    if not index_path.is_file():
        raise CheckpointError(f"shard index {index_path} does not exist")
    weight_map = _read_index(index_path)
    by_shard: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
        by_shard.setdefault(shard, []).append(name)
    out: dict[str, torch.Tensor] = {}
    for shard, names in by_shard.items():
        shard_path = index_path.parent / shard
        if not shard_path.exists():
            raise CheckpointError(
                f"{index_path}: shard {shard!r} is missing (it holds {len(names)} tensors, e.g. {names[0]!r})"
            )
        tensors = load_tensors(shard_path, device=device)
        for name in names:
            if name not in tensors:
                raise CheckpointError(f"{shard_path}: the index puts tensor {name!r} here but the shard lacks it")
            out[name] = tensors[name]
    return out


def load_weights(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Load weights from a ``.safetensors`` file, an index file, or a folder holding either.

    Args:
        path: file or folder. A folder is searched for ``model.safetensors.index.json`` then
            ``model.safetensors``.
        device: where to put the tensors.

    Returns:
        name -> tensor.
    """
    p = Path(path)
    if p.is_dir():
        if (p / INDEX_NAME).is_file():
            return load_sharded(p, device)
        if (p / SINGLE_FILE_NAME).is_file():
            return load_tensors(p / SINGLE_FILE_NAME, device)
        found = sorted(x.name for x in p.iterdir() if x.is_file())
        raise CheckpointError(
            f"{p} holds neither {INDEX_NAME} nor {SINGLE_FILE_NAME} (files: {', '.join(found[:10]) or 'none'})"
        )
    if p.name.endswith(".index.json"):
        return load_sharded(p, device)
    return load_tensors(p, device)
