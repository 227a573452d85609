"""moekit's MoE layer vs a dense SwiGLU FFN of equal active FLOPs and vs HF transformers' MoE blocks.

Every contender runs in this one process on the same inputs. The HF block is built from a small
config with random weights; moekit's layer gets a copy of the same weights (checked once per case
in fp32: both compute the same function). Repeats are interleaved (one call of each contender per
round, in rotating order) and the median is kept, so load from other processes hits all alike.

Contenders
  moekit      moekit.nn.MoE
  dense       a SwiGLU FFN (moekit.nn.MLP, plain nn.Linear) of intermediate size
              top_k * expert_hidden + shared_hidden: the same active FLOPs, no routing
  hf_eager, hf_grouped_mm, hf_batched_mm
              the HF sparse-MoE block with ``config._experts_implementation`` set to each of
              transformers' experts implementations (transformers/integrations/moe.py);
              batched_mm gathers a weight matrix per (token, expert) pair and is skipped when
              that exceeds --batched-mm-gib.

Modes: ``fwd`` is inference (torch.inference_mode); ``fwd+bwd`` is a training step of the layer
(input and weights require grad, backward of the output; for moekit also of its aux loss).
Decode cases (1 and 16 tokens) run forward only and are not in the geometric means.

Ratios per line: moekit/dense (1.0 = routing is free; the practical limit) and
best-HF/moekit (> 1: moekit is faster than the fastest HF implementation).

Usage:
    python benchmarks/moe_layer.py                       # all cases, fp32 and bf16
    python benchmarks/moe_layer.py --quick               # a few small cases (smoke)
    python benchmarks/moe_layer.py --cases olmoe,decode --dtypes fp32 --repeats 7 --json out.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from moekit.nn import MLP, MoE

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MODES = ("fwd", "fwd+bwd")
HF_IMPLS = ("eager", "grouped_mm", "batched_mm")


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    family: str  # which HF block: olmoe, qwen3_moe, mixtral, qwen2_moe (shared experts + gate)
    tokens: int
    hidden: int
    experts: int
    top_k: int
    expert_hidden: int
    norm_topk_prob: bool
    shared_hidden: int = 0  # fused shared-expert MLP size (num_shared * shared size)
    num_shared: int = 0
    decode: bool = False

    @property
    def dense_hidden(self) -> int:
        return self.top_k * self.expert_hidden + self.shared_hidden

    def describe(self) -> str:
        s = f"T={self.tokens} D={self.hidden} E={self.experts} k={self.top_k} H={self.expert_hidden}"
        return s + (f" shared={self.num_shared}x{self.shared_hidden // self.num_shared}" if self.num_shared else "")


CASES = [
    Case("olmoe", "olmoe", 2048, 1024, 64, 8, 512, norm_topk_prob=False),
    Case("qwen", "qwen3_moe", 4096, 512, 32, 8, 256, norm_topk_prob=True),
    Case("mixtral", "mixtral", 2048, 512, 8, 2, 1024, norm_topk_prob=True),
    Case("finegrained", "qwen2_moe", 2048, 512, 64, 6, 128, norm_topk_prob=True, shared_hidden=256, num_shared=2),
    Case("decode1", "olmoe", 1, 1024, 64, 8, 512, norm_topk_prob=False, decode=True),
    Case("decode16", "olmoe", 16, 1024, 64, 8, 512, norm_topk_prob=False, decode=True),
]
QUICK_CASES = [
    Case("quick_olmoe", "olmoe", 256, 256, 16, 4, 128, norm_topk_prob=False),
    Case("quick_shared", "qwen2_moe", 256, 256, 16, 4, 64, norm_topk_prob=True, shared_hidden=128, num_shared=2),
    Case("quick_decode1", "olmoe", 1, 256, 16, 4, 128, norm_topk_prob=False, decode=True),
]


# -- model construction ---------------------------------------------------------------------------
def hf_block(case: Case) -> torch.nn.Module:
    """The HF sparse-MoE block of the case's family, with random fp32 weights."""
    common = dict(hidden_size=case.hidden, num_experts_per_tok=case.top_k, hidden_act="silu")
    if case.family == "olmoe":
        from transformers.models.olmoe.configuration_olmoe import OlmoeConfig
        from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock as Block

        config = OlmoeConfig(
            num_experts=case.experts, intermediate_size=case.expert_hidden, norm_topk_prob=case.norm_topk_prob, **common
        )
    elif case.family == "qwen3_moe":
        from transformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock as Block

        config = Qwen3MoeConfig(
            num_experts=case.experts,
            moe_intermediate_size=case.expert_hidden,
            norm_topk_prob=case.norm_topk_prob,
            **common,
        )
    elif case.family == "mixtral":
        from transformers.models.mixtral.configuration_mixtral import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock as Block

        assert case.norm_topk_prob, "Mixtral always renormalises the top-k weights"
        config = MixtralConfig(
            num_local_experts=case.experts, intermediate_size=case.expert_hidden, router_jitter_noise=0.0, **common
        )
    elif case.family == "qwen2_moe":
        from transformers.models.qwen2_moe.configuration_qwen2_moe import Qwen2MoeConfig
        from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock as Block

        config = Qwen2MoeConfig(
            num_experts=case.experts,
            moe_intermediate_size=case.expert_hidden,
            shared_expert_intermediate_size=case.shared_hidden,
            norm_topk_prob=case.norm_topk_prob,
            **common,
        )
    else:
        raise ValueError(case.family)
    config._experts_implementation = "eager"
    block = Block(config)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in block.named_parameters():
            # fan-in scaled normal, like moekit's own init; the router sees N(0, 1) logits
            fan_in = p.shape[-1]
            p.copy_(torch.randn(p.shape, generator=gen) * fan_in**-0.5)
            if name.endswith("shared_expert_gate.weight"):
                p.mul_(0.1)
    return block


