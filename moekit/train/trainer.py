"""Language-model training: the next-token task of the one loop (:mod:`moekit.train.loop`) and
:func:`train`, the function behind ``moekit train``."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from moekit import checkpoint as ckpt
from moekit.analysis.health import CollapseMonitor
from moekit.data.corpus import builtin_corpus
from moekit.data.loader import TokenDataset, TokenLoader, iter_eval_batches, split_tokens
from moekit.data.text import load_text
from moekit.data.tokenizers import Tokenizer, build_tokenizer
from moekit.errors import CheckpointError
from moekit.io.safe_io import atomic_write_json
from moekit.models import MoELM
from moekit.models.presets import resolve_lm_config
from moekit.train.config import TrainConfig
from moekit.train.loop import RUN_FILE, Loop, SingleProcess, StepLoss, TrainResult, open_run
from moekit.train.metrics import load_imbalance


def load_corpus(config: TrainConfig) -> str:
    if config.data is None:
        return builtin_corpus()
    paths = [config.data] if isinstance(config.data, str) else list(config.data)
    return "\n\n".join(load_text(path, text_field=config.text_field) for path in paths)


def encode_corpus(tokenizer: Tokenizer, text: str) -> torch.Tensor:
    return torch.tensor(tokenizer.encode(text), dtype=torch.long)


def _build_model(config: TrainConfig, text: str, source: Path | None) -> tuple[MoELM, Tokenizer]:
    """The model and tokenizer: from the checkpoint resumed (``source``), ``init_from`` (moekit or Hugging
    Face), or a new model of the preset."""
    if source is None and config.init_from:
        from moekit.interop.hf.api import is_hf_checkpoint, load_hf_for_training  # only this path needs interop

        if is_hf_checkpoint(config.init_from):  # fine-tune it (fp32 weights) with the tokenizer it came with
            return load_hf_for_training(config.init_from)
        source = ckpt.resolve_checkpoint(config.init_from)
    if source is not None:
        return ckpt.load_model(source)
    tokenizer = build_tokenizer(config.tokenizer, text)
    torch.manual_seed(config.seed)
    model_config = resolve_lm_config(config.model, config.model_overrides, tokenizer.vocab_size, config.block_size)
    return MoELM(model_config), tokenizer


class LanguageModelTask:
    """Next-token prediction on a corpus: the language-model task of the loop. ``compute_loss`` may be replaced
    (distillation: :mod:`moekit.recipes.distill`); the MoE balancing loss is added by the loop."""

    def __init__(self, config: TrainConfig, source: Path | None, parallel):
        self.config, self.parallel = config, parallel
        text = load_corpus(config)
        self.model, self.tokenizer = _build_model(config, text, source)
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
        self.tokens_per_batch = config.batch_size * config.block_size  # the global batch, on every rank
        self.compute_loss = self.cross_entropy
        self.collapse_monitor = CollapseMonitor()  # warns once per layer that collapses at evaluations
        self.val_loads: list[torch.Tensor] = []  # per-MoE-layer expert loads of the last evaluation

    def next_batch(self):
        x, y = self.loader.next_batch()
        W, r = self.parallel.world_size, self.parallel.rank
        if W > 1:  # rank r's rows of the global batch
            b = x.shape[0] // W
            x, y = x[r * b : (r + 1) * b], y[r * b : (r + 1) * b]
        return x.to(self.parallel.device), y.to(self.parallel.device)

    def loss(self, batch) -> StepLoss:
        x, y = batch
        out = self.model(x)
        return StepLoss(self.compute_loss(x, y, out), out.aux_loss, out.moe_aux, self.tokens_per_batch)

    def cross_entropy(self, x: torch.Tensor, y: torch.Tensor, out) -> torch.Tensor:
        """The next-token loss of one micro-batch."""
        return F.cross_entropy(out.logits.float().view(-1, out.logits.shape[-1]), y.reshape(-1))

    @torch.no_grad()
    def evaluate(self, step: int, max_batches: int | None = None) -> dict[str, Any]:
        """Mean next-token loss over fixed validation windows (split over the ranks), and expert-load health."""
        cfg, W = self.config, self.parallel.world_size
        max_batches = max_batches or cfg.eval_batches
        tokens, batch_size = self.val_tokens, cfg.batch_size
        per_rank = min(len(TokenDataset(tokens, cfg.block_size)), max_batches * batch_size) // W
        if W > 1 and per_rank:  # each rank an equal share (a remainder of fewer than W windows is left out)
            lo = self.parallel.rank * per_rank * cfg.block_size
            tokens, batch_size = tokens[lo : lo + per_rank * cfg.block_size + 1], batch_size // W
            max_batches = math.ceil(per_rank / batch_size)
        was_training = self.model.training
        self.model.eval()
        total, count, loads = 0.0, 0, None
        for x, y in iter_eval_batches(tokens, cfg.block_size, batch_size, max_batches=max_batches):
            x, y = x.to(self.parallel.device), y.to(self.parallel.device)
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bfloat16"):
                logits = (out := self.model(x)).logits
            total += F.cross_entropy(logits.float().view(-1, logits.shape[-1]), y.reshape(-1), reduction="sum").item()
            count += y.numel()
            batch_loads = [aux.tokens_per_expert.detach().cpu() for aux in out.moe_aux]
            loads = batch_loads if loads is None else [a + b for a, b in zip(loads, batch_loads)]
        self.val_loads = loads or []
        self.model.train(was_training)
        val = total / count if W == 1 or not per_rank else self.parallel.mean(total / count)
        return {"val_loss": val, **self.health(step)}

    def health(self, step: int) -> dict[str, Any]:
        """Per-layer max/mean expert load on the last evaluation's data, checked by the collapse monitor."""
        if not self.val_loads:
            return {}
        layers = self.model.moe_layers()
        top_k = [moe.config.experts_per_token for _, moe in layers]
        self.collapse_monitor.update(self.val_loads, top_k=top_k, layers=[i for i, _ in layers], step=step)
        return {"val_layer_imbalance": [load_imbalance(load) for load in self.val_loads]}

    def summary(self, record: dict[str, Any]) -> str:
        return f"val_loss {record['val_loss']:.4f}"

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state)

    def describe(self) -> dict[str, Any]:
        return {"model": self.model.config.to_dict()}

    def start(self, run_dir: Path) -> None:
        record = {"train": self.config.to_dict(), **self.describe(), "parameters": self.model.num_parameters()}
        atomic_write_json(run_dir / RUN_FILE, record)

    def export(self, run_dir: Path) -> None:
        pass  # the checkpoint folder is the language model's deliverable


