"""The loss of a model on a text file: what ``moekit eval`` prints."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from moekit.data.loader import iter_eval_batches
from moekit.data.text import load_text
from moekit.errors import DataError
from moekit.interop.hf.api import load_for_inference
from moekit.nn.offload import offload_stats


@torch.no_grad()
def evaluate_file(
    checkpoint: str | Path | None,
    data: str | Path,
    block_size: int | None = None,
    batch_size: int = 16,
    max_batches: int | None = None,
    hf_model: str | Path | None = None,
    expert_memory: str | int | None = None,
    dtype: torch.dtype | str | None = None,
) -> dict[str, Any]:
    """Mean next-token loss (nats/token), perplexity and token count of a checkpoint (or, with ``hf_model`` and
    ``checkpoint=None``, a Hugging Face folder) over non-overlapping windows (default 128 tokens) of a file;
    with ``expert_memory`` (see :func:`moekit.checkpoint.load_model`) also the expert cache's summary; ``dtype``
    casts the float weights."""
    model, tokenizer = load_for_inference(checkpoint, hf_model, expert_memory, dtype)
    block = min(block_size or 128, model.config.max_position_embeddings)
    ids = tokenizer.encode(load_text(data))
    if ids and max(ids) >= model.config.vocab_size:
        raise DataError(f"{data}: token id {max(ids)} is outside the model's vocabulary ({model.config.vocab_size})")
    total, count = 0.0, 0
    for x, y in iter_eval_batches(torch.tensor(ids, dtype=torch.long), block, batch_size, max_batches=max_batches):
        logits = model(x).logits
        total += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum").item()
        count += y.numel()
    loss = total / count
    out: dict[str, Any] = {"val_loss": loss, "perplexity": math.exp(min(loss, 50)), "tokens": count}
    stats = offload_stats(model)
    if stats is not None:
        out["expert_cache"] = stats.summary()
    return out
