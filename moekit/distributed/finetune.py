"""Data-parallel fine-tuning: ``torchrun --nproc-per-node N -m moekit finetune ...`` (:mod:`moekit.recipes.finetune`).

Every rank builds the same fine-tuning run (same checkpoint, same ESFT selection, adapters drawn from the same
seed), takes rows ``[r*B/N, (r+1)*B/N)`` of each global batch and averages the gradients over the ranks, as a
``moekit train`` run does (:mod:`moekit.distributed.trainer`). Only what trains has a gradient: frozen weights
(the base under LoRA, the unselected experts under ESFT) have none, so the all-reduce carries the adapters, the
selected experts and the routers only. At every checkpoint the ranks compare a digest of what trains, so
adapters or experts that drifted apart stop the run instead of being saved; rank 0 writes the checkpoint in the
one-process fine-tuning format, so a run resumes on any number of ranks.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moekit import checkpoint as ckpt
from moekit.distributed.collectives import barrier
from moekit.distributed.mesh import DistContext, init_distributed, run_guarded
from moekit.distributed.trainer import ExpertParallel, check_built, check_launch
from moekit.recipes.finetune import FinetuneConfig, FinetuneTrainer, save_finetune_checkpoint
from moekit.train.config import TrainConfig
from moekit.train.loop import TrainResult


def trained_digest(model: nn.Module) -> str:
    """A hash of the bytes of every parameter that trains (identical on ranks in sync)."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        if p.requires_grad:
            h.update(name.encode())
            h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


class FinetuneParallel(ExpertParallel):
    """The loop's parallel hook of a fine-tuning rank (data parallel: ep = 1)."""

    def __init__(self, ctx: DistContext, finetune: FinetuneConfig):
        super().__init__(ctx)
        self.finetune = finetune

    def save_checkpoint(self, run_dir, step: int, model, **kwargs: Any) -> Path:
        self.ctx.check_same(f"trained weights at step {step}", {"digest": trained_digest(model)})
        if self.is_main:
            save_finetune_checkpoint(Path(run_dir), step, model, self.finetune, **kwargs)
        barrier()
        return Path(run_dir) / ckpt.CHECKPOINTS / f"step-{step:06d}"


def finetune_distributed(
    config: TrainConfig,
    finetune: FinetuneConfig,
    resume: bool = False,
    timeout: float | None = None,
    ctx: DistContext | None = None,
) -> TrainResult:
    """Fine-tune on every rank of a torchrun-style launch (``config.batch_size`` is the global batch); the function
    behind ``moekit finetune`` when WORLD_SIZE > 1. Returns the TrainResult (the same on every rank)."""
    own = ctx is None
    ctx = ctx or init_distributed(ep=1, timeout=timeout)

    def build_and_run() -> TrainResult:
        cfg = check_launch(config, ctx, resume, finetune=finetune.to_dict())
        parallel = FinetuneParallel(ctx, finetune)
        trainer = FinetuneTrainer(cfg, finetune, resume=resume, parallel=parallel)
        check_built(ctx, trainer, parallel, selection=trainer.chosen.get("selection"))
        return trainer.run()

    result = run_guarded(ctx, build_and_run)
    if own:
        ctx.close()
    return result
