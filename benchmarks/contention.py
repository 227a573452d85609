r"""Training on a busy machine: the demo MoE LM's step and its dense baseline, idle and beside busy processes.

Each setting runs in its own worker process, since OpenMP reads its settings once, when torch loads. A worker
trains ``demo`` (MoE) and ``dense-demo`` (equal active parameters) side by side, steps interleaved, with
``moekit train``'s defaults (blocks of 128 x batch 32, torch's thread count) and keeps the lower quartile of
each model's step times. Around it, ``--busy`` processes spin on a core each, as another job would. The table
gives each setting's speed beside N busy processes as a share of its own idle speed, and of moekit's idle.

Settings: ``moekit`` (its defaults: threads for the cores free at the start, a short OpenMP spin-wait),
``moekit-load-later`` (a thread per core, as a run that started on an idle machine has when the load comes),
``before`` (a thread per core and OpenMP's default spin-wait, ``GOMP_SPINCOUNT=300000``: moekit until
2026-12) and ``threads-1`` (``--threads 1``, the README's old advice). Others with ``--setting
NAME:VAR=VALUE,...`` (``threads=N`` or ``threads=all`` sets the run's thread count).

    python benchmarks/contention.py                           # idle, beside 1 and 2 busy processes
    python benchmarks/contention.py --json benchmarks/results/contention.json \
        --markdown benchmarks/results/contention.md
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import moekit  # noqa: F401  (before torch, see worker)

HERE = Path(__file__).resolve().parent
SETTINGS = {
    "moekit": {},
    "moekit-load-later": {"threads": "all"},
    "before": {"GOMP_SPINCOUNT": "300000", "threads": "all"},
    "threads-1": {"threads": "1"},
}
MODELS = ("demo", "dense-demo")


def worker(steps: int, threads: str | None) -> None:
    """Time both models' steps in this process; print one JSON line of lower-quartile milliseconds."""
    import tempfile

    sys.path.insert(0, str(HERE))
    from lm_quality import make_trainer

    from moekit.train.threads import DEFAULT_THREADS

    count = DEFAULT_THREADS if threads == "all" else int(threads) if threads else None

    recipe = argparse.Namespace(block_size=128, batch_size=32, lr=3e-3, warmup=50, eval_batches=1, seed=1337, moe=[])
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {model: make_trainer(model, steps, Path(tmp), recipe, threads=count) for model in MODELS}
        times: dict[str, list[float]] = {model: [] for model in MODELS}
        for step in range(steps):
            for model, trainer in trainers.items():
                t0 = time.perf_counter()
                trainer.train_step(step / steps)
                times[model].append(time.perf_counter() - t0)
    warm = max(1, steps // 5)
    ms = {model: 1e3 * statistics.quantiles(t[warm:], n=4)[0] for model, t in times.items()}
    print(json.dumps({"step_ms": ms, "threads": trainers["demo"].threads}), flush=True)


def _spin() -> None:
    while True:
        pass


def run_setting(env_changes: dict[str, str], steps: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    env.update({k: v for k, v in env_changes.items() if k != "threads"})
    command = [sys.executable, __file__, "--worker", "--steps", str(steps)]
    if "threads" in env_changes:
        command += ["--threads", env_changes["threads"]]
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=True, timeout=3600)
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(settings: dict[str, dict], loads: list[int], steps: int, rounds: int) -> list[dict]:
    rows = []
    for busy in loads:
        spinners = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(busy)]
        for p in spinners:
            p.start()
        try:
            got: dict[str, list[dict]] = {name: [] for name in settings}
            for _ in range(rounds):  # settings alternate, so a drift in load hits all alike
                for name, changes in settings.items():
                    got[name].append(run_setting(changes, steps))
        finally:
            for p in spinners:
                p.kill()
        for name, results in got.items():
            ms = {m: statistics.median(r["step_ms"][m] for r in results) for m in MODELS}
            threads = ",".join(str(t) for t in sorted({r["threads"] for r in results}))  # a run picks its own
            rows.append({"busy": busy, "setting": name, "threads": threads, "step_ms": ms, "workers": results})
            print(f"busy={busy} {name:16s} " + "  ".join(f"{m}={v:7.1f}ms" for m, v in ms.items()), flush=True)
    return rows


def add_shares(rows: list[dict]) -> None:
    """Speed as a share of the same setting's idle speed, and of moekit's idle speed."""
    idle = {r["setting"]: r["step_ms"] for r in rows if r["busy"] == 0}
    for r in rows:
        if r["setting"] in idle:
            r["of_own_idle"] = {m: idle[r["setting"]][m] / r["step_ms"][m] for m in MODELS}
        if "moekit" in idle:
            r["of_moekit_idle"] = {m: idle["moekit"][m] / r["step_ms"][m] for m in MODELS}


def markdown(rows: list[dict], header: str) -> str:
    lines = [
        header,
        "",
        "| busy processes | setting | threads | demo (MoE) ms/step | dense-demo ms/step "
        "| MoE speed, % of own idle | dense speed, % of own idle | MoE speed, % of moekit idle |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        own, ref = r.get("of_own_idle", {}), r.get("of_moekit_idle", {})
        lines.append(
            f"| {r['busy']} | {r['setting']} | {r['threads']} | {r['step_ms']['demo']:.0f} "
            f"| {r['step_ms']['dense-demo']:.0f} | {100 * own.get('demo', float('nan')):.0f} "
            f"| {100 * own.get('dense-demo', float('nan')):.0f} | {100 * ref.get('demo', float('nan')):.0f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40, help="training steps per model in each worker")
    p.add_argument("--rounds", type=int, default=2, help="workers per setting and load (median taken)")
    p.add_argument("--busy", default="0,1,2", help="comma-separated numbers of busy processes")
    p.add_argument("--setting", action="append", default=[], help="NAME:VAR=VALUE,... (replaces the defaults)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--markdown", type=Path, default=None)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--threads", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.steps, args.threads)
        return
    settings = SETTINGS
    if args.setting:
        settings = {}
        for spec in args.setting:
            name, _, pairs = spec.partition(":")
            settings[name] = dict(pair.split("=", 1) for pair in pairs.split(",") if pair)
    loads = [int(b) for b in args.busy.split(",")]
    load = os.getloadavg()[0]
    header = (
        f"# Training beside busy processes ({os.cpu_count()} cores, load {load:.1f} before the run, "
        f"{args.steps} steps x {args.rounds} workers per cell, lower-quartile step time, median over workers)"
    )
    print(header, flush=True)
    rows = measure(settings, loads, args.steps, args.rounds)
    add_shares(rows)
    table = markdown(rows, header)
    print(table)
    if args.json:
        args.json.write_text(json.dumps({"header": header, "rows": rows}, indent=2) + "\n")
    if args.markdown:
        args.markdown.write_text(table)


if __name__ == "__main__":
    main()
