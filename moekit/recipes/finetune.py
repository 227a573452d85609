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
puts back and :func:`merge_adapter` folds into the weights. The trainer state records the fine-tuning settings
too, so ``resume`` continues a run through the loop's own resume (:func:`moekit.train.loop.open_run`): the
checkpoint's weights, adapters, optimizer state and step, and the ESFT selection read back from
``esft_selection.json`` (not recomputed); settings that differ from the run's are refused.
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
    load_lora_tensors,
    merge_lora,
    read_adapter,
    save_adapter,
)
from moekit.nn.split_experts import merge_split_experts, split_experts
from moekit.recipes.esft import (
    SELECTION_FILE,
    Relevance,
    document_sequences,
    expert_relevance,
    read_selection,
    select_experts,
    token_windows,
    write_selection,
)
from moekit.train.config import TrainConfig
from moekit.train.loop import Loop, SingleProcess, TrainResult, open_run
from moekit.train.trainer import LanguageModelTask

FINETUNE_STATE = "finetune"  # the trainer state's key for the fine-tuning settings


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


def choose_experts(model: MoELM, config: FinetuneConfig, sequences: list[torch.Tensor]) -> dict:
    """ESFT's choice on the calibration ``sequences``: ``{"selection": {layer: experts}, "scores": [...]}``."""
    scores = expert_relevance(model, sequences, config.esft)
    return {"selection": select_experts(scores, config.top_p), "scores": scores}


def prepare(model: MoELM, config: FinetuneConfig, selection: dict[int, list[int]] | None = None) -> None:
    """Apply ``config.method`` to ``model`` in place (adapters, split experts, frozen weights); ESFT trains the
    experts of ``selection`` (MoE layer -> experts)."""
    if config.uses_esft and selection is None:
        raise ConfigError("ESFT needs its expert selection (from calibration data or esft_selection.json)")
    for p in model.parameters():
        p.requires_grad_(config.method == Method.FULL)
    if config.method == Method.LORA:
        apply_lora(model, config.lora())
    elif config.method == Method.ESFT:
        split_experts(model, selection or {})
    elif config.method == Method.ESFT_LORA:
        names = [f"layers.{i}.mlp.experts" for i, _ in model.moe_layers()]
        apply_lora(model, config.lora(), {names[i]: experts for i, experts in (selection or {}).items()})
    for name, p in model.named_parameters():
        adapter = ".lora_" in name or ".train_w_" in name
        router = ".router." in name and config.method in (Method.FULL, Method.LORA) and not config.freeze_router
        if adapter or router:
            p.requires_grad_(True)
        if ".router." in name and config.freeze_router:
            p.requires_grad_(False)


def trainable_parameters(model: nn.Module) -> int:
    """Parameters that get gradients."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def has_adapters(model: nn.Module) -> bool:
    return any(isinstance(m, (LoRALinear, LoRAExperts)) for m in model.modules())


def base_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors without its adapters, tied duplicates dropped: what ``model.safetensors`` holds."""
    return {k: v for k, v in ckpt.model_tensors(model).items() if ".lora_" not in k}


def save_finetune_checkpoint(
    run_dir: Path, step: int, model: nn.Module, finetune: FinetuneConfig, **kwargs: Any
) -> Path:
    """A checkpoint whose model file holds the base weights, whose ``adapter.safetensors`` the adapters and whose
    trainer state the fine-tuning settings (``kwargs``: :func:`moekit.checkpoint.save_checkpoint`'s)."""
    tmp, final = ckpt.begin_checkpoint(run_dir, step)
    ckpt.write_model_folder(tmp, base_tensors(model), kwargs["description"], kwargs.get("tokenizer"))
    if kwargs.get("optimizer") is not None:
        save_tensors(ckpt.optimizer_tensors(kwargs["optimizer"]), tmp / ckpt.OPTIMIZER_FILE)
    for name, tensors in (kwargs.get("extra") or {}).items():
        save_tensors(tensors, tmp / name)
    if has_adapters(model):
        save_adapter(model, finetune.lora(), tmp / ADAPTER_FILE)
    state = {"step": step, **(kwargs.get("trainer_state") or {}), FINETUNE_STATE: finetune.to_dict()}
    return ckpt.commit_checkpoint(tmp, final, state, kwargs.get("keep", 2))