def moekit_from_hf(case: Case, block: torch.nn.Module) -> MoE:
    """moekit's layer with the HF block's weights (HF gate_up_proj [E, 2H, D] -> w_in [E, D, 2H])."""
    layer = MoE(
        hidden_size=case.hidden,
        num_experts=case.experts,
        top_k=case.top_k,
        expert_hidden_size=case.expert_hidden,
        norm_topk_prob=case.norm_topk_prob,
        num_shared_experts=case.num_shared,
        shared_expert_hidden_size=(case.shared_hidden // case.num_shared) if case.num_shared else None,
        shared_expert_gate=case.family == "qwen2_moe",
    )
    with torch.no_grad():
        layer.router.weight.copy_(block.gate.weight)
        layer.experts.w_in.copy_(block.experts.gate_up_proj.transpose(1, 2))
        layer.experts.w_out.copy_(block.experts.down_proj.transpose(1, 2))
        if case.num_shared:
            for name in ("gate_proj", "up_proj", "down_proj"):
                getattr(layer.shared_experts, name).weight.copy_(getattr(block.shared_expert, name).weight)
            layer.shared_expert_gate.weight.copy_(block.shared_expert_gate.weight)
    return layer


def dense_ffn(case: Case) -> MLP:
    torch.manual_seed(1)
    return MLP(case.hidden, case.dense_hidden, "swiglu")


class WidenedGemms(torch.nn.Module):
    """A half-precision dense FFN whose GEMMs run in fp32 on widened operands (bf16 in and out).

    On CPUs without bf16 GEMM support this is the fastest dense FFN in bf16, so it, not the plain
    bf16 module, is the dense limit moekit's bf16 path (which does the same) is held to.
    """

    def __init__(self, mlp: MLP):
        super().__init__()
        self.mlp = mlp

    def forward(self, x):
        m = self.mlp
        x32 = x.float()
        gate = F.linear(x32, m.gate_proj.weight.float())
        up = F.linear(x32, m.up_proj.weight.float())
        return F.linear(F.silu(gate) * up, m.down_proj.weight.float()).to(x.dtype)


def batched_mm_gib(case: Case, dtype: torch.dtype, mode: str) -> float:
    """Memory HF batched_mm materialises: one [2H, D] and one [D, H] matrix per (token, expert)
    pair (and as much again for their gradients in backward)."""
    per_pair = 3 * case.hidden * case.expert_hidden * torch.finfo(dtype).bits // 8
    return case.tokens * case.top_k * per_pair * (2 if mode == "fwd+bwd" else 1) / 2**30


# -- timing ---------------------------------------------------------------------------------------
def make_step(module: torch.nn.Module, x: torch.Tensor, g: torch.Tensor, mode: str, setup=None, moekit=False):
    """A callable running one forward (inference) or forward+backward of ``module`` on x."""
    params = [p for p in module.parameters()]

    def fwd():
        if setup:
            setup()
        module.eval()  # inference, as in a decoding step (moekit's few-token path needs it)
        with torch.inference_mode():
            module(x)

    def fwd_bwd():
        if setup:
            setup()
        module.train()
        for p in params:
            p.grad = None
        xg = x.detach().requires_grad_(True)
        out = module(xg)
        if moekit:
            y, aux = out
            torch.autograd.backward([y, aux.loss], [g, torch.ones_like(aux.loss)])
        else:
            out.backward(g)

    return fwd if mode == "fwd" else fwd_bwd


def time_interleaved(steps: dict[str, Callable], repeats: int, slow_s: float) -> tuple[dict[str, float], list[str]]:
    """Median wall time per step over ``repeats`` interleaved rounds after one timed warmup call.

    A step whose warmup call took more than ``slow_s`` seconds (plain bf16 GEMMs on a CPU without
    bf16 support) is not repeated: its time is that one call, and it is listed as single-run. Such
    a step is many times slower than the others, so one call settles the comparison.
    """
    times: dict[str, list[float]] = {k: [] for k in steps}
    single = []
    for name, fn in steps.items():
        t0 = time.perf_counter()
        fn()
        warm = time.perf_counter() - t0
        if warm > slow_s:
            times[name].append(warm)
            single.append(name)
    names = [k for k in steps if k not in single]
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            t0 = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}, single


