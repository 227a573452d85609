"""The CPU expert schedules side by side: the demo MoE LM's training step on workers, inline and auto.

``moekit.nn.kernels.schedule.run_jobs`` runs the per-expert jobs either on single-threaded worker
threads or inline (one op after another on the caller's intra-op threads); ``auto`` measures both
per call site and runs the faster. This script times one training step of the ``demo`` MoE model
and of its equal-active dense baseline (lm_quality's recipe: blocks of 128 x batch 32) under each
schedule, on an idle machine and beside ``--busy`` processes that spin on a core each (another job
sharing the machine). Steps of all contenders are interleaved round by round, so load drifts hit
all alike; the lower quartile of the step times is kept.

    python benchmarks/expert_schedule.py --threads 2                 # idle
    python benchmarks/expert_schedule.py --threads 2 --busy 1        # beside one busy process
    python benchmarks/expert_schedule.py --threads 2 --busy 0,1 --json benchmarks/results/expert_schedule.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lm_quality import make_trainer  # noqa: E402

from moekit.nn.kernels.schedule import expert_schedule  # noqa: E402

SCHEDULES = ("workers", "inline", "auto")


def _spin() -> None:
    while True:
        pass


def measure(args, busy: int) -> dict:
    recipe = argparse.Namespace(
        block_size=128, batch_size=32, lr=3e-3, warmup=50, eval_batches=1, seed=1337, moe=args.moe
    )
    spinners = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(busy)]
    for p in spinners:
        p.start()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            # One trainer per schedule (same seed and batches); only the auto one's calls feed the chooser.
            trainers = {f"moe/{s}": make_trainer("demo", args.steps, Path(tmp), recipe, tag=f"-{s}") for s in SCHEDULES}
            trainers["dense"] = make_trainer("dense-demo", args.steps, Path(tmp), recipe)
            times: dict[str, list[float]] = {name: [] for name in trainers}
            for step in range(args.steps):
                for name, trainer in trainers.items():
                    schedule = name.split("/")[1] if "/" in name else "auto"
                    with expert_schedule(schedule):
                        t0 = time.perf_counter()
                        trainer.train_step(step / args.steps)
                        times[name].append(time.perf_counter() - t0)
    finally:
        for p in spinners:
            p.kill()
    warm = max(1, args.steps // 5)
    ms = {name: 1e3 * statistics.quantiles(t[warm:], n=4)[0] for name, t in times.items()}
    best = min(ms[f"moe/{s}"] for s in ("workers", "inline"))
    shown = "  ".join(f"{name}={v:6.1f}ms" for name, v in ms.items())
    print(
        f"busy={busy}: {shown}  |  auto/best-fixed={ms['moe/auto'] / best:.2f}x  "
        f"MoE(auto)/dense={ms['moe/auto'] / ms['dense']:.2f}x  "
        f"MoE(workers)/dense={ms['moe/workers'] / ms['dense']:.2f}x",
        flush=True,
    )
    return {"busy_processes": busy, "step_ms": ms, "auto_over_best_fixed": ms["moe/auto"] / best}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60, help="training steps per contender and load level")
    p.add_argument("--busy", default="0", help="comma-separated numbers of busy processes, e.g. 0,1")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--moe", action="append", default=[], help="MoE field of the demo model, e.g. num_experts=16")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, demo MoE {args.moe or ''}", flush=True)
    results = [measure(args, int(b)) for b in args.busy.split(",")]
    if args.json:
        args.json.write_text(json.dumps({"threads": torch.get_num_threads(), "results": results}, indent=2))


if __name__ == "__main__":
    main()
