"""``moekit train [CONFIG] [--key value ...] [--resume] [--nproc N] [--ep P]``.

With ``--nproc N`` (N > 1) the command starts N copies of itself on this machine, torchrun-style
(:func:`moekit.distributed.launch.launch`); a copy that finds torchrun's environment (WORLD_SIZE > 1) trains
its share with :func:`moekit.distributed.train_distributed`. So these two run the same thing::

    moekit train --nproc 2 --ep 2 --max-steps 100
    torchrun --standalone --nproc-per-node 2 -m moekit train --ep 2 --max-steps 100
"""

from __future__ import annotations

import argparse
import os
import sys

from rich.console import Console

from moekit import checkpoint as ckpt
from moekit.config import fields_help, parse_overrides, read_config_file
from moekit.errors import ConfigError
from moekit.train.config import TrainConfig
from moekit.train.trainer import train


def add_parser(verbs) -> None:
    p = verbs.add_parser(
        "train",
        help="train a language model",
        description="Train an MoE (or dense) language model. Any TrainConfig field can be set with "
        "--key value (e.g. --max-steps 500, --time-budget 2m, --model.num_hidden_layers 2, --model.moe.top_k 1).",
        epilog="TrainConfig fields (--key value, or keys of a --config file):\n"
        + fields_help(TrainConfig, skip=("model_overrides",))
        + "\n  --model.FIELD, --model.moe.FIELD  the model preset's fields (moekit.models.config.LMConfig, MoEConfig)"
        "\n--task classify|image-classify and --task translate take ClassifyConfig and TranslateConfig fields.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="YAML, TOML or JSON file with TrainConfig fields (may also come first, bare)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--out", dest="out_dir", help="run folder (default: runs/run-<time>)")
    p.add_argument(
        "--nproc", type=int, default=1, help="processes on this machine (launches itself like torchrun; default 1)"
    )
    p.add_argument(
        "--ep", type=int, default=1, help="expert-parallel degree: each process holds num_experts / ep experts"
    )
    p.add_argument(
        "--dist-timeout",
        type=float,
        default=None,
        help="seconds a process waits for the others before the run fails (default 300)",
    )
    p.add_argument(
        "--task",
        default="lm",
        choices=("lm", "classify", "image-classify", "translate"),
        help="lm (default), classify (text: --data TSV/CSV/JSONL --valid FILE), image-classify "
        "(--data IDX/NPZ/folder; see moekit.tasks.classify.ClassifyConfig) or translate (--source FILE "
        "--target FILE --valid-source FILE --valid-target FILE; see moekit.tasks.translate.TranslateConfig)",
    )
    p.set_defaults(func=run, free_options=True)


def run(args: argparse.Namespace) -> int:
    if args.task == "translate":
        return _run_translator(args)
    if args.task != "lm":
        return _run_classifier(args)
    extra = list(args.extra)
    config_file = args.config
    if extra and not extra[0].startswith("--"):
        config_file = extra.pop(0)
    base = _resumed(args, read_config_file(config_file) if config_file else {})
    overrides = parse_overrides(extra)
    if args.out_dir:
        overrides["out_dir"] = args.out_dir
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.nproc > 1 and "RANK" not in os.environ:
        return _launch(args)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if args.nproc > 1 and args.nproc != local_world:
        raise ConfigError(f"--nproc {args.nproc} but the launcher started {local_world} processes on this machine")
    if world > 1 or args.ep > 1:
        from moekit.distributed import train_distributed

        if args.ep > world:
            raise ConfigError(f"--ep {args.ep} needs at least {args.ep} processes (--nproc N or torchrun), got {world}")
        result = train_distributed(base, resume=args.resume, ep=args.ep, timeout=args.dist_timeout, **overrides)
        if int(os.environ.get("RANK", "0")) != 0:
            return 0
    else:
        result = train(base, resume=args.resume, **overrides)
    console = Console()
    step, val = result.val_losses[-1]
    console.print(f"step {step}: val_loss={val:.4f}  ({result.tokens_per_second:,.0f} tok/s over the run)")
    console.print(f"run folder: {result.run_dir}  checkpoint: {result.checkpoint}")
    return 0


def _single_process_task_config(args: argparse.Namespace) -> dict:
    """The config dict of a ``--task`` other than lm: the config file, then ``--key value`` overrides."""
    if args.nproc > 1 or args.ep > 1:
        raise ConfigError(f"--task {args.task} trains in one process (no --nproc or --ep)")
    base = _resumed(args, read_config_file(args.config) if args.config else {})
    overrides = parse_overrides(list(args.extra))
    if args.out_dir:
        overrides["out_dir"] = args.out_dir
    return {**base, **overrides, "task": args.task}


def _resumed(args: argparse.Namespace, base: dict) -> dict:
    """On --resume, every setting comes from the run folder; a config file and options then change only what
    may change on resume (the loop refuses the rest, naming it)."""
    if not args.resume:
        return base
    if not args.out_dir:
        raise ConfigError("--resume needs --out: the run folder to continue")
    return {**ckpt.saved_train_config(args.out_dir), **base}


def _run_classifier(args: argparse.Namespace) -> int:
    """``--task classify|image-classify``: one process; options are ClassifyConfig fields (``--model.*``: encoder)."""
    from moekit.tasks.classify import train_classifier

    result = train_classifier(_single_process_task_config(args), resume=args.resume)
    console = Console()
    console.print(
        f"step {result.step}: valid accuracy {result.accuracy:.4f}  ({result.seconds:.0f}s, "
        f"{result.active_parameters:,} of {result.parameters:,} parameters active)"
    )
    console.print(f"run folder: {result.run_dir}")
    return 0


def _run_translator(args: argparse.Namespace) -> int:
    """``--task translate``: one process; options are TranslateConfig fields (``--model.*``: Seq2SeqConfig)."""
    from moekit.tasks.translate import train_translator

    result = train_translator(_single_process_task_config(args), resume=args.resume)
    bleu = "" if result.bleu is None else f", valid BLEU {result.bleu:.2f} (greedy)"
    Console().print(
        f"step {result.step}: valid loss {result.valid_loss:.4f}{bleu}  ({result.seconds:.0f}s, "
        f"{result.tokens_per_second:,.0f} tok/s over the run, {result.active_parameters:,} of {result.parameters:,} "
        "parameters active)"
    )
    Console().print(f"run folder: {result.run_dir}")
    return 0


def _launch(args: argparse.Namespace) -> int:
    """Start ``args.nproc`` copies of this command (each then sees WORLD_SIZE and trains its share)."""
    from moekit.distributed.launch import launch

    if args.ep > args.nproc or args.nproc % args.ep:
        raise ConfigError(f"--ep {args.ep} must divide --nproc {args.nproc}")
    argv = ["train"]
    if args.config:
        argv += ["--config", args.config]
    if args.resume:
        argv.append("--resume")
    if args.out_dir:
        argv += ["--out", args.out_dir]
    argv += ["--nproc", str(args.nproc), "--ep", str(args.ep)]
    if args.dist_timeout is not None:
        argv += ["--dist-timeout", str(args.dist_timeout)]
    argv += list(args.extra)
    code, _ = launch([sys.executable, "-m", "moekit", *argv], args.nproc)
    return code
