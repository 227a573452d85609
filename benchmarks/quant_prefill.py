"""Prefill (many tokens) through one MoE layer's quantised experts vs its bf16 and fp32 experts.

One layer with the 1.72B shape's experts (hidden 1024, 64 experts top-8, expert width 512, SwiGLU), its experts'
forward on the rows of T tokens (routed by a random top-8 per token, sorted by expert) with ``--threads`` threads.
Variants, all in this one process, interleaved (one call of each per round, in rotating order; the median and the
minimum kept):

  bf16, fp32           the float experts (moekit.nn.Experts) in that dtype
  int8/int4 kernel     QuantizedExperts (group 32) with every expert on ATen's weight-only kernel (before: the
                       dense path switched off by raising DENSE_MIN_ROWS)
  int8/int4            QuantizedExperts as shipped: experts with DENSE_MIN_ROWS rows or more dequantised for
                       the call and run as one bf16 GEMM each
  int8/int4 layer      the whole layer dequantised at once into [E, D, X] stacks, then moekit's grouped GEMM
                       (the float path); a transient copy of the layer's weights in bf16
each quantised one with bf16 and with fp32 activations (``act``), its ratio to the float experts of that dtype.

``--model-layers N`` adds a whole-model row: a random MoELM of the 1.72B shape cut to N layers (vocab 32000, 16/4
heads of 64), one 256-token prompt forward (no cache) in bf16, and with int8 / int4 experts plus int8 attention
and output head, kernel-only (before) and as shipped.

``--sweep`` prints instead one expert's time on the weight-only kernel and on the dense path per row count
(how DENSE_MIN_ROWS was chosen).

Usage:
    python benchmarks/quant_prefill.py --json benchmarks/results/quant_prefill.json
    python benchmarks/quant_prefill.py --sweep --threads 1
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch

import moekit.nn.quantized as quantized
from moekit.models import LMConfig, MoELM
from moekit.models.quantization import quantize_model, uniform_spec
from moekit.nn import MoE
from moekit.nn.config import Activation, MoEConfig
from moekit.nn.experts import Experts
from moekit.nn.kernels import native
from moekit.nn.kernels.fused_experts import activate
from moekit.nn.kernels.grouped_mm import grouped_mm
from moekit.nn.quantized import QuantizedExperts, QuantMatrix

HIDDEN, EXPERTS, TOP_K, WIDTH, GROUP = 1024, 64, 8, 512, 32
NEVER = 1 << 30


def routed_counts(tokens: int, seed: int) -> tuple[int, ...]:
    """Rows per expert of ``tokens`` tokens each sent to TOP_K distinct random experts."""
    g = torch.Generator().manual_seed(seed)
    chosen = torch.rand(tokens, EXPERTS, generator=g).topk(TOP_K, dim=1).indices.flatten()
    return tuple(torch.bincount(chosen, minlength=EXPERTS).tolist())


class KernelOnly:
    """Run a forward with the dense path off (every matrix on the weight-only kernel): the code before it."""

    def __enter__(self) -> None:
        self.saved = dict(quantized.DENSE_MIN_ROWS)
        quantized.DENSE_MIN_ROWS.update(dict.fromkeys(self.saved, NEVER))

    def __exit__(self, *exc) -> None:
        quantized.DENSE_MIN_ROWS.update(self.saved)


def dense_stack(matrices) -> torch.Tensor:
    """[E, in, out] bf16 (a transposed view of [E, out, in]): every expert's matrix dequantised."""
    first = matrices[0]
    out = torch.empty(len(matrices), first.out_features, first.in_features, dtype=torch.bfloat16)
    for e, m in enumerate(matrices):
        w = native.dequantize(m.q, m.scales, m.zeros if m.bits == 4 else None, m.group_size)
        out[e] = m.dequantize() if w is None else w
    return out.transpose(1, 2)


