"""``moekit demo``: the main job. Train the ``demo`` MoE on the built-in tiny-shakespeare for about
two minutes, print validation loss by step, sample text, and show each layer's expert load.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from moekit.analysis.pipeline import AnalysisResult, analyze
from moekit.checkpoint import load_model
from moekit.data.corpus import builtin_corpus
from moekit.inference.generate import stream_text
from moekit.tasks import classify, decoding, translate
from moekit.tasks.routing import routing_by_label, routing_table
from moekit.train.trainer import train


def add_parser(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser("demo", help="train, sample and analyse a small MoE LM (about 2 minutes)", description=__doc__)
    p.add_argument("--time-budget", help="training time, e.g. 90s or 2m (default: 2m for lm, 40s for the other tasks)")
    p.add_argument("--out", help="run folder (default: runs/demo-<time>)")
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


def demo(
    time_budget: str = "2m",
    out: str | Path | None = None,
    prompt: str = "ROMEO:",
    max_new_tokens: int = 300,
    seed: int = 1337,
    console: Console | None = None,
) -> dict[str, Any]:
    """Train the demo LM, sample it and analyse its routing; returns the run folder, validation losses, sample
    and report (``out=None``: runs/demo-<time>)."""
    console = console or Console()
    out = out or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}"
    console.rule("[bold]moekit demo: an MoE language model on tiny-shakespeare")
    budget = {"time_budget": time_budget, "max_steps": 100_000}
    result = train(model="demo", eval_interval=100, out_dir=out, seed=seed, **budget, **DEMO_RECIPE)
    model, tokenizer = load_model(result.checkpoint)
    console.print(
        f"\n[bold]validation loss by step[/] "
        f"({result.tokens_per_second:,.0f} tokens/s over the run, evaluations included):"
    )
    for step, loss in result.val_losses:
        console.print(f"  step {step:>5}  val_loss {loss:.4f}")

    console.print(f"\n[bold]sample[/] (temperature 0.8, seed {seed}):")
    pieces = stream_text(model, tokenizer, prompt, max_new_tokens=max_new_tokens, temperature=0.8, seed=seed)
    sample = prompt + "".join(pieces)
    console.print(sample, markup=False, highlight=False)

    analysis = _routing_report(result.run_dir, console)
    console.print(_expert_load_table(analysis.summary["layers"]))
    console.print(f"routing report: [bold]{analysis.report}[/] (open it in a browser)")
    console.print(f"\nrun folder: [bold]{result.run_dir}[/] (checkpoint {result.checkpoint.name}, metrics.jsonl, tb/)")
    console.print(f"next: moekit generate --checkpoint {result.run_dir} --prompt 'JULIET:'")
    return {"run_dir": result.run_dir, "val_losses": result.val_losses, "sample": sample, "report": analysis.report}


def _routing_report(run_dir: Path, console: Console) -> AnalysisResult:
    """Analyse the routing on the corpus' last tenth, the text the trainer held out for validation."""
    text = builtin_corpus()
    out = Path(run_dir) / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    (out / "validation.txt").write_text(text[int(len(text) * 0.9) :], encoding="utf-8")
    return analyze(run_dir, [out / "validation.txt"], out, max_tokens=16384, progress=False, console=console)


def _expert_load_table(layers: list[dict[str, Any]]) -> Table:
    """Each expert's share of the validation tokens' assignments, one column per MoE layer and one row per
    expert (so that many experts still fit a terminal's width)."""
    table = Table(title="share of tokens per expert (%)", caption="validation data")
    table.add_column("expert")
    for layer in layers:
        table.add_column(f"layer {layer['layer']}", justify="right")
    for e in range(max(layer["num_experts"] for layer in layers)):
        shares = (layer["load_share"][e] if e < layer["num_experts"] else 0.0 for layer in layers)
        table.add_row(f"e{e}", *(f"{100 * s:.1f}" for s in shares))
    table.add_row("max/mean", *(f"{layer['imbalance']:.2f}" for layer in layers), style="bold")
    return table


