"""Where a batch-1 decode step's time goes: moekit's expert kernels, the attention and head GEMVs, the rest.

Times each call of ``Experts.run_chosen`` (a token's experts in one layer) and of the native bf16 GEMV
(attention projections, head) during 32 greedy decode steps after a 32-token prompt; "rest" is the step's
time outside them (norms, rotary, attention's small ops, routing, sampling, Python).

Usage:
    python benchmarks/decode_profile.py --model /work/bench/q3-1.7b [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import torch

import moekit
from moekit.inference.generate import generate
from moekit.nn import experts as experts_module
from moekit.nn import gemv

STEPS = 32


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="HF checkpoint folder (loaded in bf16)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = moekit.from_hf(args.model, dtype=torch.bfloat16)
    spent = {"experts": 0.0, "gemv": 0.0}
    run_chosen, gemv_bf16 = experts_module.Experts.run_chosen, gemv.native.gemv_bf16

    def timed_run_chosen(self, *a):
        t = time.perf_counter()
        run_chosen(self, *a)
        spent["experts"] += time.perf_counter() - t

    def timed_gemv(*a):
        t = time.perf_counter()
        y = gemv_bf16(*a)
        spent["gemv"] += time.perf_counter() - t
        return y

    experts_module.Experts.run_chosen, gemv.native.gemv_bf16 = timed_run_chosen, timed_gemv
    ids = torch.randint(3, model.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.inference_mode():
        generate(model, ids, max_new_tokens=4, temperature=0)
        t0 = time.perf_counter()
        generate(model, ids, max_new_tokens=1, temperature=0)  # the prompt alone: no decode step
        prompt = time.perf_counter() - t0
        spent.update(experts=0.0, gemv=0.0)
        t0 = time.perf_counter()
        generate(model, ids, max_new_tokens=STEPS + 1, temperature=0)
        total = time.perf_counter() - t0 - prompt
    step, e, g = (1e3 * v / STEPS for v in (total, spent["experts"], spent["gemv"]))
    rest = step - e - g
    print(f"decode step {step:.1f} ms: expert kernels {e:.1f} ms, attention+head GEMVs {g:.1f} ms, rest {rest:.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
