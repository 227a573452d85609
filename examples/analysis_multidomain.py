"""Worked example: train a small MoE on code + math + prose, then ask which experts handle what.

    DATA=../shared/data/multidomain   # code_networkx/, math_gsm8k/, prose_warpeace/
    python examples/analysis_multidomain.py --data $DATA            # 400 steps: ~3-4 minutes on one core
    python examples/analysis_multidomain.py --data $DATA --steps 3000 --out results/analysis_multidomain_long

1. Mixes the three training sets of the ``--data`` folder (networkx source code, GSM8K
   math word problems, War and Peace) into one byte-level corpus, interleaved in ~4 KB chunks and
   balanced by size.
2. Trains a small byte-level MoE (the ``demo`` preset narrowed to hidden size 64: 4 layers, 8 experts,
   top-2) on it for a fixed number of steps (so the numbers reproduce), keeping the intermediate
   checkpoints.
3. Runs ``moekit analyze`` on held-out text of each domain (``valid.txt`` / ``test.txt``) with one
   label per domain, comparing the final checkpoint with the one from a third of the way through
   (routing drift), and once more with token-category labels. Writes ``report.html``, ``stats.json``
   and the plots to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from moekit.analysis.pipeline import analyze
from moekit.train.trainer import train

# The demo preset narrowed so that a few minutes on 2 shared cores buy a few hundred steps.
MODEL_OVERRIDES = {"hidden_size": 64, "intermediate_size": 256, "moe": {"expert_hidden_size": 128}}
DOMAINS = {  # label -> (training file, held-out file) inside the data folder
    "code": ("code_networkx/train.txt", "code_networkx/valid.txt"),
    "math": ("math_gsm8k/train.txt", "math_gsm8k/test.txt"),
    "prose": ("prose_warpeace/train.txt", "prose_warpeace/valid.txt"),
}


def mix_corpus(data: Path, out_file: Path, bytes_per_domain: int, chunk: int = 4096) -> dict[str, int]:
    """Interleave ``chunk``-sized pieces (cut at line ends) of each domain's training text."""
    pieces = {}
    for label, (train_file, _) in DOMAINS.items():
        text = (data / train_file).read_text(encoding="utf-8")[:bytes_per_domain]
        parts, start = [], 0
        while start < len(text):
            end = text.find("\n", start + chunk)
            end = len(text) if end < 0 else end + 1
            parts.append(text[start:end])
            start = end
        pieces[label] = parts
    out_file.parent.mkdir(parents=True, exist_ok=True)
    with open(out_file, "w", encoding="utf-8") as f:
        for i in range(max(len(p) for p in pieces.values())):
            for parts in pieces.values():
                if i < len(parts):
                    f.write(parts[i])
    return {label: sum(len(p) for p in parts) for label, parts in pieces.items()}


def train_model(args, out: Path, run_dir: Path) -> tuple[int, float, float]:
    """Mix the corpus and train; returns (steps, last validation loss, seconds)."""
    if run_dir.exists():
        shutil.rmtree(run_dir)
    sizes = mix_corpus(args.data, out / "train_mix.txt", args.bytes_per_domain)
    print(f"training corpus: {sizes} characters per domain -> {out / 'train_mix.txt'}")
    t0 = time.perf_counter()
    result = train(
        model="demo",
        model_overrides=MODEL_OVERRIDES,
        data=str(out / "train_mix.txt"),
        time_budget=args.time_budget,
        max_steps=args.steps,
        batch_size=8,
        eval_interval=50,
        eval_batches=4,
        checkpoint_interval=25,
        keep_checkpoints=1000,
        threads=args.threads,
        seed=args.seed,
        out_dir=str(run_dir),
    )
    train_s = time.perf_counter() - t0
    print(f"trained {result.step} steps in {train_s:.0f}s, val_loss {result.val_losses[-1][1]:.3f}")
    return result.step, result.val_losses[-1][1], train_s


def previous_run(run_dir: Path) -> tuple[int, float, None]:
    """(steps, last validation loss, None) of the run already in ``run_dir``."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    last = [r for r in records if "val_loss" in r][-1]
    return last["step"], last["val_loss"], None


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--data", type=Path, required=True, help="the multidomain folder (code_networkx/, math_gsm8k/, ...)"
    )
    ap.add_argument("--out", type=Path, default=Path("results/analysis_multidomain"))
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--time-budget", default=None, help="stop earlier when this is spent (e.g. 3m)")
    ap.add_argument("--bytes-per-domain", type=int, default=1_500_000)
    ap.add_argument("--max-tokens", type=int, default=3 * 8192, help="held-out tokens analysed (all domains)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on busy shared cores)")
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--skip-training", action="store_true", help="analyse the run already in OUT/run again")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    out = args.out
    run_dir = out / "run"
    step, val_loss, train_s = previous_run(run_dir) if args.skip_training else train_model(args, out, run_dir)
    saved = sorted((run_dir / "checkpoints").glob("step-*"))
    early = min(saved, key=lambda p: abs(int(p.name.split("-")[1]) - step / 3))

    held_out = [f"{label}={args.data / valid}" for label, (_, valid) in DOMAINS.items()]
    t0 = time.perf_counter()
    by_domain = analyze(
        checkpoint=run_dir, data=held_out, out=out, labels="file", compare=early, max_tokens=args.max_tokens
    )
    by_category = analyze(
        checkpoint=run_dir, data=held_out, out=out / "by_category", labels="category", max_tokens=args.max_tokens
    )
    analyse_s = time.perf_counter() - t0

    s = by_domain.summary
    c = by_category.summary
    brief = {
        "steps": step,
        "train_seconds": round(train_s) if train_s is not None else None,
        "val_loss": round(val_loss, 4),
        "analyse_seconds": round(analyse_s),
        "tokens": s["tokens"],
        "compare_with": early.name,
        "layers": [
            {
                "layer": layer["layer"],
                "imbalance": layer["imbalance"],
                "dead": layer["dead_experts"],
                "mi_domain_bits": layer["specialisation"]["mi_bits"],
                "mi_domain_normalised": layer["specialisation"]["mi_normalised"],
                "mi_category_bits": cat["specialisation"]["mi_bits"],
                "mi_category_normalised": cat["specialisation"]["mi_normalised"],
                "top_expert_by_domain": {k: v[0] for k, v in layer["specialisation"]["top_experts"].items()},
                "top_expert_by_category": {k: v[0] for k, v in cat["specialisation"]["top_experts"].items()},
                "top1_changed_since_early": d["top1_changed"],
                "load_tv_since_early": d["load_tv"],
            }
            for layer, cat, d in zip(s["layers"], c["layers"], s["drift"])
        ],
        "readings": s["readings"]["overview"] + c["readings"]["specialisation"],
    }
    (out / "summary.json").write_text(json.dumps(brief, indent=2) + "\n")
    print(json.dumps(brief, indent=2))
    print(f"report: {by_domain.report}\nby token category: {by_category.report}")
    return brief


if __name__ == "__main__":
    main()