def task_demo(
    task: str, time_budget: str = "40s", out: str | Path | None = None, seed: int = 1337, console: Console | None = None
) -> dict[str, Any]:
    """Train a small MoE classifier on built-in data (offline), print its accuracy and routing by label."""
    console = console or Console()
    out = out or f"runs/demo-{task}-{time.strftime('%Y%m%d-%H%M%S')}"
    what = "sentiment sentences" if task == "classify" else "scikit-learn's 8x8 digits"
    console.rule(f"[bold]moekit demo: an MoE classifier on the built-in {what}")
    fields = {"model.patch_size": 2} if task == "image-classify" else {}
    result = classify.train_classifier(
        task=task, time_budget=time_budget, out_dir=out, seed=seed, eval_interval=100, threads=1, **fields
    )
    for record in result.history:
        console.print(f"  step {record['step']:>5}  valid accuracy {record['accuracy']:.4f}")
    model, vocab, names, _ = classify.load_classifier(result.run_dir)
    _, valid = classify.load_task_data(_run_config(result.run_dir, classify.ClassifyConfig))
    examples = classify.encode(model, vocab, valid, names)
    table = routing_table(routing_by_label(model, examples, len(names)), names)
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
    "model.moe.num_experts": 4,
    "model.dropout": 0.0,
    "batch_tokens": 1024,
    "lr": 3e-3,
    "warmup_steps": 30,
    "valid_fraction": 0.1,
    "eval_interval": 100,
    "threads": 1,
    "bleu_sentences": 0,
}


def translate_demo(
    time_budget: str = "40s", out: str | Path | None = None, seed: int = 1337, console: Console | None = None
) -> dict[str, Any]:
    """Train a small MoE encoder-decoder on the built-in English-German pairs (offline); print validation
    loss, BLEU (greedy and beam 4), sample translations and each MoE layer's expert load."""
    console = console or Console()
    out = out or f"runs/demo-translate-{time.strftime('%Y%m%d-%H%M%S')}"
    console.rule("[bold]moekit demo: an MoE encoder-decoder on the built-in English-German pairs")
    result = translate.train_translator(time_budget=time_budget, out_dir=out, seed=seed, **TRANSLATE_DEMO)
    for record in result.history:
        console.print(f"  step {record['step']:>5}  valid loss {record['valid_loss']:.4f}")
    model, tokenizer = translate.load_translator(result.run_dir)
    _, valid = translate.load_task_data(_run_config(result.run_dir, translate.TranslateConfig))
    greedy = decoding.translate(model, tokenizer, valid.sources)
    beam = decoding.translate(model, tokenizer, valid.sources, beam=4)
    bleu = {"greedy": decoding.corpus_bleu(greedy, valid.targets), "beam4": decoding.corpus_bleu(beam, valid.targets)}
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
    _, loads = translate.validation_loss(model, translate.encode_pairs(tokenizer, valid))
    console.print(_seq2seq_load_table(model, loads))
    console.print(f"run folder: [bold]{result.run_dir}[/]")
    console.print(f'next: moekit translate --checkpoint {result.run_dir} --text "A little dog is running in the snow."')
    return {"run_dir": result.run_dir, "bleu": bleu, "translations": beam, "valid": valid}


def _seq2seq_load_table(model: torch.nn.Module, loads: list[torch.Tensor]) -> Table:
    """Each MoE layer's share of the validation tokens per expert, one row per layer."""
    names = [f"encoder.{i}" for i, b in enumerate(model.encoder) if b.is_moe]
    names += [f"decoder.{i}" for i, b in enumerate(model.decoder) if b.is_moe]
    table = Table(title="share of validation tokens per expert (%)")
    table.add_column("layer")
    for e in range(model.config.moe.num_experts):
        table.add_column(f"e{e}", justify="right")
    for name, row in zip(names, loads):
        table.add_row(name, *(f"{s:.0f}" for s in (row.float() / row.sum().clamp_min(1) * 100).tolist()))
    return table


def _run_config(run_dir: Path, config_class: type) -> Any:
    """The task config a run folder's run.json records."""
    return config_class.from_dict(json.loads((run_dir / "run.json").read_text())["train"])


def run(args: argparse.Namespace) -> int:
    budget = {} if args.time_budget is None else {"time_budget": args.time_budget}  # each demo has its own default
    if args.task == "translate":
        translate_demo(out=args.out, seed=args.seed, **budget)
    elif args.task != "lm":
        task_demo(args.task, out=args.out, seed=args.seed, **budget)
    else:
        demo(out=args.out, prompt=args.prompt, max_new_tokens=args.max_new_tokens, seed=args.seed, **budget)
    return 0
