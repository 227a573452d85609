"""``moekit demo``: the main job. Train the ``demo`` MoE on the built-in tiny-shakespeare for about
two minutes, print validation loss by step, sample text, and show each layer's expert load.
"""

from __future__ import annotations

import argparse
import time

from rich.console import Console
from rich.table import Table

from moekit.analysis.load import expert_load
from moekit.commands.generate import stream_text
from moekit.data.loader import iter_eval_batches
from moekit.train.checkpoint import load_model
from moekit.train.trainer import train


def add_parser(verbs) -> None:
    p = verbs.add_parser("demo", help="train, sample and analyse a small MoE LM (about 2 minutes)", description=__doc__)
    p.add_argument("--time-budget", default="2m", help="training time (e.g. 90s, 2m)")
    p.add_argument("--out", default=None, help="run folder (default: runs/demo-<time>)")
    p.add_argument("--prompt", default="ROMEO:", help="text to continue after training")
    p.add_argument("--max-new-tokens", type=int, default=300)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument(
        "--task",
        default="lm",
        choices=("lm", "classify", "image-classify"),
        help="lm (default); classify: the built-in sentiment sentences; image-classify: scikit-learn's digits",
    )
    p.set_defaults(func=run)


def demo(time_budget="2m", out=None, prompt="ROMEO:", max_new_tokens=300, seed=1337, console=None) -> dict:
    """Run the demo; returns the run folder, the validation losses and the sample."""
    console = console or Console()
    out = out or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}"
    console.rule("[bold]moekit demo: an MoE language model on tiny-shakespeare")
    result = train(model="demo", time_budget=time_budget, max_steps=100_000, eval_interval=100, out_dir=out, seed=seed)
    model, tokenizer = load_model(result.checkpoint)
    console.print(f"\n[bold]validation loss by step[/] ({result.tokens_per_second:,.0f} tokens/s):")
    for step, loss in result.val_losses:
        console.print(f"  step {step:>5}  val_loss {loss:.4f}")

    console.print(f"\n[bold]sample[/] (temperature 0.8, seed {seed}):")
    pieces = list(stream_text(model, tokenizer, prompt, max_new_tokens=max_new_tokens, temperature=0.8, seed=seed))
    sample = prompt + "".join(pieces)
    console.print(sample, markup=False, highlight=False)

    val_tokens = _val_tokens(model, tokenizer)
    layers, load = expert_load(model, (x for x, _ in iter_eval_batches(val_tokens, 128, 16, max_batches=8)))
    table = Table(title="share of tokens per expert (%), validation data")
    table.add_column("layer")
    for e in range(load.shape[1]):
        table.add_column(f"e{e}", justify="right")
    table.add_column("max/mean", justify="right")
    for layer, row in zip(layers, load):
        share = row.float() / row.sum() * 100
        table.add_row(str(layer), *(f"{s:.1f}" for s in share), f"{(row.max() / row.float().mean()).item():.2f}")
    console.print(table)
    report = _routing_report(result.run_dir, console)
    console.print(f"routing report: [bold]{report}[/] (open it in a browser)")
    console.print(f"\nrun folder: [bold]{result.run_dir}[/] (checkpoint {result.checkpoint.name}, metrics.jsonl, tb/)")
    console.print(f"next: moekit generate --checkpoint {result.run_dir} --prompt 'JULIET:'")
    return {"run_dir": result.run_dir, "val_losses": result.val_losses, "sample": sample, "report": report}


def _routing_report(run_dir, console):
    """moekit analyze on the corpus' validation tenth: which experts take which kinds of characters."""
    from pathlib import Path

    from moekit.commands.analyze import analyze
    from moekit.data.corpus import builtin_corpus

    text = builtin_corpus()
    out = Path(run_dir) / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    valid = out / "validation.txt"
    valid.write_text(text[int(len(text) * 0.9) :], encoding="utf-8")
    return analyze(checkpoint=run_dir, data=[valid], out=out, max_tokens=16384, progress=False, console=console)[
        "report"
    ]


def _val_tokens(model, tokenizer):
    import torch

    from moekit.data.corpus import builtin_corpus
    from moekit.data.loader import split_tokens

    _, val = split_tokens(torch.tensor(tokenizer.encode(builtin_corpus())), 0.1)
    return val


def task_demo(task: str, time_budget="40s", out=None, seed=1337, console=None) -> dict:
    """Train a small MoE classifier on built-in data (offline), print its accuracy and routing by label."""
    from moekit.tasks.classify import encode, load_classifier, load_task_data, train_classifier
    from moekit.tasks.routing import routing_by_label, routing_table

    console = console or Console()
    out = out or f"runs/demo-{task}-{time.strftime('%Y%m%d-%H%M%S')}"
    what = "sentiment sentences" if task == "classify" else "scikit-learn's 8x8 digits"
    console.rule(f"[bold]moekit demo: an MoE classifier on the built-in {what}")
    fields = {"model.patch_size": 2} if task == "image-classify" else {}
    result = train_classifier(
        task=task, time_budget=time_budget, out_dir=out, seed=seed, eval_interval=100, threads=1, **fields
    )
    for record in result.history:
        console.print(f"  step {record['step']:>5}  valid accuracy {record['accuracy']:.4f}")
    model, vocab, names, _ = load_classifier(result.run_dir)
    _, valid = load_task_data(train_config_of(result.run_dir))
    table = routing_table(routing_by_label(model, encode(model, vocab, valid, names), len(names)), names)
    (result.run_dir / "routing_by_label.md").write_text(table, encoding="utf-8")
    console.print(table, markup=False, highlight=False)
    console.print(f"run folder: [bold]{result.run_dir}[/]")
    console.print(f"next: moekit predict --checkpoint {result.run_dir} --data FILE")
    return {"run_dir": result.run_dir, "accuracy": result.accuracy, "routing": table}


def train_config_of(run_dir):
    import json

    from moekit.tasks.classify import ClassifyConfig

    return ClassifyConfig.from_dict(json.loads((run_dir / "run.json").read_text())["train"])


def run(args: argparse.Namespace) -> int:
    if args.task != "lm":
        task_demo(args.task, args.time_budget if args.time_budget != "2m" else "40s", args.out, args.seed)
        return 0
    demo(args.time_budget, args.out, args.prompt, args.max_new_tokens, args.seed)
    return 0
