"""Import and export Hugging Face checkpoints: :func:`from_hf`, :func:`to_hf`, and moekit checkpoint folders.

An HF model folder holds ``config.json`` (with ``model_type``), weights as ``model.safetensors`` or
``model.safetensors.index.json`` + shards, and tokenizer files. Weights are read and written only
through :mod:`moekit.io.safe_io`: headers are validated before any data is mapped, and pickle
checkpoints (``pytorch_model.bin``) are refused, never unpickled.

Import keeps the checkpoint's dtype (bf16 stays bf16; ``e_score_correction_bias`` stays fp32 as in
transformers) and builds the model on the meta device, so no memory is spent on a random init.
"""

from __future__ import annotations

import collections
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from moekit.data.tokenizers import TOKENIZER_FILE, HFTokenizer, Tokenizer
from moekit.errors import CheckpointError, ConfigError, DataError
from moekit.interop.hf.config_export import hf_config_from_lm, infer_family
from moekit.interop.hf.config_map import lm_config_from_hf
from moekit.interop.hf.tokenizer_export import carry_tokenizer, copy_tokenizer_files
from moekit.interop.hf.weights_map import HFTensors, hf_to_moekit, moekit_to_hf
from moekit.io.huge_pages import move_to_huge_pages
from moekit.io.safe_io import (
    INDEX_NAME,
    SHARD_FILE_RE,
    SINGLE_FILE_NAME,
    atomic_write_json,
    load_sharded,
    load_tensors,
    read_safetensors_header,
    save_sharded,
    save_tensors,
)
from moekit.models import LMConfig, MoELM
from moekit.models.dtypes import as_dtype, cast_weights
from moekit.models.materialize import materialize
from moekit.models.quantization import apply_spec, quantize_linears
from moekit.nn.expert_cache import ExpertSpans
from moekit.nn.lora import ADAPTER_FILE, load_lora, read_adapter
from moekit.nn.offload import OffloadedExperts, is_expert_weight, keep_in_file, offload_experts
from moekit.nn.quantized import ExpertStack

CONFIG_NAME = "config.json"
_PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth", "model.ckpt")
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30
PEFT_ADAPTER_FOLDER = "adapter"  # --to-hf of a LoRA fine-tune: the PEFT adapter, beside the base model's files


# ------------------------------------------------------------------------------------------------ recognising


def read_hf_config(path: str | os.PathLike) -> dict[str, Any]:
    """The ``config.json`` of an HF model folder, as a dict."""
    folder = Path(path)
    file = folder / CONFIG_NAME
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder (expected a Hugging Face model folder)")
    if not file.is_file():
        raise CheckpointError(f"{folder} has no {CONFIG_NAME}; a Hugging Face model folder needs one")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{file} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{file} must hold a JSON object")
    return data


def is_hf_checkpoint(path: str | os.PathLike) -> bool:
    """True for a folder whose config.json is a Hugging Face one (has ``model_type``, is not moekit's)."""
    file = Path(path) / CONFIG_NAME
    if not file.is_file():
        return False
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(data, dict) and "model_type" in data and data.get("format") != "moekit"


