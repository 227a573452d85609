"""Perplexity of trained MoE models with quantised experts: bf16 vs int8, int4 (groups 32/64/128) and
routing-aware mixed precision against two choices of the same bytes.

Per model (moekit checkpoints, e.g. a ``moekit demo`` run): the fp32 checkpoint, cast to bf16, is the
baseline; every other row quantises the experts of that bf16 model (attention and the head stay bf16, except in the
``attention + head`` rows: ``--linear-bits 8`` or ``4``).
Validation text: the last 10% of tiny-shakespeare (the built-in corpus, or ``--data``); calibration for the
mixed rows: the first 5%. ``mixed`` keeps the most-routed ``--fraction`` of each layer's experts at 8 bits
and the rest at 4 (group 32); ``mixed-least`` gives 8 bits to the least-routed instead and ``mixed-random``
to a random choice: the same bytes, a worse choice (if routing-aware precision is worth anything).

Usage:
    python benchmarks/quant_quality.py --checkpoint runs/demo --checkpoint runs/other --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

import torch
import torch.nn.functional as F

from moekit.analysis.load import expert_load
from moekit.checkpoint import load_model
from moekit.data.corpus import builtin_corpus
from moekit.data.loader import iter_eval_batches
from moekit.errors import ConfigError
from moekit.models.quantization import expert_bytes, mixed_spec, quantize_model, uniform_spec


@torch.inference_mode()
def loss_of(model, ids: torch.Tensor, block: int) -> float:
    total, count = 0.0, 0
    for x, y in iter_eval_batches(ids, block, 16):
        total += F.cross_entropy(model(x).logits.float().flatten(0, 1), y.flatten(), reduction="sum").item()
        count += y.numel()
    return total / count


def rows_for(checkpoint: str, text: str, fraction: float) -> list[dict]:
    model, tokenizer = load_model(checkpoint)
    block = min(128, model.config.max_position_embeddings)
    ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)
    cut = len(ids) // 10
    val, calib = ids[-cut:], ids[: len(ids) // 20]
    layers, load = expert_load(model, [x for x, _ in iter_eval_batches(calib, block, 16, max_batches=8)])
    loads = {i: load[row] for row, i in enumerate(layers)}
    rng = random.Random(0)
    specs: dict[str, dict | None] = {"bf16": None, "int8": uniform_spec(model.config, 8)}
    for g in (32, 64, 128):
        specs[f"int4 g{g}"] = uniform_spec(model.config, 4, g)
    specs["int8, attention + head int8"] = uniform_spec(model.config, 8, linear_bits=8)
    specs["int4 g32, attention + head int8"] = uniform_spec(model.config, 4, 32, linear_bits=8)
    specs["int4 g32, attention + head int4"] = uniform_spec(model.config, 4, 32, linear_bits=4)
    specs[f"mixed {fraction:.0%} 8-bit (most routed)"] = mixed_spec(loads, fraction)
    specs[f"mixed {fraction:.0%} 8-bit (least routed)"] = mixed_spec({i: -v for i, v in loads.items()}, fraction)
    shuffled = {i: torch.tensor(rng.sample(range(v.numel()), v.numel())) for i, v in loads.items()}
    specs[f"mixed {fraction:.0%} 8-bit (random)"] = mixed_spec(shuffled, fraction)
    rows, base = [], None
    for name, spec in specs.items():
        m, _ = load_model(checkpoint)
        m = m.to(torch.bfloat16)
        if spec is not None:
            try:
                quantize_model(m, spec)
            except ConfigError as e:  # a group that does not divide this model's widths
                rows.append({"model": checkpoint, "config": name, "skipped": str(e)})
                continue
        loss = loss_of(m, val, block)
        base = loss if base is None else base
        row = {"model": checkpoint, "config": name, "val_loss": loss, "perplexity": math.exp(loss)}
        row.update(ppl_vs_bf16=math.exp(loss - base) - 1, expert_mib=expert_bytes(m) / 2**20)
        rows.append(row)
        print(
            f"{Path(checkpoint).name:>14s}  {name:34s} loss {loss:.4f}  ppl {math.exp(loss):7.3f}  "
            f"{row['ppl_vs_bf16']:+.2%} vs bf16  experts {row['expert_mib']:.2f} MiB",
            flush=True,
        )
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", action="append", required=True)
    ap.add_argument("--data", help="text file (default: the built-in tiny-shakespeare)")
    ap.add_argument("--fraction", type=float, default=0.25, help="share of experts at 8 bits in the mixed rows")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    text = Path(args.data).read_text() if args.data else builtin_corpus()
    rows = [r for ck in args.checkpoint for r in rows_for(ck, text, args.fraction)]
    if args.json:
        Path(args.json).write_text(json.dumps({"argv": argv or [], "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
