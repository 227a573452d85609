"""Checkpoints: safetensors weights + JSON config/tokenizer/trainer state + optimizer and RNG state.

Layout of a run folder (every kind of run: a language model's ``config.json`` holds ``{"model": LMConfig}``,
a task's its description, e.g. ``{"task": "classify", "encoder": ...}``)::

    run/
      run.json  metrics.jsonl  tb/    the run's config and model; one JSON record per log / evaluation
      checkpoints/
        latest                  name of the newest complete checkpoint (written atomically)
        step-000500/            one checkpoint: written as .tmp-*, fsynced, then renamed
          config.json  model.safetensors  tokenizer.json  trainer_state.json  optimizer.safetensors
          trained.safetensors   with an EMA: model.safetensors is the average, this the weights as trained

Task runs of the older layout (``run/checkpoint-00000100/``: ``model``/``optimizer``/``ema.safetensors`` +
``state.json``) are found and read by :func:`find_checkpoint` and :func:`read_trainer_state`; resumed, they
write this layout. An expert-parallel run over P ranks (:mod:`moekit.distributed`) writes one shard per rank
(``model-ep{r}-of-{P}.safetensors``: rank r's experts, + on rank 0 the rest; ``optimizer-ep{r}-of-{P}``) and
``model-ep.index.json`` (the files; which tensors split along dim 0): :func:`read_model_tensors` and
:func:`read_optimizer_tensors` merge them into the single-file content, so every reader sees one format.

A kill at any moment leaves the previous checkpoint intact: a checkpoint folder only gets its final name
once every file in it is on disk, and ``latest`` is replaced atomically after that. No pickle anywhere.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moekit.data.tokenizers import Tokenizer, load_tokenizer
from moekit.errors import CheckpointError, ConfigError
from moekit.io.atomic import atomic_write_json, atomic_write_text, fsync_tree
from moekit.io.huge_pages import move_to_huge_pages
from moekit.io.safe_io import load_tensors, save_tensors
from moekit.models import LMConfig, MoELM
from moekit.models.dtypes import as_dtype, cast_weights
from moekit.models.materialize import materialize
from moekit.models.quantization import apply_spec
from moekit.models.resolve import upgrade_saved
from moekit.nn.offload import is_expert_weight, offload_experts
from moekit.nn.quantized import is_quantized_tensor

FORMAT = "moekit"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
EP_INDEX_FILE = "model-ep.index.json"
TRAINED_FILE = "trained.safetensors"
CHECKPOINTS = "checkpoints"
LATEST = "latest"
# The task-run layout before one format: run/checkpoint-00000100/{model,optimizer,ema}.safetensors + state.json.
OLD_TASK_PREFIX, OLD_TASK_STATE, OLD_TASK_EMA = "checkpoint-", "state.json", "ema.safetensors"
# Settings a resumed run may change: how long it runs and how it reports, not what a step computes.
RESUMABLE_CHANGES = frozenset(
    {"max_steps", "time_budget", "eval_interval", "eval_batches", "log_interval", "checkpoint_interval",
     "checkpoint_every", "keep_checkpoints", "threads", "out_dir", "tensorboard", "progress"}
)  # fmt: skip


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with tied duplicates dropped (safetensors stores shared memory once)."""
    seen: dict[int, str] = {}
    out = {}
    for name, tensor in model.state_dict().items():
        ptr = tensor.untyped_storage().data_ptr()
        if tensor.numel() and ptr in seen:
            continue
        seen[ptr] = name
        out[name] = tensor
    return out


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Optimizer state as flat named tensors (``state.<param index>.<key>``) plus the torch RNG."""
    out = {"rng.torch": torch.get_rng_state()}
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            out[f"state.{index}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return out


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    """Inverse of :func:`optimizer_tensors`; also restores the torch RNG."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        if name == "rng.torch":
            continue
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = value
    full = optimizer.state_dict()
    full["state"] = state
    optimizer.load_state_dict(full)
    if "rng.torch" in tensors:
        torch.set_rng_state(tensors["rng.torch"])


