"""TrainConfig: everything a training run needs besides the model architecture."""

from __future__ import annotations

import dataclasses
import enum
import re
from typing import Any

from moekit.config import C, Config, check_choice, require, unknown_key_error
from moekit.errors import ConfigError


class OptimizerKind(str, enum.Enum):
    ADAMW = "adamw"
    MUON = "muon"  # Muon on the hidden matrices (experts included), AdamW on the rest: moekit.train.muon


class Precision(str, enum.Enum):
    FP32 = "float32"
    BF16 = "bfloat16"  # bf16 autocast; weights, optimizer state and router math stay fp32


def parse_duration(value: str | float | int | None, field: str = "time_budget") -> float | None:
    """Seconds from ``90``, ``"90s"``, ``"2m"``, ``"1.5h"``; None stays None."""
    if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)):
        return None if value is None else float(value)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([smh]?)\s*", str(value))
    if not match or isinstance(value, bool):
        raise ConfigError(f"{field}={value!r} is not a duration like 90, '90s', '2m' or '1h'")
    number, unit = float(match.group(1)), match.group(2) or "s"
    return number * {"s": 1, "m": 60, "h": 3600}[unit]


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunConfig(Config):
    """What every training run has (the one loop, :mod:`moekit.train.loop`, reads these): the optimizer (AdamW
    or Muon, warmup + cosine), accumulation, precision, weight averaging, how long it runs, how it reports and
    where it lives. :class:`TrainConfig` (language models) and :class:`TaskTrainConfig` (classification,
    translation) add their fields and defaults; ``model_overrides`` changes fields of the model's config."""

    model_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    max_steps: int = 2000  # optimizer steps (a time budget may end the run sooner)
    # Seconds of training (90, or '90s', '2m', '1.5h'); the run's length in steps is planned from it.
    # The plan is made after a tenth of the budget (moekit.train.budget), so that a resumed run continues exactly.
    time_budget: float | None = dataclasses.field(default=None, metadata={"parsed_in_post_init": True})
    optimizer: OptimizerKind = OptimizerKind.ADAMW  # muon: Muon on the hidden matrices, AdamW on the rest
    lr: float = 3e-3  # peak learning rate, after warmup
    min_lr_ratio: float = 0.1  # the cosine schedule ends at lr * min_lr_ratio
    warmup_steps: int = 50  # linear warmup from lr / warmup_steps
    weight_decay: float = 0.1  # decoupled (AdamW), on weights of 2 or more dimensions
    beta1: float = 0.9  # Adam's first-moment decay
    beta2: float = 0.95  # Adam's second-moment decay
    grad_accum: int = 1  # micro-batches per optimizer step (their mean gradient)
    grad_clip: float = 1.0  # 0 disables clipping (the norm is still checked for NaN/inf)
    precision: Precision = Precision.FP32  # bfloat16: autocast the forward; weights stay float32
    aux_loss_scale: float = 1.0  # multiplies the model's balancing losses (0 turns them off)
    bias_update: bool = True  # aux-loss-free bias updates for sigmoid routers, once per step
    trainable: str | None = None  # regex of parameter names to train (or "router", "experts"); None = all
    # Decay of a moving average of the weights that is evaluated, saved and is the run's model; 0: off.
    # (Polyak averaging; 0 means the weights as trained.)
    ema_decay: float = 0.0
    eval_interval: int = 200  # steps between validations (one also runs at the end)
    eval_batches: int = 20  # validation batches per evaluation
    log_interval: int = 10  # steps between records in metrics.jsonl
    checkpoint_interval: int = 500  # steps between checkpoints (one is also written at the end)
    # Seconds between checkpoints besides every checkpoint_interval steps ('10m' too; None: steps only).
    # So that a short or interrupted run is never without one.
    checkpoint_every: float | None = dataclasses.field(default=600.0, metadata={"parsed_in_post_init": True})
    keep_checkpoints: int = 2  # the newest N checkpoints are kept
    seed: int = 1337  # weights, data order and dropout
    threads: int | None = None  # None: the cores free at the start (moekit.train.threads); kept on resume
    out_dir: str | None = None  # the run folder (--out); None: runs/run-<time>
    tensorboard: bool = True  # also write TensorBoard event files
    progress: bool = True  # show the progress bar

    def __post_init__(self) -> None:
        object.__setattr__(self, "time_budget", parse_duration(self.time_budget))
        object.__setattr__(self, "checkpoint_every", parse_duration(self.checkpoint_every, "checkpoint_every"))
        object.__setattr__(self, "precision", check_choice("precision", self.precision, Precision))
        object.__setattr__(self, "optimizer", check_choice("optimizer", self.optimizer, OptimizerKind))
        positive = ("max_steps", "eval_interval", "log_interval", "checkpoint_interval", "grad_accum", "eval_batches")
        for name in (*positive, "keep_checkpoints"):
            value = getattr(self, name)
            require(isinstance(value, int) and value >= 1, f"{name} must be a positive integer, got {value!r}")
        require(self.lr > 0, f"lr must be > 0, got {self.lr}")
        require(0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        require(self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}")
        require(self.grad_clip >= 0, f"grad_clip must be >= 0, got {self.grad_clip}")
        require(0 <= self.ema_decay < 1, f"ema_decay must be in [0, 1), got {self.ema_decay}")
        require(self.time_budget is None or self.time_budget > 0, f"time_budget must be > 0, got {self.time_budget}")
        every = self.checkpoint_every
        require(every is None or every > 0, f"checkpoint_every must be > 0 or null, got {every}")
        threads = self.threads
        require(threads is None or threads >= 1, f"threads must be a positive integer or null, got {threads}")
        require(isinstance(self.model_overrides, dict), "model_overrides must be a mapping of model config fields")

    @classmethod
    def from_options(cls: type[C], options: dict[str, Any], what: str = "train config") -> C:
        """Build from ``--key value`` options (:func:`moekit.config.parse_overrides`), a config file's dict or a
        ``to_dict()``, later keys winning: dashes become underscores, ``model.X`` keys (``model.moe.top_k``:
        nested) go into ``model_overrides``; an unknown key raises ConfigError naming the closest valid one."""
        out: dict[str, Any] = {}
        names = cls.field_names()
        for key, value in options.items():
            key = key.replace("-", "_")
            if key.startswith("model."):
                target = out["model_overrides"] = _mapping(out, "model_overrides", key)
                *parents, leaf = key.split(".")[1:]
                for part in parents:
                    target[part] = _mapping(target, part, key)
                    target = target[part]
                target[leaf] = value
            elif key in names:
                out[key] = value
            else:
                raise unknown_key_error(key, names, what)
        return cls.from_dict(out)


def _mapping(parent: dict[str, Any], name: str, key: str) -> dict[str, Any]:
    """A copy of ``parent[name]`` to merge ``key`` into: an empty one if unset, a ConfigError if not a mapping."""
    value = parent.get(name)
    require(value is None or isinstance(value, dict), f"{key} sets a field of {name}, which is not a mapping")
    return dict(value or {})


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig(RunConfig):
    """A language-model training run. ``model`` is a preset name; ``model_overrides`` changes its fields."""

    model: str = "demo"  # a preset: tiny, demo, dense-demo, small, olmoe-1b-7b, qwen3-30b-a3b, deepseek-small
    init_from: str | None = None  # a moekit checkpoint or run folder, or a Hugging Face model folder, to fine-tune
    data: str | tuple[str, ...] | None = None  # text file, folder or JSONL (or several); None = built-in corpus
    text_field: str = "text"  # the field of JSONL records that holds the text
    tokenizer: str = "byte"  # byte | char | path to a folder with an HF tokenizer.json
    val_fraction: float = 0.1  # share of the data held out for validation
    block_size: int = 128  # tokens per training sequence
    batch_size: int = 32  # sequences per micro-batch

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("block_size", "batch_size"):
            value = getattr(self, name)
            require(isinstance(value, int) and value >= 1, f"{name} must be a positive integer, got {value!r}")
        require(0 < self.val_fraction < 1, f"val_fraction must be in (0, 1), got {self.val_fraction}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TaskTrainConfig(RunConfig):
    """A task run's settings (:class:`RunConfig` with task defaults, plus label smoothing); a task's config adds
    its data fields and may change defaults."""

    max_steps: int = 100_000
    lr: float = 1e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 100
    weight_decay: float = 0.05
    beta2: float = 0.99
    checkpoint_interval: int = 1000  # steps between checkpoints (one is also written at the end)
    tensorboard: bool = False
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        require(0 <= self.label_smoothing < 1, f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
