"""The one training loop: language models, classification, translation, distillation and expert-parallel runs.

A run is a :class:`Loop` over a *task* (what differs: the model, its batches, the loss of a micro-batch,
evaluation, what its checkpoints describe) and a *parallel* hook (one process, or the ranks of
:mod:`moekit.distributed`). The loop owns the rest: AdamW or Muon with warmup + cosine, a step count or a
wall-clock budget, gradient accumulation, clipping, the non-finite guard (it raises before the optimizer
touches a weight), bf16 autocast, an EMA of the weights, aux-free router-bias updates, metrics (JSONL +
TensorBoard), the progress bar, atomic checkpoints (:mod:`moekit.checkpoint`) and bit-exact resume.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import signal
import time
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import torch
from torch import nn

from moekit import checkpoint as ckpt
from moekit.errors import CheckpointError, ConfigError, NonFiniteError, TrainingInterrupted
from moekit.io.safe_io import load_tensors
from moekit.nn.moe import start_global_batch
from moekit.train.average import WeightAverage
from moekit.train.budget import BudgetPlan, BudgetPlanner
from moekit.train.config import Precision, RunConfig
from moekit.train.metrics import MetricsLogger, load_imbalance
from moekit.train.optim import build_optimizer, lr_at
from moekit.train.progress import TrainProgress
from moekit.train.stop import StopOnSignal
from moekit.train.threads import use_threads

RUN_FILE = "run.json"
# Shorthands for RunConfig.trainable.
TRAINABLE_ALIASES = {"router": r"\.mlp\.router\.", "experts": r"\.mlp\.(experts|router|shared_expert)"}


@dataclasses.dataclass
class StepLoss:
    """One micro-batch's forward pass."""

    loss: torch.Tensor  # the task loss (scalar), logged and guarded
    aux_loss: torch.Tensor | float  # the MoE balancing loss, added with ``aux_loss_scale``
    moe_aux: list  # per MoE layer: statistics with ``tokens_per_expert``
    items: int  # examples or tokens in the micro-batch (the rate shown)


ModelT = TypeVar("ModelT", bound=nn.Module)


class Task(Protocol[ModelT]):
    """What a task gives the loop (``model``: the task's own model class)."""

    model: ModelT
    tokenizer: Any  # saved into each checkpoint when not None (``.save(folder)``)

    def next_batch(self) -> Any: ...  # the next micro-batch of a seeded stream
    def loss(self, batch: Any) -> StepLoss: ...  # runs the model (under the loop's autocast)
    def evaluate(self, step: int) -> dict[str, Any]: ...  # validation metrics (the EMA weights applied)
    def summary(self, record: dict[str, Any]) -> str: ...  # one line for an evaluation record
    def state_dict(self) -> dict[str, Any]: ...  # the batch stream's position
    def load_state_dict(self, state: dict[str, Any]) -> None: ...
    def describe(self) -> dict[str, Any]: ...  # what a checkpoint's config.json says about the model
    def start(self, run_dir: Path) -> None: ...  # a new run begins (files written once)
    def export(self, run_dir: Path) -> None: ...  # after each checkpoint: the run's model files, if any


