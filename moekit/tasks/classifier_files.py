"""A classifier's files in its run folder: ``model.json`` (task, model config, labels, vocabulary) and
``model.safetensors``, written after each checkpoint and read by ``predict`` and ``load_classifier``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moekit.checkpoint import load_tensors_into, model_tensors
from moekit.data.labelled import WordVocab
from moekit.data.tokenizers import Tokenizer, load_tokenizer
from moekit.errors import CheckpointError, ConfigError, DataError
from moekit.io.atomic import atomic_write_json
from moekit.io.safe_io import load_tensors, save_tensors
from moekit.models.config import LMConfig
from moekit.models.encoder import EncoderClassifier, EncoderConfig
from moekit.models.ensemble import EnsembleClassifier
from moekit.models.lm import MoELM
from moekit.models.lm_classifier import LMClassifier

WEIGHTS, META = "model.safetensors", "model.json"


class TokenizerVocab:
    """A language model's tokenizer behind WordVocab's ``encode(text, max_length)``, for :class:`LMClassifier`."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def encode(self, text: str, max_length: int) -> list[int]:
        return self.tokenizer.encode(text)[:max_length] or [0]


def upgrade_meta(saved: dict[str, Any]) -> dict[str, Any]:
    """A saved ``model.json`` with its encoder config in today's spelling (old runs saved MoE fields flat)."""
    return {**saved, "encoder": EncoderConfig.from_dict(saved["encoder"]).to_dict()} if "encoder" in saved else saved


def classifier_meta(model: EncoderClassifier | LMClassifier, vocab, names: list[str], task: str) -> dict[str, Any]:
    """What ``model.json`` holds: the task, the model's config, the label names and the vocabulary."""
    if isinstance(model, LMClassifier):  # the LM's config (its tokenizer is saved beside); weights: lm.* and head.*
        return {"task": task, "lm": model.lm.config.to_dict(), "max_length": model.max_length, "labels": names}
    return {
        "task": task,
        "encoder": model.config.to_dict(),
        "labels": names,
        "vocab": vocab.to_dict() if vocab is not None else None,
    }


def save_classifier(run_dir: Path, model: EncoderClassifier | LMClassifier, vocab, meta: dict[str, Any]) -> None:
    """Write ``model.json`` (``meta``), the weights, and an LM classifier's tokenizer into ``run_dir``."""
    if isinstance(model, LMClassifier):
        vocab.tokenizer.save(run_dir)
    atomic_write_json(run_dir / META, meta)
    save_tensors(model_tensors(model), run_dir / WEIGHTS)  # tied LM head: stored once


def is_classifier_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` holds a classifier's ``model.json``."""
    return (Path(path) / META).is_file()


def load_classifier(path: str | Path) -> tuple[EncoderClassifier, WordVocab | None, list[str], str]:
    """(model in eval mode, vocabulary or None, label names, task) from a run folder."""
    run_dir = Path(path)
    if not is_classifier_checkpoint(run_dir):
        raise CheckpointError(f"{run_dir} holds no classifier ({META} is missing)")
    try:
        meta = json.loads((run_dir / META).read_text(encoding="utf-8"))
        if meta.get("task") == "translate":
            raise CheckpointError(f"{run_dir} holds a translation model: use `moekit translate --checkpoint {run_dir}`")
        names, task = list(meta["labels"]), meta["task"]
        if "lm" in meta:
            lm = MoELM(LMConfig.from_dict(meta["lm"]))
            model = LMClassifier(lm, max(2, len(names)), int(meta["max_length"]))
            vocab = TokenizerVocab(load_tokenizer(run_dir))
        else:
            config = EncoderConfig.from_dict(meta["encoder"])
            members = int(meta.get("ensemble", 1))
            if members > 1:
                model = EnsembleClassifier([EncoderClassifier(config) for _ in range(members)])
            else:
                model = EncoderClassifier(config)
            vocab = WordVocab.from_dict(meta["vocab"]) if meta.get("vocab") else None
    except (ValueError, KeyError, TypeError, ConfigError, DataError) as e:
        raise CheckpointError(f"{run_dir / META}: not a valid classifier description ({e})") from None
    load_tensors_into(model, load_tensors(run_dir / WEIGHTS), run_dir / WEIGHTS)
    model.eval()
    return model, vocab, names, task
