"""Checkpoints of a distributed run: each rank writes only its shard, into one atomic checkpoint folder.

With expert parallelism (P > 1), ranks 0..P-1 (dp_rank 0: one copy of every expert) each write
``model-ep{r}-of-{P}.safetensors`` and ``optimizer-ep{r}-of-{P}.safetensors`` holding their experts'
slices; rank 0's files also hold every replicated tensor (and the torch RNG state). Rank 0 then writes
config, tokenizer, trainer state and ``model-ep.index.json``, fsyncs and renames the folder, exactly as
:func:`moekit.checkpoint.save_checkpoint` does, so a kill mid-save leaves the previous
checkpoint intact. The folder is shared: on several nodes ``--out`` must be on a shared file system.

Without expert parallelism every rank holds the whole model; rank 0 writes the single-process format.

Reading (:func:`moekit.checkpoint.read_model_tensors`) merges the shards into the single-process
tensors, so a checkpoint saved at one EP degree loads at any other, or in one process.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moekit import checkpoint as ckpt
from moekit.distributed.collectives import barrier
from moekit.distributed.expert_parallel import expert_parameters
from moekit.distributed.mesh import DistContext
from moekit.errors import CheckpointError
from moekit.io.atomic import atomic_write_json, fsync_file
from moekit.io.safe_io import save_tensors


def optimizer_params(optimizer: torch.optim.Optimizer) -> list[nn.Parameter]:
    """Parameters in the order of the optimizer state's integer keys."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def sharded_optimizer_names(
    tensors: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer, expert_params: list[nn.Parameter]
) -> list[str]:
    """Names of optimizer tensors (``state.<i>.<key>``) that are per-element state of an expert weight."""
    params = optimizer_params(optimizer)
    ids = {id(p) for p in expert_params}
    out = []
    for name, t in tensors.items():
        if not name.startswith("state."):
            continue
        p = params[int(name.split(".")[1])]
        if id(p) in ids and t.dim() == p.dim():
            out.append(name)
    return out


def shard_optimizer_tensors(
    tensors: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer, model: nn.Module, ctx: DistContext
) -> dict[str, torch.Tensor]:
    """This rank's slice of full (single-process layout) optimizer tensors, for a sharded ``model``."""
    if ctx.ep_size == 1:
        return tensors
    params = optimizer_params(optimizer)
    out = dict(tensors)
    for name in sharded_optimizer_names(tensors, optimizer, expert_parameters(model)):
        t, n = tensors[name], params[int(name.split(".")[1])].shape[0]
        if t.shape[0] != n * ctx.ep_size:
            raise CheckpointError(
                f"optimizer tensor {name!r} has {t.shape[0]} experts; expected {n * ctx.ep_size} to shard over "
                f"ep={ctx.ep_size}"
            )
        out[name] = t[ctx.ep_rank * n : (ctx.ep_rank + 1) * n].clone()
    return out


def save_distributed_checkpoint(
    ctx: DistContext,
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
    """Collective: every rank calls it with :func:`moekit.checkpoint.save_checkpoint`'s arguments; returns the
    checkpoint folder (on every rank)."""
    final = Path(run_dir) / ckpt.CHECKPOINTS / f"step-{step:06d}"
    if ctx.ep_size == 1:
        if ctx.is_main:
            ckpt.save_checkpoint(
                run_dir, step, model, tokenizer, optimizer, trainer_state, keep, description=description, extra=extra
            )
        barrier()
        return final

    P, r = ctx.ep_size, ctx.ep_rank
    if ctx.is_main:
        ckpt.begin_checkpoint(run_dir, step, tag="ep")
    barrier()
    tmp = final.parent / f".tmp-{final.name}-ep"

    expert = expert_parameters(model)
    expert_ids = {id(p) for p in expert}
    expert_names = [n for n, p in model.named_parameters() if id(p) in expert_ids]
    weight_files = [f"model-ep{j}-of-{P}.safetensors" for j in range(P)]
    optimizer_files = [f"optimizer-ep{j}-of-{P}.safetensors" for j in range(P)] if optimizer is not None else []
    opt_split: list[str] = []
    if ctx.dp_rank == 0:  # one copy of every expert: the first row of the mesh
        tensors = ckpt.model_tensors(model)
        if not ctx.is_main:
            tensors = {k: v for k, v in tensors.items() if k in expert_names}
        meta = {"format": ckpt.FORMAT, "ep_rank": str(r), "ep_size": str(P)}
        save_tensors(tensors, tmp / weight_files[r], metadata=meta)
        fsync_file(tmp / weight_files[r])
        if optimizer is not None:
            opt = ckpt.optimizer_tensors(optimizer)
            opt_split = sharded_optimizer_names(opt, optimizer, expert)
            if not ctx.is_main:
                opt = {k: v for k, v in opt.items() if k in opt_split}
            save_tensors(opt, tmp / optimizer_files[r], metadata=meta)
            fsync_file(tmp / optimizer_files[r])
    barrier()

    if ctx.is_main:
        description = description or {"model": model.config.to_dict()}
        atomic_write_json(
            tmp / ckpt.CONFIG_FILE, {"format": ckpt.FORMAT, "version": ckpt.FORMAT_VERSION, **description}
        )
        if tokenizer is not None:
            tokenizer.save(tmp)
        index = {
            "format": "moekit-ep",
            "version": 1,
            "ep_size": P,
            "files": weight_files,
            "expert_tensors": expert_names,
            "optimizer_files": optimizer_files,
            "optimizer_expert_tensors": opt_split,
        }
        atomic_write_json(tmp / ckpt.EP_INDEX_FILE, index)
        ckpt.commit_checkpoint(tmp, final, {"step": step, **(trainer_state or {})}, keep)
    barrier()
    return final
