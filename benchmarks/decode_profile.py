"""Where a batch-1 decode step's time goes: the native block steps, the experts, the head, the rest.

Times, during 32 greedy decode steps after a 32-token prompt, each layer's native step (attention, its
norms and the router: ``moekit.nn.kernels.native.step.run``), each layer's experts (``few_tokens.run_token``,
which calls the expert kernels), and the output head; "rest" is the step's time outside them (embedding,
rotary tables, sampling, Python). With ``--torch-path`` the steps run PyTorch's path instead (the native step
off), where "block steps" stays 0 and the attention and norms fall into "rest".

Usage:
    python benchmarks/decode_profile.py --model /work/bench/q3-1.7b [--threads 2] [--torch-path]
    python benchmarks/decode_profile.py --checkpoint /work/bench/q3-1.7b-int8L
"""

from __future__ import annotations

import argparse
import time

import torch

import moekit
from moekit.inference.generate import generate
from moekit.models import decode_step
from moekit.nn import few_tokens
from moekit.nn.kernels.native import step as native_step

STEPS = 32


def timed(spent: dict, key: str, fn):
    def wrapper(*a, **k):
        t = time.perf_counter()
        out = fn(*a, **k)
        spent[key] += time.perf_counter() - t
        return out

    return wrapper


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="HF checkpoint folder (loaded in bf16)")
    src.add_argument("--checkpoint", help="moekit checkpoint folder (a quantised one, say), loaded as stored")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--torch-path", action="store_true", help="turn the native step off")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = moekit.load(args.checkpoint) if args.checkpoint else moekit.from_hf(args.model, dtype=torch.bfloat16)
    spent = dict.fromkeys(("block steps", "experts", "head"), 0.0)
    native_step.run = timed(spent, "block steps", native_step.run)
    few_tokens.run_token = timed(spent, "experts", few_tokens.run_token)
    decode_step.linear = timed(spent, "head", decode_step.linear)
    if args.torch_path:
        decode_step.forward = lambda *a: None
    ids = torch.randint(3, model.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.inference_mode():
        generate(model, ids, max_new_tokens=4, temperature=0)
        t0 = time.perf_counter()
        generate(model, ids, max_new_tokens=1, temperature=0)  # the prompt alone: no decode step
        prompt = time.perf_counter() - t0
        spent.update(dict.fromkeys(spent, 0.0))
        t0 = time.perf_counter()
        generate(model, ids, max_new_tokens=STEPS + 1, temperature=0)
        total = time.perf_counter() - t0 - prompt
    step = 1e3 * total / STEPS
    parts = {k: 1e3 * v / STEPS for k, v in spent.items()}
    if args.torch_path:
        parts["head"] = 0.0  # the PyTorch path runs its own head call, counted in "rest"
    shown = ", ".join(f"{k} {v:.1f} ms" for k, v in parts.items())
    print(f"decode step {step:.1f} ms ({1e3 / step:.1f} tok/s): {shown}, rest {step - sum(parts.values()):.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
