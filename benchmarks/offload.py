"""Expert offload: batch-1 greedy decode with at most a share of the experts resident, against the resident model.

A random bf16 Qwen3-MoE (default: hidden 1024, 8 layers, 64 experts top-8, expert width 512, vocab 32000) is
saved by transformers (``save_pretrained``: one tensor per expert) and converted to a moekit checkpoint
(``from_hf`` then written: stacked experts, the layout offload reads). Then, in this process, one after the other:
the resident model, and the model with ``expert_memory`` = 100%, 50%, 25% of the experts' bytes (LRU), the
same budgets with LFU eviction and with prefetch. Each samples (seeded; a random model's greedy text repeats one
token, which would flatter the cache) after a prompt; all must give the resident model's tokens (asserted:
same logits, same seed, same samples).

Measured per run (prompt length L, N new tokens):
  decode tokens/s  = (N - 1) / (T(N tokens) - T(first token))
  hit rate, MiB read per token: over the decode steps only (the prompt's forward wants most experts)
  ratio            = decode tokens/s / the resident model's

``--io`` also times reading experts (random ones, from the page cache) by ``os.preadv`` into fresh memory vs
copying them out of the file's memory map and then ``madvise(MADV_DONTNEED)`` on their range, with the
resident-set growth of each: why the cache reads with ``preadv``.

Usage:
    python benchmarks/offload.py                     # the default shape, 48 new tokens
    python benchmarks/offload.py --quick             # a small model (smoke)
    python benchmarks/offload.py --io --json out.json --keep /tmp/offload-ckpt
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

from moekit.checkpoint import load_model, model_tensors, write_model_folder
from moekit.data.tokenizers import ByteTokenizer
from moekit.inference.generate import stream_generate
from moekit.interop.hf.api import from_hf
from moekit.nn.offload import OffloadStats, offload_experts


def build_checkpoint(folder: Path, args) -> Path:
    """A random bf16 Qwen3-MoE saved by transformers, converted to a moekit checkpoint in ``folder``/moekit."""
    import transformers

    config = transformers.Qwen3MoeConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.hidden // args.heads,
        max_position_embeddings=4096,
        num_experts=args.experts,
        num_experts_per_tok=args.top_k,
        moe_intermediate_size=args.expert_hidden,
        intermediate_size=4 * args.hidden,
        norm_topk_prob=True,
    )
    torch.manual_seed(args.seed)
    model = transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    model.save_pretrained(folder / "hf")
    del model
    converted = from_hf(folder / "hf")  # the stacked layout; a byte tokenizer (the prompt is token ids)
    out = write_model_folder(folder / "moekit", model_tensors(converted), {"model": converted.config.to_dict()})
    ByteTokenizer().save(out)
    del converted
    for file in (folder / "hf").iterdir():  # only the converted copy is used: spare the disk
        file.unlink()
    return out


def rss_bytes() -> int:
    """This process's resident set now."""
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmRSS"))


def expert_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".experts.w_" in n)


def timed_decode(model, prompt: list[int], new: int) -> tuple[list[int], float, float]:
    """(tokens, seconds to the first token, seconds for the rest) of one greedy stream."""
    with torch.inference_mode():
        t0 = time.perf_counter()
        stream = stream_generate(model, prompt, max_new_tokens=new, temperature=0)
        tokens = [next(stream)]
        t1 = time.perf_counter()
        tokens += list(stream)
        t2 = time.perf_counter()
    return tokens, t1 - t0, t2 - t1


def run_case(ckpt: Path, prompt: list[int], args, budget: float | None, policy="lru", prefetch=False) -> dict:
    model, _ = load_model(ckpt)
    size = expert_bytes(model)
    cache = offload_experts(model, max(1, int(size * budget)), policy, prefetch) if budget is not None else None
    timed_decode(model, prompt[::-1], 4)  # warm-up: first-use setup, a first fill of the cache
    if cache is not None:
        cache.stats = OffloadStats()
    with torch.inference_mode():  # the prompt alone, so that the decode steps' counters can be told apart
        t0 = time.perf_counter()
        stream = stream_generate(model, prompt, max_new_tokens=args.new, temperature=args.temperature, seed=args.seed)
        tokens = [next(stream)]
        first = time.perf_counter() - t0
        before = cache.stats.__dict__.copy() if cache is not None else {}
        t1 = time.perf_counter()
        tokens += list(stream)
        rest = time.perf_counter() - t1
    row = {
        "budget": budget,
        "policy": policy if cache is not None else None,
        "prefetch": prefetch,
        "expert_mib": size / 2**20,
        "prefill_s": first,
        "decode_tok_s": (len(tokens) - 1) / rest,
        "tokens": tokens,
    }
    if cache is not None:
        s = cache.stats
        lookups, hits = s.lookups - before["lookups"], s.hits - before["hits"]
        read = s.bytes_read + s.prefetch_bytes - before["bytes_read"] - before["prefetch_bytes"]
        steps = s.tokens - before["tokens"]
        row.update(hit_rate=hits / max(1, lookups), mib_per_token=read / max(1, steps) / 2**20)
        row.update(prefetched=s.prefetched - before["prefetched"])
        cache.close()
    return row