class Trainer(Loop):
    """A language-model run in ``config.out_dir`` (new, or continued with ``resume=True``): the loop over
    :class:`LanguageModelTask`; ``parallel`` is the hook of a multi-process run (:mod:`moekit.distributed`)."""

    def __init__(self, config: TrainConfig, resume: bool = False, console=None, parallel=None):
        run_dir = Path(config.out_dir or f"runs/run-{time.strftime('%Y%m%d-%H%M%S')}")
        source = open_run(run_dir, resume)
        parallel = parallel or SingleProcess()
        task = LanguageModelTask(config, source, parallel)
        self.tokenizer, self.loader, self.val_tokens = task.tokenizer, task.loader, task.val_tokens
        super().__init__(config, task, run_dir, source, console, parallel)


def train(config: TrainConfig | dict | None = None, resume: bool = False, **overrides: Any) -> TrainResult:
    """Train a model; the function behind ``moekit train``.

    Args:
        config: a TrainConfig or a dict of its fields (None: defaults).
        resume: continue the run in ``config.out_dir`` from its latest checkpoint.
        overrides: TrainConfig fields, or ``model.<field>`` keys for the model.
    """
    base = config.to_dict() if isinstance(config, TrainConfig) else dict(config or {})
    return Trainer(TrainConfig.from_options({**base, **overrides}), resume=resume).run()
