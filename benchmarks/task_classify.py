"""MoE encoder vs the dense baseline with equal active parameters, for equal training time.

    python benchmarks/task_classify.py --task classify --data ../shared/data/sst2/train.tsv \
        --valid ../shared/data/sst2/dev.tsv --budget 15m --out benchmarks/results/classify.md
    python benchmarks/task_classify.py --task image-classify \
        --data ../shared/data/mnist/train-images-idx3-ubyte.gz \
        --valid ../shared/data/mnist/t10k-images-idx3-ubyte.gz --budget 15m --out benchmarks/results/image-classify.md

Both models share every setting but ``ffn`` (moe: top-1 of 8 experts every other layer; dense: one
MLP as wide as an expert), so a token passes the same number of weights in both. Writes a markdown
table (and ``--json``); the MoE run also writes its routing-by-label report next to the table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from side_by_side import run_side_by_side
from task_table import parse_sets, write_table

from moekit.tasks.classify import ClassifyConfig, encode, load_classifier, load_task_data, train_classifier
from moekit.tasks.routing import write_routing_report


def _train_one(args, extra: dict, ffn: str, run_tag: int | None = None) -> dict:
    """Train the ``ffn`` model (moe or dense) for the budget."""
    run_dir = Path(args.runs) / f"{args.task}-{ffn}-{run_tag or os.getpid()}"
    result = train_classifier(
        task=args.task,
        data=args.data,
        valid=args.valid,
        time_budget=args.budget,
        threads=args.threads,
        out_dir=str(run_dir),
        progress=False,
        eval_interval=1_000_000,
        **{"model.ffn": ffn, **extra},
    )
    members = json.loads((run_dir / "run.json").read_text()).get("member_accuracy", [result.accuracy])
    row = {
        "model": ffn,
        "accuracy": result.accuracy,
        "member_mean": sum(members) / len(members),  # an ensemble's members alone (a single model: itself)
        "steps": result.step,
        "seconds": result.seconds,
        "parameters": result.parameters,
        "active_parameters": result.active_parameters,
    }
    print(json.dumps(row), flush=True)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=("classify", "image-classify"), required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--valid", required=True)
    p.add_argument("--budget", default="15m", help="training time per model")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs", default="runs/bench")
    p.add_argument("--out", required=True, help="markdown table path")
    p.add_argument("--json", default=None)
    p.add_argument("--models", default="moe,dense", help="which of moe,dense to train, in order")
    p.add_argument(
        "--parallel", action="store_true", help="train MoE and dense at once, one core each (default: in turn)"
    )
    p.add_argument("--set", nargs="*", default=[], help="extra ClassifyConfig key=value (model.moe.top_k=2 ...)")
    args = p.parse_args(argv)
    extra = parse_sets(args.set)
    models = args.models.split(",")
    if args.parallel:
        rows = run_side_by_side(_train_one, [(args, extra, ffn, os.getpid()) for ffn in models])
    else:
        rows = [_train_one(args, extra, ffn) for ffn in models]
    if "moe" in models:
        model, vocab, names, _ = load_classifier(Path(args.runs) / f"{args.task}-moe-{os.getpid()}")
        cfg = ClassifyConfig.from_dict({"task": args.task, "data": args.data, "valid": args.valid})
        _, valid = load_task_data(cfg)
        routing = Path(args.out).with_name(Path(args.out).stem + "-routing.md")
        write_routing_report(model, encode(model, vocab, valid, names), names, routing)
    columns = [
        ("accuracy", "accuracy", ".4f"),
        ("members' mean accuracy", "member_mean", ".4f"),
        ("steps", "steps", "d"),
        ("seconds", "seconds", ".0f"),
        ("parameters", "parameters", ",d"),
        ("active parameters", "active_parameters", ",d"),
    ]
    write_table(args, args.task, f"train: `{args.data}`, evaluated on `{args.valid}`", columns, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