class _FinetuneCheckpoints(SingleProcess):
    """One process, saving fine-tuning checkpoints."""

    def __init__(self, finetune: FinetuneConfig):
        self.finetune = finetune

    def save_checkpoint(self, run_dir: Path, step: int, model: nn.Module, **kwargs: Any) -> Path:
        return save_finetune_checkpoint(run_dir, step, model, self.finetune, **kwargs)


def saved_finetune_config(checkpoint: Path) -> dict[str, Any]:
    """The fine-tuning settings recorded in the trainer state of ``checkpoint`` (a run or checkpoint folder)."""
    source = ckpt.find_checkpoint(checkpoint) or checkpoint
    saved = ckpt.read_trainer_state(source).get(FINETUNE_STATE)
    if not isinstance(saved, dict):
        raise CheckpointError(f"{source} records no fine-tuning settings: not a moekit finetune run to resume")
    return saved


class FinetuneTrainer(Loop):
    """A fine-tuning run: the language-model task from ``init_from``, prepared by :func:`prepare`; ``resume``
    continues the run in ``config.out_dir``; ``parallel``: the hook of a multi-process run
    (:mod:`moekit.distributed.finetune`), which saves with :func:`save_finetune_checkpoint`."""

    def __init__(
        self, config: TrainConfig, finetune: FinetuneConfig, console=None, resume: bool = False, parallel=None
    ):
        if not config.init_from:
            raise ConfigError("finetune needs --init-from: a moekit run or checkpoint, or a Hugging Face folder")
        if config.trainable:
            raise ConfigError("finetune chooses what trains from --method; leave --trainable unset")
        run_dir = Path(config.out_dir or f"runs/finetune-{time.strftime('%Y%m%d-%H%M%S')}")
        source = open_run(run_dir, resume)
        if source is not None:
            saved = FinetuneConfig.from_dict(saved_finetune_config(source)).to_dict()
            ckpt.check_resumable(saved, finetune.to_dict(), FinetuneConfig().to_dict(), run_dir)
        parallel = parallel or _FinetuneCheckpoints(finetune)
        task = LanguageModelTask(config, source, parallel)
        self.total_parameters = sum(p.numel() for p in task.model.parameters())  # before any split or adapter
        self.chosen = self._choose(task, config, finetune, run_dir, source)
        torch.manual_seed(config.seed)  # the adapters' first draw: the same in every run and on every rank
        prepare(task.model, finetune, self.chosen.get("selection"))
        if source is not None and has_adapters(task.model):
            if not (source / ADAPTER_FILE).is_file():
                raise CheckpointError(f"{source} has no {ADAPTER_FILE}: cannot resume the adapters")
            load_lora_tensors(task.model, read_adapter(source / ADAPTER_FILE)[1])
        if "scores" in self.chosen and parallel.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            c = self.chosen
            write_selection(run_dir / SELECTION_FILE, c["selection"], c["scores"], finetune.esft, finetune.top_p)
        self.finetune, self.tokenizer = finetune, task.tokenizer
        super().__init__(config, task, run_dir, source, console, parallel)

    @staticmethod
    def _choose(task, config: TrainConfig, finetune: FinetuneConfig, run_dir: Path, source: Path | None) -> dict:
        """ESFT's selection: read back from the run on resume, else chosen on the calibration data."""
        if not finetune.uses_esft:
            return {}
        if source is not None:
            if not (run_dir / SELECTION_FILE).is_file():
                raise CheckpointError(f"{run_dir / SELECTION_FILE} is missing: cannot resume the ESFT run")
            return {"selection": read_selection(run_dir / SELECTION_FILE)}
        if finetune.calibration_data is not None:
            text = load_text(finetune.calibration_data)
            sequences = document_sequences(task.tokenizer, text, config.block_size)
        else:
            sequences = token_windows(task.train_tokens, config.block_size)
        return choose_experts(task.model, finetune, sequences)


def finetune(
    config: TrainConfig | dict | None = None,
    finetune_config: FinetuneConfig | dict | None = None,
    resume: bool = False,
    **overrides: Any,
) -> TrainResult:
    """Fine-tune ``init_from`` with ``finetune_config``'s method (``resume``: continue the run in ``out_dir``);
    the function behind ``moekit finetune``."""
    base = config.to_dict() if isinstance(config, TrainConfig) else dict(config or {})
    ft = finetune_config if isinstance(finetune_config, FinetuneConfig) else FinetuneConfig(**(finetune_config or {}))
    return FinetuneTrainer(TrainConfig.from_options({**base, **overrides}), ft, resume=resume).run()


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
