"""moekit serve's engine alone (no HTTP): decode tokens/s with 16 steady rows against requests that come and go.

The small random Qwen3-MoE of ``benchmarks/serve.py`` (4 layers, hidden 256, 16 experts top-4), one intra-op thread
(``moekit serve``'s default on 2 cores), ``max_batch`` 16, greedy. Two workloads, alternated ``--repeats`` times in
one process:

* ``steady``: 16 prompts of 20 tokens, 64 new tokens each: every row joins at once and leaves at once;
* ``churn``: 128 prompts of 18-24 tokens with 48-80 new tokens each, all queued: rows leave at different steps and
  a waiting request joins (a prefill forward of its own) whenever one leaves.

The gap between the two is what joining costs a continuously batched server.

    python benchmarks/serve_engine.py [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from serve import build_checkpoint  # noqa: E402  # the same model as the HTTP benchmark

import moekit  # noqa: E402
from moekit.serve.engine import Engine, Finished  # noqa: E402
from moekit.serve.sampling import SamplingParams  # noqa: E402


def run(engine: Engine, prompts: list[list[int]], max_tokens: list[int]) -> tuple[float, float]:
    """(generated tokens/s, tokens per forward) of one workload."""
    done = threading.Semaphore(0)
    tokens = [0]

    def sink(event) -> None:
        if isinstance(event, Finished):
            done.release()
        else:
            tokens[0] += 1

    steps = engine.stats.steps
    start = time.perf_counter()
    for prompt, n in zip(prompts, max_tokens):
        engine.submit(prompt, SamplingParams(max_tokens=n, temperature=0), sink)
    for _ in prompts:
        done.acquire()
    seconds = time.perf_counter() - start
    return tokens[0] / seconds, tokens[0] / max(engine.stats.steps - steps, 1)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        build_checkpoint(Path(tmp) / "m")
        model = moekit.from_hf(str(Path(tmp) / "m"))
    engine = Engine(model, max_batch=16, max_queue=1000)
    loop = threading.Thread(target=engine.run, daemon=True)
    loop.start()
    workloads = {
        "steady": ([[100 + i] * 20 for i in range(16)], [64] * 16),
        "churn": ([[100 + i % 50] * (18 + i % 7) for i in range(128)], [48 + (i * 7) % 33 for i in range(128)]),
    }
    run(engine, *workloads["steady"])  # warm-up
    rows = []
    for repeat in range(args.repeats):
        for name, workload in workloads.items():
            rate, per_step = run(engine, *workload)
            rows.append({"workload": name, "repeat": repeat, "tokens_per_s": round(rate, 1),
                         "tokens_per_forward": round(per_step, 2)})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    engine.stop()
    best = {n: max(r["tokens_per_s"] for r in rows if r["workload"] == n) for n in workloads}
    print(f"churn / steady: {best['churn'] / best['steady']:.2f} (best of {args.repeats}); load {os.getloadavg()}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "best": best, "load": os.getloadavg()}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
