"""Training on several processes: the same run as one process, with the global batch split over ranks.

:class:`ExpertParallel` is the loop's parallel hook (:mod:`moekit.train.loop`) on one rank of a (dp, ep) mesh:

* every rank builds the same model (same seed or checkpoint), then keeps its E / P experts
  (:func:`moekit.distributed.shard_model`);
* rank r takes rows ``[r*B/W, (r+1)*B/W)`` of each global batch of B windows (the loader, its state
  and therefore resume are those of one process);
* gradients are summed over the ranks holding each parameter and divided by W, and clipped by the
  global norm (:mod:`moekit.distributed.gradients`);
* the logged loss is averaged over ranks (the other metrics are global already), and so is the validation
  loss (each rank takes a share of the windows);
* checkpoints are written shard by shard (:mod:`moekit.distributed.checkpoint`);
* configs are compared across ranks at start, and failures reported with rank and step
  (:mod:`moekit.distributed.mesh`).
"""

from __future__ import annotations

import hashlib
from typing import Any, cast

import torch

import moekit
from moekit import checkpoint as ckpt
from moekit.distributed.checkpoint import save_distributed_checkpoint, shard_optimizer_tensors
from moekit.distributed.expert_parallel import expert_parameters, shard_model
from moekit.distributed.gradients import clip_grad_norm_
from moekit.distributed.mesh import DistContext, init_distributed, run_guarded
from moekit.errors import ConfigError
from moekit.train.config import TrainConfig
from moekit.train.loop import Loop, TrainResult
from moekit.train.trainer import LanguageModelTask, Trainer

# Fields that may differ between ranks (they do not change what a step computes).
_PER_RANK_FIELDS = {"threads", "progress", "tensorboard"}


def _tokens_digest(tokens: torch.Tensor) -> str:
    return hashlib.sha256(tokens.contiguous().numpy().tobytes()).hexdigest()[:16]


class ExpertParallel:
    """The loop's parallel hook on one rank of the mesh ``ctx``."""

    def __init__(self, ctx: DistContext):
        self.ctx, self.is_main, self.device = ctx, ctx.is_main, ctx.device
        self.rank, self.world_size = ctx.rank, ctx.world_size

    def prepare(self, model):
        full = dict(model.num_parameters())
        with torch.no_grad():
            self.param_digest = repr(sum(float(p.double().sum()) for p in model.parameters()))
        shard_model(model, self.ctx)
        model.num_parameters = lambda: dict(full)  # counts of the whole model (run.json), not of this shard
        self.expert_params = expert_parameters(model)
        return model.to(self.device)

    def clip(self, params, max_norm: float) -> torch.Tensor:
        return clip_grad_norm_(params, max_norm, self.expert_params, self.ctx)

    def agree(self, elapsed: float) -> float:
        # Rank 0's clock for all: ranks that read their own clocks could stop at different steps under a
        # time budget (one rank waits forever in an all-reduce) or follow different LR schedules.
        return self.ctx.broadcast_float(elapsed)

    def mean(self, value: float) -> float:
        return self.ctx.all_reduce_mean(value)  # equal slices: mean of means

    def heartbeat(self, step: int) -> None:
        self.ctx.heartbeat(step)

    def load_optimizer(self, optimizer, tensors: dict[str, torch.Tensor], model) -> None:
        ckpt.load_optimizer_tensors(optimizer, shard_optimizer_tensors(tensors, optimizer, model, self.ctx))

    def save_checkpoint(self, run_dir, step: int, model, **kwargs: Any):
        return save_distributed_checkpoint(self.ctx, run_dir, step, model, **kwargs)


def check_launch(config: TrainConfig, ctx: DistContext, resume: bool, **shared: Any) -> TrainConfig:
    """Refuse a launch whose ranks cannot run the same step (global batch not divisible, ranks' configs or the
    ``shared`` settings differing); returns the config this rank runs (reporting only on rank 0)."""
    if config.batch_size % ctx.world_size:
        raise ConfigError(
            f"batch_size={config.batch_size} is not divisible by the number of processes ({ctx.world_size}); "
            f"batch_size is the global batch and each rank takes batch_size / {ctx.world_size} rows"
        )
    if config.ema_decay and ctx.ep_size > 1:
        raise ConfigError("ema_decay is not supported with expert parallelism (ep > 1) yet")
    same = {k: v for k, v in config.to_dict().items() if k not in _PER_RANK_FIELDS}
    same.update(
        world_size=ctx.world_size, ep=ctx.ep_size, resume=resume, moekit=moekit.__version__, torch=torch.__version__
    )
    ctx.check_same("train config", {**same, **shared})
    return config if ctx.is_main else config.replace(progress=False, tensorboard=False)


def check_built(ctx: DistContext, trainer: Loop, parallel: ExpertParallel, **shared: Any) -> None:
    """Same model, same data and the same ``shared`` values on every rank (also a barrier: nobody starts before
    all are built)."""
    task = cast(LanguageModelTask, trainer.task)
    ctx.check_same(
        "model and data",
        {
            "model": trainer.model.config.to_dict(),
            "train_tokens": _tokens_digest(task.train_tokens),
            "val_tokens": _tokens_digest(task.val_tokens),
            "initial_parameters": parallel.param_digest,
            "step": trainer.step,
            **shared,
        },
    )


class DistributedTrainer(Trainer):
    """A language-model :class:`Trainer` on one rank of the mesh ``ctx``; every rank constructs one with the same
    config, whose ``batch_size`` is the global batch (the world size must divide it). ``resume`` continues a run
    saved at any EP degree, or by one process."""

    def __init__(self, config: TrainConfig, ctx: DistContext, resume: bool = False, console=None):
        self.ctx = ctx
        config = check_launch(config, ctx, resume)
        parallel = ExpertParallel(ctx)
        super().__init__(config, resume=resume, console=console, parallel=parallel)
        check_built(ctx, self, parallel)


def train_distributed(
    config: TrainConfig | dict | None = None,
    resume: bool = False,
    ep: int = 1,
    timeout: float | None = None,
    ctx: DistContext | None = None,
    **overrides: Any,
) -> TrainResult:
    """Train on every process of a torchrun-style launch; the function behind ``moekit train`` when WORLD_SIZE > 1.

    Every rank calls it with the same arguments, those of :func:`moekit.train.train` (``batch_size`` is the global
    batch) plus the expert-parallel degree ``ep`` (it divides the number of processes and every layer's
    num_experts), the collective ``timeout`` (default 300 s) and ``ctx``, a mesh to use instead of joining the
    environment's. Returns the TrainResult (the same on every rank); a DistributedError names the rank and step
    that failed.
    """
    base = config.to_dict() if isinstance(config, TrainConfig) else dict(config or {})
    cfg = TrainConfig.from_options({**base, **overrides})
    own = ctx is None
    ctx = ctx or init_distributed(ep=ep, timeout=timeout)
    result = run_guarded(ctx, lambda: DistributedTrainer(cfg, ctx, resume=resume).run())
    if own:
        ctx.close()
    return result
