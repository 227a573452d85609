"""MoE encoder-decoder vs the dense baseline with equal active parameters, for equal training time.

    python benchmarks/task_translate.py --data ../shared/data/multi30k --budget 30m --threads 2 \
        --out benchmarks/results/translate.md --json benchmarks/results/translate.json

``--data DIR`` takes Multi30k's layout (``train``, ``val``, ``test_2016_flickr`` ``.{en,de}.gz``); or name
each file with ``--source/--target/--valid-source/--valid-target/--test-source/--test-target``. Both models
share every setting but ``ffn`` (moe: top-1 of 8 experts in the last and every other FFN of each stack; dense:
one MLP as wide as an expert), so a token passes the same number of weights in both. Each trains for
``--budget`` (validation loss checks included), then translates the test set greedily and with beam search
(not counted in the budget). Writes a markdown table (and ``--json``); the MoE run's expert load and the
source words each encoder expert takes most are written next to the table (``*-routing.md``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from side_by_side import run_side_by_side
from task_table import parse_sets, write_table

from moekit.data.bpe import SPECIAL_TOKENS
from moekit.data.parallel import read_parallel
from moekit.tasks.decoding import corpus_bleu, translate
from moekit.tasks.translate import encode_pairs, load_translator, train_translator


def _files(args) -> dict[str, str]:
    names = ("source", "target", "valid_source", "valid_target", "test_source", "test_target")
    files = {name: getattr(args, name) for name in names}
    if args.data:
        d = Path(args.data)
        split = {"source": "train", "valid_source": "val", "test_source": args.test_split}
        for key, stem in split.items():
            files[key] = files[key] or str(d / f"{stem}.{args.src_lang}.gz")
            target_key = key.replace("source", "target")
            files[target_key] = files[target_key] or str(d / f"{stem}.{args.tgt_lang}.gz")
    missing = [f"--{k.replace('_', '-')}" for k, v in files.items() if not v]
    if missing:
        raise SystemExit(f"give --data DIR or {' '.join(missing)}")
    return files


@torch.no_grad()
def routing_report(model, tokenizer, pairs, path: Path, top: int = 12) -> None:
    """Each MoE layer's share of test tokens per expert; for encoder layers, the subwords each expert takes most
    often relative to their frequency (lift), among subwords seen at least 20 times."""
    lines = ["# Routing of the MoE translation model on the test set", ""]
    encoded = encode_pairs(tokenizer, pairs)
    layers = [("encoder", i, b.mlp) for i, b in enumerate(model.encoder) if b.is_moe]
    layers += [("decoder", i, b.mlp) for i, b in enumerate(model.decoder) if b.is_moe]
    E = model.config.moe.num_experts
    counts = {(stack, i): torch.zeros(E, dtype=torch.long) for stack, i, _ in layers}
    by_token = {(stack, i): Counter() for stack, i, _ in layers if stack == "encoder"}
    token_total: Counter = Counter()
    for rows in encoded.batches(4096):
        src, src_mask, tgt_in, _, tgt_mask = encoded.batch(rows)
        out = model(src, tgt_in, src_mask, tgt_mask, record_routing=True)
        ids = {"encoder": src.reshape(-1).tolist(), "decoder": tgt_in.reshape(-1).tolist()}
        token_total.update(i for i, m in zip(ids["encoder"], src_mask.reshape(-1).tolist()) if m)
        for (stack, i, _), aux in zip(layers, out.moe_aux):
            r = aux.routing
            counts[(stack, i)] += torch.bincount(r.expert_idx_A, minlength=E)
            if stack == "encoder":
                tokens = [ids["encoder"][t] for t in r.token_idx_A.tolist()]
                by_token[(stack, i)].update(zip(r.expert_idx_A.tolist(), tokens))
    lines += ["| layer | " + " | ".join(f"e{e}" for e in range(E)) + " |", "|---|" + "---:|" * E]
    for (stack, i), row in counts.items():
        share = row.float() / row.sum().clamp_min(1) * 100
        lines.append(f"| {stack}.{i} | " + " | ".join(f"{s:.1f}" for s in share.tolist()) + " |")
    lines.append("")
    for (stack, i), pairs_seen in by_token.items():
        lines += [f"## {stack}.{i}: subwords each expert takes most (lift = P(expert | subword) / P(expert))", ""]
        load = counts[(stack, i)].float() / counts[(stack, i)].sum()
        for e in range(E):
            scored = []
            for tok, n in token_total.items():
                if n >= 20 and pairs_seen[(e, tok)]:
                    scored.append((pairs_seen[(e, tok)] / n / float(load[e]), tok))
            best = sorted(scored, reverse=True)[:top]
            words = ", ".join(f"`{_label(tokenizer, t)}` {lift:.1f}" for lift, t in best)
            lines.append(f"- e{e} ({float(load[e]) * 100:.1f}% of tokens): {words}")
        lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")


def _label(tokenizer, token_id: int) -> str:
    return SPECIAL_TOKENS[token_id] if token_id < len(SPECIAL_TOKENS) else tokenizer.decode([token_id]) or "␣"


def _run_model(args, files: dict, extra: dict, ffn: str, tag: int | None = None) -> dict:
    """Train the ``ffn`` model for the budget, then translate the test set greedily and with beam search."""
    run_dir = Path(args.runs) / f"translate-{ffn}-{tag or os.getpid()}"
    result = train_translator(
        source=files["source"],
        target=files["target"],
        valid_source=files["valid_source"],
        valid_target=files["valid_target"],
        time_budget=args.budget,
        threads=args.threads,
        out_dir=str(run_dir),
        progress=False,
        bleu_sentences=0,
        **{"model.ffn": ffn, **extra},
    )
    model, tokenizer = load_translator(run_dir)
    row = {
        "model": ffn,
        "steps": result.step,
        "seconds": result.seconds,
        "tokens_per_second": result.tokens_per_second,
        "valid_loss": result.valid_loss,
        "parameters": result.parameters,
        "active_parameters": result.active_parameters,
        "run_dir": str(run_dir),
    }
    test = read_parallel(files["test_source"], files["test_target"])
    for beam in (1, args.beam):
        start = time.perf_counter()
        hyps = translate(model, tokenizer, test.sources, beam=beam)
        key = "greedy" if beam == 1 else f"beam{beam}"
        row[f"bleu_{key}"] = corpus_bleu(hyps, test.targets)
        row[f"decode_seconds_{key}"] = time.perf_counter() - start
        (run_dir / f"test.{key}.{args.tgt_lang}").write_text("".join(h + "\n" for h in hyps), encoding="utf-8")
    print(json.dumps(row), flush=True)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="folder with Multi30k's train/val/test .gz files")
    p.add_argument("--src-lang", default="en")
    p.add_argument("--tgt-lang", default="de")
    p.add_argument("--test-split", default="test_2016_flickr")
    for name in ("source", "target", "valid-source", "valid-target", "test-source", "test-target"):
        p.add_argument(f"--{name}", default=None)
    p.add_argument("--budget", default="30m", help="training time per model")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--beam", type=int, default=5)
    p.add_argument("--models", default="moe,dense", help="which of moe,dense to train, in order")
    p.add_argument("--parallel", action="store_true", help="train the models at once, one core each (default: in turn)")
    p.add_argument("--runs", default="runs/bench")
    p.add_argument("--out", required=True, help="markdown table path")
    p.add_argument("--json", default=None)
    p.add_argument("--set", nargs="*", default=[], help="extra TranslateConfig key=value (model.moe.top_k=2 ...)")
    args = p.parse_args(argv)
    files = _files(args)
    extra = parse_sets(args.set)
    if args.parallel:
        jobs = [(args, files, extra, ffn, os.getpid()) for ffn in args.models.split(",")]
        rows = run_side_by_side(_run_model, jobs)
    else:
        rows = [_run_model(args, files, extra, ffn) for ffn in args.models.split(",")]
    moe = next((r for r in rows if r["model"] == "moe"), None)
    if moe is not None:
        model, tokenizer = load_translator(moe["run_dir"])
        test = read_parallel(files["test_source"], files["test_target"])
        routing_report(model, tokenizer, test, Path(args.out).with_name(Path(args.out).stem + "-routing.md"))
    columns = [
        ("test BLEU greedy", "bleu_greedy", ".2f"),
        (f"test BLEU beam {args.beam}", f"bleu_beam{args.beam}", ".2f"),
        ("valid loss", "valid_loss", ".3f"),
        ("steps", "steps", "d"),
        ("train seconds", "seconds", ".0f"),
        ("tokens/s", "tokens_per_second", ",.0f"),
        ("parameters", "parameters", ",d"),
        ("active parameters", "active_parameters", ",d"),
    ]
    data_line = (
        f"train: `{files['source']}` -> `{files['target']}`; test BLEU (sacrebleu, cased, 13a) on "
        f"`{files['test_source']}` -> `{files['test_target']}`"
    )
    write_table(args, "translate", data_line, columns, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
