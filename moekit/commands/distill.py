"""``moekit distill --teacher DIR --student PRESET|CONFIG|DIR [--temperature T] [--alpha A] [--key value ...]``."""

from __future__ import annotations

import argparse

from rich.console import Console

from moekit.config import parse_overrides, read_config_file
from moekit.recipes.distill import distill


def add_parser(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser(
        "distill",
        help="distil a teacher model into a dense or smaller MoE student",
        description="Train a student on alpha * T^2 * KL(teacher/T || student/T) + (1 - alpha) * CE(data). "
        "Any TrainConfig field can be set with --key value (e.g. --data FILE, --max-steps 500, --lr 1e-3).",
    )
    p.add_argument("--teacher", required=True, help="moekit checkpoint or run folder (or a Hugging Face folder)")
    p.add_argument("--student", required=True, help="preset name, LMConfig file (YAML/JSON/TOML) or checkpoint folder")
    p.add_argument("--temperature", type=float, default=2.0, help="softmax temperature T (default 2)")
    p.add_argument("--alpha", type=float, default=0.5, help="weight of the teacher term (default 0.5)")
    p.add_argument(
        "--top-k-logits", type=int, default=None, help="keep only the teacher's top-k logits (renormalised over them)"
    )
    p.add_argument("--cache-teacher", default=None, help="folder to write (or read) the teacher's logits")
    p.add_argument(
        "--init-from-teacher", action="store_true", help="copy the teacher's non-expert weights into the student"
    )
    p.add_argument("--config", help="YAML, TOML or JSON file with TrainConfig fields")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--out", dest="out_dir", help="run folder (default: runs/run-<time>)")
    p.set_defaults(func=run, free_options=True)


def run(args: argparse.Namespace) -> int:
    base = read_config_file(args.config) if args.config else {}
    overrides = parse_overrides(list(args.extra))
    if args.out_dir:
        overrides["out_dir"] = args.out_dir
    result = distill(
        args.teacher,
        args.student,
        temperature=args.temperature,
        alpha=args.alpha,
        top_k_logits=args.top_k_logits,
        cache_teacher=args.cache_teacher,
        init_from_teacher=args.init_from_teacher,
        config=base,
        resume=args.resume,
        **overrides,
    )
    console = Console()
    step, val = result.val_losses[-1]
    console.print(f"step {step}: student val_loss={val:.4f}  ({result.tokens_per_second:,.0f} tok/s over the run)")
    console.print(f"run folder: {result.run_dir}  checkpoint: {result.checkpoint}")
    return 0
