"""Issue 23's experiment: the router zoo against the dense twin, equal tokens and equal active parameters.

Every configuration trains the ``demo`` model (layer 0 dense, 16 experts top-2 in layers 1-2) or its dense twin
``dense-demo`` on the same seeded batches: a global batch of 32 blocks of 128 tokens as 4 micro-batches of 8
(the micro-batches are what micro-batch balancing balances; global-batch balancing counts all four).

    python benchmarks/router_zoo.py --steps 600 --out benchmarks/results/router_zoo/shakespeare-600
    python benchmarks/router_zoo.py --steps 2400 --dropout 0.1 --out benchmarks/results/router_zoo/shakespeare-2400
    python benchmarks/router_zoo.py --corpus multidomain --data ../shared/data/multidomain --steps 600 \\
        --only dense topk-micro topk-global --out benchmarks/results/router_zoo/multidomain-600
    python benchmarks/router_zoo.py --timing 60 --out benchmarks/results/router_zoo/timing   # step time ratios
    python benchmarks/router_zoo.py --table benchmarks/results/router_zoo/shakespeare-2400 --timing-from ...

A run writes one JSON per configuration into --out (so configurations can run in separate processes, and a
table is made from whichever have finished); ``--table DIR`` prints the markdown table of DIR's results.
Losses are deterministic (same seed, same batches); step times are not, so the step-time ratio comes from
``--timing N``: N steps of every configuration interleaved in one process (the machine's load hits all alike).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from upcycle_experiments import TRAIN, VALID, domain_losses  # each domain's files; held-out loss per domain

from moekit.analysis.load import expert_load
from moekit.data.loader import iter_eval_batches
from moekit.data.text import load_text
from moekit.train import TrainConfig, Trainer

# name -> (model preset, MoE field overrides): equal active parameters (top-2 of 16 experts of width 192 against
# the dense twin's FFN), each router with the balancing its paper uses.
CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "dense": ("dense-demo", {}),
    "dense-no-dropout": ("dense-demo", {}),  # with --dropout: the dense twin without it guards the comparison
    "topk-micro-no-dropout": ("demo", {}),  # (a name ending in -no-dropout trains without --dropout)
    "relu-no-dropout": ("demo", {"router": "relu", "aux_loss_coef": 0.0}),
    "topk-micro": ("demo", {}),  # aux_loss_scope="micro", the default
    "topk-global": ("demo", {"aux_loss_scope": "global"}),
    "sigmoid-auxfree": ("demo", {"router": "sigmoid_topk", "aux_loss_coef": 0.0}),
    "threshold": ("demo", {"router": "expert_threshold", "aux_loss_coef": 0.0}),
    "relu": ("demo", {"router": "relu", "aux_loss_coef": 0.0}),
    # ReMoE reports that its lead grows with the expert count: twice the experts, the same active size.
    "relu-32": ("demo", {"router": "relu", "aux_loss_coef": 0.0, "num_experts": 32}),
    "relu-32-no-dropout": ("demo", {"router": "relu", "aux_loss_coef": 0.0, "num_experts": 32}),
    "zero-experts": ("demo", {"zero_experts": 1, "copy_experts": 1, "constant_experts": 1, "gating_residual": True}),
}


def make_trainer(name: str, args, out: Path) -> Trainer:
    model, moe = CONFIGS[name]
    multidomain = args.corpus == "multidomain"
    config = TrainConfig(
        model=model,
        data=tuple(str(args.data / TRAIN[d]) for d in TRAIN) if multidomain else args.data,
        tokenizer="byte" if multidomain else "char",
        block_size=args.block_size,
        batch_size=args.batch_size // args.accum,
        grad_accum=args.accum,
        max_steps=max(args.steps, 1),
        lr=args.lr,
        warmup_steps=args.warmup,
        eval_batches=args.eval_batches,
        seed=args.seed,
        progress=False,
        tensorboard=False,
        out_dir=str(out / name),
    )
    dropout = 0.0 if name.endswith("-no-dropout") else args.dropout
    overrides: dict[str, Any] = {"dropout": dropout} if dropout else {}
    if moe:
        overrides["moe"] = dict(moe)
    return Trainer(config.replace(model_overrides=overrides) if overrides else config)


def balance(load_LE: torch.Tensor) -> float:
    """Mean over MoE layers of the busiest expert's load over the mean load (1 = perfect balance)."""
    load = load_LE.float()
    return float((load.max(dim=1).values / load.mean(dim=1).clamp(min=1e-9)).mean())


