"""MoE vs equal-active dense language model on tiny-shakespeare, character level.

nanoGPT's split (first 90% train, last 10% validation). Both models train for the same steps on
the same batches (same seed), interleaved step by step in one process so that both see the same
machine load; the script prints both validation losses, their gap and the step-time ratio.

    python benchmarks/lm_quality.py --steps 600            # equal tokens: MoE vs dense
    python benchmarks/lm_quality.py --steps 2400 --dropout 0.2   # both with dropout, plus the dense without
    python benchmarks/lm_quality.py --demo-budget 120      # the demo preset under a 2-minute budget

Targets (issue 3): MoE beats dense by >= 0.03 nats at equal tokens with step time <= 1.2x dense;
the demo preset reaches val loss <= 1.70 within 2 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from moekit.commands.demo import DEMO_RECIPE
from moekit.train import TrainConfig, Trainer


def make_trainer(model: str, steps: int, out: Path, args, dropout: float = 0.0, tag: str = "", **extra) -> Trainer:
    config = TrainConfig(
        model=model,
        data=getattr(args, "data", None),  # None: the built-in copy of tiny-shakespeare
        tokenizer="char",
        block_size=args.block_size,
        batch_size=args.batch_size,
        max_steps=steps,
        lr=args.lr,
        warmup_steps=args.warmup,
        eval_batches=args.eval_batches,
        seed=args.seed,
        progress=False,
        tensorboard=False,
        out_dir=str(out / (model + tag)),
        **extra,
    )
    overrides: dict = {"dropout": dropout} if dropout else {}
    if model == "demo" and args.moe:  # a variant of the demo's MoE layers, e.g. --moe num_experts=16
        overrides["moe"] = dict(_field_value(kv) for kv in args.moe)
    if model == "demo" and getattr(args, "lm", None):  # a variant of the demo model, e.g. --lm first_k_dense=1
        overrides.update(_field_value(kv) for kv in args.lm)
    if overrides:
        config = config.replace(model_overrides=overrides)
    return Trainer(config)


def _field_value(text: str) -> tuple[str, object]:
    key, _, value = text.partition("=")
    return key, json.loads(value) if value[:1] in "0123456789-[{tf" or value == "null" else value


def equal_tokens(args) -> dict:
    """MoE vs dense on the same batches. With ``--dropout`` both train with it, and a third model, the dense
    one without dropout, guards the comparison: the gap is taken against the better of the two dense runs."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        trainers = {
            "moe": make_trainer("demo", args.steps, out, args, args.dropout),
            "dense": make_trainer("dense-demo", args.steps, out, args, args.dropout),
        }
        if args.dropout:
            trainers["dense-no-dropout"] = make_trainer("dense-demo", args.steps, out, args, tag="-plain")
        times: dict[str, list[float]] = {name: [] for name in trainers}
        curve = []  # validation losses at every tenth of the run: where the gap opens
        for step in range(args.steps):
            for name, trainer in trainers.items():
                t0 = time.perf_counter()
                trainer.train_step(step / args.steps)
                times[name].append(time.perf_counter() - t0)
            if (step + 1) % max(1, args.steps // 10) == 0 or step + 1 == args.steps:
                losses = {name: t.evaluate(max_batches=args.eval_batches)["val_loss"] for name, t in trainers.items()}
                point = {"step": step + 1, **losses}
                curve.append(point)
                shown = " ".join(f"{name} {point[name]:.4f}" for name in trainers)
                print(f"  step {step + 1}/{args.steps}: {shown}", file=sys.stderr, flush=True)
        params = {name: trainer.model.num_parameters() for name, trainer in trainers.items()}
    losses = {name: loss for name, loss in curve[-1].items() if name != "step"}
    best_dense = min((name for name in losses if name.startswith("dense")), key=losses.get)
    step_time = {name: statistics.median(t[5:] or t) for name, t in times.items()}
    result = {
        "steps": args.steps,
        "tokens": args.steps * args.batch_size * args.block_size,
        "dropout": args.dropout,
        "moe_variant": args.moe,
        "model_variant": args.lm,
        "val_loss": losses,
        "best_dense": best_dense,
        "gap_nats": losses[best_dense] - losses["moe"],
        "step_time_ratio": step_time["moe"] / step_time["dense"],
        "params": params,
        "curve": curve,
    }
    others = ", ".join(f"{name} {loss:.4f}" for name, loss in losses.items() if name != "moe")
    print(
        f"equal tokens ({result['tokens']:,}, dropout {args.dropout}): MoE val {losses['moe']:.4f} "
        f"(active {params['moe']['active']:,} / total {params['moe']['total']:,}) vs {others} "
        f"(active {params['dense']['active']:,}): gap to the best dense {result['gap_nats']:+.4f} nats "
        f"[target >= 0.03]; step time MoE/dense {result['step_time_ratio']:.2f}x [target <= 1.2x]"
    )
    return result


def demo_budget(args) -> dict:
    """The demo preset with ``moekit demo``'s recipe (blocks of 64, batch 16) under a time budget."""
    # exactly `moekit demo`'s model and recipe: the equal-tokens options (--dropout, --moe) do not apply
    recipe = argparse.Namespace(**{**vars(args), **DEMO_RECIPE, "moe": [], "lm": []})
    with tempfile.TemporaryDirectory() as tmp:
        trainer = make_trainer("demo", 100_000, Path(tmp), recipe, time_budget=args.demo_budget, eval_interval=100_000)
        t0 = time.perf_counter()
        result = trainer.run()
        wall = time.perf_counter() - t0
    loss = result.val_losses[-1][1]
    print(
        f"demo preset, {args.demo_budget:.0f} s budget: {result.step} steps, val loss {loss:.4f} "
        f"[target <= 1.70], {result.tokens_per_second:,.0f} tokens/s, wall {wall:.0f} s"
    )
    return {
        "budget_s": args.demo_budget,
        "steps": result.step,
        "val_loss": loss,
        "tokens_per_s": result.tokens_per_second,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="tiny-shakespeare input.txt (default: the built-in copy)")
    p.add_argument("--steps", type=int, default=600, help="steps for the equal-tokens comparison (0 = skip)")
    p.add_argument("--demo-budget", type=float, default=0, help="seconds for the demo-budget run (0 = skip)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--eval-batches", type=int, default=40)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--dropout", type=float, default=0.0, help="dropout of both models (LMConfig.dropout)")
    p.add_argument("--moe", action="append", default=[], help="MoE field of the demo model, e.g. num_experts=16")
    p.add_argument("--lm", action="append", default=[], help="model field of the demo model, e.g. first_k_dense=1")
    p.add_argument("--json", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {}
    if args.steps:
        results["equal_tokens"] = equal_tokens(args)
    if args.demo_budget:
        results["demo_budget"] = demo_budget(args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