def sanity_check(case: Case, block, layer, x: torch.Tensor, impls) -> dict[str, float]:
    """Max |moekit - HF| / max |HF| per HF implementation, fp32, forward."""
    errs = {}
    with torch.inference_mode():
        y_moekit = layer(x)[0]
        for impl in impls:
            block.experts.config._experts_implementation = impl
            y_hf = block(x)
            errs[impl] = float((y_moekit - y_hf).abs().max() / y_hf.abs().max().clamp_min(1e-12))
    return errs


def run_case(case: Case, dtype_name: str, modes, repeats: int, batched_gib: float, hf_impls, slow_s, log):
    dtype = DTYPES[dtype_name]
    block32 = hf_block(case)
    layer32 = moekit_from_hf(case, block32)
    gen = torch.Generator().manual_seed(2)
    x32 = torch.randn(1, case.tokens, case.hidden, generator=gen)
    g32 = torch.randn(1, case.tokens, case.hidden, generator=gen)
    sanity = {}
    if dtype_name == "fp32":
        impls = [i for i in HF_IMPLS if i != "batched_mm" or batched_mm_gib(case, dtype, "fwd") <= batched_gib]
        sanity = sanity_check(case, block32, layer32, x32, impls)
        bad = {k: v for k, v in sanity.items() if v > 1e-4}
        if bad:
            log(f"  !! {case.name}: moekit and HF differ: {bad}")
    block, layer, dense = block32.to(dtype), layer32.to(dtype), dense_ffn(case).to(dtype)
    x, g = x32.to(dtype), g32.to(dtype)
    rows = []
    for mode in modes:
        steps = {"moekit": make_step(layer, x, g, mode, moekit=True)}
        if dtype == torch.float32 or mode == "fwd":
            # In half precision the plain module only shows how slow bf16 GEMMs are here (tens of
            # seconds per training step): forward only. The limit is the fp32-GEMM dense FFN.
            steps["dense"] = make_step(dense, x, g, mode)
        if dtype != torch.float32:
            steps["dense_f32gemm"] = make_step(WidenedGemms(dense), x, g, mode)
        skipped = {}
        for impl in hf_impls:
            gib = batched_mm_gib(case, dtype, mode) if impl == "batched_mm" else 0.0
            if gib > batched_gib:
                skipped[f"hf_{impl}"] = f"would materialise ~{gib:.1f} GiB of per-token expert weights"
                continue

            def setup(impl=impl):
                block.experts.config._experts_implementation = impl

            steps[f"hf_{impl}"] = make_step(block, x, g, mode, setup=setup)
        t, single = time_interleaved(steps, repeats, slow_s)
        best_dense = min((k for k in t if k.startswith("dense")), key=t.get)
        hf = {k: v for k, v in t.items() if k.startswith("hf_")}
        best_hf = min(hf, key=hf.get) if hf else None
        row = dict(
            case=case.name,
            shape=case.describe(),
            dtype=dtype_name,
            mode=mode,
            decode=case.decode,
            times_s=t,
            skipped=skipped,
            single_run=single,
            best_dense=best_dense,
            moekit_over_dense=t["moekit"] / t[best_dense],
            best_hf=best_hf,
            best_hf_over_moekit=t[best_hf] / t["moekit"] if best_hf else float("nan"),
            sanity_max_rel_err=sanity,
        )
        rows.append(row)
        log(format_row(row))
        for k, why in skipped.items():
            log(f"    ({k} skipped: {why})")
    return rows