class SingleProcess:
    """The parallel hook of a run in one process; :class:`moekit.distributed.trainer.ExpertParallel` is the
    one of a (dp, ep) mesh."""

    is_main, rank, world_size, device = True, 0, 1, torch.device("cpu")

    def prepare(self, model: ModelT) -> ModelT:
        return model

    def clip(self, params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
        return nn.utils.clip_grad_norm_(params, max_norm)

    def agree(self, elapsed: float) -> float:
        return elapsed

    def mean(self, value: float) -> float:
        return value

    def heartbeat(self, step: int) -> None:
        pass

    def load_optimizer(self, optimizer, tensors: dict[str, torch.Tensor], model: nn.Module) -> None:
        ckpt.load_optimizer_tensors(optimizer, tensors)

    def save_checkpoint(self, run_dir: Path, step: int, model: nn.Module, **kwargs: Any) -> Path:
        return ckpt.save_checkpoint(run_dir, step, model, **kwargs)


@dataclasses.dataclass
class TrainResult:
    run_dir: Path
    checkpoint: Path | None
    step: int
    train_losses: list[float]  # one per step taken in this call
    history: list[dict[str, Any]]  # one record per evaluation; the last is after the final step
    seconds: float  # training time of the whole run, the final evaluation not counted
    items: int  # examples or tokens trained on, over the whole run

    @property
    def val_losses(self) -> list[tuple[int, float]]:
        """(step, validation loss) per evaluation (language models)."""
        return [(r["step"], r["val_loss"]) for r in self.history]

    @property
    def tokens_per_second(self) -> float:
        return self.items / max(self.seconds, 1e-9)


def freeze_except(model: nn.Module, pattern: str) -> None:
    """Train only the parameters whose name matches the regex ``pattern`` (``router`` = routers only)."""
    regex = re.compile(TRAINABLE_ALIASES.get(pattern, pattern))
    matched = 0
    for name, param in model.named_parameters():
        param.requires_grad_(bool(regex.search(name)))
        matched += param.requires_grad
    if not matched:
        raise ConfigError(f"trainable={pattern!r} matches no parameter of the model")


def open_run(run_dir: Path, resume: bool) -> Path | None:
    """The checkpoint to resume from (None for a new run); a new run needs a folder without a run in it."""
    found = ckpt.find_checkpoint(run_dir) if run_dir.is_dir() else None
    if resume and found is None:
        raise CheckpointError(f"cannot resume: {run_dir} holds no checkpoint to resume from")
    if not resume and (found or (run_dir / RUN_FILE).exists() or (run_dir / ckpt.CHECKPOINTS).exists()):
        raise CheckpointError(f"{run_dir} already holds a run; pass --resume to continue it, or choose another --out")
    return found


class Loop(Generic[ModelT]):
    """One training run of ``task`` in ``run_dir``, continued from the checkpoint ``source`` when given
    (from :func:`open_run`; the task has loaded its model weights from it)."""

    def __init__(
        self,
        config: RunConfig,
        task: Task[ModelT],
        run_dir: Path,
        source: Path | None = None,
        console=None,
        parallel=None,
    ):
        self.config, self.task, self.run_dir, self.console = config, task, Path(run_dir), console
        self.parallel = parallel or SingleProcess()
        self.resumed = source is not None
        self.model = task.model = self.parallel.prepare(task.model)
        self.model.train()
        if config.trainable:
            freeze_except(self.model, config.trainable)
        self.optimizer = build_optimizer(self.model, config)
        self.average = WeightAverage(self.model, config.ema_decay) if config.ema_decay > 0 else None
        # Built once, not per step: clipping sees the parameters that can have gradients.
        self._params = [p for p in self.model.parameters() if p.requires_grad]
        self._update_biases = getattr(self.model, "update_router_biases", None) if config.bias_update else None
        self.step, self.items, self.elapsed_before = 0, 0, 0.0
        self.history: list[dict[str, Any]] = []
        self.plan: BudgetPlan | None = None  # a time-budgeted run's length, once fixed
        recorded = self._restore(source) if source is not None else None
        self.threads = use_threads(config.threads, recorded, choose=self.parallel.world_size == 1)

    def averaged(self):
        """Context in which the model holds its weight average (no-op without ``ema_decay``)."""
        return self.average.applied() if self.average is not None else contextlib.nullcontext()

    def _autocast(self):
        bf16 = self.config.precision == Precision.BF16
        return torch.autocast(self.parallel.device.type, dtype=torch.bfloat16, enabled=bf16)

    def _restore(self, source: Path) -> int | None:
        """Continue from the checkpoint ``source``; returns the thread count it ran with (None: not recorded)."""
        state = ckpt.read_trainer_state(source)
        defaults = type(self.config)().to_dict()
        ckpt.check_resumable(state.get("train_config", {}), self.config.to_dict(), defaults, self.run_dir)
        self.parallel.load_optimizer(self.optimizer, ckpt.read_optimizer_tensors(source), self.model)
        self.task.load_state_dict(state["loader"])
        self.step, self.items = int(state["step"]), int(state.get("items", 0))
        self.elapsed_before = float(state.get("elapsed", 0.0))
        self.history = list(state.get("history", []))
        plan, threads = state.get("plan"), state.get("threads")
        try:
            if plan is not None:
                budget, elapsed = self.config.time_budget, self.elapsed_before
                self.plan = BudgetPlan.from_state(plan).for_budget(budget, self.step, elapsed)
        except ValueError as e:
            raise CheckpointError(f"{source}: trainer state: {e}") from None
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise CheckpointError(f"{source}: trainer state's threads is not a positive integer: {threads!r}")
        if self.average is not None:
            if (source / ckpt.OLD_TASK_EMA).is_file():  # old layout: the model as trained, the average beside
                self.average.load(load_tensors(source / ckpt.OLD_TASK_EMA), source)
            else:  # the model loaded the average; the weights as trained come back from trained.safetensors
                self.average.load(load_tensors(source / ckpt.TRAINED_FILE), source)
                self.average.swap()
        return threads

    def train_step(self, progress: float) -> dict[str, Any]:
        """One optimizer step over ``grad_accum`` micro-batches; returns its metrics."""
        cfg = self.config
        self.parallel.heartbeat(self.step)
        lr = lr_at(self.step, progress, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_sum, aux_sum, loads, items = 0.0, 0.0, None, 0
        start_global_batch(self.model)  # aux_loss_scope="global" balances over this step's micro-batches
        for _ in range(cfg.grad_accum):
            with self._autocast():
                out = self.task.loss(self.task.next_batch())
            if not torch.isfinite(out.loss):
                raise NonFiniteError(
                    f"non-finite loss ({out.loss.item()}) at step {self.step}; no weight was updated. "
                    f"Try a lower lr (now {cfg.lr}) or precision=float32."
                )
            total = out.loss + cfg.aux_loss_scale * out.aux_loss if cfg.aux_loss_scale > 0 and out.moe_aux else out.loss
            (total / cfg.grad_accum).backward()
            loss_sum, aux_sum, items = (
                loss_sum + out.loss.item(),
                aux_sum + torch.as_tensor(out.aux_loss).item(),
                items + out.items,
            )
            micro = [aux.tokens_per_expert.detach() for aux in out.moe_aux]
            loads = micro if loads is None else [a + b for a, b in zip(loads, micro)]
        grad_norm = self.parallel.clip(self._params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        if not torch.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteError(
                f"non-finite gradient at step {self.step} (norm {grad_norm.item()}); no weight was updated. "
                f"Try a lower lr (now {cfg.lr}), grad_clip, or precision=float32."
            )
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self._update_biases is not None:
            self._update_biases()
        if self.average is not None:
            self.average.update(self.step)
        self.step += 1
        self.items += items
        imbalance = [load_imbalance(load) for load in loads or []]
        return {
            "step": self.step,
            "loss": self.parallel.mean(loss_sum / cfg.grad_accum),
            "aux_loss": aux_sum / cfg.grad_accum,
            "lr": lr,
            "grad_norm": grad_norm.item(),
            "imbalance": sum(imbalance) / len(imbalance) if imbalance else 1.0,
            "layer_imbalance": imbalance,
            "items": items,
        }

    def evaluate(self, **options: Any) -> dict[str, Any]:
        """The task's validation metrics, with the weight average applied."""
        with self.averaged():
            return self.task.evaluate(self.step, **options)

    def save(self, elapsed: float) -> Path:
        """Checkpoint now (with the weight average as the model) and let the task export its model files."""
        state = {
            "loader": self.task.state_dict(),
            "elapsed": elapsed,
            "items": self.items,
            "history": self.history,
            "train_config": self.config.to_dict(),
            "plan": dataclasses.asdict(self.plan) if self.plan is not None else None,
            "threads": self.threads,
        }
        with self.averaged():  # inside, the average's shadow holds the weights as trained
            extra = {ckpt.TRAINED_FILE: self.average.tensors()} if self.average is not None else None
            path = self.parallel.save_checkpoint(
                self.run_dir,
                self.step,
                self.model,
                tokenizer=self.task.tokenizer,
                optimizer=self.optimizer,
                trainer_state=state,
                keep=self.config.keep_checkpoints,
                description=self.task.describe(),
                extra=extra,
            )
            if self.parallel.is_main:
                self.task.export(self.run_dir)
        return path

    @property
    def last_step(self) -> int:
        """Where the run ends: ``max_steps``, or sooner where a time budget's plan says (:mod:`.budget`)."""
        return min(self.config.max_steps, self.plan.steps) if self.plan is not None else self.config.max_steps

    @property
    def progress(self) -> float:
        """How far the learning-rate schedule is: by steps, or by a time budget's plan (0, the peak, until then)."""
        if self.plan is not None:
            return self.plan.progress(self.step)
        return 0.0 if self.config.time_budget is not None else self.step / self.config.max_steps

    def run(self) -> TrainResult:
        """Train until ``max_steps`` or the time budget; evaluate and checkpoint along the way."""
        cfg, main = self.config, self.parallel.is_main
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if not self.resumed and main:
            self.task.start(self.run_dir)
        resumed_at = self.step if self.resumed else None
        metrics = MetricsLogger(self.run_dir, tensorboard=cfg.tensorboard, resumed_at=resumed_at) if main else None
        train_losses: list[float] = []
        start = time.perf_counter()
        checkpoint = ckpt.find_checkpoint(self.run_dir) if self.resumed else None
        saved_step = self.step if self.resumed else None

        def log(record: dict[str, Any]) -> None:
            if metrics is not None:
                metrics.log(record)

        def validate(bar) -> None:
            last = train_losses[-1] if train_losses else (self.history[-1].get("train_loss") if self.history else None)
            record = {"step": self.step, "train_loss": last, **self.evaluate()}
            self.history.append({**record, "elapsed": self.elapsed_before + time.perf_counter() - start})
            log(self.history[-1])
            bar.note(f"step {self.step:>6}: {self.task.summary(record)}")

        stop = StopOnSignal()
        saved_at = self.elapsed_before
        planner = None
        if cfg.time_budget is not None and self.plan is None:
            now = self.parallel.agree(self.elapsed_before)
            planner = BudgetPlanner(cfg.time_budget, cfg.warmup_steps, cfg.max_steps, self.step, now)
            self.plan = planner.plan(self.step, now)  # a run resumed past warmup without a plan
        try:
            total = self.last_step if cfg.time_budget is None or self.plan is not None else None
            bar = TrainProgress(self.step, total, enabled=cfg.progress and main, console=self.console)
            with stop, bar:
                while self.step < self.last_step:
                    # A stop request reaches every rank through the agreed clock (rank 0's): +inf.
                    elapsed = self.parallel.agree(
                        math.inf if stop.signum else self.elapsed_before + time.perf_counter() - start
                    )
                    if elapsed == math.inf:
                        break
                    t0 = time.perf_counter()
                    record = self.train_step(self.progress)
                    record["tokens_per_sec"] = record.pop("items") / max(time.perf_counter() - t0, 1e-9)
                    record["elapsed"] = self.elapsed_before + time.perf_counter() - start
                    train_losses.append(record["loss"])
                    if planner is not None and self.plan is None:
                        self.plan = planner.plan(self.step, self.parallel.agree(record["elapsed"]))
                        if self.plan is not None:
                            bar.set_total(self.last_step)
                    bar.update(record)
                    if self.step % cfg.log_interval == 0:
                        log(record)
                    if self.step % cfg.eval_interval == 0:
                        validate(bar)
                    due = cfg.checkpoint_every is not None and elapsed - saved_at >= cfg.checkpoint_every
                    if self.step % cfg.checkpoint_interval == 0 or due:
                        checkpoint, saved_step, saved_at = self.save(record["elapsed"]), self.step, elapsed
                seconds = self.elapsed_before + time.perf_counter() - start
                if not stop.signum and (not self.history or self.history[-1]["step"] != self.step):
                    validate(bar)
                if saved_step != self.step:
                    checkpoint = self.save(seconds)
        except BaseException:
            self.parallel.heartbeat(self.step)  # the step in progress, for the error report of a multi-rank run
            raise
        finally:
            if metrics is not None:
                metrics.close()
        if stop.signum:
            raise TrainingInterrupted(
                f"stopped by {signal.Signals(stop.signum).name} after step {self.step}; checkpoint {checkpoint} "
                f"is complete: continue with --resume"
            )
        if self.average is not None:  # the averaged weights are the run's model from here on
            with torch.no_grad():
                torch._foreach_copy_(self.average.params, self.average.shadow)
        return TrainResult(self.run_dir, checkpoint, self.step, train_losses, self.history, seconds, self.items)
