"""Perplexity through batch-1 decode steps: the kernels a generation runs, at bf16, int8 and int4.

``quant_quality.py`` scores whole blocks, which run the prompt path (a GEMM per expert). A generation runs
other code: the native decode step and the experts' one-row kernels. Here each validation window is fed one
token at a time through the KV cache, as ``generate`` does, and the next token's loss is taken from each
step's logits. The first row compares that with the block path of the same bf16 model: the two paths' losses
should agree to a few parts in 10^4.

Usage:
    python benchmarks/decode_quality.py --checkpoint /work/bench/q3like-trained [--tokens 1024] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math

import torch
import torch.nn.functional as F

from moekit.checkpoint import load_model
from moekit.data.corpus import builtin_corpus
from moekit.models.quantization import quantize_model, uniform_spec

CONFIGS = {
    "bf16": None,
    "int8 experts, int8 attention + head": dict(bits=8, linear_bits=8),
    "int4 g32 experts, int8 attention + head": dict(bits=4, linear_bits=8),
    "int4 g32 experts, int4 attention + head": dict(bits=4, linear_bits=4),
}


@torch.inference_mode()
def decode_loss(model, windows: list[torch.Tensor]) -> float:
    """Mean next-token loss with one token per forward, through the KV cache."""
    total, count = 0.0, 0
    for ids in windows:
        cache = model.new_cache(max_length=ids.numel())
        for t in range(ids.numel() - 1):
            logits = model(ids[None, t : t + 1], cache=cache, logits_to_keep=1).logits[0, -1].float()
            total += F.cross_entropy(logits[None], ids[t + 1 : t + 2]).item()
            count += 1
    return total / count


@torch.inference_mode()
def block_loss(model, windows: list[torch.Tensor]) -> float:
    """The same windows scored whole (the prompt path)."""
    total, count = 0.0, 0
    for ids in windows:
        logits = model(ids[None]).logits[0, :-1].float()
        total += F.cross_entropy(logits, ids[1:], reduction="sum").item()
        count += ids.numel() - 1
    return total / count


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="a trained moekit run or checkpoint")
    ap.add_argument("--tokens", type=int, default=1024, help="validation tokens decoded per configuration")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.checkpoint)
    text = builtin_corpus()
    ids = torch.tensor(tokenizer.encode(text[-len(text) // 10 :]), dtype=torch.long)  # the validation tenth
    width = min(256, model.config.max_position_embeddings)
    windows = [ids[i : i + width] for i in range(0, min(args.tokens, ids.numel() - width), width)]
    rows = []
    for name, spec in CONFIGS.items():
        model, _ = load_model(args.checkpoint)
        model = model.to(torch.bfloat16)
        if spec is not None:
            quantize_model(model, uniform_spec(model.config, spec["bits"], 32, linear_bits=spec["linear_bits"]))
        row = {"config": name, "decode_loss": decode_loss(model, windows)}
        if spec is None:
            row["block_loss"] = block_loss(model, windows)
        rows.append(row)
    base = rows[0]["decode_loss"]
    for row in rows:
        row["ppl"] = math.exp(row["decode_loss"])
        row["ppl_vs_bf16"] = math.exp(row["decode_loss"] - base) - 1
        block = f"  (block path {math.exp(row['block_loss']):.4f})" if "block_loss" in row else ""
        print(f"{row['config']:42s} decode ppl {row['ppl']:.4f}  {row['ppl_vs_bf16']:+.3%} vs bf16{block}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"argv": vars(args), "tokens": sum(w.numel() - 1 for w in windows), "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
