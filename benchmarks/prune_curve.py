"""Pruning and merging curves: validation loss with 100/75/50/25% of each layer's experts kept.

One MoE (a shrunk ``demo``: 8 experts top-2) is trained on tiny-shakespeare (character level), then
compressed three ways with ``moekit.recipes`` on calibration windows from the training split:

* ``frequency``               prune: keep the experts that received the most assignments
* ``router-weighted-output``  prune: keep the experts with the largest summed ``w * ||f_e(x)||``
* ``merge``                   merge: cluster experts by output similarity, frequency-weighted averages

Each compressed model is evaluated as is and after a short fine-tune (same recipe for all, including
an uncompressed control, since extra training alone lowers the loss). Writes a markdown table and a plot.

    python benchmarks/prune_curve.py               # about 5-7 minutes on 2 busy cores
    python benchmarks/prune_curve.py --quick       # a 1-minute smoke run (results/prune_curve-quick/)
    python benchmarks/prune_curve.py --checkpoint results/distill_switch/teacher   # skip training
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from moekit.checkpoint import load_model, save_checkpoint
from moekit.data.loader import iter_eval_batches
from moekit.models import LMConfig
from moekit.nn.config import MoEConfig
from moekit.recipes import calibration_batches, collect_expert_stats, merge, prune
from moekit.train import TrainConfig, Trainer

ROOT = Path(__file__).resolve().parent
FRACTIONS = (1.0, 0.75, 0.5, 0.25)
METHODS = ("frequency", "router-weighted-output", "merge")


def moe_config(args) -> LMConfig:
    H = args.hidden
    return LMConfig(
        vocab_size=256,  # replaced by the tokenizer's size
        hidden_size=H,
        intermediate_size=4 * H,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        max_position_embeddings=args.block_size,
        tie_word_embeddings=True,
        moe=MoEConfig(num_experts=args.experts, top_k=2, expert_hidden_size=2 * H, aux_loss_coef=0.01),
    )


def options(args, out: Path, steps: int, **extra) -> dict:
    base = dict(
        tokenizer="char",
        block_size=args.block_size,
        batch_size=args.batch_size,
        max_steps=steps,
        lr=args.lr,
        warmup_steps=args.warmup,
        eval_interval=100_000,
        eval_batches=2,
        seed=args.seed,
        threads=args.threads,
        progress=False,
        tensorboard=False,
        out_dir=str(out),
    )
    return {**base, **extra}


@torch.no_grad()
def val_loss(model, val_tokens: torch.Tensor, block_size: int, max_batches: int | None) -> float:
    model.eval()
    total, count = 0.0, 0
    for x, y in iter_eval_batches(val_tokens, block_size, 32, max_batches=max_batches):
        logits = model(x).logits
        total += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum").item()
        count += y.numel()
    return total / count


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=None, help="an MoE checkpoint to compress (skips training)")
    p.add_argument("--steps", type=int, default=500, help="training steps of the MoE")
    p.add_argument("--finetune-steps", type=int, default=40, help="steps of the short fine-tune after compressing")
    p.add_argument("--finetune-lr", type=float, default=1e-3)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--calibration-batches", type=int, default=8, help="batches of 16 windows from the train split")
    p.add_argument("--similarity-tokens", type=int, default=2048)
    p.add_argument("--eval-batches", type=int, default=20, help="validation batches of 32 x block (0: all)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="a 1-minute smoke run")
    p.add_argument("--out", type=Path, default=None, help="run folders and JSON (default results/prune_curve)")
    args = p.parse_args()
    if args.quick:
        args.steps, args.finetune_steps, args.hidden, args.eval_batches = 40, 5, 32, 4
    args.eval_batches = args.eval_batches or None
    name = "prune_curve-quick" if args.quick else "prune_curve"
    if args.seed != p.get_default("seed"):
        name += f"-seed{args.seed}"  # keeps the default seed's report
    out = args.out or Path("results") / name
    report_dir = out if args.quick else ROOT / "results"
    if out.exists() and any(out.iterdir()):
        sys.exit(f"{out} is not empty; remove it or pass --out")
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    if args.checkpoint is None:
        cfg = moe_config(args)
        data = cfg.to_dict()
        data.pop("vocab_size")
        trainer = Trainer(TrainConfig(model="demo", model_overrides=data, **options(args, out / "moe", args.steps)))
        trainer.run()
        source = out / "moe"
        print(f"trained the MoE: {time.perf_counter() - t_start:.0f} s", file=sys.stderr, flush=True)
    else:
        source = args.checkpoint
    model, tokenizer = load_model(source)
    from moekit.data.corpus import builtin_corpus
    from moekit.data.loader import split_tokens

    train_tokens, val_tokens = split_tokens(torch.tensor(tokenizer.encode(builtin_corpus())), 0.1)
    batches = calibration_batches(tokenizer, train_tokens, args.block_size, 16, args.calibration_batches)
    stats = collect_expert_stats(model, batches, similarity_tokens=args.similarity_tokens)
    E = model.moe_layers()[0][1].config.num_experts

    rows = []
    for method in METHODS:
        for fraction in FRACTIONS:
            n = round(fraction * E)
            if fraction == 1.0 and method != METHODS[0]:
                continue  # the uncompressed model: one row
            if fraction == 1.0:
                compressed, label = model, "none (100%)"
            elif method == "merge":
                compressed, _ = merge(model, stats, target=n)
                label = "merge"
            else:
                compressed, _ = prune(model, stats, keep=n, criterion=method)
                label = f"prune: {method}"
            before = val_loss(compressed, val_tokens, args.block_size, args.eval_batches)
            folder = out / f"{method}-{n}"
            save_checkpoint(folder / "compressed", 0, compressed, tokenizer)
            ft = Trainer(
                TrainConfig(
                    init_from=str(folder / "compressed"),
                    **options(
                        args, folder / "finetune", args.finetune_steps, lr=args.finetune_lr, warmup_steps=0,
                        seed=args.seed + 1,
                    ),
                )
            )  # fmt: skip
            ft.run()
            after = val_loss(ft.model, val_tokens, args.block_size, args.eval_batches)
            rows.append(
                {
                    "method": label,
                    "experts": n,
                    "fraction": fraction,
                    "params_total": compressed.num_parameters()["total"],
                    "val_loss": before,
                    "val_loss_finetuned": after,
                }
            )
            print(f"{label:32s} {n}/{E}: {before:.4f} -> {after:.4f} after fine-tune", file=sys.stderr, flush=True)

    wall = time.perf_counter() - t_start
    command = ("python benchmarks/prune_curve.py " + " ".join(sys.argv[1:])).strip()
    results = {"command": command, "args": vars(args) | {"out": str(out)}, "wall_s": round(wall), "rows": rows}
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / f"{name}.md").write_text(markdown(results, args, model, E, name))
    plot(rows, report_dir / f"{name}.png", args)
    print((report_dir / f"{name}.md").read_text())


def markdown(results: dict, args, model, E: int, name: str) -> str:
    cfg = model.config
    m = cfg.moe
    full = results["rows"][0]
    lines = [
        "# Expert pruning and merging: what survives",
        "",
        f"Command: `{results['command']}` ({results['wall_s']} s wall on a shared 2-core CPU).",
        "",
        f"MoE: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, {E} experts top-{m.top_k} of width "
        f"{m.expert_hidden_size}, trained {args.steps if args.checkpoint is None else '(given checkpoint)'} steps on "
        f"tiny-shakespeare (character level). Calibration: {args.calibration_batches} x 16 windows of "
        f"{args.block_size} characters from the training split ({args.similarity_tokens} tokens for merge "
        f"similarities). Fine-tune: {args.finetune_steps} steps of {args.batch_size} x {args.block_size}, lr "
        f"{args.finetune_lr}, the same for every row. Validation loss in nats/char over "
        f"{'the whole validation split' if args.eval_batches is None else f'{args.eval_batches} batches of 32'}.",
        "",
        "| method | experts kept per layer | params | val loss | val loss after fine-tune |",
        "|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        lines.append(
            f"| {r['method']} | {r['experts']}/{E} ({100 * r['fraction']:.0f}%) | {r['params_total']:,} | "
            f"{r['val_loss']:.4f} ({r['val_loss'] - full['val_loss']:+.3f}) | "
            f"{r['val_loss_finetuned']:.4f} ({r['val_loss_finetuned'] - full['val_loss_finetuned']:+.3f}) |"
        )
    lines += [
        "",
        "In brackets: the difference to the uncompressed model (as is / after the same fine-tune).",
        "",
        f"![pruning curves]({name}.png)",
        "",
    ]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, args) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return
    full = rows[0]
    fig, axes = plt.subplots(1, 2, figsize=(9.6, 4.0))
    for ax, key, title in (
        (axes[0], "val_loss", "as compressed"),
        (axes[1], "val_loss_finetuned", f"after a {args.finetune_steps}-step fine-tune"),
    ):
        for label in dict.fromkeys(r["method"] for r in rows[1:]):
            mine = [full] + [r for r in rows if r["method"] == label]
            ax.plot([100 * r["fraction"] for r in mine], [r[key] for r in mine], marker="o", label=label)
        ax.set_title(title)
        ax.set_xlabel("experts kept per layer (%)")
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("validation loss (nats/char)")
    axes[1].axhline(full["val_loss_finetuned"], color="grey", lw=0.8, ls="--", label="uncompressed, same fine-tune")
    axes[1].legend()
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
