"""``moekit predict --checkpoint RUN --data FILE [--out PREDICTIONS.tsv]``: labels from a trained classifier.

Text files (TSV/CSV/JSONL) need a text column; a label column, if present, gives the accuracy.
Image data (IDX, NPZ, folder, builtin:digits) is labelled and always reports accuracy.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from moekit.tasks.classify import predict


def add_parser(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser("predict", help="label text or images with a trained classifier", description=__doc__)
    p.add_argument("--checkpoint", required=True, help="run folder of moekit train --task classify|image-classify")
    p.add_argument("--data", required=True, help="file to label")
    p.add_argument("--out", default=None, help="write a TSV of (input, prediction) rows here")
    p.add_argument("--text-column", default=None)
    p.add_argument("--label-column", default=None)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    rows, predictions, acc = predict(args.checkpoint, args.data, args.text_column, args.label_column)
    inputs = getattr(rows, "texts", None) or getattr(rows, "sources", [])
    if args.out:
        with open(Path(args.out), "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_MINIMAL, lineterminator="\n")
            writer.writerow(["input", "prediction"])
            writer.writerows(zip(inputs, predictions))
    else:
        for item, label in list(zip(inputs, predictions))[:20]:
            print(f"{label}\t{item}")
        if len(predictions) > 20:
            print(f"... ({len(predictions) - 20} more; --out FILE writes them all)")
    summary = f"{len(predictions)} predictions"
    if acc is not None:
        summary += f", accuracy {acc:.4f}"
    print(summary)
    return 0
