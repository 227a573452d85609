"""``moekit prune --checkpoint DIR (--keep N | --keep-fraction F) --criterion C --calibration-data FILE --out DIR``."""

from __future__ import annotations

import argparse

from moekit.recipes.prune import format_report, prune_checkpoint


def add_parser(verbs) -> None:
    p = verbs.add_parser(
        "prune",
        help="remove the least important experts of each MoE layer",
        description="Rank each MoE layer's experts on calibration text and keep the top N; writes a new checkpoint.",
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint or run folder of an MoE model")
    keep = p.add_mutually_exclusive_group(required=True)
    keep.add_argument("--keep", type=int, help="experts to keep per layer")
    keep.add_argument("--keep-fraction", type=float, help="share of each layer's experts to keep, in (0, 1]")
    p.add_argument("--criterion", default="frequency", choices=["frequency", "router-weighted-output"])
    p.add_argument("--calibration-data", required=True, help="text file, folder or JSONL to rank experts on")
    p.add_argument("--out", required=True, help="folder for the pruned checkpoint")
    add_calibration_options(p)
    p.set_defaults(func=run)


def add_calibration_options(p) -> None:
    p.add_argument("--block-size", type=int, default=128, help="calibration window length (capped by the context)")
    p.add_argument("--batch-size", type=int, default=16, help="calibration windows per batch")
    p.add_argument("--max-batches", type=int, default=8, help="calibration batches (default 8)")


def run(args: argparse.Namespace) -> int:
    report = prune_checkpoint(
        args.checkpoint,
        args.out,
        keep=args.keep,
        keep_fraction=args.keep_fraction,
        criterion=args.criterion,
        calibration_data=args.calibration_data,
        block_size=args.block_size,
        batch_size=args.batch_size,
        max_batches=args.max_batches,
    )
    print(format_report(report))
    print(f"pruned checkpoint: {report['checkpoint']}")
    return 0
