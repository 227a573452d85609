"""The training loop: AdamW, warmup + cosine, accumulation, clipping, bf16 autocast, balancing
losses, aux-free bias updates, periodic evaluation, atomic checkpoints and exact resume.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from moekit import checkpoint as ckpt
from moekit.analysis.health import CollapseMonitor
from moekit.data.corpus import builtin_corpus
from moekit.data.loader import TokenLoader, iter_eval_batches, split_tokens
from moekit.data.text import load_text
from moekit.data.tokenizers import Tokenizer, build_tokenizer
from moekit.errors import CheckpointError, ConfigError, NonFiniteError
from moekit.interop.hf.api import is_hf_checkpoint, load_hf_for_training
from moekit.io.safe_io import atomic_write_json
from moekit.models import LMConfig, MoELM
from moekit.models.presets import get_preset
from moekit.train.config import Precision, TrainConfig
from moekit.train.metrics import MetricsLogger, load_imbalance
from moekit.train.optim import build_optimizer, lr_at
from moekit.train.progress import TrainProgress

RUN_FILE = "run.json"
# Shorthands for TrainConfig.trainable.
TRAINABLE_ALIASES = {"router": r"\.mlp\.router\.", "experts": r"\.mlp\.(experts|router|shared_expert)"}
# Fields that may change when a run is resumed (they do not change what a step computes).
RESUMABLE_CHANGES = {
    "max_steps",
    "time_budget",
    "eval_interval",
    "eval_batches",
    "log_interval",
    "checkpoint_interval",
    "keep_checkpoints",
    "threads",
    "out_dir",
    "tensorboard",
    "progress",
}


@dataclasses.dataclass
class TrainResult:
    run_dir: Path
    checkpoint: Path
    step: int
    train_losses: list[float]  # one per step taken in this call
    val_losses: list[tuple[int, float]]  # (step, validation loss) per evaluation
    tokens_per_second: float


def resolve_model_config(config: TrainConfig, tokenizer: Tokenizer) -> LMConfig:
    """The preset with ``model_overrides`` applied; vocab_size follows the tokenizer unless overridden."""
    base = get_preset(config.model).to_dict()
    overrides = dict(config.model_overrides)
    moe_over = overrides.pop("moe", None)
    merged = {**base, **overrides}
    if "moe" in config.model_overrides and moe_over is None:
        merged["moe"] = None  # model.moe=null: the preset's dense baseline
    elif moe_over is not None:
        if merged.get("moe") is None:
            raise ConfigError(f"model.moe overrides given, but preset {config.model!r} is dense")
        merged["moe"] = {**merged["moe"], **moe_over}
    if "vocab_size" not in overrides:
        merged["vocab_size"] = tokenizer.vocab_size
    if merged.get("moe") is not None:
        merged["moe"] = {**merged["moe"], "hidden_size": merged["hidden_size"]}
    model_config = LMConfig.from_dict(merged)
    if model_config.vocab_size < tokenizer.vocab_size:
        raise ConfigError(
            f"model.vocab_size={model_config.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size} tokens"
        )
    if config.block_size > model_config.max_position_embeddings:
        raise ConfigError(
            f"block_size={config.block_size} exceeds the model's max_position_embeddings="
            f"{model_config.max_position_embeddings}"
        )
    return model_config


def load_corpus(config: TrainConfig) -> str:
    if config.data is None:
        return builtin_corpus()
    paths = [config.data] if isinstance(config.data, str) else list(config.data)
    return "\n\n".join(load_text(path, text_field=config.text_field) for path in paths)


def freeze_except(model: torch.nn.Module, pattern: str) -> None:
    """Train only the parameters whose name matches the regex ``pattern`` (``router`` = routers only)."""
    regex = re.compile(TRAINABLE_ALIASES.get(pattern, pattern))
    matched = 0
    for name, param in model.named_parameters():
        param.requires_grad_(bool(regex.search(name)))
        matched += param.requires_grad
    if not matched:
        raise ConfigError(f"trainable={pattern!r} matches no parameter of the model")


def encode_corpus(tokenizer: Tokenizer, text: str) -> torch.Tensor:
    return torch.tensor(tokenizer.encode(text), dtype=torch.long)


class Trainer:
    """One training run in ``config.out_dir`` (new, or continued with ``resume=True``)."""

    # Overridden by moekit.distributed.DistributedTrainer: only rank 0 writes run.json, metrics and the
    # progress bar; each rank runs on its own device.
    is_main = True
    device = torch.device("cpu")

    def __init__(self, config: TrainConfig, resume: bool = False, console=None):
        self.config = config
        self.resume = resume
        self.console = console
        if config.threads:
            torch.set_num_threads(config.threads)
        self.run_dir = Path(config.out_dir or f"runs/run-{time.strftime('%Y%m%d-%H%M%S')}")
        self._check_run_dir()

        text = load_corpus(config)
        source = ckpt.resolve_checkpoint(self.run_dir) if resume else None
        init_hf = source is None and bool(config.init_from) and is_hf_checkpoint(config.init_from)
        if source is None and config.init_from and not init_hf:
            source = ckpt.resolve_checkpoint(config.init_from)
        if init_hf:  # a Hugging Face model folder: fine-tune it (fp32 weights) with the tokenizer it came with
            self.model, self.tokenizer = load_hf_for_training(config.init_from)
        elif source is not None:
            self.model, self.tokenizer = ckpt.load_model(source)
            if resume:
                self._check_same_model(source)
        else:
            self.tokenizer = build_tokenizer(config.tokenizer, text)
            torch.manual_seed(config.seed)
            self.model = MoELM(resolve_model_config(config, self.tokenizer))
        self.model.train()
        tokens = encode_corpus(self.tokenizer, text)
        if tokens.numel() and int(tokens.max()) >= self.model.config.vocab_size:
            raise CheckpointError(
                f"the tokenizer produced id {int(tokens.max())} but the model's vocab_size is "
                f"{self.model.config.vocab_size}: tokenizer and checkpoint do not match"
            )
        self.train_tokens, self.val_tokens = split_tokens(tokens, config.val_fraction)
        self.loader = TokenLoader(self.train_tokens, config.block_size, config.batch_size, seed=config.seed)
        # Validation needs one full window; fail now, not at the first evaluation.
        TokenLoader(self.val_tokens, config.block_size, 1)
        self.model = self.prepare_model(self.model)
        if config.trainable:
            freeze_except(self.model, config.trainable)
        self.optimizer = build_optimizer(self.model, config)
        self.collapse_monitor = CollapseMonitor()  # warns once per layer that collapses at evaluations
        self.val_loads: list[torch.Tensor] = []  # per-MoE-layer expert loads of the last evaluation
        self.step = 0
        self.elapsed_before = 0.0
        if resume:
            self._restore(source)

    # -- run folder ---------------------------------------------------------------------------
    def _check_run_dir(self) -> None:
        run_file = self.run_dir / RUN_FILE
        if self.resume:
            if not run_file.is_file():
                raise CheckpointError(f"cannot resume: {self.run_dir} holds no run ({RUN_FILE} is missing)")
            stored = json.loads(run_file.read_text())["train"]
            mine = self.config.to_dict()
            changed = [k for k in mine if k not in RESUMABLE_CHANGES and stored.get(k) != mine[k]]
            if changed:
                k = changed[0]
                raise CheckpointError(
                    f"--resume from a run with a different config: {k} is {stored.get(k)!r} in {run_file} but "
                    f"{mine[k]!r} now (changed: {', '.join(changed)})"
                )
        elif run_file.exists() or (self.run_dir / ckpt.CHECKPOINTS).exists():
            raise CheckpointError(
                f"{self.run_dir} already holds a run; pass --resume to continue it, or choose another --out"
            )

    def _check_same_model(self, source: Path) -> None:
        stored = json.loads((self.run_dir / RUN_FILE).read_text()).get("model")
        if stored is not None and stored != self.model.config.to_dict():
            raise CheckpointError(f"checkpoint {source} holds a different model than {self.run_dir / RUN_FILE}")

    def _restore(self, source: Path) -> None:
        state = ckpt.read_trainer_state(source)
        # One file, or the shards of an expert-parallel run merged (a run may resume at another EP degree).
        ckpt.load_optimizer_tensors(self.optimizer, ckpt.read_optimizer_tensors(source))
        self.loader.load_state_dict(state["loader"])
        self.step = int(state["step"])
        self.elapsed_before = float(state.get("elapsed", 0.0))

    # -- training -----------------------------------------------------------------------------
    def prepare_model(self, model: MoELM) -> MoELM:
        """Called once the model is built or loaded, before the optimizer; the distributed trainer shards
        the experts here."""
        return model

    def clip_gradients(self, params: list[torch.nn.Parameter]) -> torch.Tensor:
        """Clip the gradients to ``grad_clip`` (0: no clipping) and return their total norm; the distributed
        trainer first reduces them over the ranks here."""
        max_norm = self.config.grad_clip if self.config.grad_clip > 0 else math.inf
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.precision == Precision.BF16)

    def _micro_step(self) -> tuple[float, float, list[torch.Tensor]]:
        x, y = self.loader.next_batch()
        with self._autocast():
            out = self.model(x)
        loss = self.compute_loss(x, y, out)
        if not torch.isfinite(loss):
            raise NonFiniteError(
                f"non-finite loss ({loss.item()}) at step {self.step}; no weight was updated. "
                f"Try a lower lr (now {self.config.lr}) or precision=float32."
            )
        total = loss
        if self.config.aux_loss_scale > 0 and out.moe_aux:
            total = total + self.config.aux_loss_scale * out.aux_loss
        (total / self.config.grad_accum).backward()
        loads = [aux.tokens_per_expert.detach() for aux in out.moe_aux]
        return loss.item(), out.aux_loss.item(), loads

    def compute_loss(self, x: torch.Tensor, y: torch.Tensor, out) -> torch.Tensor:
        """The task loss of one micro-batch (next-token cross-entropy); a subclass may override it
        (distillation: :class:`moekit.recipes.distill.DistillTrainer`). The MoE balancing loss is added after."""
        return F.cross_entropy(out.logits.float().view(-1, out.logits.shape[-1]), y.reshape(-1))

    def train_step(self, progress: float) -> dict[str, Any]:
        """One optimizer step over ``grad_accum`` micro-batches; returns its metrics."""
        cfg = self.config
        lr = lr_at(self.step, progress, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        losses, aux_losses, loads = [], [], None
        for _ in range(cfg.grad_accum):
            loss, aux_loss, micro_loads = self._micro_step()
            losses.append(loss)
            aux_losses.append(aux_loss)
            loads = micro_loads if loads is None else [a + b for a, b in zip(loads, micro_loads)]
        params = [p for p in self.model.parameters() if p.grad is not None]
        grad_norm = self.clip_gradients(params)
        if not torch.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteError(
                f"non-finite gradient norm ({grad_norm.item()}) at step {self.step}; no weight was updated. "
                f"Try a lower lr (now {cfg.lr}), grad_clip, or precision=float32."
            )
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if cfg.bias_update:
            self.model.update_router_biases()
        self.step += 1
        imbalance = [load_imbalance(load) for load in loads or []]
        return {
            "step": self.step,
            "loss": sum(losses) / len(losses),
            "aux_loss": sum(aux_losses) / len(aux_losses),
            "lr": lr,
            "grad_norm": grad_norm.item(),
            "imbalance": sum(imbalance) / len(imbalance) if imbalance else 1.0,
            "layer_imbalance": imbalance,
        }

    @torch.no_grad()
    def evaluate(self, max_batches: int | None = None) -> float:
        """Mean next-token loss over fixed validation windows."""
        was_training = self.model.training
        self.model.eval()
        total, count = 0.0, 0
        loads = None
        batches = iter_eval_batches(
            self.val_tokens,
            self.config.block_size,
            self.config.batch_size,
            max_batches=max_batches or self.config.eval_batches,
        )
        for x, y in batches:
            x, y = x.to(self.device), y.to(self.device)
            with self._autocast():
                out = self.model(x)
                logits = out.logits
            total += F.cross_entropy(logits.float().view(-1, logits.shape[-1]), y.reshape(-1), reduction="sum").item()
            count += y.numel()
            batch_loads = [aux.tokens_per_expert.detach().cpu() for aux in out.moe_aux]
            loads = batch_loads if loads is None else [a + b for a, b in zip(loads, batch_loads)]
        self.val_loads = loads or []
        self.model.train(was_training)
        return total / count

    def eval_health(self) -> dict[str, Any]:
        """Per-layer max/mean expert load on the last evaluation's data, checked by the collapse monitor."""
        if not self.val_loads:
            return {}
        layers = self.model.moe_layers()
        self.collapse_monitor.update(
            self.val_loads,
            top_k=[moe.config.experts_per_token for _, moe in layers],
            layers=[i for i, _ in layers],
            step=self.step,
        )
        return {"val_layer_imbalance": [load_imbalance(load) for load in self.val_loads]}

    def save(self, elapsed: float) -> Path:
        state = {"loader": self.loader.state_dict(), "elapsed": elapsed, "train_config": self.config.to_dict()}
        return ckpt.save_checkpoint(
            self.run_dir,
            self.step,
            self.model,
            self.tokenizer,
            self.optimizer,
            state,
            keep=self.config.keep_checkpoints,
        )

    def agreed_elapsed(self, elapsed: float) -> float:
        """The training time every process acts on (the time budget, the schedule); here, this process's."""
        return elapsed

    def run(self) -> TrainResult:
        """Train until ``max_steps`` or the time budget; evaluate and checkpoint along the way."""
        cfg = self.config
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if not self.resume and self.is_main:
            atomic_write_json(
                self.run_dir / RUN_FILE,
                {
                    "train": cfg.to_dict(),
                    "model": self.model.config.to_dict(),
                    "parameters": self.model.num_parameters(),
                },
            )
        metrics = MetricsLogger(self.run_dir, tensorboard=cfg.tensorboard) if self.is_main else _NoMetrics()
        train_losses: list[float] = []
        val_losses: list[tuple[int, float]] = []
        tokens_per_step = cfg.batch_size * cfg.block_size * cfg.grad_accum
        start = time.perf_counter()
        checkpoint_path = None
        try:
            with TrainProgress(cfg, self.step, enabled=cfg.progress and self.is_main, console=self.console) as bar:
                while self.step < cfg.max_steps:
                    elapsed = self.agreed_elapsed(self.elapsed_before + time.perf_counter() - start)
                    if cfg.time_budget is not None and elapsed >= cfg.time_budget:
                        break
                    progress = self.step / cfg.max_steps
                    if cfg.time_budget is not None:
                        progress = max(progress, elapsed / cfg.time_budget)
                    t0 = time.perf_counter()
                    record = self.train_step(progress)
                    record["tokens_per_sec"] = tokens_per_step / max(time.perf_counter() - t0, 1e-9)
                    record["elapsed"] = self.elapsed_before + time.perf_counter() - start
                    train_losses.append(record["loss"])
                    bar.update(record)
                    if self.step % cfg.log_interval == 0:
                        metrics.log(record)
                    if self.step % cfg.eval_interval == 0:
                        val = self.evaluate()
                        val_losses.append((self.step, val))
                        metrics.log({"step": self.step, "val_loss": val, **self.eval_health()})
                        bar.note(f"step {self.step:>6}: val_loss {val:.4f}")
                    if self.step % cfg.checkpoint_interval == 0:
                        checkpoint_path = self.save(record["elapsed"])
            elapsed = self.elapsed_before + time.perf_counter() - start
            if not val_losses or val_losses[-1][0] != self.step:
                val = self.evaluate()
                val_losses.append((self.step, val))
                metrics.log({"step": self.step, "val_loss": val, **self.eval_health()})
            if checkpoint_path is None or not checkpoint_path.name.endswith(f"{self.step:06d}"):
                checkpoint_path = self.save(elapsed)
        finally:
            metrics.close()
        run_time = time.perf_counter() - start
        return TrainResult(
            run_dir=self.run_dir,
            checkpoint=checkpoint_path,
            step=self.step,
            train_losses=train_losses,
            val_losses=val_losses,
            tokens_per_second=len(train_losses) * tokens_per_step / max(run_time, 1e-9),
        )


class _NoMetrics:
    """The metrics sink of non-zero ranks: rank 0 logs the (already global) metrics."""

    def log(self, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def train(config: TrainConfig | dict | None = None, resume: bool = False, **overrides: Any) -> TrainResult:
    """Train a model; the function behind ``moekit train``.

    Args:
        config: a TrainConfig or a dict of its fields (None: defaults).
        resume: continue the run in ``config.out_dir`` from its latest checkpoint.
        overrides: TrainConfig fields, or ``model.<field>`` keys for the model.
    """
    from moekit.train.config import apply_overrides

    base = config.to_dict() if isinstance(config, TrainConfig) else dict(config or {})
    cfg = TrainConfig.from_dict(apply_overrides(base, overrides))
    return Trainer(cfg, resume=resume).run()
