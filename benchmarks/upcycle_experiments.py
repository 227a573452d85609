"""Issue 5's experiments on the multidomain set (--data: code, math, prose), byte-level.

(a) upcycle: a dense seed, then the same extra tokens either as dense continuation or as an
    upcycled MoE (8 experts, top-2): validation loss per domain and overall.
(b) btx: Branch-Train-MiX from the same seed vs the seed vs dense continuation with equal total
    compute (BTX's MoE steps are counted at their measured cost in dense steps); validation loss
    per domain, and the share of each domain's tokens that each expert receives, per layer.

    DATA=../shared/data/multidomain   # code_networkx/, math_gsm8k/, prose_warpeace/
    python benchmarks/upcycle_experiments.py --data $DATA --experiment upcycle --out results/upcycle
    python benchmarks/upcycle_experiments.py --data $DATA --experiment btx --out results/btx
    python benchmarks/upcycle_experiments.py --data $DATA --experiment both --quick    # a smoke run

Each writes results.md, results.json and a plot into --out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from moekit.analysis.load import expert_load
from moekit.checkpoint import load_model, save_checkpoint
from moekit.data.loader import iter_eval_batches
from moekit.data.text import load_text
from moekit.recipes.upcycle import mix_experts, upcycle
from moekit.train import TrainConfig, Trainer

# Each domain's training and held-out file, relative to --data.
TRAIN = {"code": "code_networkx/train.txt", "math": "math_gsm8k/train.txt", "prose": "prose_warpeace/train.txt"}
VALID = {"code": "code_networkx/valid.txt", "math": "math_gsm8k/test.txt", "prose": "prose_warpeace/valid.txt"}


def run_training(out: Path, steps: int, args, domains, init_from=None, trainable=None, lr=None) -> Path:
    config = TrainConfig(
        model=args.model,
        init_from=str(init_from) if init_from else None,
        data=tuple(str(args.data / TRAIN[d]) for d in domains),
        tokenizer="byte",
        block_size=args.block_size,
        batch_size=args.batch_size,
        max_steps=steps,
        lr=lr or args.lr,
        warmup_steps=min(20, steps // 5),
        eval_interval=10**9,
        eval_batches=4,
        checkpoint_interval=10**9,
        trainable=trainable,
        seed=args.seed,
        progress=not args.quiet,
        tensorboard=False,
        out_dir=str(out),
    )
    return Trainer(config).run().checkpoint


def domain_losses(model, tokenizer, args) -> dict[str, float]:
    """Mean next-token loss on each domain's held-out text (first --valid-bytes bytes)."""
    losses = {}
    model.eval()
    with torch.no_grad():
        for name, path in VALID.items():
            tokens = torch.tensor(tokenizer.encode(load_text(args.data / path)[: args.valid_bytes]))
            total, count = 0.0, 0
            for x, y in iter_eval_batches(tokens, args.block_size, 16):
                logits = model(x).logits
                total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
                count += y.numel()
            losses[name] = total / count
    losses["overall"] = sum(losses[d] for d in VALID) / len(VALID)
    return losses


def domain_expert_shares(model, tokenizer, args) -> dict[str, list[list[float]]]:
    """domain -> [layer][expert] share of the domain's routed assignments."""
    shares = {}
    for name, path in VALID.items():
        tokens = torch.tensor(tokenizer.encode(load_text(args.data / path)[: args.valid_bytes]))
        batches = (x for x, _ in iter_eval_batches(tokens, args.block_size, 16))
        _, load = expert_load(model, batches)
        shares[name] = (load.float() / load.sum(dim=1, keepdim=True)).tolist()
    return shares


def table(rows: dict[str, dict[str, float]]) -> str:
    cols = [*VALID, "overall"]
    lines = ["| model | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for name, losses in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{losses[c]:.4f}" for c in cols) + " |")
    return "\n".join(lines)


