"""``moekit demo``: the main job. Train the ``demo`` MoE on the built-in tiny-shakespeare for about
two minutes, print validation loss by step, sample text, and show each layer's expert load.
"""

from __future__ import annotations

import argparse
import time

from rich.console import Console
from rich.table import Table

from moekit.analysis.load import expert_load
from moekit.checkpoint import load_model
from moekit.commands.generate import stream_text
from moekit.data.loader import iter_eval_batches
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
        choices=("lm", "classify", "image-classify", "translate"),
        help="lm (default); classify: the built-in sentiment sentences; image-classify: scikit-learn's digits; "
        "translate: the built-in English-German sentence pairs",
    )
    p.set_defaults(func=run)


# The demo's training recipe. A two-minute budget on 2 cores buys only a few hundred steps, and then more
# steps beat bigger ones: on tiny-shakespeare (1 core, 120 s) blocks of 64 x batch 16 reach val 2.00 in 309
# steps where the trainer's default 128 x 32 reaches 2.28 in 78 (batch 8: 2.00; lr 6e-3: 2.03; Muon: 2.00).
DEMO_RECIPE = {"block_size": 64, "batch_size": 16, "lr": 3e-3}


def demo(time_budget="2m", out=None, prompt="ROMEO:", max_new_tokens=300, seed=1337, console=None) -> dict:
    """Run the demo; returns the run folder, the validation losses and the sample."""
    console = console or Console()
    out = out or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}"
    console.rule("[bold]moekit demo: an MoE language model on tiny-shakespeare")
    budget = {"time_budget": time_budget, "max_steps": 100_000}
    result = train(model="demo", eval_interval=100, out_dir=out, seed=seed, **budget, **DEMO_RECIPE)
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
    # One column per MoE layer and one row per expert, so that many experts still fit a terminal's width.
    share = load.float() / load.sum(dim=1, keepdim=True) * 100
    table = Table(title="share of tokens per expert (%)", caption="validation data")
    table.add_column("expert")
    for layer in layers:
        table.add_column(f"layer {layer}", justify="right")
    for e in range(load.shape[1]):
        table.add_row(f"e{e}", *(f"{s:.1f}" for s in share[:, e]))
    imbalance = load.max(dim=1).values / load.float().mean(dim=1)
    table.add_row("max/mean", *(f"{v:.2f}" for v in imbalance), style="bold")
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


# Small enough to learn the built-in pairs in well under a minute on one core.
TRANSLATE_DEMO = {
    "model.hidden_size": 64,
    "model.encoder_layers": 2,
    "model.decoder_layers": 2,
    "model.num_attention_heads": 2,
    "model.intermediate_size": 128,
    "model.num_experts": 4,
    "model.dropout": 0.0,
    "batch_tokens": 1024,
    "lr": 3e-3,
    "warmup_steps": 30,
    "valid_fraction": 0.1,
}


def translate_demo(time_budget="40s", out=None, seed=1337, console=None) -> dict:
    """Train a small MoE encoder-decoder on the built-in English-German pairs (offline); print validation
    loss, BLEU (greedy and beam 4), sample translations and each MoE layer's expert load."""
    from moekit.tasks.translate import (
        corpus_bleu,
        encode_pairs,
        load_task_data,
        load_translator,
        train_translator,
        translate,
        validation_loss,
    )

    console = console or Console()
    out = out or f"runs/demo-translate-{time.strftime('%Y%m%d-%H%M%S')}"
    console.rule("[bold]moekit demo: an MoE encoder-decoder on the built-in English-German pairs")
    result = train_translator(
        time_budget=time_budget,
        out_dir=out,
        seed=seed,
        eval_interval=100,
        threads=1,
        bleu_sentences=0,
        **TRANSLATE_DEMO,
    )
    for record in result.history:
        console.print(f"  step {record['step']:>5}  valid loss {record['valid_loss']:.4f}")
    model, tokenizer = load_translator(result.run_dir)
    _, valid = load_task_data(train_config_of(result.run_dir, task="translate"))
    greedy = translate(model, tokenizer, valid.sources)
    beam = translate(model, tokenizer, valid.sources, beam=4)
    bleu = {"greedy": corpus_bleu(greedy, valid.targets), "beam4": corpus_bleu(beam, valid.targets)}
    console.print(
        f"\n[bold]validation BLEU[/] ({len(valid)} held-out pairs): greedy {bleu['greedy']:.1f}, "
        f"beam 4 {bleu['beam4']:.1f}  ({result.active_parameters:,} of {result.parameters:,} parameters active)"
    )
    table = Table(title="held-out sentences (beam 4)")
    for column in ("English", "moekit", "reference"):
        table.add_column(column)
    for i in range(min(5, len(valid))):
        table.add_row(valid.sources[i], beam[i], valid.targets[i])
    console.print(table)
    _, loads = validation_loss(model, encode_pairs(tokenizer, valid))
    names = [f"encoder.{i}" for i, b in enumerate(model.encoder) if b.is_moe]
    names += [f"decoder.{i}" for i, b in enumerate(model.decoder) if b.is_moe]
    load_table = Table(title="share of validation tokens per expert (%)")
    load_table.add_column("layer")
    for e in range(model.config.num_experts):
        load_table.add_column(f"e{e}", justify="right")
    for name, row in zip(names, loads):
        load_table.add_row(name, *(f"{s:.0f}" for s in (row.float() / row.sum().clamp_min(1) * 100).tolist()))
    console.print(load_table)
    console.print(f"run folder: [bold]{result.run_dir}[/]")
    console.print(f'next: moekit translate --checkpoint {result.run_dir} --text "A little dog is running in the snow."')
    return {"run_dir": result.run_dir, "bleu": bleu, "translations": beam, "valid": valid}


def train_config_of(run_dir, task: str = "classify"):
    import json

    if task == "translate":
        from moekit.tasks.translate import TranslateConfig as config_class
    else:
        from moekit.tasks.classify import ClassifyConfig as config_class

    return config_class.from_dict(json.loads((run_dir / "run.json").read_text())["train"])


def run(args: argparse.Namespace) -> int:
    if args.task == "translate":
        translate_demo(args.time_budget if args.time_budget != "2m" else "40s", args.out, args.seed)
        return 0
    if args.task != "lm":
        task_demo(args.task, args.time_budget if args.time_budget != "2m" else "40s", args.out, args.seed)
        return 0
    demo(args.time_budget, args.out, args.prompt, args.max_new_tokens, args.seed)
    return 0
