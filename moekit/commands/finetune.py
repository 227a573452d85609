"""``moekit finetune --init-from RUN_OR_HF_DIR --method full|lora|esft|esft+lora [...] [--key value ...]`` and
``moekit merge-adapter CHECKPOINT --out DIR``.

Any TrainConfig field can follow as ``--key value`` (``--data math.txt --max-steps 200 --lr 1e-4``); the run
shows train's progress bar and writes train's run folder, plus ``adapter.safetensors`` in each checkpoint
(LoRA) and ``esft_selection.json`` (ESFT). ``--resume --out RUN`` continues a run with its own settings;
under ``torchrun --nproc-per-node N -m moekit finetune ...`` each rank trains on its share of the global batch
(data parallel: :mod:`moekit.distributed.finetune`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

from rich.console import Console

from moekit import checkpoint as ckpt
from moekit.config import parse_overrides, read_config_file
from moekit.errors import ConfigError
from moekit.io.folders import check_output_folder
from moekit.recipes.finetune import (
    FinetuneConfig,
    FinetuneTrainer,
    merge_adapter,
    saved_finetune_config,
    trainable_parameters,
)
from moekit.train.config import TrainConfig


def add_parser(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser(
        "finetune",
        help="fine-tune a checkpoint: full, LoRA, ESFT or ESFT+LoRA",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # Fine-tuning settings default to None: a new run takes FinetuneConfig's defaults, a resumed run its own.
    p.add_argument("--init-from", help="moekit run or checkpoint, or Hugging Face model folder")
    p.add_argument("--method", choices=["full", "lora", "esft", "esft+lora"], help="default: lora")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--config", help="YAML, TOML or JSON file with TrainConfig fields")
    p.add_argument("--out", dest="out_dir", help="run folder (default: runs/finetune-<time>)")
    p.add_argument("--lora-rank", type=int, help="default: 8")
    p.add_argument("--lora-alpha", type=float, help="the update is scaled by alpha / rank (default: 16)")
    p.add_argument("--lora-dropout", type=float, help="default: 0")
    p.add_argument(
        "--lora-targets",
        help="comma-separated: attention, experts, shared_experts, dense_mlp (default: the first three; "
        "esft+lora: the selected experts)",
    )
    p.add_argument("--freeze-router", action="store_true", default=None, help="full and lora: do not train the routers")
    p.add_argument("--esft", choices=["gate", "token"], help="expert relevance for ESFT (default: gate)")
    p.add_argument("--top-p", type=float, help="ESFT: per layer, experts up to this relevance share (default: 0.2)")
    p.add_argument("--calibration-data", help="ESFT: task text to score the experts on (default: --data)")
    p.add_argument("--dist-timeout", type=float, help="torchrun: seconds a rank waits for the others (default 300)")
    p.set_defaults(func=run, free_options=True)

    m = verbs.add_parser(
        "merge-adapter",
        help="fold a fine-tuning checkpoint's LoRA adapter into its weights",
        description="Write the model of a `moekit finetune` checkpoint with its adapter merged, as a plain model "
        "folder that moekit.load reads.",
    )
    m.add_argument("checkpoint", help="fine-tuning run or checkpoint folder (with adapter.safetensors)")
    m.add_argument("--out", required=True, help="output folder")
    m.add_argument("--overwrite", action="store_true", help="write into --out even if it is not empty")
    m.set_defaults(func=run_merge)


_FINETUNE_OPTIONS = [f.name for f in dataclasses.fields(FinetuneConfig)]  # each one an option of the parser


def _configs(args: argparse.Namespace) -> tuple[TrainConfig, FinetuneConfig]:
    """The run's settings: on --resume the run folder's, changed by what the command line gives (the trainer
    refuses changes to what a step computes, naming the setting)."""
    given = {k: getattr(args, k) for k in _FINETUNE_OPTIONS if getattr(args, k) is not None}
    if "lora_targets" in given:
        given["lora_targets"] = tuple(t.strip() for t in given["lora_targets"].split(",") if t.strip())
    train_base, finetune_base = {}, {}
    if args.resume:
        if not args.out_dir:
            raise ConfigError("--resume needs --out: the run folder to continue")
        train_base = ckpt.saved_train_config(args.out_dir)
        finetune_base = saved_finetune_config(Path(args.out_dir))
    elif not args.init_from:
        raise ConfigError("finetune needs --init-from: a moekit run or checkpoint, or a Hugging Face folder")
    overrides = {**train_base, **(read_config_file(args.config) if args.config else {})}
    overrides.update(parse_overrides(list(args.extra)))
    for key in ("init_from", "out_dir"):
        if getattr(args, key):
            overrides[key] = getattr(args, key)
    return TrainConfig.from_options(overrides), FinetuneConfig.from_dict({**finetune_base, **given})


def run(args: argparse.Namespace) -> int:
    config, finetune = _configs(args)
    console = Console()
    main = int(os.environ.get("RANK", "0")) == 0
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # a rank of torchrun: data parallel
        from moekit.distributed.finetune import finetune_distributed

        result = finetune_distributed(config, finetune, resume=args.resume, timeout=args.dist_timeout)
    else:
        trainer = FinetuneTrainer(config, finetune, console=console, resume=args.resume)
        trainable, total = trainable_parameters(trainer.model), trainer.total_parameters
        console.print(f"{finetune.method.value}: training {trainable:,} of {total:,} parameters")
        result = trainer.run()
    if main:
        step, val = result.val_losses[-1]
        console.print(f"step {step}: val_loss={val:.4f}  ({result.tokens_per_second:,.0f} tok/s over the run)")
        console.print(f"run folder: {result.run_dir}  checkpoint: {result.checkpoint}")
    return 0


def run_merge(args: argparse.Namespace) -> int:
    check_output_folder(args.out, args.overwrite)
    path = merge_adapter(args.checkpoint, args.out)
    print(f"merged {args.checkpoint} -> {path}")
    return 0
