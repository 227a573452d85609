"""The training loop every task shares (``moekit train --task classify|image-classify|translate``).

A task brings its model, a seeded stream of batches (cheap descriptors, e.g. row indices), and
callables: ``forward(batch)`` runs the model and returns a :class:`TaskStep` (task loss, the MoE
balancing loss, per-layer routing statistics), ``evaluate()`` returns the validation metrics, and
``save_model()`` writes the task's model files. The loop owns the rest: AdamW with warmup + cosine
(moekit.train.optim), a step count or a wall-clock budget, gradient clipping, the non-finite guard (it
raises before the optimizer touches a weight), the progress bar, ``metrics.jsonl``, and checkpoints.

Checkpoints: every ``checkpoint_interval`` steps and at the end, ``run_dir/checkpoint-<step>/`` (model and
optimizer tensors, torch RNG, step, elapsed time, evaluation history; the newest two are kept) is written
under a temporary name and renamed, so a run killed at any moment leaves its last complete checkpoint.
``resume=True`` restores it and fast-forwards the batch stream, so a resumed run continues as the
uninterrupted run would (bit-identical on CPU when it runs by ``max_steps``). Language-model pretraining
has its own :class:`moekit.train.Trainer` (expert parallelism, tokenizer state).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from moekit.checkpoint import (
    load_optimizer_tensors,
    load_tensors_into,
    model_tensors,
    optimizer_tensors,
)
from moekit.config import require, unknown_key_error
from moekit.errors import CheckpointError, ConfigError, NonFiniteError
from moekit.io.atomic import atomic_write_json, fsync_tree
from moekit.io.safe_io import load_tensors, save_tensors
from moekit.train.config import RunConfig
from moekit.train.metrics import load_imbalance
from moekit.train.optim import build_optimizer, lr_at
from moekit.train.progress import TrainProgress


@dataclasses.dataclass(frozen=True, kw_only=True)
class TaskTrainConfig(RunConfig):
    """A task run's optimisation and run settings (:class:`RunConfig` with task defaults, plus label
    smoothing); a task's config adds its data fields and may change defaults. ``model_overrides`` sets
    fields of the task's model config (``--model.num_experts 4``)."""

    max_steps: int = 100_000
    lr: float = 1e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 100
    weight_decay: float = 0.05
    beta2: float = 0.99
    checkpoint_interval: int = 1000  # steps between checkpoints (one is also written at the end)
    label_smoothing: float = 0.0
    # Evaluate and save an exponential moving average of the weights (Polyak averaging) with this decay;
    # 0 = the weights as trained. The averaged weights are the run's model.
    ema_decay: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        require(0 <= self.label_smoothing < 1, f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        require(0 <= self.ema_decay < 1, f"ema_decay must be in [0, 1), got {self.ema_decay}")

    @classmethod
    def from_options(cls, data: dict[str, Any], what: str):
        """Build from command-line style options: ``model.top_k`` keys (``--model.top_k 2``) move into
        ``model_overrides``; an unknown key raises ConfigError naming the closest valid one."""
        out = {k.replace("-", "_"): v for k, v in data.items() if not k.startswith("model.")}
        model = dict(out.get("model_overrides") or {})
        model.update({k[len("model.") :]: v for k, v in data.items() if k.startswith("model.")})
        if model:
            out["model_overrides"] = model
        names = cls.field_names()
        for key in out:
            if key not in names:
                raise unknown_key_error(key, names, what)
        return cls.from_dict(out)


@dataclasses.dataclass
class TaskStep:
    """One training batch's forward pass."""

    loss: torch.Tensor  # the task loss (scalar), logged and guarded
    aux_loss: torch.Tensor | float  # the MoE balancing loss, added with ``aux_loss_scale``
    moe_aux: list  # per MoE layer: statistics with ``tokens_per_expert``
    items: int  # examples or tokens in the batch (for the rate shown)


@dataclasses.dataclass
class LoopResult:
    step: int
    seconds: float  # training time, the final evaluation not counted
    items: int  # examples or tokens trained on
    history: list[dict[str, Any]]  # one record per evaluation; the last is after the final step


# Settings a resumed run may change: how long it runs and how it reports, not what it computes.
RESUMABLE_CHANGES = frozenset(
    {"max_steps", "time_budget", "eval_interval", "log_interval", "checkpoint_interval", "threads", "progress"}
)
CHECKPOINT_PREFIX = "checkpoint-"
KEEP_CHECKPOINTS = 2  # the newest two: one to resume from, one more should the newest be damaged
_WEIGHTS, _OPTIMIZER, _STATE, _AVERAGE = "model.safetensors", "optimizer.safetensors", "state.json", "ema.safetensors"


class WeightAverage:
    """An exponential moving average of a model's trainable parameters (Polyak & Juditsky 1992).

    The decay ramps up as ``min(decay, (1 + t) / (10 + t))`` so that the first steps' random weights fade
    quickly. ``applied()`` swaps the average into the model for a while (evaluation, saving).
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in self.named]
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Fold in the weights after optimizer step ``step`` (counted from 0): one fused op per step."""
        decay = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self.shadow, self.params, 1.0 - decay)

    @torch.no_grad()
    def _swap(self) -> None:
        for p, avg in zip(self.params, self.shadow):
            held = p.clone()
            p.copy_(avg)
            avg.copy_(held)

    @torch.no_grad()
    def copy_into_model(self) -> None:
        torch._foreach_copy_(self.params, self.shadow)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        self._swap()
        try:
            yield
        finally:
            self._swap()

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: avg for (name, _), avg in zip(self.named, self.shadow)}

    @torch.no_grad()
    def load(self, tensors: dict[str, torch.Tensor], source: Path) -> None:
        names = [name for name, _ in self.named]
        if sorted(tensors) != sorted(names):
            raise CheckpointError(f"{source}: the averaged weights do not match the model's parameters")
        for name, avg in zip(names, self.shadow):
            if tensors[name].shape != avg.shape:
                raise CheckpointError(
                    f"{source}: {name} has shape {tuple(tensors[name].shape)}, not {tuple(avg.shape)}"
                )
            avg.copy_(tensors[name])


