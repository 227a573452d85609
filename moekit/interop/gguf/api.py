"""Import llama.cpp GGUF files: :func:`from_gguf` (a model), :func:`load_gguf` (model + tokenizer),
:func:`convert_from_gguf` (a moekit checkpoint folder).

The GGUF's metadata becomes an HF config dict and its tensors HF-named tensors (:mod:`.arch`), which the Hugging
Face import turns into a moekit model; so every check of that import (shapes, leftovers, unsupported options)
applies to GGUF files too.
"""

from __future__ import annotations

import collections
import os
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any

import torch

from moekit.data.tokenizers import HFTokenizer
from moekit.errors import CheckpointError, ConfigError, MoekitError
from moekit.interop.gguf.arch import GGUFTensors, hf_config_from_gguf
from moekit.interop.gguf.reader import GGUFFile
from moekit.interop.gguf.vocab import write_tokenizer
from moekit.interop.hf.api import build_model, save_moekit_checkpoint
from moekit.interop.hf.config_map import lm_config_from_hf
from moekit.models import MoELM
from moekit.models.dtypes import as_dtype
from moekit.models.quantization import uniform_spec


def default_dtype(gg: GGUFFile) -> torch.dtype:
    """The dtype most of the file's weights (by element count) are stored in; quantised ones count as float32."""
    counts: collections.Counter[torch.dtype] = collections.Counter()
    for name in gg.tensor_names():
        counts[gg.stored_dtype(name)] += int(torch.Size(gg.shape(name)).numel())
    return counts.most_common(1)[0][0] if counts else torch.float32


def from_gguf(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    bits: int | None = None,
    group_size: int = 32,
) -> MoELM:
    """A moekit model (eval mode) from a GGUF file.

    Args:
        path: the ``.gguf`` file (one file; split GGUFs are not read).
        device: where to put the weights.
        dtype: the weights' dtype; default: the file's (F32 -> float32, BF16 -> bfloat16, F16 -> float16,
            quantised types -> float32, the values ``gguf.quants.dequantize`` gives).
        bits: 8 or 4: the experts in moekit's int8 / int4 (groups of ``group_size`` columns), quantised one
            expert at a time as they are read (see :func:`convert_from_gguf`).

    Raises:
        CheckpointError: not a GGUF file, truncated, an unsupported tensor type, tensors that do not fit.
        ConfigError: an architecture or option moekit does not implement.
    """
    return _model(GGUFFile(path), device, dtype, bits, group_size)[0]


def _model(
    gg: GGUFFile,
    device: str | torch.device,
    dtype: torch.dtype | str | None,
    bits: int | None = None,
    group_size: int = 32,
    expert_memory: str | int | None = None,
) -> tuple[MoELM, dict[str, Any] | None]:
    """The model, and with ``bits`` the quantisation spec its experts were quantised with (else None);
    ``expert_memory``: offload the experts (float types only), read from the file expert by expert."""
    try:
        raw = hf_config_from_gguf(gg)
    except MoekitError:
        raise
    except (TypeError, ValueError) as e:  # a number that is a string or a list, in a damaged or odd file
        raise CheckpointError(f"{gg.path}: malformed GGUF metadata ({e})") from None
    config = lm_config_from_hf(raw, where=str(gg.path), quiet=True)
    target = as_dtype(dtype) or default_dtype(gg)
    spec = uniform_spec(config, bits, group_size) if bits is not None else None
    offload = expert_memory is not None
    tensors = GGUFTensors(gg, raw, target, stream_experts=spec is not None, per_expert=offload)
    quantised = tensors.quantised_experts() if offload else []
    if quantised:
        raise ConfigError(
            f"--expert-memory reads float experts (F32, F16, BF16) from a GGUF, but {gg.path}'s {quantised[0]} is "
            f"{gg.type_name(quantised[0])}: convert the GGUF first, `moekit convert --from-gguf {gg.path} --bits 8|4 "
            f"--out DIR` (int8/int4 experts)"
        )
    source = tensors.expert_stacks if spec is not None else None
    model = build_model(
        config,
        tensors,
        tensors.files,
        device,
        target,
        quantization=spec,
        expert_source=source,
        expert_memory=expert_memory,
    )
    return model, spec


def load_gguf(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    expert_memory: str | int | None = None,
) -> tuple[MoELM, HFTokenizer]:
    """:func:`from_gguf` plus the file's tokenizer (written as ``tokenizer.json`` into a temporary folder that
    lives as long as the tokenizer); ``expert_memory``: keep the (float) experts in the file, at most that much of
    them resident (:mod:`moekit.nn.offload`)."""
    gg = GGUFFile(path)
    model, _ = _model(gg, device, dtype, expert_memory=expert_memory)
    folder = tempfile.mkdtemp(prefix="moekit-gguf-tok-")
    try:
        tokenizer = HFTokenizer(write_tokenizer(gg, folder))
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    weakref.finalize(tokenizer, shutil.rmtree, folder, ignore_errors=True)  # the folder goes with the tokenizer
    return model, tokenizer


def convert_from_gguf(
    source: str | os.PathLike,
    out: str | os.PathLike,
    dtype: torch.dtype | str | None = None,
    bits: int | None = None,
    group_size: int = 32,
) -> Path:
    """GGUF file -> moekit checkpoint folder (config.json + model.safetensors + tokenizer.json).

    ``bits`` (8 or 4, int4 in groups of ``group_size`` columns): the experts become moekit's int8/int4 as they
    are read, one expert's matrices at a time (dequantised from the file's type into ``dtype``, then quantised):
    the float experts never exist as a whole. ``dtype``: of the weights that stay float (default: the file's)."""
    gg = GGUFFile(source)
    model, spec = _model(gg, "cpu", dtype, bits, group_size)
    folder = save_moekit_checkpoint(model, out, None, quantization=spec)
    write_tokenizer(gg, folder)
    return folder
