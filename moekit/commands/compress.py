"""``moekit prune`` and ``moekit merge-experts``: fewer experts per MoE layer, ranked or compared on
calibration text; both write a new checkpoint and share the calibration options.

    moekit prune --checkpoint DIR (--keep N | --keep-fraction F) --criterion C --calibration-data FILE --out DIR
    moekit merge-experts --checkpoint DIR --target N --calibration-data FILE --out DIR
"""

from __future__ import annotations

import argparse

from moekit.io.folders import check_output_folder
from moekit.recipes.merge import merge_checkpoint
from moekit.recipes.prune import format_report, prune_checkpoint


def add_parser(verbs: argparse._SubParsersAction) -> None:
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
    p.add_argument("--overwrite", action="store_true", help="write into --out even if it is not empty")
    _add_calibration_options(p)
    p.set_defaults(func=run_prune)

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
    p.add_argument("--overwrite", action="store_true", help="write into --out even if it is not empty")
    p.add_argument("--similarity-tokens", type=int, default=2048, help="tokens every expert runs on (default 2048)")
    _add_calibration_options(p)
    p.set_defaults(func=run_merge)


def _add_calibration_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--block-size", type=int, default=128, help="calibration window length (capped by the context)")
    p.add_argument("--batch-size", type=int, default=16, help="calibration windows per batch")
    p.add_argument("--max-batches", type=int, default=8, help="calibration batches (default 8)")


def _calibration(args: argparse.Namespace) -> dict[str, object]:
    return {name: getattr(args, name) for name in ("calibration_data", "block_size", "batch_size", "max_batches")}


def run_prune(args: argparse.Namespace) -> int:
    check_output_folder(args.out, args.overwrite)
    report = prune_checkpoint(
        args.checkpoint,
        args.out,
        keep=args.keep,
        keep_fraction=args.keep_fraction,
        criterion=args.criterion,
        **_calibration(args),
    )
    print(format_report(report))
    print(f"pruned checkpoint: {report['checkpoint']}")
    return 0


def run_merge(args: argparse.Namespace) -> int:
    check_output_folder(args.out, args.overwrite)
    report = merge_checkpoint(
        args.checkpoint, args.out, args.target, similarity_tokens=args.similarity_tokens, **_calibration(args)
    )
    print(format_report(report))
    print(f"merged checkpoint: {report['checkpoint']}")
    return 0
