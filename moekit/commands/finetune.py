"""``moekit finetune --init-from RUN_OR_HF_DIR --method full|lora|esft|esft+lora [...] [--key value ...]`` and
``moekit merge-adapter CHECKPOINT --out DIR``.

Any TrainConfig field can follow as ``--key value`` (``--data math.txt --max-steps 200 --lr 1e-4``); the run
shows train's progress bar and writes train's run folder, plus ``adapter.safetensors`` in each checkpoint
(LoRA) and ``esft_selection.json`` (ESFT).
"""

from __future__ import annotations

import argparse

from rich.console import Console

from moekit.config import parse_overrides, read_config_file
from moekit.io.folders import check_output_folder
from moekit.recipes.finetune import FinetuneConfig, FinetuneTrainer, merge_adapter, trainable_parameters
from moekit.train.config import TrainConfig


def add_parser(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser(
        "finetune",
        help="fine-tune a checkpoint: full, LoRA, ESFT or ESFT+LoRA",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--init-from", required=True, help="moekit run or checkpoint, or Hugging Face model folder")
    p.add_argument("--method", default="lora", choices=["full", "lora", "esft", "esft+lora"])
    p.add_argument("--config", help="YAML, TOML or JSON file with TrainConfig fields")
    p.add_argument("--out", dest="out_dir", help="run folder (default: runs/finetune-<time>)")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=16.0, help="the update is scaled by alpha / rank")
    p.add_argument("--lora-dropout", type=float, default=0.0)
    p.add_argument(
        "--lora-targets",
        default="attention,experts,shared_experts",
        help="comma-separated: attention, experts, shared_experts, dense_mlp (esft+lora: the selected experts)",
    )
    p.add_argument("--freeze-router", action="store_true", help="full and lora: do not train the routers")
    p.add_argument("--esft", default="gate", choices=["gate", "token"], help="expert relevance for ESFT")
    p.add_argument("--top-p", type=float, default=0.2, help="ESFT: per layer, experts up to this relevance share")
    p.add_argument("--calibration-data", help="ESFT: task text to score the experts on (default: --data)")
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


def run(args: argparse.Namespace) -> int:
    extra = list(args.extra)
    base = read_config_file(args.config) if args.config else {}
    overrides = {**base, **parse_overrides(extra), "init_from": args.init_from}
    if args.out_dir:
        overrides["out_dir"] = args.out_dir
    finetune = FinetuneConfig(
        method=args.method,
        lora_rank=args.lora_rank,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        lora_targets=tuple(t.strip() for t in args.lora_targets.split(",") if t.strip()),
        freeze_router=args.freeze_router,
        esft=args.esft,
        top_p=args.top_p,
        calibration_data=args.calibration_data,
    )
    console = Console()
    trainer = FinetuneTrainer(TrainConfig.from_options(overrides), finetune, console=console)
    trainable, total = trainable_parameters(trainer.model), trainer.total_parameters
    console.print(f"{args.method}: training {trainable:,} of {total:,} parameters")
    result = trainer.run()
    step, val = result.val_losses[-1]
    console.print(f"step {step}: val_loss={val:.4f}  ({result.tokens_per_second:,.0f} tok/s over the run)")
    console.print(f"run folder: {result.run_dir}  checkpoint: {result.checkpoint}")
    return 0


def run_merge(args: argparse.Namespace) -> int:
    check_output_folder(args.out, args.overwrite)
    path = merge_adapter(args.checkpoint, args.out)
    print(f"merged {args.checkpoint} -> {path}")
    return 0
