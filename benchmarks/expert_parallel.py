"""Expert parallelism on one machine: EP=1 (2 data-parallel ranks) vs EP=2 (2 ranks, experts split).

Both run the same model on the same global batch (B x S tokens, each rank B/2 x S) for the same training
step (forward, backward, gradient reduction and clipping, AdamW). Per case it reports:

  tok/s        global tokens / median step time (slowest rank of each step)
  params/rank  bytes of the parameters one rank holds (AdamW adds twice that in optimizer state)
  a2a/step     bytes one rank sends to the other through all-to-all per step (forward and backward),
               measured by moekit.distributed.collectives.STATS, next to the analytic figure for
               uniform routing: 4 exchanges (dispatch and combine, forward and backward) x L_moe layers
               x T_rank tokens x k x D x 4 bytes x (P - 1) / P. Measured / analytic above 1 means the
               router sent more than its even share to the other rank's experts.

A one-process row (the same global batch in one process) is the reference for tokens/s. Ratios are
EP=2 / EP=1. On a shared 2-core machine absolute times are noise and both ranks share the cores, so
EP=2 is not expected to be faster here: the point is the memory split and the exact traffic.

Usage:
    python benchmarks/expert_parallel.py                     # defaults below
    python benchmarks/expert_parallel.py --steps 5 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from moekit.models import LMConfig, MoELM
from moekit.nn import MoEConfig


def model_config(args) -> LMConfig:
    return LMConfig(
        vocab_size=256,
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        max_position_embeddings=args.seq,
        tie_word_embeddings=True,
        moe=MoEConfig(
            num_experts=args.experts,
            top_k=args.top_k,
            expert_hidden_size=args.expert_hidden,
            aux_loss_coef=0.01,
        ),
    )


def run_steps(model, step_fn, steps: int, warmup: int, sync=lambda t: t) -> list[float]:
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        step_fn()
        dt = sync(time.perf_counter() - t0)
        if i >= warmup:
            times.append(dt)
    return times


def worker(args) -> None:
    """One rank: time training steps of the sharded model, write this rank's numbers to args.out."""
    from moekit.distributed import STATS, clip_grad_norm_, expert_parameters, init_distributed, shard_model

    torch.set_num_threads(1)
    ctx = init_distributed(ep=args.ep, timeout=300)
    torch.manual_seed(0)
    model = shard_model(MoELM(model_config(args)), ctx).train()
    expert = expert_parameters(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False)
    b = args.batch // ctx.world_size
    gen = torch.Generator().manual_seed(1 + ctx.rank)

    def step():
        x = torch.randint(0, 256, (b, args.seq), generator=gen)
        out = model(x)
        loss = F.cross_entropy(out.logits[:, :-1].reshape(-1, 256), x[:, 1:].reshape(-1)) + out.aux_loss
        loss.backward()
        clip_grad_norm_([p for p in model.parameters() if p.grad is not None], 1.0, expert, ctx)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def slowest(dt: float) -> float:
        t = torch.tensor([dt], dtype=torch.float64)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return float(t)

    run_steps(model, step, 0, args.warmup, slowest)
    STATS.clear()
    times = run_steps(model, step, args.steps, 0, slowest)
    result = {
        "rank": ctx.rank,
        "step_seconds": times,
        "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "a2a_bytes_per_step": STATS["all_to_all_bytes"] / args.steps,
        "a2a_calls_per_step": STATS["all_to_all_calls"] / args.steps,
    }
    Path(args.out).with_suffix(f".rank{ctx.rank}.json").write_text(json.dumps(result))
    ctx.close()


def one_process(args) -> dict:
    torch.manual_seed(0)
    model = MoELM(model_config(args)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False)
    gen = torch.Generator().manual_seed(1)

    def step():
        x = torch.randint(0, 256, (args.batch, args.seq), generator=gen)
        out = model(x)
        loss = F.cross_entropy(out.logits[:, :-1].reshape(-1, 256), x[:, 1:].reshape(-1)) + out.aux_loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    times = run_steps(model, step, args.steps, args.warmup)
    return {
        "case": "1 process",
        "ep": 1,
        "nproc": 1,
        "tokens_per_s": args.batch * args.seq / statistics.median(times),
        "param_bytes_per_rank": sum(p.numel() * p.element_size() for p in model.parameters()),
        "a2a_bytes_per_step": 0.0,
        "a2a_analytic_bytes_per_step": 0.0,
    }


def distributed_case(args, ep: int) -> dict:
    from moekit.distributed.launch import launch

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r"
        cmd = [sys.executable, __file__, "--worker", "--ep", str(ep), "--out", str(out)]
        cmd += [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in SHAPE_ARGS]
        code, logs = launch(cmd, args.nproc, timeout=args.timeout, capture=True)
        if code != 0:
            raise SystemExit(f"ep={ep} failed (exit {code}):\n" + "\n".join(logs))
        ranks = [json.loads(out.with_suffix(f".rank{r}.json").read_text()) for r in range(args.nproc)]
    steps = ranks[0]["step_seconds"]
    tokens_rank = args.batch // args.nproc * args.seq
    analytic = 4 * args.layers * tokens_rank * args.top_k * args.hidden * 4 * (ep - 1) / ep
    return {
        "case": f"{args.nproc} processes, ep={ep} (dp={args.nproc // ep})",
        "ep": ep,
        "nproc": args.nproc,
        "tokens_per_s": args.batch * args.seq / statistics.median(steps),
        "param_bytes_per_rank": max(r["param_bytes"] for r in ranks),
        "a2a_bytes_per_step": statistics.mean(r["a2a_bytes_per_step"] for r in ranks),
        "a2a_analytic_bytes_per_step": analytic,
        "a2a_calls_per_step": ranks[0]["a2a_calls_per_step"],
    }


SHAPE_ARGS = ("hidden", "layers", "experts", "top_k", "expert_hidden", "batch", "seq", "steps", "warmup")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--expert-hidden", type=int, default=256)
    p.add_argument("--batch", type=int, default=16, help="global batch (sequences)")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--json", help="write the results here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--ep", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0

    torch.set_num_threads(max(1, (os.cpu_count() or 1)))
    rows = [one_process(args), distributed_case(args, 1), distributed_case(args, 2)]
    mib = 2**20
    print(
        f"model: {args.layers} layers, D={args.hidden}, {args.experts} experts top-{args.top_k} "
        f"(H={args.expert_hidden}); "
        f"global batch {args.batch}x{args.seq} tokens; median of {args.steps} steps; {platform.processor() or ''} "
        f"{os.cpu_count()} cores"
    )
    for r in rows:
        ratio = (
            ""
            if r["a2a_analytic_bytes_per_step"] == 0
            else (
                f" (analytic {r['a2a_analytic_bytes_per_step'] / mib:.2f} MiB, "
                f"measured/analytic {r['a2a_bytes_per_step'] / r['a2a_analytic_bytes_per_step']:.3f})"
            )
        )
        print(
            f"{r['case']:<28} {r['tokens_per_s']:>9,.0f} tok/s  "
            f"params/rank {r['param_bytes_per_rank'] / mib:6.2f} MiB  "
            f"a2a/step {r['a2a_bytes_per_step'] / mib:6.2f} MiB{ratio}"
        )
    ep1, ep2 = rows[1], rows[2]
    print(
        f"ratios ep=2 / ep=1: tok/s {ep2['tokens_per_s'] / ep1['tokens_per_s']:.2f}, "
        f"params/rank {ep2['param_bytes_per_rank'] / ep1['param_bytes_per_rank']:.2f}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