def plot(rows: dict[str, dict[str, float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = [*VALID, "overall"]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / len(rows)
    for i, (name, losses) in enumerate(rows.items()):
        ax.bar([c + i * width for c in range(len(cols))], [losses[c] for c in cols], width, label=name)
    ax.set_xticks([c + width * (len(rows) - 1) / 2 for c in range(len(cols))], cols)
    ax.set_ylabel("validation loss (nats/byte)")
    low = min(min(v.values()) for v in rows.values())
    ax.set_ylim(low * 0.9, None)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def step_cost_ratio(moe_ckpt: Path, dense_ckpt: Path, args) -> float:
    """Measured MoE / dense training step time (interleaved, median)."""
    times = {}
    trainers = {}
    for name, ckpt in (("moe", moe_ckpt), ("dense", dense_ckpt)):
        cfg = TrainConfig(
            init_from=str(ckpt),
            data=str(args.data / TRAIN["prose"]),
            block_size=args.block_size,
            batch_size=args.batch_size,
            max_steps=100,
            progress=False,
            tensorboard=False,
        )
        trainers[name] = Trainer(cfg)
        times[name] = []
    for _ in range(6):
        for name, trainer in trainers.items():
            t0 = time.perf_counter()
            trainer.train_step(0.5)
            times[name].append(time.perf_counter() - t0)
    med = {k: sorted(v[1:])[len(v[1:]) // 2] for k, v in times.items()}
    return med["moe"] / med["dense"]


def experiment_upcycle(args, out: Path, seed: Path) -> dict:
    dense_cont = run_training(out / "dense-continued", args.extra_steps, args, TRAIN, init_from=seed)
    dense, tokenizer = load_model(seed)
    moe = upcycle(dense, args.experts, args.top_k, noise=args.noise, seed=args.seed)
    upcycled0 = save_checkpoint(out / "upcycled-step0", 0, moe, tokenizer)
    moe_cont = run_training(out / "upcycled-trained", args.extra_steps, args, TRAIN, init_from=upcycled0)
    rows = {
        "seed (dense)": domain_losses(load_model(seed)[0], tokenizer, args),
        f"dense +{args.extra_steps} steps": domain_losses(load_model(dense_cont)[0], tokenizer, args),
        f"upcycled {args.experts}x top-{args.top_k} +{args.extra_steps} steps": domain_losses(
            load_model(moe_cont)[0], tokenizer, args
        ),
    }
    plot(rows, out / "upcycle.png", "Upcycling vs dense continuation (equal extra tokens)")
    gap = rows[list(rows)[1]]["overall"] - rows[list(rows)[2]]["overall"]
    md = (
        f"# Upcycling vs dense continuation\n\nSeed: `{args.model}` trained {args.seed_steps} steps on code+math+prose "
        f"(batch {args.batch_size} x {args.block_size} bytes); then {args.extra_steps} more steps each.\n\n"
        f"{table(rows)}\n\nUpcycled minus dense (overall): {-gap:+.4f} nats/byte "
        f"({'the upcycled MoE is better' if gap > 0 else 'dense continuation is better'}).\n\n![plot](upcycle.png)\n"
    )
    (out / "results.md").write_text(md)
    return {"losses": rows, "upcycled_advantage_nats": gap}


def experiment_btx(args, out: Path, seed: Path) -> dict:
    branches = []
    for name in TRAIN:
        branches.append(run_training(out / f"branch-{name}", args.branch_steps, args, [name], init_from=seed))
    models = [load_model(b)[0] for b in branches]
    tokenizer = load_model(seed)[1]
    mixed = save_checkpoint(out / "mixed", 0, mix_experts(models, top_k=args.top_k, seed=args.seed), tokenizer)
    routed = run_training(
        out / "router", args.router_steps, args, TRAIN, init_from=mixed, trainable="router", lr=args.lr
    )
    final = run_training(out / "finetune", args.finetune_steps, args, TRAIN, init_from=routed)
    cost = step_cost_ratio(final, seed, args)
    dense_steps = round(len(TRAIN) * args.branch_steps + (args.router_steps + args.finetune_steps) * cost)
    dense_cont = run_training(out / "dense-continued", dense_steps, args, TRAIN, init_from=seed)
    btx_model = load_model(final)[0]
    rows = {
        "seed (dense)": domain_losses(load_model(seed)[0], tokenizer, args),
        f"dense +{dense_steps} steps (equal compute)": domain_losses(load_model(dense_cont)[0], tokenizer, args),
        "BTX (branch, mix, router, finetune)": domain_losses(btx_model, tokenizer, args),
    }
    shares = domain_expert_shares(btx_model, tokenizer, args)
    plot(rows, out / "btx.png", "Branch-Train-MiX vs dense continuation (equal compute)")
    domains = list(TRAIN)
    layers = len(next(iter(shares.values())))
    lines = [
        "| layer | " + " | ".join(f"{d} tokens -> expert shares (code/math/prose)" for d in domains) + " |",
        "|---|" + "---|" * len(domains),
    ]
    plurality_hits = 0
    for layer in range(layers):
        cells = []
        for d_idx, d in enumerate(domains):
            row = shares[d][layer]
            best = max(range(len(row)), key=row.__getitem__)
            plurality_hits += best == d_idx
            cells.append(" / ".join(f"{s:.2f}" for s in row) + (" (own)" if best == d_idx else ""))
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    md = (
        f"# Branch-Train-MiX\n\nSeed: `{args.model}` {args.seed_steps} steps on the union. BTX: {args.branch_steps} "
        f"steps per domain branch, mix (top-{args.top_k}), {args.router_steps} router-only steps, "
        f"{args.finetune_steps} full steps on the union. Dense continuation: {dense_steps} steps (MoE step = "
        f"{cost:.2f} dense steps, measured).\n\n{table(rows)}\n\n## Share of each domain's tokens per expert\n\n"
        f"Expert i is the FFN of domain i (code, math, prose). A domain's own expert holds the plurality in "
        f"{plurality_hits} of {layers * len(domains)} (layer, domain) cells.\n\n"
        + "\n".join(lines)
        + "\n\n![plot](btx.png)\n"
    )
    (out / "results.md").write_text(md)
    return {
        "losses": rows,
        "shares": shares,
        "dense_steps": dense_steps,
        "cost_ratio": cost,
        "plurality_hits": plurality_hits,
        "cells": layers * len(domains),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiment", choices=["upcycle", "btx", "both"], default="both")
    p.add_argument("--data", type=Path, required=True, help="the multidomain folder (code_networkx/, math_gsm8k/, ...)")
    p.add_argument("--out", type=Path, default=Path("results/upcycle_experiments"))
    p.add_argument("--model", default="dense-demo")
    p.add_argument("--seed-steps", type=int, default=300)
    p.add_argument("--extra-steps", type=int, default=300)
    p.add_argument("--branch-steps", type=int, default=150)
    p.add_argument("--router-steps", type=int, default=50)
    p.add_argument("--finetune-steps", type=int, default=100)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--noise", type=float, default=0.01)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--valid-bytes", type=int, default=60_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny step counts: checks the pipeline in ~1 minute")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args()
    if args.quick:
        args.seed_steps = args.extra_steps = args.branch_steps = 4
        args.router_steps = args.finetune_steps = 2
        args.valid_bytes = 5_000
    args.out.mkdir(parents=True, exist_ok=True)
    seed = run_training(args.out / "seed", args.seed_steps, args, TRAIN)
    results = {"args": {k: str(v) for k, v in vars(args).items()}}
    if args.experiment in ("upcycle", "both"):
        results["upcycle"] = experiment_upcycle(args, args.out / "upcycle", seed)
        print((args.out / "upcycle" / "results.md").read_text())
    if args.experiment in ("btx", "both"):
        results["btx"] = experiment_btx(args, args.out / "btx", seed)
        print((args.out / "btx" / "results.md").read_text())
    (args.out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