def write_model_folder(
    folder: str | os.PathLike, tensors: dict[str, torch.Tensor] | None, description: dict[str, Any], tokenizer=None
) -> Path:
    """Write a model folder: ``model.safetensors`` (unless ``tensors`` is None: expert-parallel shards),
    ``config.json`` (format, version and ``description``, e.g. ``{"model": LMConfig dict}``) and the tokenizer's
    files when given."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    if tensors is not None:
        save_tensors(tensors, out / WEIGHTS_FILE, metadata={"format": FORMAT})
    atomic_write_json(out / CONFIG_FILE, {"format": FORMAT, "version": FORMAT_VERSION, **description})
    if tokenizer is not None:
        tokenizer.save(out)
    return out


def begin_checkpoint(run_dir: str | os.PathLike, step: int, tag: str = "") -> tuple[Path, Path]:
    """(temporary folder to write checkpoint ``step`` into, its final name); see :func:`commit_checkpoint`."""
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-{final.name}-{tag or os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp, final


def commit_checkpoint(tmp: Path, final: Path, state: dict[str, Any], keep: int) -> Path:
    """Write the trainer state, fsync, rename ``tmp`` to ``final``, point ``latest`` at it, prune old ones."""
    atomic_write_json(tmp / STATE_FILE, state)
    fsync_tree(tmp)
    if final.exists():  # re-saving the same step (e.g. the final save after a periodic one)
        shutil.rmtree(final)
    os.rename(tmp, final)
    root = final.parent
    atomic_write_text(root / LATEST, final.name + "\n")
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in [*root.glob(".tmp-*"), *root.parent.glob(f".tmp-{OLD_TASK_PREFIX}*")]:  # left by a killed run
        shutil.rmtree(stale, ignore_errors=True)
    return final


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    model: nn.Module,
    tokenizer=None,
    optimizer: torch.optim.Optimizer | None = None,
    trainer_state: dict[str, Any] | None = None,
    keep: int = 2,
    description: dict[str, Any] | None = None,
    extra: dict[str, dict[str, torch.Tensor]] | None = None,
) -> Path:
    """Write ``run_dir/checkpoints/step-XXXXXX`` atomically and point ``latest`` at it.

    Args:
        description: what ``config.json`` says besides the format (default: ``{"model": model.config}``).
        extra: more safetensors files by name (``trained.safetensors`` under an EMA).

    Returns:
        The checkpoint folder.
    """
    tmp, final = begin_checkpoint(run_dir, step)
    if description is None:  # a language model: its LMConfig
        description = {"model": typing.cast(MoELM, model).config.to_dict()}
    write_model_folder(tmp, model_tensors(model), description, tokenizer)
    if optimizer is not None:
        save_tensors(optimizer_tensors(optimizer), tmp / OPTIMIZER_FILE)
    for name, tensors in (extra or {}).items():
        save_tensors(tensors, tmp / name)
    return commit_checkpoint(tmp, final, {"step": step, **(trainer_state or {})}, keep)


def find_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of a run folder (either layout), or None."""
    try:
        return resolve_checkpoint(run_dir)
    except CheckpointError:
        pass
    old = [p for p in Path(run_dir).glob(f"{OLD_TASK_PREFIX}*") if p.name[len(OLD_TASK_PREFIX) :].isdigit()]
    return max(old, key=lambda p: int(p.name[len(OLD_TASK_PREFIX) :]), default=None)


def has_weights(folder: Path) -> bool:
    """Whether ``folder`` holds model weights: ``model.safetensors`` or an expert-parallel index."""
    return (folder / WEIGHTS_FILE).is_file() or (folder / EP_INDEX_FILE).is_file()


