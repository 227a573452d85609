"""The trainer on several processes: the same run as one process, with the global batch split over ranks.

``DistributedTrainer`` is :class:`moekit.train.Trainer` with:

* every rank building the same model (same seed or checkpoint), then keeping its E / P experts
  (:func:`moekit.distributed.shard_model`);
* rank r taking rows ``[r*B/W, (r+1)*B/W)`` of each global batch of B windows (the loader, its state
  and therefore resume are those of one process);
* gradients summed over the ranks holding each parameter and divided by W, and clipping by the
  global norm (:mod:`moekit.distributed.gradients`);
* the logged loss averaged over ranks (the other metrics are global already);
* validation windows split over ranks, the loss averaged;
* checkpoints written shard by shard (:mod:`moekit.distributed.checkpoint`);
* configs compared across ranks at start, and failures reported with rank and step
  (:mod:`moekit.distributed.mesh`).
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import torch

import moekit
from moekit import checkpoint as ckpt
from moekit.data.loader import TokenDataset
from moekit.distributed.checkpoint import save_distributed_checkpoint, shard_optimizer_tensors
from moekit.distributed.expert_parallel import expert_parameters, shard_model
from moekit.distributed.gradients import clip_grad_norm_
from moekit.distributed.mesh import DistContext, init_distributed, run_guarded
from moekit.errors import ConfigError
from moekit.models import MoELM
from moekit.train.config import TrainConfig, apply_overrides
from moekit.train.trainer import Trainer, TrainResult

# Fields that may differ between ranks (they do not change what a step computes).
_PER_RANK_FIELDS = {"threads", "progress", "tensorboard"}


class ShardedLoader:
    """Rank r's rows of every global batch of a :class:`TokenLoader` (state: the global loader's)."""

    def __init__(self, loader, rank: int, world_size: int):
        if loader.batch_size % world_size:
            raise ConfigError(
                f"batch_size={loader.batch_size} is not divisible by the number of processes ({world_size}); "
                f"each rank takes batch_size / {world_size} rows of every global batch"
            )
        self.loader, self.rank, self.world_size = loader, rank, world_size

    def next_batch(self):
        x, y = self.loader.next_batch()
        b = x.shape[0] // self.world_size
        rows = slice(self.rank * b, (self.rank + 1) * b)
        return x[rows], y[rows]

    def __next__(self):
        return self.next_batch()

    def __iter__(self):
        return self

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state)

    def __getattr__(self, name: str):
        return getattr(self.loader, name)


def _tokens_digest(tokens: torch.Tensor) -> str:
    return hashlib.sha256(tokens.contiguous().numpy().tobytes()).hexdigest()[:16]


class DistributedTrainer(Trainer):
    """A :class:`Trainer` on one rank of a (dp, ep) mesh; every rank constructs one with the same config.

    Args:
        config: the run's TrainConfig (``batch_size`` is the global batch; it must divide by the world size).
        ctx: the mesh from :func:`moekit.distributed.init_distributed`.
        resume: continue the run in ``config.out_dir`` (saved at any EP degree, or by one process).
    """

    def __init__(self, config: TrainConfig, ctx: DistContext, resume: bool = False, console=None):
        self.ctx = ctx
        self.is_main = ctx.is_main
        self.device = ctx.device
        if config.batch_size % ctx.world_size:
            raise ConfigError(
                f"batch_size={config.batch_size} is not divisible by the number of processes ({ctx.world_size}); "
                f"batch_size is the global batch and each rank takes batch_size / {ctx.world_size} rows"
            )
        shared = {k: v for k, v in config.to_dict().items() if k not in _PER_RANK_FIELDS}
        shared.update(
            world_size=ctx.world_size, ep=ctx.ep_size, resume=resume, moekit=moekit.__version__, torch=torch.__version__
        )
        ctx.check_same("train config", shared)
        if not ctx.is_main:
            config = config.replace(progress=False, tensorboard=False)
        super().__init__(config, resume=resume, console=console)
        if ctx.device.type != "cpu":
            self.loader.device = ctx.device
        self.loader = ShardedLoader(self.loader, ctx.rank, ctx.world_size)
        # Same model, same data on every rank (also a barrier: nobody starts before all are built).
        ctx.check_same(
            "model and data",
            {
                "model": self.model.config.to_dict(),
                "train_tokens": _tokens_digest(self.train_tokens),
                "val_tokens": _tokens_digest(self.val_tokens),
                "initial_parameters": self._param_digest,
                "step": self.step,
            },
        )

    # -- hooks of Trainer ---------------------------------------------------------------------------------
    def prepare_model(self, model: MoELM) -> MoELM:
        full = dict(model.num_parameters())
        with torch.no_grad():
            self._param_digest = repr(sum(float(p.double().sum()) for p in model.parameters()))
        shard_model(model, self.ctx)
        # Counts of the whole model (run.json), not of this rank's shard.
        model.num_parameters = lambda: dict(full)
        self._expert_params = expert_parameters(model)
        return model.to(self.device)

    def clip_gradients(self, params: list[torch.nn.Parameter]) -> torch.Tensor:
        max_norm = self.config.grad_clip if self.config.grad_clip > 0 else math.inf
        return clip_grad_norm_(params, max_norm, self._expert_params, self.ctx)

    def _restore(self, source) -> None:
        state = ckpt.read_trainer_state(source)
        full = ckpt.read_optimizer_tensors(source)
        ckpt.load_optimizer_tensors(self.optimizer, shard_optimizer_tensors(full, self.optimizer, self.model, self.ctx))
        self.loader.load_state_dict(state["loader"])
        self.step = int(state["step"])
        self.elapsed_before = float(state.get("elapsed", 0.0))

    def run(self) -> TrainResult:
        try:
            return super().run()
        except BaseException:
            self.ctx.step = self.step  # the step in progress, for the error report
            raise

    def agreed_elapsed(self, elapsed: float) -> float:
        # Rank 0's clock for all: ranks that read their own clocks could stop at different steps under a
        # time budget (one rank waits forever in an all-reduce) or follow different LR schedules.
        return self.ctx.broadcast_float(elapsed)

    def train_step(self, progress: float) -> dict[str, Any]:
        self.ctx.heartbeat(self.step)
        record = super().train_step(progress)
        record["loss"] = self.ctx.all_reduce_mean(record["loss"])  # equal slices: mean of means
        return record

    @torch.no_grad()
    def evaluate(self, max_batches: int | None = None) -> float:
        """Validation loss: each rank takes an equal share of the windows (a remainder of fewer than W
        windows is left out), the per-rank means are averaged."""
        cfg, W = self.config, self.ctx.world_size
        n_windows = len(TokenDataset(self.val_tokens, cfg.block_size))
        n_windows = min(n_windows, (max_batches or cfg.eval_batches) * cfg.batch_size)
        per_rank = n_windows // W
        if per_rank == 0:  # fewer windows than ranks: every rank evaluates all of them
            return super().evaluate(max_batches)
        b = cfg.batch_size // W
        full = self.val_tokens
        lo = self.ctx.rank * per_rank * cfg.block_size
        self.val_tokens = full[lo : lo + per_rank * cfg.block_size + 1]
        self.config = cfg.replace(batch_size=b)
        try:
            val = super().evaluate(max_batches=math.ceil(per_rank / b))
        finally:
            self.val_tokens, self.config = full, cfg
        return self.ctx.all_reduce_mean(val)

    def save(self, elapsed: float):
        state = {"loader": self.loader.state_dict(), "elapsed": elapsed, "train_config": self.config.to_dict()}
        return save_distributed_checkpoint(
            self.ctx,
            self.run_dir,
            self.step,
            self.model,
            self.tokenizer,
            self.optimizer,
            state,
            keep=self.config.keep_checkpoints,
        )


def train_distributed(
    config: TrainConfig | dict | None = None,
    resume: bool = False,
    ep: int = 1,
    timeout: float | None = None,
    ctx: DistContext | None = None,
    **overrides: Any,
) -> TrainResult:
    """Train on every process of a torchrun-style launch; the function behind ``moekit train`` when
    WORLD_SIZE > 1. Every rank calls it with the same arguments.

    Args:
        config, resume, overrides: as :func:`moekit.train.train` (``batch_size`` is the global batch).
        ep: expert-parallel degree P (divides the number of processes and every layer's num_experts).
        timeout: seconds a collective waits for a peer before the run fails (default 300).
        ctx: an existing mesh (default: join the one the environment describes, and leave it after).

    Returns:
        The TrainResult (the same on every rank).

    Raises:
        DistributedError: this rank or another failed; the message names the rank and step.
    """
    base = config.to_dict() if isinstance(config, TrainConfig) else dict(config or {})
    cfg = TrainConfig.from_dict(apply_overrides(base, overrides))
    own = ctx is None
    ctx = ctx or init_distributed(ep=ep, timeout=timeout)
    result = run_guarded(ctx, lambda: DistributedTrainer(cfg, ctx, resume=resume).run())
    if own:
        ctx.close()
    return result
