"""Fine-tuning an MoE checkpoint cheaply: full, LoRA, ESFT or ESFT + LoRA, on the one training loop.

* ``full``: every weight trains (``freeze_router``: not the routers).
* ``lora``: the base is frozen; adapters (:mod:`moekit.nn.lora`) on ``lora_targets`` train, and the routers
  unless ``freeze_router``.
* ``esft``: the experts most relevant to the task (:mod:`moekit.recipes.esft`, from ``calibration_data`` or
  the training data) train, everything else is frozen (:mod:`moekit.nn.split_experts`: optimizer state only
  for those experts); the selection is written to ``esft_selection.json`` in the run folder.
* ``esft+lora``: adapters on the selected experts only.

Checkpoints hold the base model as usual (``model.safetensors``, ESFT's trained experts in place) and, with
adapters, ``adapter.safetensors`` beside it (its header names the LoRA settings), which :func:`load_finetuned`
puts back and :func:`merge_adapter` folds into the weights. Fine-tuning runs do not resume.
"""

from __future__ import annotations

import dataclasses
import enum
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moekit import checkpoint as ckpt
from moekit.config import Config, check_choice, require
from moekit.data.text import load_text
from moekit.errors import CheckpointError, ConfigError
from moekit.io.safe_io import save_tensors
from moekit.models import MoELM
from moekit.nn.lora import (
    ADAPTER_FILE,
    LoRAConfig,
    LoRAExperts,
    LoRALinear,
    apply_lora,
    load_lora,
    merge_lora,
    read_adapter,
    save_adapter,
)
from moekit.nn.split_experts import merge_split_experts, split_experts
from moekit.recipes.esft import SELECTION_FILE, Relevance, expert_relevance, select_experts, write_selection
from moekit.train.config import TrainConfig
from moekit.train.loop import Loop, SingleProcess, TrainResult, open_run
from moekit.train.trainer import LanguageModelTask, encode_corpus


class Method(str, enum.Enum):
    FULL = "full"
    LORA = "lora"
    ESFT = "esft"
    ESFT_LORA = "esft+lora"