def _read_ep_index(ckpt: Path) -> dict[str, Any]:
    file = ckpt / EP_INDEX_FILE
    try:
        index = json.loads(file.read_text())
        files, split = list(index["files"]), set(index["expert_tensors"])
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{file} is not a valid expert-parallel index: {e}") from None
    if index.get("ep_size") != len(files) or not files:
        raise CheckpointError(f"{file}: ep_size={index.get('ep_size')} but it lists {len(files)} files")
    index["expert_tensors"] = split
    return index


def _merge_ep_shards(ckpt: Path, files: list[str], split: set[str]) -> dict[str, torch.Tensor]:
    """Tensors of ``files`` (one per EP rank, in rank order): ``split`` ones concatenated along dim 0,
    the others from the first file."""
    shards = []
    for name in files:
        if not (ckpt / name).is_file():
            raise CheckpointError(f"{ckpt / name} is missing: the expert-parallel checkpoint is incomplete")
        shards.append(load_tensors(ckpt / name))
    out = {k: v for k, v in shards[0].items() if k not in split}
    for r, shard in enumerate(shards):
        extra = sorted(set(shard) - split) if r else []
        missing = sorted(split - set(shard))
        if extra or missing:
            raise CheckpointError(
                f"{ckpt / files[r]} does not match {EP_INDEX_FILE}: missing {missing[:5]}, unexpected {extra[:5]}"
            )
    for k in sorted(split):
        out[k] = torch.cat([shard[k] for shard in shards], dim=0)
    return out


def weights_files(checkpoint: str | os.PathLike) -> list[Path]:
    """The safetensors files of a checkpoint's model: ``model.safetensors``, or the expert-parallel shards in
    rank order (rank 0's holds every non-expert tensor)."""
    ckpt = resolve_checkpoint(checkpoint)
    if (ckpt / WEIGHTS_FILE).is_file():
        return [ckpt / WEIGHTS_FILE]
    return [ckpt / name for name in _read_ep_index(ckpt)["files"]]


