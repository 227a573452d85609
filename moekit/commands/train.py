"""``moekit train [CONFIG] [--key value ...] [--resume]``."""

from __future__ import annotations

import argparse

from rich.console import Console

from moekit.commands.options import parse_overrides, read_config_file
from moekit.train.config import apply_overrides
from moekit.train.trainer import train


def add_parser(verbs) -> None:
    p = verbs.add_parser(
        "train",
        help="train a language model",
        description="Train an MoE (or dense) language model. Any TrainConfig field can be set with "
        "--key value (e.g. --max-steps 500, --time-budget 2m, --model.num_hidden_layers 2, --model.moe.top_k 1).",
    )
    p.add_argument("--config", help="YAML, TOML or JSON file with TrainConfig fields (may also come first, bare)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--out", dest="out_dir", help="run folder (default: runs/run-<time>)")
    p.set_defaults(func=run, free_options=True)


def run(args: argparse.Namespace) -> int:
    extra = list(args.extra)
    config_file = args.config
    if extra and not extra[0].startswith("--"):
        config_file = extra.pop(0)
    base = read_config_file(config_file) if config_file else {}
    overrides = parse_overrides(extra)
    if args.out_dir:
        overrides["out_dir"] = args.out_dir
    result = train(apply_overrides(base, {}), resume=args.resume, **overrides)
    console = Console()
    step, val = result.val_losses[-1]
    console.print(f"step {step}: val_loss={val:.4f}  ({result.tokens_per_second:,.0f} tok/s)")
    console.print(f"run folder: {result.run_dir}  checkpoint: {result.checkpoint}")
    return 0
