"""``moekit eval --checkpoint DIR --data FILE``: validation loss of a checkpoint on a text file.

``--model HF_DIR`` evaluates a Hugging Face model folder (with its tokenizer.json) instead.
"""

from __future__ import annotations

import argparse

from moekit.inference.evaluate import evaluate_file
from moekit.inference.model_options import add_model_options


def add_parser(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser("eval", help="evaluate a checkpoint on a text file", description=__doc__)
    add_model_options(p)
    p.add_argument("--data", required=True, help="text file, folder or JSONL")
    p.add_argument("--block-size", type=int, default=None, help="window length (default: 128, capped by context)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-batches", type=int, default=None, help="evaluate at most this many batches")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    r = evaluate_file(
        args.checkpoint,
        args.data,
        args.block_size,
        args.batch_size,
        args.max_batches,
        args.model,
        args.expert_memory,
        args.dtype,
    )
    print(f"val_loss={r['val_loss']:.4f} perplexity={r['perplexity']:.3f} tokens={r['tokens']}")
    if "expert_cache" in r:
        print(r["expert_cache"])
    return 0