@dataclasses.dataclass(frozen=True, kw_only=True)
class FinetuneConfig(Config):
    """What ``moekit finetune`` trains (the run itself is a :class:`TrainConfig` with ``init_from``)."""

    method: Method = Method.LORA
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ("attention", "experts", "shared_experts")
    freeze_router: bool = False  # full and lora: keep the routers as they are (esft always does)
    esft: Relevance = Relevance.GATE  # expert relevance: average gate score or token selection ratio
    top_p: float = 0.2  # ESFT keeps per layer the fewest experts whose relevance reaches this share
    calibration_data: str | None = None  # task text for ESFT's relevance (default: the training data)

    def __post_init__(self) -> None:
        object.__setattr__(self, "method", check_choice("method", self.method, Method))
        object.__setattr__(self, "esft", check_choice("esft", self.esft, Relevance))
        require(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        self.lora()  # validates the LoRA fields now

    def lora(self) -> LoRAConfig:
        targets = ("experts",) if self.method == Method.ESFT_LORA else self.lora_targets
        return LoRAConfig(rank=self.lora_rank, alpha=self.lora_alpha, dropout=self.lora_dropout, targets=targets)

    @property
    def uses_esft(self) -> bool:
        return self.method in (Method.ESFT, Method.ESFT_LORA)


def prepare(model: MoELM, config: FinetuneConfig, calibration: torch.Tensor | None, block_size: int) -> dict:
    """Apply ``config.method`` to ``model`` in place (adapters, split experts, frozen weights); returns what was
    chosen: ``{"selection": ..., "scores": ...}`` for ESFT, else empty."""
    chosen: dict[str, Any] = {}
    if config.uses_esft:
        if calibration is None:
            raise ConfigError("ESFT needs calibration tokens (--calibration-data TASK.txt or the training data)")
        scores = expert_relevance(model, calibration, config.esft, block_size)
        chosen = {"selection": select_experts(scores, config.top_p), "scores": scores}
    for p in model.parameters():
        p.requires_grad_(config.method == Method.FULL)
    if config.method == Method.LORA:
        apply_lora(model, config.lora())
    elif config.method == Method.ESFT:
        split_experts(model, chosen["selection"])
    elif config.method == Method.ESFT_LORA:
        names = [f"layers.{i}.mlp.experts" for i, _ in model.moe_layers()]
        apply_lora(model, config.lora(), {names[i]: experts for i, experts in chosen["selection"].items()})
    for name, p in model.named_parameters():
        adapter = ".lora_" in name or ".train_w_" in name
        router = ".router." in name and config.method in (Method.FULL, Method.LORA) and not config.freeze_router
        if adapter or router:
            p.requires_grad_(True)
        if ".router." in name and config.freeze_router:
            p.requires_grad_(False)
    return chosen


def trainable_parameters(model: nn.Module) -> int:
    """Parameters that get gradients."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def has_adapters(model: nn.Module) -> bool:
    return any(isinstance(m, (LoRALinear, LoRAExperts)) for m in model.modules())


def base_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors without its adapters, tied duplicates dropped: what ``model.safetensors`` holds."""
    return {k: v for k, v in ckpt.model_tensors(model).items() if ".lora_" not in k}


class _FinetuneCheckpoints(SingleProcess):
    """Checkpoints whose model file holds the base weights and whose ``adapter.safetensors`` the adapters."""

    def __init__(self, lora: LoRAConfig):
        self.lora = lora

    def save_checkpoint(self, run_dir: Path, step: int, model: nn.Module, **kwargs: Any) -> Path:
        tmp, final = ckpt.begin_checkpoint(run_dir, step)
        ckpt.write_model_folder(tmp, base_tensors(model), kwargs["description"], kwargs.get("tokenizer"))
        if kwargs.get("optimizer") is not None:
            save_tensors(ckpt.optimizer_tensors(kwargs["optimizer"]), tmp / ckpt.OPTIMIZER_FILE)
        if has_adapters(model):
            save_adapter(model, self.lora, tmp / ADAPTER_FILE)
        state = {"step": step, **(kwargs.get("trainer_state") or {})}
        return ckpt.commit_checkpoint(tmp, final, state, kwargs.get("keep", 2))


class FinetuneTrainer(Loop):
    """A fine-tuning run: the language-model task from ``init_from``, prepared by :func:`prepare`."""

    def __init__(self, config: TrainConfig, finetune: FinetuneConfig, console=None):
        if not config.init_from:
            raise ConfigError("finetune needs --init-from: a moekit run or checkpoint, or a Hugging Face folder")
        if config.trainable:
            raise ConfigError("finetune chooses what trains from --method; leave --trainable unset")
        run_dir = Path(config.out_dir or f"runs/finetune-{time.strftime('%Y%m%d-%H%M%S')}")
        if run_dir.is_dir() and ckpt.find_checkpoint(run_dir) is not None:
            raise CheckpointError(
                f"{run_dir} already holds a run; choose another --out (fine-tuning runs do not resume)"
            )
        open_run(run_dir, resume=False)
        parallel = _FinetuneCheckpoints(finetune.lora())
        task = LanguageModelTask(config, None, parallel)
        calibration = task.train_tokens
        if finetune.calibration_data is not None:
            calibration = encode_corpus(task.tokenizer, load_text(finetune.calibration_data))
        self.total_parameters = sum(p.numel() for p in task.model.parameters())  # before any split or adapter
        self.chosen = prepare(task.model, finetune, calibration, config.block_size)
        if "selection" in self.chosen:
            run_dir.mkdir(parents=True, exist_ok=True)
            c = self.chosen
            write_selection(run_dir / SELECTION_FILE, c["selection"], c["scores"], finetune.esft, finetune.top_p)
        self.finetune, self.tokenizer = finetune, task.tokenizer
        super().__init__(config, task, run_dir, None, console, parallel)


def finetune(
    config: TrainConfig | dict | None = None, finetune_config: FinetuneConfig | dict | None = None, **overrides: Any
) -> TrainResult:
    """Fine-tune ``init_from`` with ``finetune_config``'s method; the function behind ``moekit finetune``."""
    base = config.to_dict() if isinstance(config, TrainConfig) else dict(config or {})
    ft = finetune_config if isinstance(finetune_config, FinetuneConfig) else FinetuneConfig(**(finetune_config or {}))
    return FinetuneTrainer(TrainConfig.from_options({**base, **overrides}), ft).run()


def load_finetuned(path: str | Path, device: str = "cpu") -> tuple[MoELM, Any]:
    """(model, tokenizer) of a fine-tuning checkpoint or run, with its adapters (if any) attached, unmerged."""
    source = ckpt.resolve_checkpoint(path)
    model, tokenizer = ckpt.load_model(source, device)
    adapter = source / ADAPTER_FILE
    if adapter.is_file():
        load_lora(model, *read_adapter(adapter, device))
    return model, tokenizer


def merge_adapter(path: str | Path, out: str | Path) -> Path:
    """Write the model of the fine-tuning checkpoint ``path`` with its adapters folded in, as a plain model
    folder ``out`` (loads with ``moekit.load``); the function behind ``moekit merge-adapter``."""
    model, tokenizer = load_finetuned(path)
    if not has_adapters(model):
        raise CheckpointError(f"{ckpt.resolve_checkpoint(path)} has no {ADAPTER_FILE}: nothing to merge")
    merge_lora(model)
    merge_split_experts(model)
    return ckpt.write_model_folder(out, ckpt.model_tensors(model), {"model": model.config.to_dict()}, tokenizer)