def mutual_information(load_DLE: torch.Tensor) -> float:
    """Mean over layers of I(domain; expert) in nats, from the assignments each domain sent to each expert."""
    total = 0.0
    for layer in range(load_DLE.shape[1]):
        joint = load_DLE[:, layer].double()
        joint = joint / joint.sum()
        outer = joint.sum(1, keepdim=True) * joint.sum(0, keepdim=True)
        nz = joint > 0
        total += float((joint[nz] * (joint[nz] / outer[nz]).log()).sum())
    return total / load_DLE.shape[1]


def domain_results(trainer: Trainer, args) -> dict[str, Any]:
    """Held-out loss per domain and the domain/expert mutual information (MoE only)."""
    model, tokenizer = trainer.model, trainer.tokenizer
    losses = {name: loss for name, loss in domain_losses(model, tokenizer, args).items() if name in VALID}
    loads = []
    for path in VALID.values():
        tokens = torch.tensor(tokenizer.encode(load_text(args.data / path)[: args.valid_bytes]))
        if model.moe_layers():
            loads.append(expert_load(model, (x for x, _ in iter_eval_batches(tokens, args.block_size, 16)))[1])
    result: dict[str, Any] = {"domain_loss": losses, "val_loss": sum(losses.values()) / len(losses)}
    if loads:
        load_DLE = torch.stack(loads)
        result["mutual_information"] = mutual_information(load_DLE)
        result["balance"] = balance(load_DLE.sum(0))
    return result


def validation_balance(trainer: Trainer) -> float | None:
    """Balance of the expert loads of the last evaluation (None for the dense model)."""
    loads = trainer.task.val_loads
    return balance(torch.stack([load.float() for load in loads])) if loads else None


def ffn_experts_per_token(trainer: Trainer, args) -> float | None:
    """Mean over MoE layers of the FFN experts that process a held-out token: the active compute of routers
    whose count varies (relu, expert threshold) or that may skip the FFN (zero-computation experts)."""
    model = trainer.model
    if not model.moe_layers():
        return None
    batches = [x for x, _ in iter_eval_batches(trainer.task.val_tokens, args.block_size, 16, 10)]
    _, load_LE = expert_load(model, batches)
    return float(load_LE.sum(dim=1).float().mean()) / sum(x.numel() for x in batches)


