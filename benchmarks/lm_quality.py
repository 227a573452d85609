"""MoE vs equal-active dense language model on tiny-shakespeare, character level.

nanoGPT's split (first 90% train, last 10% validation). Both models train for the same steps on
the same batches (same seed), interleaved step by step in one process so that both see the same
machine load; the script prints both validation losses, their gap and the step-time ratio.

    python benchmarks/lm_quality.py --steps 600            # equal tokens: MoE vs dense
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

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt"


def make_trainer(model: str, steps: int, out: Path, args, **extra) -> Trainer:
    config = TrainConfig(
        model=model,
        data=str(SHARED) if SHARED.is_file() else None,  # the built-in corpus is the same text
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
        out_dir=str(out / model),
        **extra,
    )
    if model == "demo" and args.moe:  # a variant of the demo's MoE layers, e.g. --moe num_experts=16
        config = config.replace(model_overrides={"moe": dict(_moe_override(kv) for kv in args.moe)})
    return Trainer(config)


def _moe_override(text: str) -> tuple[str, object]:
    key, _, value = text.partition("=")
    return key, json.loads(value) if value[:1] in "0123456789-[{tf" or value == "null" else value


def equal_tokens(args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {name: make_trainer(name, args.steps, Path(tmp), args) for name in ("demo", "dense-demo")}
        times: dict[str, list[float]] = {name: [] for name in trainers}
        curve = []  # (step, MoE val, dense val) at every tenth of the run: where the gap opens
        for step in range(args.steps):
            for name, trainer in trainers.items():
                t0 = time.perf_counter()
                trainer.train_step(step / args.steps)
                times[name].append(time.perf_counter() - t0)
            if (step + 1) % max(1, args.steps // 10) == 0 or step + 1 == args.steps:
                moe, dense = (trainers[name].evaluate(args.eval_batches) for name in ("demo", "dense-demo"))
                curve.append((step + 1, moe, dense))
                print(
                    f"  step {step + 1}/{args.steps}: MoE {moe:.4f} dense {dense:.4f} gap {dense - moe:+.4f}",
                    file=sys.stderr,
                    flush=True,
                )
        losses = {"demo": curve[-1][1], "dense-demo": curve[-1][2]}
        params = {name: trainer.model.num_parameters() for name, trainer in trainers.items()}
    step_time = {name: statistics.median(t[5:] or t) for name, t in times.items()}
    result = {
        "steps": args.steps,
        "tokens": args.steps * args.batch_size * args.block_size,
        "val_loss_moe": losses["demo"],
        "val_loss_dense": losses["dense-demo"],
        "gap_nats": losses["dense-demo"] - losses["demo"],
        "step_time_ratio": step_time["demo"] / step_time["dense-demo"],
        "params_moe": params["demo"],
        "params_dense": params["dense-demo"],
        "curve": [{"step": s, "val_loss_moe": m, "val_loss_dense": d} for s, m, d in curve],
    }
    print(
        f"equal tokens ({result['tokens']:,}): MoE val {result['val_loss_moe']:.4f} "
        f"(active {params['demo']['active']:,} / total {params['demo']['total']:,}) vs dense "
        f"{result['val_loss_dense']:.4f} (active {params['dense-demo']['active']:,}): gap "
        f"{result['gap_nats']:+.4f} nats [target >= 0.03]; step time MoE/dense {result['step_time_ratio']:.2f}x "
        f"[target <= 1.2x]"
    )
    return result


def demo_budget(args) -> dict:
    """The demo preset with ``moekit demo``'s recipe (blocks of 64, batch 16) under a time budget."""
    recipe = argparse.Namespace(**{**vars(args), **DEMO_RECIPE})
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
    p.add_argument("--steps", type=int, default=600, help="steps for the equal-tokens comparison (0 = skip)")
    p.add_argument("--demo-budget", type=float, default=0, help="seconds for the demo-budget run (0 = skip)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--eval-batches", type=int, default=40)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--moe", action="append", default=[], help="MoE field of the demo model, e.g. num_experts=16")
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
