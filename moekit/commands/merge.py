"""``moekit merge-experts --checkpoint DIR --target N --calibration-data FILE --out DIR``."""

from __future__ import annotations

import argparse

from moekit.commands.prune import add_calibration_options
from moekit.recipes.merge import merge_checkpoint
from moekit.recipes.prune import format_report


def add_parser(verbs) -> None:
    p = verbs.add_parser(
        "merge-experts",
        help="merge similar experts of each MoE layer down to N",
        description="Cluster each MoE layer's experts by the similarity of their outputs on calibration text and "
        "average each cluster (weighted by use) into one expert; writes a new checkpoint.",
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint or run folder of an MoE model")
    p.add_argument("--target", type=int, required=True, help="experts per layer after merging")
    p.add_argument("--calibration-data", required=True, help="text file, folder or JSONL to compare experts on")
    p.add_argument("--out", required=True, help="folder for the merged checkpoint")
    p.add_argument("--similarity-tokens", type=int, default=2048, help="tokens every expert runs on (default 2048)")
    add_calibration_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    report = merge_checkpoint(
        args.checkpoint,
        args.out,
        args.target,
        calibration_data=args.calibration_data,
        similarity_tokens=args.similarity_tokens,
        block_size=args.block_size,
        batch_size=args.batch_size,
        max_batches=args.max_batches,
    )
    print(format_report(report))
    print(f"merged checkpoint: {report['checkpoint']}")
    return 0