def run(name: str, args) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        trainer = make_trainer(name, args, Path(tmp))
        torch.manual_seed(args.seed)
        curve, times = [], []
        for step in range(args.steps):
            t0 = time.perf_counter()
            trainer.train_step(step / args.steps)
            times.append(time.perf_counter() - t0)
            if (step + 1) % max(1, args.steps // 10) == 0 or step + 1 == args.steps:
                loss = trainer.evaluate(max_batches=args.eval_batches)["val_loss"]
                curve.append({"step": step + 1, "val_loss": loss})
                print(f"  {name} step {step + 1}/{args.steps}: val {loss:.4f}", file=sys.stderr, flush=True)
        result: dict[str, Any] = {
            "name": name,
            "model": CONFIGS[name][0],
            "moe": CONFIGS[name][1],
            "corpus": args.corpus,
            "steps": args.steps,
            "tokens": args.steps * args.batch_size * args.block_size,
            "dropout": args.dropout,
            "val_loss": curve[-1]["val_loss"],
            "curve": curve,
            "params": trainer.model.num_parameters(),
            "median_step_s": statistics.median(times[5:] or times),
            "experts_per_token": ffn_experts_per_token(trainer, args),
        }
        if args.corpus == "multidomain":
            result.update(domain_results(trainer, args))
        else:
            result["balance"] = validation_balance(trainer)
    return result


def timing(args) -> dict[str, Any]:
    """Step time of every configuration over ``args.timing`` interleaved steps, after ``args.timing_warmup``
    untimed ones (relu routes near densely until its L1 coefficient has grown: ~100 steps); ratios to dense."""
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {name: make_trainer(name, args, Path(tmp)) for name in args.only}
        total = args.timing_warmup + args.timing
        for step in range(args.timing_warmup):
            for trainer in trainers.values():
                trainer.train_step(step / total)
        times: dict[str, list[float]] = {name: [] for name in trainers}
        for step in range(args.timing_warmup, total):
            for name, trainer in trainers.items():
                t0 = time.perf_counter()
                trainer.train_step(step / total)
                times[name].append(time.perf_counter() - t0)
    low = {name: statistics.quantiles(t[5:], n=4)[0] for name, t in times.items()}  # lower quartile: least noise
    return {
        "steps": args.timing,
        "warmup": args.timing_warmup,
        "lower_quartile_s": low,
        "ratio_to_dense": {n: low[n] / low["dense"] for n in low},
    }


def table(folder: Path, timing_file: Path | None) -> str:
    rows = {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json")) if p.stem != "timing"}
    ratios = json.loads(timing_file.read_text())["ratio_to_dense"] if timing_file else {}
    dense = [r["val_loss"] for n, r in rows.items() if n.startswith("dense")]
    best_dense = min(dense) if dense else math.nan
    domains = next((list(r["domain_loss"]) for r in rows.values() if "domain_loss" in r), [])
    head = [
        "config",
        "val loss",
        *domains,
        "gap to dense",
        "step time / dense",
        "FFN experts / token",
        "balance",
        *(["MI"] if domains else []),
    ]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for name in [n for n in CONFIGS if n in rows] + [n for n in rows if n not in CONFIGS]:
        r = rows[name]
        cells = [name, f"{r['val_loss']:.4f}", *(f"{r['domain_loss'][d]:.4f}" for d in domains)]
        cells.append("-" if math.isnan(best_dense) else f"{best_dense - r['val_loss']:+.4f}")
        cells.append(f"{ratios[name]:.2f}x" if name in ratios else "-")
        cells.append(f"{r['experts_per_token']:.2f}" if r.get("experts_per_token") is not None else "-")
        cells.append(f"{r['balance']:.2f}" if r.get("balance") is not None else "-")
        if domains:
            cells.append(f"{r['mutual_information']:.4f}" if "mutual_information" in r else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(folder: Path, path: Path) -> None:
    """Validation loss against tokens, one line per configuration of ``folder``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for p in sorted(folder.glob("*.json")):
        r = json.loads(p.read_text())
        if "curve" not in r:
            continue
        per_step = r["tokens"] / r["steps"]
        steps = [point["step"] for point in r["curve"]]
        style = "--" if r["model"].startswith("dense") else "-"
        ax.plot([s * per_step for s in steps], [point["val_loss"] for point in r["curve"]], style, label=r["name"])
    ax.set_xlabel("training tokens")
    ax.set_ylabel("validation loss (nats)")
    ax.set_ylim(top=min(ax.get_ylim()[1], 2.0))
    ax.set_title(f"router zoo: {folder.name}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", choices=["shakespeare", "multidomain"], default="shakespeare")
    p.add_argument("--data", type=Path, default=None, help="tiny-shakespeare file, or the multidomain folder")
    p.add_argument("--only", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=32, help="sequences per optimizer step")
    p.add_argument("--accum", type=int, default=4, help="micro-batches per optimizer step")
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--eval-batches", type=int, default=40)
    p.add_argument("--valid-bytes", type=int, default=200_000, help="held-out bytes per domain (multidomain)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--timing", type=int, default=0, help="measure step times over N interleaved steps instead")
    p.add_argument("--timing-warmup", type=int, default=0, help="untimed steps before the timed ones")
    p.add_argument("--out", type=Path, help="folder for the per-configuration JSON results")
    p.add_argument("--table", type=Path, default=None, help="print the markdown table of this folder's results")
    p.add_argument("--timing-from", type=Path, default=None, help="timing.json whose ratios the table shows")
    p.add_argument("--plot", type=Path, default=None, help="with --table: also plot the loss curves here (.png)")
    args = p.parse_args()
    if args.table:
        print(table(args.table, args.timing_from))
        if args.plot:
            plot(args.table, args.plot)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.corpus == "multidomain" and args.data is None:
        p.error("--corpus multidomain needs --data (the multidomain folder)")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.timing:
        if "dense" not in args.only:
            args.only = ["dense", *args.only]
        result = timing(args)
        (args.out / "timing.json").write_text(json.dumps(result, indent=1))
        print(json.dumps(result["ratio_to_dense"], indent=1))
        return
    for name in args.only:
        result = run(name, args)
        (args.out / f"{name}.json").write_text(json.dumps(result, indent=1))
        print(f"{name}: val {result['val_loss']:.4f}", flush=True)


if __name__ == "__main__":
    main()