def train_loop(
    model: torch.nn.Module,
    cfg: TaskTrainConfig,
    run_dir: Path,
    batches: Iterator[Any],
    forward: Callable[[Any], TaskStep],
    evaluate: Callable[[], dict[str, Any]],
    describe: Callable[[dict[str, Any]], str],
    save_model: Callable[[], None],
    resume: bool = False,
    console=None,
) -> LoopResult:
    """Train ``model`` until ``cfg.max_steps`` or ``cfg.time_budget``; write ``run_dir/metrics.jsonl``.

    Args:
        batches: the training batches, an endless stream that is the same for the same seed.
        forward: runs the model on one batch of ``batches``.
        evaluate: the validation metrics (a dict); the loop adds the step, the last training loss and
            the elapsed time to make a record of ``history``.
        describe: a short line for an evaluation record, shown under the progress bar.
        save_model: writes the task's model files (called with each checkpoint and at the end).
        resume: continue from the last checkpoint in ``run_dir`` (CheckpointError when there is none).
    """
    optimizer = build_optimizer(model, cfg)
    average = WeightAverage(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    averaged = average.applied if average else contextlib.nullcontext  # what evaluation and saving see
    history: list[dict[str, Any]] = []
    step, items, elapsed_before, last_loss = 0, 0, 0.0, None
    if resume:
        step, items, elapsed_before, history = _restore(run_dir, cfg, model, optimizer, average)
        last_loss = history[-1]["loss"] if history else None
        batches = itertools.islice(batches, step, None)  # the batches the first run already trained on
    start = time.perf_counter() - elapsed_before
    saved_step = step if resume else None
    model.train()
    with open(run_dir / "metrics.jsonl", "a" if resume else "w", encoding="utf-8") as metrics:

        def log(record: dict[str, Any]) -> None:
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()

        def validate() -> None:
            with averaged():
                metrics_now = evaluate()
            history.append({"step": step, "loss": last_loss, **metrics_now, "elapsed": time.perf_counter() - start})
            log(history[-1])

        def checkpoint() -> None:
            nonlocal saved_step
            saved_step = step
            state = {"step": step, "items": items, "elapsed": time.perf_counter() - start, "history": history}
            _save_checkpoint(run_dir, model, optimizer, {**state, "config": cfg.to_dict()}, average)
            with averaged():
                save_model()

        with TrainProgress(cfg, step, enabled=cfg.progress, console=console) as bar:
            while step < cfg.max_steps:
                elapsed = time.perf_counter() - start
                if cfg.time_budget is not None and elapsed >= cfg.time_budget:
                    break
                progress = max(step / cfg.max_steps, elapsed / cfg.time_budget if cfg.time_budget else 0.0)
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(step, progress, cfg)
                out = forward(next(batches))
                if not torch.isfinite(out.loss):
                    raise NonFiniteError(f"non-finite loss ({out.loss.item()}) at step {step}; try a lower lr")
                (out.loss + cfg.aux_loss_scale * out.aux_loss).backward()
                max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
                if not torch.isfinite(norm):
                    raise NonFiniteError(f"non-finite gradient at step {step}; try a lower lr")
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if average is not None:
                    average.update(step)
                step += 1
                items += out.items
                last_loss = out.loss.item()
                loads = [aux.tokens_per_expert for aux in out.moe_aux]
                record = {
                    "step": step,
                    "loss": last_loss,
                    "lr": optimizer.param_groups[0]["lr"],
                    "tokens_per_sec": items / max(1e-9, time.perf_counter() - start),
                    "imbalance": sum(load_imbalance(a) for a in loads) / len(loads) if loads else 1.0,
                }
                bar.update(record)
                if step % cfg.log_interval == 0:
                    log(record)
                if step % cfg.eval_interval == 0:
                    validate()
                    bar.note(f"step {step:>6}: {describe(history[-1])}")
                if step % cfg.checkpoint_interval == 0:
                    checkpoint()
        seconds = time.perf_counter() - start
        if not history or history[-1]["step"] != step:
            validate()
        if saved_step != step:
            checkpoint()
    if average is not None:  # the averaged weights are the run's model from here on
        average.copy_into_model()
    return LoopResult(step, seconds, items, history)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The complete checkpoint with the highest step in ``run_dir`` (a partly written one has a temporary name)."""
    found = [
        p
        for p in Path(run_dir).glob(f"{CHECKPOINT_PREFIX}*")
        if p.is_dir() and p.name[len(CHECKPOINT_PREFIX) :].isdigit()
    ]
    return max(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]), default=None)


def _save_checkpoint(
    run_dir: Path, model, optimizer, state: dict[str, Any], average: WeightAverage | None = None
) -> Path:
    final = run_dir / f"{CHECKPOINT_PREFIX}{state['step']:08d}"
    tmp = run_dir / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_tensors(model_tensors(model), tmp / _WEIGHTS)
    save_tensors(optimizer_tensors(optimizer), tmp / _OPTIMIZER)
    if average is not None:
        save_tensors(average.tensors(), tmp / _AVERAGE)
    atomic_write_json(tmp / _STATE, state)
    fsync_tree(tmp)
    if final.exists():  # the end of a run that had just saved this step
        shutil.rmtree(final)
    os.rename(tmp, final)
    done = sorted(p for p in Path(run_dir).glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir())
    for old in done[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in Path(run_dir).glob(f".tmp-{CHECKPOINT_PREFIX}*"):  # left by a killed run
        shutil.rmtree(stale, ignore_errors=True)
    return final


def _restore(
    run_dir: Path, cfg: TaskTrainConfig, model, optimizer, average: WeightAverage | None
) -> tuple[int, int, float, list[dict[str, Any]]]:
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise CheckpointError(f"{run_dir} holds no checkpoint to resume from (no {CHECKPOINT_PREFIX}* folder)")
    try:
        state = json.loads((ckpt / _STATE).read_text(encoding="utf-8"))
        saved = dict(state["config"])
        step, items, elapsed, history = (
            int(state["step"]),
            int(state["items"]),
            float(state["elapsed"]),
            state["history"],
        )
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{ckpt / _STATE}: not a readable checkpoint state ({e})") from None
    now = cfg.to_dict()
    for key in sorted(set(saved) | set(now)):
        if key not in RESUMABLE_CHANGES and key != "out_dir" and saved.get(key) != now.get(key):
            raise ConfigError(
                f"--resume: {key}={now.get(key)!r} differs from the run in {run_dir} ({key}={saved.get(key)!r}); "
                f"only {', '.join(sorted(RESUMABLE_CHANGES))} may change"
            )
    load_tensors_into(model, load_tensors(ckpt / _WEIGHTS), ckpt / _WEIGHTS)
    load_optimizer_tensors(optimizer, load_tensors(ckpt / _OPTIMIZER))
    if average is not None:
        average.load(load_tensors(ckpt / _AVERAGE), ckpt / _AVERAGE)
    return step, items, elapsed, history


def shuffled_rows(n: int, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless batches of row indices into ``n`` examples, reshuffled each epoch (a last partial batch is
    left out; a set smaller than one batch is taken whole each step)."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(n, generator=generator)
        if n < batch_size:
            yield order
            continue
        for cursor in range(0, n - batch_size + 1, batch_size):
            yield order[cursor : cursor + batch_size]


def length_bucketed_rows(
    lengths: Sequence[int], batch_size: int, seed: int, pool_batches: int = 32
) -> Iterator[torch.Tensor]:
    """Like :func:`shuffled_rows`, but each batch holds rows of similar length, so padding stays small.

    Each epoch shuffles the rows, sorts every pool of ``pool_batches`` batches by length, cuts the pools
    into batches and shuffles the batches: the order stays random, the padding per batch is small.
    """
    n = len(lengths)
    if n < batch_size:
        yield from shuffled_rows(n, batch_size, seed)
        return
    length = torch.as_tensor(lengths)
    generator = torch.Generator().manual_seed(seed)
    pool = batch_size * pool_batches
    while True:
        order = torch.randperm(n, generator=generator)[: n - n % batch_size]
        batches = []
        for start in range(0, len(order), pool):
            rows = order[start : start + pool]
            rows = rows[torch.argsort(length[rows], stable=True)]
            batches.extend(rows.split(batch_size))
        for i in torch.randperm(len(batches), generator=generator).tolist():
            yield batches[i]


def check_run_dir(run_dir: Path, resume: bool, weights: str) -> None:
    """A new run needs a folder without a model or checkpoint (nothing is overwritten); a resumed one, a checkpoint."""
    if resume:
        if latest_checkpoint(run_dir) is None:
            raise CheckpointError(f"{run_dir} holds no checkpoint to resume from (no {CHECKPOINT_PREFIX}* folder)")
    elif (run_dir / weights).exists() or latest_checkpoint(run_dir) is not None:
        raise CheckpointError(f"{run_dir} already holds a model; choose another --out, or --resume that run")


def check_same_meta(path: Path, meta: dict[str, Any]) -> None:
    """On resume: the model description rebuilt from the data and settings must be the one the run saved."""
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read the run's model description ({e})") from None
    if saved != json.loads(json.dumps(meta)):
        differ = sorted(k for k in set(saved) | set(meta) if saved.get(k) != json.loads(json.dumps(meta.get(k))))
        raise CheckpointError(
            f"--resume: the model built from this data and these settings differs from the run in {path.parent} "
            f"(in {', '.join(differ)}); resume with the data and settings the run started with"
        )