def layer_dequantised(q: QuantizedExperts, x_ND: torch.Tensor, counts: tuple[int, ...]) -> torch.Tensor:
    """The experts' forward with the whole layer dequantised first, then the float grouped GEMMs."""
    a = x_ND.bfloat16()
    h = grouped_mm(a, dense_stack(list(q.q_in)), counts)
    return grouped_mm(activate(h, q.activation), dense_stack(list(q.q_out)), counts).to(x_ND.dtype)


def variants(layer: MoE, tokens: int) -> dict[str, Callable[[], torch.Tensor]]:
    counts = routed_counts(tokens, seed=tokens)
    rows = sum(counts)
    x = torch.randn(rows, HIDDEN, generator=torch.Generator().manual_seed(1)) * 0.5
    floats: dict[str, Experts] = {}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        floats[name] = Experts(EXPERTS, HIDDEN, WIDTH)
        floats[name].load_state_dict(layer.experts.state_dict())
        floats[name].to(dtype)
    quants = {b: QuantizedExperts.from_experts(layer.experts, [b] * EXPERTS, GROUP) for b in (8, 4)}
    act = {"bf16": x.bfloat16(), "fp32": x}

    out: dict[str, Callable[[], torch.Tensor]] = {}
    for dt in ("bf16", "fp32"):
        out[dt] = functools.partial(floats[dt], act[dt], counts)
    for b, q in quants.items():
        for dt in ("bf16", "fp32"):
            out[f"int{b} kernel act={dt}"] = functools.partial(kernel_only, q, act[dt], counts)
            out[f"int{b} act={dt}"] = functools.partial(q, act[dt], counts)
        out[f"int{b} layer act=bf16"] = functools.partial(layer_dequantised, q, act["bf16"], counts)
    return out


def kernel_only(q: QuantizedExperts, x_ND: torch.Tensor, counts: tuple[int, ...]) -> torch.Tensor:
    with KernelOnly():
        return q(x_ND, counts)


def time_interleaved(fns: dict[str, Callable[[], torch.Tensor]], repeats: int) -> dict[str, list[float]]:
    """The ms of every call of each, one call of each per round in rotating order."""
    names = list(fns)
    for f in fns.values():  # warm up (kernel operands, oneDNN primitives)
        f()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            fns[n]()
            times[n].append((time.perf_counter() - t0) * 1e3)
    return times


def sweep(repeats: int) -> list[dict]:
    """One expert's ms on the weight-only kernel and on the dense path, per row count and bit width."""
    g = torch.Generator().manual_seed(0)
    rows_list = (1, 2, 4, 8, 12, 16, 24, 32, 64)
    pairs = {
        b: (
            QuantMatrix.from_float(torch.randn(2 * WIDTH, HIDDEN, generator=g) * 0.03, b, GROUP),
            QuantMatrix.from_float(torch.randn(HIDDEN, WIDTH, generator=g) * 0.03, b, GROUP),
        )
        for b in (8, 4)
    }
    out = []
    for rows in rows_list:
        x = torch.randn(rows, HIDDEN, generator=g).bfloat16()
        fns: dict[str, Callable[[], torch.Tensor]] = {}
        for b, (m_in, m_out) in pairs.items():
            fns[f"int{b} kernel"] = functools.partial(kernel_pair, m_in, m_out, x)
            fns[f"int{b} dense"] = functools.partial(dense_pair, m_in, m_out, x)
        row = {"rows": rows, **{n: min(v) for n, v in time_interleaved(fns, repeats).items()}}
        print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
        out.append(row)
    return out


def dense_pair(m_in: QuantMatrix, m_out: QuantMatrix, x: torch.Tensor) -> torch.Tensor:
    return m_out.dense_forward(activate(m_in.dense_forward(x), Activation.SWIGLU))


