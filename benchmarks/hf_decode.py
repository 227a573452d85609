"""Greedy decoding of one converted checkpoint: moekit's generate vs transformers' ``generate``.

A random Hugging Face MoE (default: qwen3_moe, 4 layers, hidden 512, 32 experts, top-4, vocab 32000) is
saved with ``save_pretrained`` and imported with ``moekit.from_hf``; transformers loads the same folder
with ``from_pretrained``. Both decode the same prompts greedily and must produce the same tokens
(asserted). Both run in this process on the same threads; repeats are interleaved (one call of each per
round) and the median is kept, so load from other processes hits both alike.

Measured per batch size B (prompt length L, N new tokens):
  prefill tokens/s = B * L / T(generate 1 token)        (the prompt's forward plus one pick)
  decode tokens/s  = B * (N - 1) / (T(N tokens) - T(1)) (per-step cost once the prompt is cached)

transformers runs with its defaults (SDPA attention, DynamicCache, its default experts implementation
for this device); ``--hf-experts eager`` etc. picks another.

Usage:
    python benchmarks/hf_decode.py                          # batch 1 and 8, 64 new tokens
    python benchmarks/hf_decode.py --quick                  # smaller model, fewer tokens (smoke)
    python benchmarks/hf_decode.py --threads 2 --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import moekit
from moekit.inference.generate import generate


def build_checkpoint(folder: Path, args) -> None:
    import transformers

    common = dict(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=4096,
        num_experts_per_tok=args.top_k,
    )
    if args.family == "qwen3_moe":
        config = transformers.Qwen3MoeConfig(
            **common,
            head_dim=args.hidden // args.heads,
            num_experts=args.experts,
            moe_intermediate_size=args.expert_hidden,
            intermediate_size=4 * args.hidden,
            norm_topk_prob=True,
        )
    elif args.family == "mixtral":
        config = transformers.MixtralConfig(
            **common, num_local_experts=args.experts, intermediate_size=args.expert_hidden
        )
    elif args.family == "olmoe":
        config = transformers.OlmoeConfig(**common, num_experts=args.experts, intermediate_size=args.expert_hidden)
    else:
        raise SystemExit(f"--family {args.family!r}: use qwen3_moe, mixtral or olmoe")
    torch.manual_seed(args.seed)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run_case(hf, model, batch: int, args) -> dict:
    g = torch.Generator().manual_seed(args.seed + batch)
    ids = torch.randint(3, args.vocab, (batch, args.prompt), generator=g)
    mask = torch.ones_like(ids)

    def hf_gen(n):
        with torch.inference_mode():
            out = hf.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
        return out[:, args.prompt :].tolist()

    def mk_gen(n):
        return generate(model, ids, max_new_tokens=n, temperature=0)

    theirs, mine = hf_gen(args.new_tokens), mk_gen(args.new_tokens)  # warm-up, and the tokens must agree
    if theirs != mine:
        first = next(i for i, (a, b) in enumerate(zip(theirs[0], mine[0])) if a != b) if theirs[0] != mine[0] else None
        raise AssertionError(f"batch {batch}: moekit and transformers decoded different tokens (row 0 from {first})")
    times = {k: [] for k in ("hf1", "hfN", "mk1", "mkN")}
    for r in range(args.repeats):
        order = [
            ("hf1", hf_gen, 1),
            ("mk1", mk_gen, 1),
            ("hfN", hf_gen, args.new_tokens),
            ("mkN", mk_gen, args.new_tokens),
        ]
        if r % 2:
            order.reverse()
        for key, fn, n in order:
            times[key].append(timed(lambda fn=fn, n=n: fn(n)))
    med = {k: statistics.median(v) for k, v in times.items()}
    n = args.new_tokens
    result = {"batch": batch, "prompt": args.prompt, "new_tokens": n}
    for who, p in (("moekit", "mk"), ("transformers", "hf")):
        result[f"{who}_prefill_tok_s"] = batch * args.prompt / med[f"{p}1"]
        result[f"{who}_decode_tok_s"] = batch * (n - 1) / max(med[f"{p}N"] - med[f"{p}1"], 1e-9)
    result["decode_ratio"] = result["moekit_decode_tok_s"] / result["transformers_decode_tok_s"]
    result["prefill_ratio"] = result["moekit_prefill_tok_s"] / result["transformers_prefill_tok_s"]
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", default="qwen3_moe", help="qwen3_moe | mixtral | olmoe")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--expert-hidden", type=int, default=256)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--prompt", type=int, default=32, help="prompt length")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads for both (default 1: stable on shared boxes)")
    p.add_argument("--hf-experts", default=None, help="transformers experts implementation (default: its own)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="2 layers, hidden 128, 8 experts, vocab 4096, 16 tokens")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.hidden, args.heads, args.kv_heads = 2, 128, 4, 2
        args.experts, args.top_k, args.expert_hidden, args.vocab = 8, 2, 64, 4096
        args.prompt, args.new_tokens, args.repeats = 16, 16, 2
    torch.set_num_threads(args.threads)
    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "hf"
        build_checkpoint(folder, args)
        kwargs = {} if args.hf_experts is None else {"experts_implementation": args.hf_experts}
        hf = transformers.AutoModelForCausalLM.from_pretrained(folder, **kwargs).eval()
        model = moekit.from_hf(folder)
    impl = getattr(hf.config, "_experts_implementation", None)
    print(
        f"# {args.family}: {args.layers} layers, hidden {args.hidden}, {args.experts} experts top-{args.top_k}, "
        f"expert hidden {args.expert_hidden}, vocab {args.vocab}; prompt {args.prompt}, {args.new_tokens} new tokens; "
        f"torch {torch.__version__}, transformers {transformers.__version__} (experts: {impl}), "
        f"{args.threads} thread(s), median of {args.repeats}"
    )
    results = []
    for batch in (int(b) for b in args.batches.split(",")):
        r = run_case(hf, model, batch, args)
        results.append(r)
        print(
            f"decode  b={batch}: moekit {r['moekit_decode_tok_s']:8.1f} tok/s  transformers "
            f"{r['transformers_decode_tok_s']:8.1f} tok/s  ratio {r['decode_ratio']:.2f}x  "
            f"(same {args.new_tokens} tokens)"
        )
        print(
            f"prefill b={batch}: moekit {r['moekit_prefill_tok_s']:8.1f} tok/s  transformers "
            f"{r['transformers_prefill_tok_s']:8.1f} tok/s  ratio {r['prefill_ratio']:.2f}x"
        )
        sys.stdout.flush()
    if args.json:
        meta = {"args": vars(args), "platform": platform.platform(), "torch": torch.__version__}
        Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