def read_model_tensors(checkpoint: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The model tensors of a checkpoint, merged from expert-parallel shards when it has them."""
    ckpt = resolve_checkpoint(checkpoint)
    if (ckpt / WEIGHTS_FILE).is_file():
        return load_tensors(ckpt / WEIGHTS_FILE)
    index = _read_ep_index(ckpt)
    return _merge_ep_shards(ckpt, index["files"], index["expert_tensors"])


def read_optimizer_tensors(checkpoint: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The optimizer tensors of a checkpoint (see :func:`optimizer_tensors`), merged like the model's."""
    ckpt = Path(checkpoint)
    if not (ckpt / OPTIMIZER_FILE).is_file():
        ckpt = resolve_checkpoint(ckpt)
    if (ckpt / OPTIMIZER_FILE).is_file():
        return load_tensors(ckpt / OPTIMIZER_FILE)
    if (ckpt / EP_INDEX_FILE).is_file():
        index = _read_ep_index(ckpt)
        files = index.get("optimizer_files")
        if files:
            return _merge_ep_shards(ckpt, files, set(index.get("optimizer_expert_tensors", [])))
    raise CheckpointError(f"{ckpt / OPTIMIZER_FILE} is missing: this checkpoint cannot be resumed")


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint folder from a checkpoint folder, a run folder, or a run's ``checkpoints`` folder."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"no checkpoint at {p}: the path does not exist")
    if (p / CONFIG_FILE).is_file() and has_weights(p):
        return p
    root = p / CHECKPOINTS if (p / CHECKPOINTS).is_dir() else p
    latest = root / LATEST
    if latest.is_file():
        candidate = root / latest.read_text().strip()
        if has_weights(candidate):
            return candidate
    steps = sorted(q for q in root.glob("step-*") if has_weights(q))
    if steps:
        return steps[-1]
    raise CheckpointError(f"no checkpoint in {p}: expected {CONFIG_FILE} + {WEIGHTS_FILE}, or a run folder")


def read_model_config(checkpoint: str | os.PathLike) -> LMConfig:
    """The LMConfig stored in a checkpoint's config.json."""
    ckpt = resolve_checkpoint(checkpoint)
    file = ckpt / CONFIG_FILE
    try:
        data = json.loads(file.read_text())
    except ValueError as e:
        raise CheckpointError(f"{file} is not valid JSON: {e}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or "model" not in data:
        raise CheckpointError(f"{file} is not a moekit checkpoint config (need format='moekit' and 'model')")
    version = data.get("version", FORMAT_VERSION)
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= FORMAT_VERSION:
        raise CheckpointError(
            f"{file} has checkpoint format version {version!r}; this moekit reads versions 1 to {FORMAT_VERSION} "
            "(a newer moekit wrote it?)"
        )
    return LMConfig.from_dict(data["model"])


def load_model(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    expert_memory: str | int | None = None,
    dtype: torch.dtype | str | None = None,
) -> tuple[MoELM, Tokenizer]:
    """Model (eval mode) and tokenizer from a checkpoint or run folder; ``expert_memory`` (bytes or "4GiB"):
    keep the experts in the file, at most that much of them resident (:mod:`moekit.nn.offload`); ``dtype``:
    cast the float weights (default: as stored; :func:`~moekit.models.dtypes.cast_weights`)."""
    target = as_dtype(dtype)
    ckpt = resolve_checkpoint(path)
    with torch.device("meta"):  # no memory and no random init: the loaded tensors become the parameters
        model = MoELM(read_model_config(ckpt))
    quantization = json.loads((ckpt / CONFIG_FILE).read_text()).get("quantization")
    if quantization is not None:  # written by `moekit quantize`: the experts are stored quantised
        apply_spec(model, quantization)
    # Offloaded experts are checked for NaN where they are read: checking them here would read them all.
    lazy = is_expert_weight if expert_memory is not None else None
    single = (ckpt / WEIGHTS_FILE).is_file()
    tensors = load_tensors(ckpt / WEIGHTS_FILE) if single else read_model_tensors(ckpt)  # else expert-parallel shards
    if target is not None:
        if lazy is not None and any(lazy(n) and t.dtype != target for n, t in tensors.items()):
            raise ConfigError(
                f"expert offload reads the experts from {ckpt} as stored; leave out dtype={dtype!r} (--dtype) "
                "or write the checkpoint in that dtype first"
            )
        tensors = cast_weights(tensors, target)
    source = ckpt / (WEIGHTS_FILE if single else EP_INDEX_FILE)
    load_tensors_into(model, tensors, source, assign=True, unread=lazy if single else None)
    tokenizer = load_tokenizer(ckpt)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise CheckpointError(
            f"{ckpt}: tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
            f"{model.config.vocab_size}"
        )
    model = model.to(device).eval()
    move_to_huge_pages(model, skip=lazy)  # offloaded experts stay views of the file
    if expert_memory is not None:
        offload_experts(model, expert_memory)
    return model, tokenizer


def load_weights_into(model: nn.Module, weights_file: str | os.PathLike) -> None:
    """Load a safetensors file into ``model``, naming missing, unexpected and mis-shaped tensors."""
    load_tensors_into(model, load_tensors(weights_file), weights_file)


def load_tensors_into(
    model: nn.Module,
    tensors: dict[str, torch.Tensor],
    weights_file: str | os.PathLike,
    assign: bool = False,
    unread: Callable[[str], bool] | None = None,
) -> None:
    """Load ``tensors`` (read from ``weights_file``) into ``model``, naming missing, unexpected and
    mis-shaped tensors; ``assign``: make them the parameters of a model built on the meta device;
    ``unread(name)``: tensors whose values are not checked here (not to read them)."""
    expected = model.state_dict()
    tied = set(expected) - set(model_tensors(model))
    missing = sorted(set(expected) - set(tensors) - tied)
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{weights_file} does not match the model: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    counts = collections.Counter(t.dtype for t in tensors.values() if t.is_floating_point())
    dtype = counts.most_common(1)[0][0] if counts else None
    for name, tensor in tensors.items():
        # moekit writes one dtype, but float32 where precision matters (a router's bias); others were altered
        if tensor.is_floating_point() and not is_quantized_tensor(name) and tensor.dtype not in (dtype, torch.float32):
            raise CheckpointError(f"{weights_file}: tensor {name!r} is {tensor.dtype} among {dtype} tensors")
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise CheckpointError(
                f"{weights_file}: tensor {name!r} has shape {tuple(tensor.shape)} but the model expects "
                f"{tuple(expected[name].shape)}"
            )
        # A sum is finite iff every term is (barring an overflow, which the exact count below rules out);
        # it reads the tensor once without an elementwise temporary (isfinite's is as large as the tensor).
        if tensor.is_floating_point() and not (unread and unread(name)) and not bool(torch.isfinite(tensor.sum())):
            bad = int((~torch.isfinite(tensor)).sum())
            if bad:
                raise CheckpointError(f"{weights_file}: tensor {name!r} holds {bad} NaN or infinite values")
    if assign:
        materialize(model, tensors)
    else:
        model.load_state_dict(tensors, strict=False)


def read_trainer_state(checkpoint: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint's trainer state; an old-layout task checkpoint's ``state.json`` in today's keys."""
    folder = Path(checkpoint)
    if (folder / OLD_TASK_STATE).is_file() and folder.name.startswith(OLD_TASK_PREFIX):
        try:
            state = json.loads((folder / OLD_TASK_STATE).read_text(encoding="utf-8"))
            config = state.pop("config")
            return {**state, "train_config": config, "loader": {"drawn": int(state["step"])}}
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{folder / OLD_TASK_STATE}: not a readable checkpoint state ({e})") from None
    file = resolve_checkpoint(checkpoint) / STATE_FILE
    if not file.is_file():
        raise CheckpointError(f"{file} is missing: this checkpoint cannot be resumed")
    return json.loads(file.read_text())


def saved_train_config(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The settings a run's latest checkpoint was trained with: what ``--resume`` starts from, before the
    options given with it (only :data:`RESUMABLE_CHANGES` may differ)."""
    found = find_checkpoint(Path(run_dir)) if Path(run_dir).is_dir() else None
    if found is None:
        raise CheckpointError(f"cannot resume: {run_dir} holds no checkpoint to resume from")
    config = read_trainer_state(found).get("train_config")
    if not isinstance(config, dict):
        raise CheckpointError(f"{found}: its trainer state records no training settings to resume with")
    return config


def check_resumable(saved: dict[str, Any], now: dict[str, Any], defaults: dict[str, Any], run_dir: Path) -> None:
    """ConfigError naming the first setting outside :data:`RESUMABLE_CHANGES` that differs from the saved run's
    (a setting the run predates counts as its default)."""
    for key in sorted(set(saved) | set(now)):
        before = saved.get(key, defaults.get(key))
        if key == "model_overrides" and isinstance(before, dict):
            before = upgrade_saved(before)  # old task runs spelt the MoE knobs flat
        if key not in RESUMABLE_CHANGES and before != now.get(key):
            raise ConfigError(
                f"--resume: {key}={now.get(key)!r} differs from the run in {run_dir} ({key}={before!r}); "
                f"only {', '.join(sorted(RESUMABLE_CHANGES))} may change"
            )


def check_same_description(path: Path, meta: dict[str, Any], upgrade: Callable[[dict], dict] | None = None) -> None:
    """On resume: the model description rebuilt from the data and settings must be the one the run saved
    (read in today's spelling by ``upgrade``, when given)."""
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        saved = upgrade(saved) if upgrade else saved
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read the run's model description ({e})") from None
    meta = json.loads(json.dumps(meta))
    if saved != meta:
        differ = sorted(k for k in set(saved) | set(meta) if saved.get(k) != meta.get(k))
        raise CheckpointError(
            f"--resume: the model built from this data and these settings differs from the run in {path.parent} "
            f"(in {', '.join(differ)}); resume with the data and settings the run started with"
        )
