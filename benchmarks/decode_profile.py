"""Where a batch-1 decode step's time goes: moekit's expert kernels, the attention and head GEMVs, the rest.

Times each call of ``Experts.run_chosen`` (a token's experts in one layer) and of the attention and head
GEMVs (the native bf16 GEMV, or ``QuantLinear`` for a quantised checkpoint) during 32 greedy decode steps after
a 32-token prompt; "rest" is the step's time outside them (norms, rotary, attention's small ops, routing,
sampling, Python). For a quantised checkpoint (``--quantized DIR``, a ``moekit quantize`` output) it also
prints the expert bytes a step reads and the GB/s the expert kernels make of them (``MOEKIT_QDOT=0``: the
kernels on bf16 activations instead of int8-quantised ones).

Usage:
    python benchmarks/decode_profile.py --model /work/bench/q3-1.7b [--threads 2]
    python benchmarks/decode_profile.py --quantized /work/bench/q3-1.7b-int4L
"""

from __future__ import annotations

import argparse
import time

import torch

import moekit
from moekit.inference.generate import generate
from moekit.nn import experts as experts_module
from moekit.nn import gemv, quantized

STEPS = 32


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="HF checkpoint folder (loaded in bf16)")
    ap.add_argument("--quantized", help="a moekit quantize output folder (instead of --model)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = moekit.load(args.quantized) if args.quantized else moekit.from_hf(args.model, dtype=torch.bfloat16)
    spent = {"experts": 0.0, "gemv": 0.0, "expert_bytes": 0.0}
    experts_class = quantized.QuantizedExperts if args.quantized else experts_module.Experts
    run_chosen, gemv_bf16, linear = experts_class.run_chosen, gemv.native.gemv_bf16, quantized.QuantLinear.forward

    def timed_run_chosen(self, x, chosen, *a):
        t = time.perf_counter()
        run_chosen(self, x, chosen, *a)
        spent["experts"] += time.perf_counter() - t
        if args.quantized:
            spent["expert_bytes"] += sum(self.q_in[e].nbytes() + self.q_out[e].nbytes() for e in chosen)

    def timed(fn):
        def call(*a):
            t = time.perf_counter()
            y = fn(*a)
            if a[-1].numel() == a[-1].shape[-1]:  # one row: a decode step's, not the prompt's
                spent["gemv"] += time.perf_counter() - t
            return y

        return call

    experts_class.run_chosen, gemv.native.gemv_bf16 = timed_run_chosen, timed(gemv_bf16)
    quantized.QuantLinear.forward = timed(linear)
    ids = torch.randint(3, model.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.inference_mode():
        generate(model, ids, max_new_tokens=4, temperature=0)
        t0 = time.perf_counter()
        generate(model, ids, max_new_tokens=1, temperature=0)  # the prompt alone: no decode step
        prompt = time.perf_counter() - t0
        spent.update(experts=0.0, gemv=0.0, expert_bytes=0.0)
        t0 = time.perf_counter()
        generate(model, ids, max_new_tokens=STEPS + 1, temperature=0)
        total = time.perf_counter() - t0 - prompt
    step, e, g = (1e3 * v / STEPS for v in (total, spent["experts"], spent["gemv"]))
    rest = step - e - g
    print(f"decode step {step:.1f} ms: expert kernels {e:.1f} ms, attention+head GEMVs {g:.1f} ms, rest {rest:.1f} ms")
    if args.quantized:
        mb = spent["expert_bytes"] / STEPS / 1e6
        print(f"expert weights read per step {mb:.1f} MB: {mb / e:.1f} GB/s in the expert kernels")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
