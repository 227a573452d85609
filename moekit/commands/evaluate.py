"""``moekit eval --checkpoint DIR --data FILE``: validation loss of a checkpoint on a text file.

``--model HF_DIR`` evaluates a Hugging Face model folder (with its tokenizer.json) instead.
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F

from moekit.data.loader import iter_eval_batches
from moekit.data.text import load_text
from moekit.errors import DataError
from moekit.interop.hf.api import load_for_inference


def add_parser(verbs) -> None:
    p = verbs.add_parser("eval", help="evaluate a checkpoint on a text file", description=__doc__)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="checkpoint or run folder")
    source.add_argument("--model", metavar="HF_DIR", help="Hugging Face model folder (instead of --checkpoint)")
    p.add_argument("--data", required=True, help="text file, folder or JSONL")
    p.add_argument("--block-size", type=int, default=None, help="window length (default: 128, capped by context)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-batches", type=int, default=None, help="evaluate at most this many batches")
    p.set_defaults(func=run)


@torch.no_grad()
def evaluate_file(
    checkpoint, data, block_size=None, batch_size=16, max_batches=None, hf_model=None
) -> dict[str, float]:
    """Mean next-token loss (nats/token) of a checkpoint (or, with ``hf_model``, an HF model folder and
    ``checkpoint=None``) over non-overlapping windows of a file."""
    model, tokenizer = load_for_inference(checkpoint, hf_model)
    block = min(block_size or 128, model.config.max_position_embeddings)
    ids = tokenizer.encode(load_text(data))
    if ids and max(ids) >= model.config.vocab_size:
        raise DataError(f"{data}: token id {max(ids)} is outside the model's vocabulary ({model.config.vocab_size})")
    tokens = torch.tensor(ids, dtype=torch.long)
    total, count = 0.0, 0
    for x, y in iter_eval_batches(tokens, block, batch_size, max_batches=max_batches):
        logits = model(x).logits
        total += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum").item()
        count += y.numel()
    loss = total / count
    return {"val_loss": loss, "perplexity": math.exp(min(loss, 50)), "tokens": count}


def run(args: argparse.Namespace) -> int:
    r = evaluate_file(args.checkpoint, args.data, args.block_size, args.batch_size, args.max_batches, args.model)
    print(f"val_loss={r['val_loss']:.4f} perplexity={r['perplexity']:.3f} tokens={r['tokens']}")
    return 0