def _read_weights(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors of an HF folder plus the file each came from (safetensors only)."""
    index = folder / INDEX_NAME
    single = folder / SINGLE_FILE_NAME
    if index.is_file():
        tensors = load_sharded(index)
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]  # validated by load_sharded
        return tensors, {name: str(folder / shard) for name, shard in weight_map.items()}
    if single.is_file():
        tensors = load_tensors(single)
        return tensors, dict.fromkeys(tensors, str(single))
    for name in _PICKLE_NAMES:
        if (folder / name).is_file():
            load_tensors(folder / name)  # raises UnsafeFileError (why, and how to convert); never unpickles
    other = sorted(p.name for p in folder.glob("*.safetensors"))
    if other:
        raise CheckpointError(
            f"{folder} has {', '.join(other[:3])} but neither {SINGLE_FILE_NAME} nor {INDEX_NAME} naming the shards"
        )
    raise CheckpointError(f"{folder} holds no weights: expected {SINGLE_FILE_NAME} or {INDEX_NAME} with its shards")


def _majority_dtype(tensors: Mapping[str, torch.Tensor]) -> torch.dtype:
    counts = collections.Counter(
        t.dtype for name, t in tensors.items() if t.is_floating_point() and "e_score_correction_bias" not in name
    )
    return counts.most_common(1)[0][0] if counts else torch.float32


# ------------------------------------------------------------------------------------------------------ import


def from_hf(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    quantization: dict[str, Any] | None = None,
    expert_memory: str | int | None = None,
) -> MoELM:
    """A moekit model (eval mode) from a Hugging Face model folder.

    Args:
        path: folder with ``config.json`` and ``model.safetensors`` or ``model.safetensors.index.json`` + shards,
            in the hub's per-expert layout or transformers 5's fused one.
        device: where to put the weights.
        dtype: cast the weights to this dtype; default: keep the checkpoint's (bf16 stays bf16).
        quantization: quantise the experts while reading, layer by layer (a :mod:`moekit.models.quantization`
            spec, e.g. ``uniform_spec(config, 4, 32)``; the float experts of one layer exist at a time).
        expert_memory: bytes or a size ("4GiB"): keep the experts in the file, at most that much of them
            resident (:mod:`moekit.nn.offload`; either expert layout, in the checkpoint's own dtype).

    Returns:
        :class:`~moekit.models.MoELM` whose forward on ``input_ids`` returns an object with ``.logits``;
        its ``config.hf_config`` keeps the source config for :func:`to_hf`.

    Raises:
        ConfigError: unknown ``model_type`` or a config option moekit cannot represent (named).
        CheckpointError / UnsafeFileError: missing or corrupt files, pickle checkpoints, mismatched tensors
            (naming the file and the tensor).
    """
    folder = Path(path)
    raw = read_hf_config(folder)
    config = lm_config_from_hf(raw, where=str(folder / CONFIG_NAME))
    tensors, files = _read_weights(folder)
    model = build_model(
        config, tensors, files, device=device, dtype=dtype, quantization=quantization, expert_memory=expert_memory
    )
    model._hf_source = folder  # lets to_hf() carry the tokenizer files along
    return model


def load_hf(
    path: str | os.PathLike, device: str | torch.device = "cpu", dtype=None, expert_memory: str | int | None = None
) -> tuple[MoELM, Tokenizer | None]:
    """:func:`from_hf` plus the folder's ``tokenizer.json`` (None when it has none)."""
    model = from_hf(path, device=device, dtype=dtype, expert_memory=expert_memory)
    file = Path(path) / TOKENIZER_FILE
    return model, (HFTokenizer(file) if file.is_file() else None)


def load_for_inference(
    checkpoint: str | os.PathLike | None = None,
    hf_dir: str | os.PathLike | None = None,
    expert_memory: str | int | None = None,
    dtype: torch.dtype | str | None = None,
):
    """(model in eval mode, tokenizer) from a moekit checkpoint/run folder or, with ``hf_dir``, an HF folder
    (or a llama.cpp ``.gguf`` file); ``expert_memory``: see :func:`moekit.checkpoint.load_model`; ``dtype``: cast
    the float weights (default: as stored). What every command that runs a model loads it with."""
    if (checkpoint is None) == (hf_dir is None):
        raise ConfigError("give exactly one of a moekit checkpoint or a Hugging Face model folder")
    as_dtype(dtype)  # a bad name fails before anything is read
    if checkpoint is not None:
        from moekit.checkpoint import load_model

        return load_model(checkpoint, expert_memory=expert_memory, dtype=dtype)
    from moekit.interop.gguf import is_gguf_file, load_gguf

    assert hf_dir is not None  # exactly one of the two, checked above
    if is_gguf_file(hf_dir):
        return load_gguf(hf_dir, dtype=dtype, expert_memory=expert_memory)
    model, tokenizer = load_hf(hf_dir, dtype=dtype, expert_memory=expert_memory)
    if tokenizer is None:
        raise DataError(f"{hf_dir} has no {TOKENIZER_FILE}; moekit needs the model's tokenizer to read and write text")
    return model, tokenizer


def load_hf_for_training(path: str | os.PathLike) -> tuple[MoELM, HFTokenizer]:
    """An HF model with fp32 weights (the trainer's master weights) and the folder's tokenizer (required)."""
    model, tokenizer = load_hf(path, dtype=torch.float32)
    if tokenizer is None:
        raise DataError(
            f"{path} has no {TOKENIZER_FILE}: fine-tuning needs the tokenizer the model was trained with "
            f"(save it with `transformers.AutoTokenizer.from_pretrained(dir).save_pretrained(dir)`)"
        )
    return model, tokenizer


@torch.no_grad()
def build_model(
    config: LMConfig,
    hf_tensors: Mapping[str, torch.Tensor],
    files: dict[str, str] | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    quantization: dict[str, Any] | None = None,
    expert_source: Callable[[int], tuple[ExpertStack, ExpertStack]] | None = None,
    expert_memory: str | int | None = None,
) -> MoELM:
    """An MoELM holding HF checkpoint tensors, built without a random init (meta device, then assign).
    ``quantization`` (a :mod:`moekit.models.quantization` spec): quantise the experts as each layer is read;
    ``expert_source(layer)``: (w_in, w_out) sequences that quantising reads expert by expert instead of the
    layer's stacks (a GGUF's: then only one expert's float matrices exist at a time); ``expert_memory``: offload
    the experts (:func:`~moekit.nn.offload.offload_experts`), per-expert tensors never stacked."""
    if expert_memory is not None and quantization is not None:
        raise ConfigError("expert offload reads float experts from the file: leave out the quantisation")
    if expert_memory is not None and torch.device(device).type != "cpu":
        raise ConfigError("expert offload keeps experts in host memory: load the model on the CPU")
    dtype = as_dtype(dtype) or _majority_dtype(hf_tensors)
    with torch.device("meta"):
        model = MoELM(config)
    transform = None
    if quantization is not None:
        apply_spec(model, quantization, linears=False)  # the linears are quantised once loaded (below)

        def transform(layer: int, moe: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            pre = f"layers.{layer}.mlp.experts."
            stacks = moe.pop(pre + "w_in"), moe.pop(pre + "w_out")
            w_in, w_out = expert_source(layer) if expert_source is not None else stacks
            state = model.layers[layer].mlp.experts.state_for(w_in, w_out)  # type: ignore[union-attr, operator]
            return {**moe, **{pre + k: v for k, v in state.items()}}

    expected = {name: t.shape for name, t in model.state_dict().items()}
    source = HFTensors(hf_tensors, files or {})
    spans: dict[int, list[ExpertSpans]] | None = {} if expert_memory is not None else None
    mapped = hf_to_moekit(source, config, expected, moe_transform=transform, expert_spans=spans)
    if spans:
        _check_offload_dtype(spans, dtype, files or {})
        keep_in_file(model, spans)
    mapped = cast_weights(mapped, dtype, device)
    materialize(model, mapped, device)
    if quantization is not None:
        quantize_linears(model, quantization)
    # Experts stay where they are: stacked per-expert tensors are already in anonymous memory (moving them measured
    # no decode gain, only load time), offloaded or fused ones are views of the file.
    move_to_huge_pages(model, skip=is_expert_weight)
    if expert_memory is not None:
        offload_experts(model, expert_memory)
    return model.eval()


def _check_offload_dtype(spans: dict[int, list[ExpertSpans]], dtype: torch.dtype, files: Mapping[str, str]) -> None:
    """Offloaded experts are read as stored: the model's dtype must be theirs (else the cache's copies differ)."""
    stored = {span.dtype for layer in spans.values() for expert in layer for span in expert}
    if stored != {dtype}:
        where = ", ".join(sorted(set(files.values()))[:2]) or "the checkpoint"
        raise CheckpointError(
            f"expert offload reads the experts of {where} as stored ({', '.join(sorted(map(str, stored)))}), "
            f"not as {dtype}: load the checkpoint in its own dtype (leave out --dtype)"
        )


# ------------------------------------------------------------------------------------------------------ export


def _check_experts_held(model: MoELM) -> None:
    """Refuse to write a model whose experts are only in their source file (offloaded without stacks)."""
    if any(isinstance(m, OffloadedExperts) and not m.fused_kernel for m in model.modules()):
        raise ConfigError(
            "this model was loaded with expert_memory and keeps its experts in the source file; load it without "
            "expert_memory (--expert-memory) to write it"
        )


def _dtype_name(tensors: dict[str, torch.Tensor]) -> str | None:
    return _DTYPE_NAMES.get(_majority_dtype(tensors))


def to_hf(
    model: MoELM,
    path: str | os.PathLike,
    tokenizer: Tokenizer | str | os.PathLike | None = None,
    dtype: torch.dtype | str | None = None,
    family: str | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    family_flag: str = "family=",
) -> Path:
    """Write ``model`` as a Hugging Face model folder that transformers loads with no missing or unexpected keys.

    Args:
        model: a :class:`~moekit.models.MoELM` (imported with :func:`from_hf`, or native when a family can
            express it).
        path: output folder (created; files of an earlier export there are replaced).
        tokenizer: a moekit tokenizer (byte and char ones are written as an HF ``tokenizer.json`` +
            ``tokenizer_config.json`` that ``AutoTokenizer`` loads with the same ids), or a folder whose tokenizer
            files to carry (a moekit checkpoint's ``tokenizer.json`` is converted the same way); default: the
            folder the model was imported from, if any.
        dtype: weights' dtype; default: the model's (``e_score_correction_bias`` is always fp32).
        family: HF ``model_type``; default: the imported one, else inferred from the config.
        max_shard_bytes: above this the weights are sharded with ``model.safetensors.index.json``.
        family_flag: how the caller spells the family option, for the hint in errors (``--family`` on the CLI).

    Returns:
        The folder.

    Raises:
        ConfigError: the family cannot express the model (naming the field).
    """
    _check_experts_held(model)
    cfg = model.config
    family = family or (cfg.hf_config or {}).get("model_type") or infer_family(cfg)
    target = as_dtype(dtype)
    # Refuses what the family cannot express, before any tensor work.
    hf_config = hf_config_from_lm(cfg, family, family_flag=family_flag)
    tensors = moekit_to_hf(model.state_dict(), cfg, family)
    if target is not None:
        tensors = {
            name: t if not t.is_floating_point() or name.endswith("e_score_correction_bias") else t.to(target)
            for name, t in tensors.items()
        }
    hf_config["dtype"] = _dtype_name(tensors) or hf_config.get("dtype")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    write_hf_weights(tensors, out, max_shard_bytes)
    atomic_write_json(out / CONFIG_NAME, hf_config)
    carry_tokenizer(model, tokenizer, out)
    return out


def write_hf_weights(tensors: dict[str, torch.Tensor], out: Path, max_shard_bytes: int) -> None:
    """One ``model.safetensors`` or HF-style shards + index; removes the other layout's stale files."""
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    metadata = {"format": "pt"}  # transformers checks for it
    if total > max_shard_bytes:
        save_sharded(tensors, out, max_shard_bytes=max_shard_bytes, metadata=metadata)
        if (out / SINGLE_FILE_NAME).is_file():
            (out / SINGLE_FILE_NAME).unlink()
    else:
        save_tensors(tensors, out / SINGLE_FILE_NAME, metadata=metadata)
        for stale in out.iterdir():
            if stale.name == INDEX_NAME or SHARD_FILE_RE.match(stale.name):
                stale.unlink()


# ----------------------------------------------------------------------------------------- moekit checkpoints


def save_moekit_checkpoint(
    model: MoELM,
    folder: str | os.PathLike,
    tokenizer_source: str | os.PathLike | None,
    quantization: dict[str, Any] | None = None,
) -> Path:
    """Write a moekit checkpoint folder (config.json + model.safetensors + tokenizer files) that
    :func:`moekit.load` and ``moekit generate/eval --checkpoint`` read; ``quantization``: the spec the model's
    experts were quantised with (recorded for loading)."""
    from moekit import checkpoint as ckpt

    _check_experts_held(model)
    out = Path(folder)
    if out.exists() and any(out.iterdir()):
        if not (out / ckpt.CONFIG_FILE).is_file():
            raise CheckpointError(f"{out} exists and is not empty; choose a new --out folder")
    description: dict[str, Any] = {"model": model.config.to_dict()}
    if quantization is not None:
        description["quantization"] = quantization
    ckpt.write_model_folder(out, ckpt.model_tensors(model), description)
    if tokenizer_source is not None:
        copy_tokenizer_files(Path(tokenizer_source), out)
    return out


def checkpoint_dtype(weights_file: str | os.PathLike) -> torch.dtype | None:
    """The majority floating dtype recorded in a safetensors header (no data is read)."""
    header, _ = read_safetensors_header(weights_file)
    counts = collections.Counter(
        _SAFETENSORS_DTYPES[e["dtype"]]
        for name, e in header.items()
        if e["dtype"] in _SAFETENSORS_DTYPES and "e_score_correction_bias" not in name
    )
    return counts.most_common(1)[0][0] if counts else None


def convert_from_hf(source: str | os.PathLike, out: str | os.PathLike) -> Path:
    """HF model folder -> moekit checkpoint folder (weights keep their dtype)."""
    source = Path(source)
    model = from_hf(source)
    if not (source / TOKENIZER_FILE).is_file():
        raise DataError(
            f"{source} has no {TOKENIZER_FILE}; a moekit checkpoint needs the tokenizer. Write one with "
            f"`transformers.AutoTokenizer.from_pretrained(dir).save_pretrained(dir)` (a fast tokenizer)"
        )
    return save_moekit_checkpoint(model, out, source)


def convert_to_hf(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    dtype: torch.dtype | str | None = None,
    family: str | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    family_flag: str = "family=",
) -> Path:
    """moekit checkpoint (or run) folder -> HF model folder, in the checkpoint's dtype unless ``dtype`` is given;
    moekit's byte/char tokenizers are written in Hugging Face form. ``family_flag``: as in :func:`to_hf`."""
    from moekit import checkpoint as ckpt

    folder = ckpt.resolve_checkpoint(checkpoint)
    model, _ = ckpt.load_model(folder)  # checks the tokenizer fits the model; the folder's files are exported
    dtype = as_dtype(dtype) or checkpoint_dtype(ckpt.weights_files(folder)[0])  # one file, or EP shards
    path = to_hf(
        model,
        out,
        tokenizer=folder,
        dtype=dtype,
        family=family,
        max_shard_bytes=max_shard_bytes,
        family_flag=family_flag,
    )
    if (folder / ADAPTER_FILE).is_file():  # a `moekit finetune` LoRA checkpoint: its adapter as a PEFT folder
        from moekit.interop.hf.peft_export import write_peft_adapter

        lora, tensors = read_adapter(folder / ADAPTER_FILE)
        load_lora(model, lora, tensors)
        family = family or (model.config.hf_config or {}).get("model_type") or infer_family(model.config)
        write_peft_adapter(model, lora, path / PEFT_ADAPTER_FOLDER, family, base_model=str(path))
    return path
