"""Tiny models and checkpoints for the recipe tests."""

from __future__ import annotations

import torch

from moekit.checkpoint import save_checkpoint
from moekit.data.corpus import builtin_corpus
from moekit.data.tokenizers import ByteTokenizer
from moekit.models import MoELM, get_preset

TINY = get_preset("tiny")
FAST = dict(batch_size=4, block_size=16, eval_interval=1000, eval_batches=2, progress=False, tensorboard=False)


def tiny_config(**moe_fields):
    """The tiny preset (2 layers, 4 experts, top-2) with MoE fields changed."""
    return TINY.replace(moe=TINY.moe.replace(**moe_fields)) if moe_fields else TINY


def tiny_model(seed: int = 0, config=None) -> MoELM:
    torch.manual_seed(seed)
    return MoELM(config or TINY).eval()


def save_model(path, model: MoELM, step: int = 0):
    """A moekit checkpoint of ``model`` (byte tokenizer) under ``path``; returns the run folder."""
    save_checkpoint(path, step, model, ByteTokenizer())
    return path


def text_file(path, chars: int = 20_000):
    path.write_text(builtin_corpus()[:chars])
    return path


def random_ids(seed: int = 0, batch: int = 4, seq: int = 24) -> torch.Tensor:
    return torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(seed))