def kernel_pair(m_in: QuantMatrix, m_out: QuantMatrix, x: torch.Tensor) -> torch.Tensor:
    with KernelOnly():
        return m_out(activate(m_in(x), Activation.SWIGLU))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", default="256,32", help="comma-separated token counts")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--model-layers", type=int, default=0, help="also time a whole model of this many layers")
    p.add_argument("--sweep", action="store_true", help="per-expert kernel vs dense times per row count")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    result: dict = {
        "argv": sys.argv,
        "args": vars(args),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "native": native.library() is not None,
        "dense_min_rows": {str(k): v for k, v in quantized.DENSE_MIN_ROWS.items()},
        "load_before": os.getloadavg(),
    }
    with torch.inference_mode():
        if args.sweep:
            result["sweep"] = sweep(args.repeats)
        else:
            layer = MoE(hidden_size=HIDDEN, num_experts=EXPERTS, top_k=TOP_K, expert_hidden_size=WIDTH).eval()
            result["cases"] = [run_case(layer, int(t), args.repeats) for t in args.tokens.split(",")]
            if args.model_layers:
                result["model"] = model_case(args.model_layers, 256, args.repeats)
    result["load_after"] = os.getloadavg()
    print(f"load average before {result['load_before']}, after {result['load_after']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


def model_case(layers: int, tokens: int, repeats: int) -> dict:
    """ms per prompt forward of a whole model (see the module docstring), bf16 and quantised."""
    config = LMConfig(
        vocab_size=32000, hidden_size=HIDDEN, intermediate_size=4 * HIDDEN, num_hidden_layers=layers,
        num_attention_heads=16, num_key_value_heads=4, head_dim=64, max_position_embeddings=4096,
        tie_word_embeddings=False, moe=MoEConfig(num_experts=EXPERTS, top_k=TOP_K, expert_hidden_size=WIDTH),
    )  # fmt: skip
    torch.manual_seed(0)
    models = {"bf16": MoELM(config).eval().to(torch.bfloat16)}
    for b in (8, 4):
        models[f"int{b}"] = MoELM(config).eval().to(torch.bfloat16)
        models[f"int{b}"].load_state_dict(models["bf16"].state_dict())
        quantize_model(models[f"int{b}"], uniform_spec(config, b, GROUP, linear_bits=8))
    ids = torch.randint(0, config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(2))
    fns: dict[str, Callable[[], torch.Tensor]] = {"bf16": functools.partial(models["bf16"], ids)}
    for b in (8, 4):
        fns[f"int{b} kernel"] = functools.partial(kernel_only_model, models[f"int{b}"], ids)
        fns[f"int{b}"] = functools.partial(models[f"int{b}"], ids)
    times = time_interleaved(fns, repeats)
    ms, best = {n: statistics.median(v) for n, v in times.items()}, {n: min(v) for n, v in times.items()}
    print(f"\nmodel, {layers} layers, {tokens}-token prompt forward, ms, median (min) of {repeats}:")
    for name in ms:
        print(f"  {name:22s} {ms[name]:8.1f} ({best[name]:7.1f}) ms   x{ms[name] / ms['bf16']:5.2f} vs bf16")
    return {"model_layers": layers, "tokens": tokens, "ms": ms, "min_ms": best}


def kernel_only_model(model: MoELM, ids: torch.Tensor):
    with KernelOnly():
        return model(ids)


def run_case(layer: MoE, tokens: int, repeats: int) -> dict:
    fns = variants(layer, tokens)
    times = time_interleaved(fns, repeats)
    ms, best = {n: statistics.median(v) for n, v in times.items()}, {n: min(v) for n, v in times.items()}
    print(f"\n{tokens} tokens ({tokens * TOP_K} rows over {EXPERTS} experts), ms per layer, median (min) of {repeats}:")
    for name in ms:
        base = "fp32" if "act=fp32" in name or name == "fp32" else "bf16"
        ratio, best_ratio = ms[name] / ms[base], best[name] / best[base]
        print(f"  {name:22s} {ms[name]:8.2f} ({best[name]:7.2f}) ms   x{ratio:5.2f} ({best_ratio:5.2f}) vs {base}")
    return {"tokens": tokens, "ms": ms, "min_ms": best}


if __name__ == "__main__":
    main()