# -- reading experts: preadv vs the memory map + madvise ------------------------------------------------

_LIBC = ctypes.CDLL(None, use_errno=True)


def _dontneed(t: torch.Tensor) -> None:
    """Drop the pages of a mapped view from this process (they are re-read from the file when touched)."""
    start = t.data_ptr() // mmap.PAGESIZE * mmap.PAGESIZE
    end = t.data_ptr() + t.numel() * t.element_size()
    if _LIBC.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), mmap.MADV_DONTNEED) != 0:
        raise OSError(ctypes.get_errno(), "madvise")


def io_compare(ckpt: Path, count: int, seed: int) -> dict:
    """Seconds per expert and resident growth, reading ``count`` random experts each way (page cache warm)."""
    model, _ = load_model(ckpt, expert_memory=2**40)  # no NaN pass over the file: nothing touched yet
    cache = model.expert_cache
    keys = random.Random(seed).sample(sorted(cache._spans), min(count, len(cache._spans)))
    layers = [m for m in model.modules() if hasattr(m, "cache") and hasattr(m, "layer")]
    out = {}
    for name in ("preadv", "mmap+madvise", "mmap"):
        kept, rss0, t0 = [], rss_bytes(), time.perf_counter()
        for layer, e in keys:
            if name == "preadv":
                kept.append(tuple(cache._read_span(span) for span in cache._spans[(layer, e)]))
            else:
                views = layers[layer].w_in[e], layers[layer].w_out[e]
                kept.append(tuple(v.clone() for v in views))
                if name == "mmap+madvise":
                    for v in views:
                        _dontneed(v)
        seconds = time.perf_counter() - t0
        size = sum(t.numel() * t.element_size() for pair in kept for t in pair)
        out[name] = {"ms_per_expert": 1e3 * seconds / len(keys), "gb_s": size / seconds / 1e9}
        out[name].update(copies_mib=size / 2**20, rss_growth_mib=(rss_bytes() - rss0) / 2**20)  # copies: the least
        del kept
    cache.close()
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--expert-hidden", type=int, default=512)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--new", type=int, default=48)
    p.add_argument(
        "--temperature", type=float, default=1.0, help="seeded sampling (a random model's greedy text repeats)"
    )
    p.add_argument("--budgets", default="1,0.5,0.25", help="shares of the experts' bytes")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--io", action="store_true", help="also compare preadv with the memory map + madvise")
    p.add_argument("--keep", type=Path, default=None, help="make (or reuse) the checkpoint here, not in a temp dir")
    p.add_argument("--quick", action="store_true", help="a small model, few tokens (smoke)")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    args = p.parse_args(argv)
    if args.quick:
        args.hidden, args.layers, args.experts, args.expert_hidden, args.vocab, args.new = 256, 2, 16, 128, 1000, 8
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp)
        ckpt = folder / "moekit"
        if not (ckpt / "model.safetensors").is_file():
            t0 = time.perf_counter()
            build_checkpoint(folder, args)
            print(f"checkpoint built in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        prompt = random.Random(args.seed).choices(range(args.vocab), k=args.prompt)
        budgets = [float(b) for b in args.budgets.split(",")]
        cases = [(None, "lru", False)] + [(b, "lru", False) for b in budgets]
        cases += [(b, "lfu", False) for b in budgets if b < 1] + [(b, "lru", True) for b in budgets if b < 1]
        cases.append((None, "lru", False))  # the resident model again: how much the machine's load moved
        rows = []
        for budget, policy, prefetch in cases:
            rows.append(run_case(ckpt, prompt, args, budget, policy, prefetch))
            assert rows[-1]["tokens"] == rows[0]["tokens"], "offloaded greedy tokens differ from the resident model's"
            print_row(rows[-1], rows[0]["decode_tok_s"])
        result = {"args": {k: str(v) for k, v in vars(args).items()}, "runs": rows}
        if args.io:
            result["io"] = io_compare(ckpt, 64, args.seed)
            print(json.dumps(result["io"], indent=1))
    for row in rows:
        del row["tokens"]
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


def print_row(row: dict, resident_tok_s: float) -> None:
    if row["budget"] is None:
        print(f"resident: {row['expert_mib']:.0f} MiB of experts, decode {row['decode_tok_s']:.2f} tok/s")
        return
    name = f"{row['budget']:.0%} {row['policy']}{' +prefetch' if row['prefetch'] else ''}"
    print(
        f"{name:>18}: decode {row['decode_tok_s']:.2f} tok/s ({row['decode_tok_s'] / resident_tok_s:.2f}x resident), "
        f"hit rate {row['hit_rate']:.1%}, {row['mib_per_token']:.1f} MiB/token"
        + (f", {row['prefetched']} prefetched" if row["prefetch"] else "")
    )


if __name__ == "__main__":
    main()
