"""Classification with an MoE encoder: text (``--task classify``) and images (``--task image-classify``).

Text can also be classified by fine-tuning a pretrained language model (``init_from``: a moekit run or
checkpoint, or a Hugging Face MoE folder) with a head over its pooled hidden states
(:class:`moekit.models.lm_classifier.LMClassifier`); it reads the text with the LM's own tokenizer.

Data -> :class:`Examples` (inputs the model takes, label ids) -> the one training loop
(:mod:`moekit.train.loop`, with :class:`ClassifyTask`: cross-entropy + the MoE balancing loss, accuracy on
the validation set) -> a run folder holding ``model.safetensors`` (moekit.io.safe_io), ``model.json``
(encoder config, label names, vocabulary), ``metrics.jsonl`` and ``checkpoints/``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from moekit import checkpoint as ckpt
from moekit.checkpoint import load_tensors_into
from moekit.config import require
from moekit.data.images import builtin_digits, check_image_size, read_images
from moekit.data.labelled import BUILTIN_SENTIMENT, WordVocab, label_names, read_labelled
from moekit.errors import CheckpointError, DataError
from moekit.io.safe_io import atomic_write_json, load_tensors
from moekit.models.encoder import EncoderClassifier, EncoderConfig
from moekit.models.ensemble import EnsembleClassifier
from moekit.models.lm_classifier import LMClassifier
from moekit.models.resolve import check_overrides
from moekit.tasks.batches import Batches, length_bucketed_rows, shuffled_rows
from moekit.tasks.classifier_files import (
    META,
    WEIGHTS,
    TokenizerVocab,
    classifier_meta,
    load_classifier,
    save_classifier,
    upgrade_meta,
)
from moekit.tasks.examples import Examples, image_examples, split_rows, subset, text_examples
from moekit.train.config import TaskTrainConfig
from moekit.train.loop import Loop, StepLoss, open_run

TASKS = ("classify", "image-classify")

# Text encoders overfit a small labelled set within an epoch or two: more dropout, and word dropout.
# SST-2, 5-minute MoE runs (2 threads, length-bucketed batches; benchmarks/results/classify.md): dev accuracy
# 82.3% with dropout 0.1, 82.7% with 0.3, 81.4% with 0.5, 82.7% with 0.3 plus token_dropout 0.1.
TEXT_MODEL_DEFAULTS = {"dropout": 0.3, "token_dropout": 0.1}


@dataclasses.dataclass(frozen=True, kw_only=True)
class ClassifyConfig(TaskTrainConfig):
    """A classification run: data fields here, optimisation fields in :class:`TaskTrainConfig`;
    ``model_overrides`` sets :class:`EncoderConfig` fields (``--model.moe.num_experts 4``).

    ``data`` None trains on the built-in set (the sentiment sentences, or scikit-learn's digits).
    Without ``valid`` the last ``valid_fraction`` of the (shuffled) training rows are held out.
    """

    task: str = "classify"
    init_from: str | None = None  # fine-tune this language model (moekit run/checkpoint or HF folder) with a head
    data: str | None = None
    valid: str | None = None
    text_column: str | None = None
    label_column: str | None = None
    valid_fraction: float = 0.1
    max_length: int = 64
    min_word_count: int = 1
    batch_size: int = 64
    max_epochs: float | None = None  # stop after this many passes over the training rows (and max_steps)
    # Train this many models (seeds seed, seed+1, ...; each gets its share of time_budget, and max_steps/max_epochs
    # each) and predict with the mean of their probabilities: see moekit.models.ensemble.
    ensemble: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.task in TASKS, f"task must be one of {', '.join(TASKS)} here, got {self.task!r}")
        for name in ("batch_size", "max_length"):
            value = getattr(self, name)
            require(isinstance(value, int) and value >= 1, f"{name} must be a positive integer, got {value!r}")
        require(0 < self.valid_fraction < 1, f"valid_fraction must be in (0, 1), got {self.valid_fraction}")
        require(self.max_epochs is None or self.max_epochs > 0, f"max_epochs must be > 0, got {self.max_epochs}")
        require(
            isinstance(self.ensemble, int) and self.ensemble >= 1,
            f"ensemble must be a positive integer, got {self.ensemble!r}",
        )
        if self.init_from is not None:
            require(self.ensemble == 1, "ensemble trains models from scratch: it does not apply to init_from")
            require(self.is_text, "init_from (a pretrained language model) needs task=classify (text)")
            require(not self.model_overrides, "init_from fine-tunes an existing model: --model.* options do not apply")
        check_overrides(self.model_overrides, EncoderConfig)

    @property
    def is_text(self) -> bool:
        return self.task == "classify"


def load_task_data(cfg: ClassifyConfig):
    """(train data, validation data) as read from the files (or built-in sets), before encoding."""
    if cfg.is_text:
        read = lambda path: read_labelled(path, cfg.text_column, cfg.label_column)  # noqa: E731
        train_data = read(cfg.data or BUILTIN_SENTIMENT)
    else:
        read = read_images
        train_data = read(cfg.data) if cfg.data else builtin_digits("train")
        if cfg.data is None and cfg.valid is None:
            return train_data, builtin_digits("test")
    if cfg.valid is not None:
        return train_data, read(cfg.valid)
    train_rows, valid_rows = split_rows(len(train_data), cfg.valid_fraction, cfg.seed)
    return subset(train_data, train_rows), subset(train_data, valid_rows)


# -- the run -------------------------------------------------------------------------------------
@dataclasses.dataclass
class ClassifyResult:
    run_dir: Path
    step: int
    accuracy: float  # on the validation set, after the last step
    history: list[dict[str, float]]  # one record per evaluation
    parameters: int
    active_parameters: int
    seconds: float


def build_model(cfg: ClassifyConfig, train_data, names: list[str]):
    """(model, vocabulary or tokenizer adapter or None, train Examples)."""
    if cfg.init_from is not None:
        from moekit.recipes.btx import load_dense  # (interop's import cost only when fine-tuning)

        lm, tokenizer = load_dense(cfg.init_from)  # a moekit or Hugging Face folder
        lm.train()
        model = LMClassifier(lm, max(2, len(names)), min(cfg.max_length, lm.config.max_position_embeddings))
        vocab = TokenizerVocab(tokenizer)
        return model, vocab, text_examples(train_data, vocab, names, model.max_length)
    overrides = dict(cfg.model_overrides)
    if cfg.is_text:
        vocab = WordVocab.build(train_data.texts, min_count=cfg.min_word_count)
        fields = {**TEXT_MODEL_DEFAULTS, "vocab_size": vocab.size, "max_length": cfg.max_length}
        examples = text_examples(train_data, vocab, names, cfg.max_length)
    else:
        vocab = None
        _, c, h, w = train_data.pixels.shape
        if h != w:
            raise DataError(f"{train_data.path}: images must be square, got {w}x{h}")
        fields = {"image_size": h, "channels": c, "patch_size": 7 if h % 7 == 0 else 4 if h % 4 == 0 else 1}
        examples = image_examples(train_data, names)
    config = EncoderConfig.from_dict({"num_labels": max(2, len(names)), **fields, **overrides})
    return EncoderClassifier(config), vocab, examples


def encode(model: EncoderClassifier | LMClassifier, vocab, data, names: list[str]) -> Examples:
    if isinstance(model, LMClassifier) or model.config.is_text:
        labelled = data.labels and data.labels[0] is not None
        return text_examples(data, vocab, names if labelled else None, _max_length(model))
    c = model.config
    check_image_size(data, c.channels, c.image_size)
    return image_examples(data, names)


@torch.no_grad()
def accuracy(model: EncoderClassifier, examples: Examples, batch_size: int = 256) -> float:
    was_training = model.training
    model.eval()
    correct = 0
    for x, mask, y in examples.batches(batch_size):
        correct += int((model(x, mask).logits.argmax(-1) == y).sum())
    model.train(was_training)
    return correct / max(1, len(examples))


def train_classifier(
    config: ClassifyConfig | dict | None = None, console=None, resume: bool = False, **overrides: Any
) -> ClassifyResult:
    """Train a text or image classifier; the function behind ``moekit train --task classify|image-classify``.

    ``resume=True`` continues the run in ``out_dir`` from its last checkpoint (same data and settings).
    """
    base = config.to_dict() if isinstance(config, ClassifyConfig) else dict(config or {})
    cfg = ClassifyConfig.from_options({**base, **overrides}, "classification config")
    run_dir = Path(cfg.out_dir or f"runs/{cfg.task}-{time.strftime('%Y%m%d-%H%M%S')}")
    if cfg.ensemble > 1:
        _check_ensemble_dir(run_dir, resume)
    else:
        open_run(run_dir, resume)  # fail before reading the data
    train_data, valid_data = load_task_data(cfg)
    names = label_names(train_data.labels)
    if len(names) < 2:
        raise DataError(f"{train_data.path}: needs at least two distinct labels, found {names}")
    if cfg.ensemble > 1:
        return _train_ensemble(cfg, run_dir, train_data, valid_data, names, console, resume)
    return _train_one(cfg, run_dir, train_data, valid_data, names, console, resume)


class ClassifyTask:
    """Classification as a task of the one loop: row batches of ``train_set``, cross-entropy (with label
    smoothing), validation accuracy; the run folder's model files are rewritten with each checkpoint."""

    def __init__(self, cfg: ClassifyConfig, model, vocab, train_set: Examples, valid_set: Examples, meta):
        self.cfg, self.model, self.vocab, self.train_set, self.valid_set, self.meta = (
            cfg, model, vocab, train_set, valid_set, meta
        )  # fmt: skip
        self.tokenizer = vocab.tokenizer if isinstance(model, LMClassifier) else None
        self.batches = Batches(_training_batches(train_set, cfg))
        self.state_dict, self.load_state_dict = self.batches.state_dict, self.batches.load_state_dict

    def next_batch(self):
        return self.train_set.batch(self.batches.next())

    def loss(self, batch) -> StepLoss:
        x, mask, y = batch
        out = self.model(x, mask)
        loss = F.cross_entropy(out.logits.float(), y, label_smoothing=self.cfg.label_smoothing)
        return StepLoss(loss, out.aux_loss, out.moe_aux, len(y))

    def evaluate(self, step: int) -> dict[str, Any]:
        return {"accuracy": accuracy(self.model, self.valid_set)}

    def summary(self, record: dict[str, Any]) -> str:
        return f"valid accuracy {record['accuracy']:.4f}"

    def describe(self) -> dict[str, Any]:
        return self.meta

    def start(self, run_dir: Path) -> None:
        pass

    def export(self, run_dir: Path) -> None:
        save_classifier(run_dir, self.model, self.vocab, self.meta)


def classify_loop(
    cfg: ClassifyConfig, run_dir: Path, train_data, valid_data, names, console=None, resume=False
) -> Loop:
    """The training loop of one classifier in ``run_dir`` (resumed from its last checkpoint with ``resume``)."""
    source = open_run(run_dir, resume)
    torch.manual_seed(cfg.seed)
    model, vocab, train_set = build_model(cfg, train_data, names)
    valid_set = encode(model, vocab, valid_data, names)
    meta = classifier_meta(model, vocab, names, cfg.task)
    if source is not None:
        ckpt.check_same_description(run_dir / META, meta, upgrade_meta)
        load_tensors_into(model, load_tensors(source / WEIGHTS), source / WEIGHTS)
    task = ClassifyTask(cfg, model, vocab, train_set, valid_set, meta)
    return Loop(_with_epoch_limit(cfg, len(train_set)), task, run_dir, source, console)


def _train_one(cfg: ClassifyConfig, run_dir: Path, train_data, valid_data, names, console, resume) -> ClassifyResult:
    loop = classify_loop(cfg, run_dir, train_data, valid_data, names, console, resume)
    run, model = loop.run(), loop.model
    result = ClassifyResult(
        run_dir,
        run.step,
        run.history[-1]["accuracy"],
        run.history,
        model.num_parameters(),
        model.active_parameters(),
        run.seconds,
    )
    _write_run_json(run_dir, cfg, (model.lm if isinstance(model, LMClassifier) else model).config, result)
    return result


def _write_run_json(run_dir: Path, cfg: ClassifyConfig, model_config, result: ClassifyResult, **more: Any) -> None:
    record = {
        "train": cfg.to_dict(),
        "model": model_config.to_dict(),
        "steps": result.step,
        "seconds": result.seconds,
        "accuracy": result.accuracy,
        "parameters": result.parameters,
        "active_parameters": result.active_parameters,
    }
    atomic_write_json(run_dir / "run.json", {**record, **more})


# -- ensembles -----------------------------------------------------------------------------------
def _member_dir(run_dir: Path, k: int) -> Path:
    return run_dir / f"member-{k}"


def _check_ensemble_dir(run_dir: Path, resume: bool) -> None:
    """A new ensemble needs a folder without a model or members; a resumed one, its first member."""
    if resume:
        if not _member_dir(run_dir, 0).is_dir():
            raise CheckpointError(f"{run_dir} holds no ensemble members to resume ({_member_dir(run_dir, 0).name})")
    elif (run_dir / WEIGHTS).exists() or _member_dir(run_dir, 0).exists():
        raise CheckpointError(f"{run_dir} already holds a run; pass --resume to continue it, or choose another --out")


def _train_ensemble(cfg: ClassifyConfig, run_dir: Path, train_data, valid_data, names, console, resume):
    """``cfg.ensemble`` members in ``run_dir/member-K`` (seed + K, each its share of the time budget), then the
    ensemble saved at ``run_dir``. On resume, finished members are kept and an unfinished one continues from
    its last checkpoint."""
    share = None if cfg.time_budget is None else cfg.time_budget / cfg.ensemble
    members, results = [], []
    for k in range(cfg.ensemble):
        member_dir = _member_dir(run_dir, k)
        member_cfg = cfg.replace(ensemble=1, seed=cfg.seed + k, time_budget=share, out_dir=str(member_dir))
        if not (member_dir / "run.json").is_file():  # not finished
            member_resume = resume and ckpt.find_checkpoint(member_dir) is not None
            if resume and not member_resume and member_dir.exists():
                shutil.rmtree(member_dir)  # killed before its first checkpoint: only a random init is lost
            _train_one(member_cfg, member_dir, train_data, valid_data, names, console, member_resume)
        member, vocab, _, _ = load_classifier(member_dir)  # every member has the same vocabulary
        members.append(member)
        results.append(json.loads((member_dir / "run.json").read_text(encoding="utf-8")))
    model = EnsembleClassifier(members)
    meta = {**classifier_meta(members[0], vocab, names, cfg.task), "ensemble": cfg.ensemble}
    save_classifier(run_dir, model, vocab, meta)
    acc = accuracy(model, encode(members[0], vocab, valid_data, names))
    steps = sum(r["steps"] for r in results)
    history = [{"step": steps, "accuracy": acc}]
    result = ClassifyResult(
        run_dir,
        steps,
        acc,
        history,
        model.num_parameters(),
        model.active_parameters(),
        sum(r["seconds"] for r in results),
    )
    member_accuracy = [r["accuracy"] for r in results]
    _write_run_json(run_dir, cfg, members[0].config, result, member_accuracy=member_accuracy)
    return result


def _with_epoch_limit(cfg: ClassifyConfig, rows: int) -> ClassifyConfig:
    """``max_steps`` lowered to ``max_epochs`` passes over ``rows`` training rows (the schedule then ends there)."""
    if cfg.max_epochs is None:
        return cfg
    steps_per_epoch = max(1, rows // (cfg.batch_size * cfg.grad_accum))
    return cfg.replace(max_steps=min(cfg.max_steps, max(1, math.ceil(cfg.max_epochs * steps_per_epoch))))


def _training_batches(train_set: Examples, cfg: ClassifyConfig):
    """Endless row batches: texts of similar length together (little padding), images simply shuffled."""
    if isinstance(train_set.inputs, torch.Tensor):
        return shuffled_rows(len(train_set), cfg.batch_size, cfg.seed)
    return length_bucketed_rows([len(row) for row in train_set.inputs], cfg.batch_size, cfg.seed)


def _max_length(model: EncoderClassifier | LMClassifier) -> int:
    return model.max_length if isinstance(model, LMClassifier) else model.config.max_length


@torch.no_grad()
def predict(checkpoint: str | Path, data: str | Path, text_column: str | None = None, label_column: str | None = None):
    """Predicted label names for a file, and the accuracy when it carries labels (else None)."""
    model, vocab, names, task = load_classifier(checkpoint)
    if task == "classify":
        rows = read_labelled(data, text_column, label_column, require_labels=False)
        labelled = all(label is not None for label in rows.labels)
        examples = text_examples(rows, vocab, names if labelled else None, _max_length(model))
    else:
        rows = read_images(data)
        labelled = True
        examples = encode(model, None, rows, names)
    predictions: list[str] = []
    for x, mask, _ in examples.batches(256):
        predictions += [names[i] for i in model(x, mask).logits.argmax(-1).tolist()]
    acc = None
    if labelled:
        acc = sum(int(names[y] == p) for y, p in zip(examples.labels.tolist(), predictions)) / len(predictions)
    return rows, predictions, acc