def format_row(row: dict) -> str:
    t = row["times_s"]
    cells = "  ".join(f"{k}={v * 1e3:9.2f}ms{'(1)' if k in row['single_run'] else ''}" for k, v in t.items())
    return (
        f"{row['case']:<12} {row['dtype']:<4} {row['mode']:<7} moekit/dense={row['moekit_over_dense']:5.2f}x"
        f"{'*' if row['best_dense'] != 'dense' else ' '} "
        f"bestHF/moekit={row['best_hf_over_moekit']:5.2f}x ({row['best_hf']})  | {cells}"
    )


def geomean(values) -> float:
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def summary(rows: list[dict], log) -> dict:
    large = [r for r in rows if not r["decode"]]
    out = {}
    log("")
    log("Geometric means over the large (non-decode) cells:")
    groups = [(f"{d} {m}", [r for r in large if r["dtype"] == d and r["mode"] == m]) for d in DTYPES for m in MODES]
    groups += [(f"all {m}", [r for r in large if r["mode"] == m]) for m in MODES]
    for label, sel in groups:
        if not sel:
            continue
        gd = geomean(r["moekit_over_dense"] for r in sel)
        gh = geomean(r["best_hf_over_moekit"] for r in sel)
        worst_d = max(sel, key=lambda r: r["moekit_over_dense"])
        worst_h = min(sel, key=lambda r: r["best_hf_over_moekit"])
        out[label] = dict(
            cells=len(sel),
            moekit_over_dense=gd,
            best_hf_over_moekit=gh,
            worst_moekit_over_dense=(worst_d["case"], worst_d["moekit_over_dense"]),
            worst_best_hf_over_moekit=(worst_h["case"], worst_h["best_hf_over_moekit"]),
        )
        log(
            f"  {label:<13} ({len(sel)} cells)  moekit/dense={gd:5.2f}x (worst {worst_d['case']} "
            f"{worst_d['moekit_over_dense']:.2f}x)   bestHF/moekit={gh:5.2f}x (worst {worst_h['case']} "
            f"{worst_h['best_hf_over_moekit']:.2f}x)"
        )
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a few small cases (smoke test)")
    ap.add_argument("--cases", default="", help="comma-separated substrings of case names to run")
    ap.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32,bf16")
    ap.add_argument("--modes", default="fwd,fwd+bwd", help="comma-separated: fwd,fwd+bwd")
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds per cell (median is kept)")
    ap.add_argument("--batched-mm-gib", type=float, default=3.0, help="skip HF batched_mm above this estimate")
    ap.add_argument("--slow-s", type=float, default=30.0, help="time a contender once if its warmup exceeds this")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    ap.add_argument("--hf", default=",".join(HF_IMPLS), help="HF experts implementations to run ('' for none)")
    ap.add_argument("--json", default="", help="write all results to this path")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    def log(msg: str) -> None:
        print(msg, flush=True)

    cases = QUICK_CASES if args.quick else CASES
    if args.cases:
        wanted = [w.strip() for w in args.cases.split(",") if w.strip()]
        cases = [c for c in cases if any(w in c.name for w in wanted)]
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    hf_impls = [h.strip() for h in args.hf.split(",") if h.strip()]

    import transformers

    log(
        f"torch {torch.__version__}, transformers {transformers.__version__}, python {platform.python_version()}, "
        f"{torch.get_num_threads()} threads, cpu capability {torch.backends.cpu.get_cpu_capability()}, "
        f"repeats={args.repeats} (median of interleaved rounds, 1 warmup)"
    )
    log(
        "Per line: moekit/dense (best dense contender; '*' = the fp32-GEMM dense FFN) and bestHF/moekit; "
        "then median times ('(1)' = a single call, see --slow-s)."
    )
    rows = []
    for dtype_name in dtypes:
        for case in cases:
            log(f"-- {case.name}: {case.describe()}  dense intermediate={case.dense_hidden}  [{dtype_name}]")
            case_modes = ["fwd"] if case.decode else modes
            rows += run_case(
                case, dtype_name, case_modes, args.repeats, args.batched_mm_gib, hf_impls, args.slow_s, log
            )
    means = summary(rows, log)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(argv=sys.argv, args=vars(args), rows=rows, geomeans=means), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
