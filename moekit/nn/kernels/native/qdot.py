"""Quantised decode kernels on int8-quantised activations (``qdot.c``), with their slow torch references.

decode.c's quantised kernels convert each int8/int4 weight to a float before multiplying, so they are bound by
that arithmetic. These quantise the activation vector once per call to int8 in blocks of :data:`QBLOCK`
(symmetric, a fp32 scale per block, as llama.cpp's Q8_0) and multiply in the CPU's integer dot instruction
(AVX512-VNNI), reading the weights in their stored form. On the 1.72B shape, 2 threads
(``MOEKIT_QDOT=1|0 python benchmarks/decode_profile.py --checkpoint CKPT``, one after the other): the int8
checkpoint's experts take 11.3 ms a step (decode.c's: 13.7), decoding 56.8 tok/s against 48.4; int4 g32 with int4
attention 8.6 ms (9.7), 71.4 against 63.7.
The result is the dot of the dequantised weight with the *dequantised
activations* (:func:`quantize_activation`), so it differs from ATen's bf16-activation kernels by the activation
quantisation error (~0.4% of each block's largest value), which the references below reproduce exactly.

Used for decode steps where built (an AVX512-VNNI CPU); ``MOEKIT_QDOT=0`` selects decode.c's kernels, which
match ATen's up to the order of fp32 sums.
"""

from __future__ import annotations

import functools
import os
import typing

import torch
import torch.nn.functional as F

from moekit.nn.kernels import native

QBLOCK = 32  # activation columns per int8 scale


class Quantised(typing.Protocol):
    """What these kernels read of a :class:`moekit.nn.quantized.QuantMatrix`."""

    q: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bits: int
    group_size: int
    in_features: int
    out_features: int

    def dequantize(self) -> torch.Tensor: ...


@functools.cache
def _built() -> bool:
    lib = native.library()
    return lib is not None and bool(lib.moekit_qdot_ok())


def enabled() -> bool:
    """Whether decode steps take these kernels: built for this CPU and not turned off (``MOEKIT_QDOT=0``)."""
    return os.environ.get("MOEKIT_QDOT", "1") != "0" and _built()


def swiglu_experts(
    x_D: torch.Tensor, table: native.QuantTable, experts: list[int], weights: list[float], y_D: torch.Tensor
) -> bool:
    """y_D (fp32) += sum_k weights[k] * expert_{experts[k]}(x_D) for quantised SwiGLU experts, each product on
    quantised activations (:func:`swiglu_experts_reference`); False (y_D untouched) where it does not apply."""
    if not (_built() and table.readable and y_D.dtype == torch.float32 and y_D.is_contiguous()):
        return False
    m_in = table.matrices[0]
    lib = typing.cast(typing.Any, native.library())
    x = x_D.reshape(-1).float().contiguous()
    chosen = torch.tensor(experts, dtype=torch.int64)
    scale = torch.tensor(weights, dtype=torch.float32)
    lib.moekit_swiglu_experts_q8act(
        x.data_ptr(), table.table.data_ptr(), table.bits.data_ptr(), table.group, m_in.in_features,
        m_in.out_features // 2, len(experts), chosen.data_ptr(), scale.data_ptr(), y_D.data_ptr(),
        torch.get_num_threads(),
    )  # fmt: skip
    return True


def gemv(m: Quantised, x_I: torch.Tensor) -> torch.Tensor | None:
    """bf16(W @ x_I) for one quantised matrix on quantised activations (:func:`gemv_reference`), or None where
    the kernel does not apply."""
    if not (_built() and native.readable(m) and x_I.numel() == m.in_features):
        return None
    lib = typing.cast(typing.Any, native.library())
    x = x_I.reshape(-1).float().contiguous()
    pointers = torch.tensor(native.matrix_pointers(m), dtype=torch.int64)
    y = torch.empty(m.out_features, dtype=torch.bfloat16)
    args = (m.bits, m.group_size, x.data_ptr(), m.out_features, m.in_features, y.data_ptr())
    lib.moekit_qgemv(pointers.data_ptr(), *args, torch.get_num_threads())
    return y


def quantize_activation(x: torch.Tensor) -> torch.Tensor:
    """x [n] as the kernels see it: per block of QBLOCK columns d = max|x| / 127 (0 where that max is below
    1e-30), xq = round-half-even(x * (1 / d)) clamped to +-127, returned dequantised (d * xq, fp32)."""
    x = x.reshape(-1).float()
    pad = -x.numel() % QBLOCK
    blocks = F.pad(x, (0, pad)).view(-1, QBLOCK)
    amax = blocks.abs().amax(dim=1, keepdim=True)
    d = torch.where(amax >= 1e-30, amax / 127, torch.zeros_like(amax))
    inv = torch.where(d != 0, 1 / d, torch.zeros_like(d))
    xq = torch.round(blocks * inv).clamp_(-127, 127)
    return (xq.double() * d.double()).view(-1)[: x.numel()].float()


def _product(m: Quantised, x: torch.Tensor) -> torch.Tensor:
    """The dequantised weight times the dequantised activations in fp64, as fp32."""
    return (m.dequantize().double() @ quantize_activation(x).double()).float()


def _bf16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).float()


def gemv_reference(m: Quantised, x_I: torch.Tensor) -> torch.Tensor:
    """What :func:`gemv` computes, slowly: dequantise both, multiply in fp64, round to bf16."""
    return _product(m, x_I).to(torch.bfloat16)


def swiglu_experts_reference(
    matrices_in: list, matrices_out: list, x_D: torch.Tensor, experts: list[int], weights: list[float]
) -> torch.Tensor:
    """What :func:`swiglu_experts` adds to y, slowly, with the kernel's bf16 roundings (fp32 sum over experts)."""
    y = torch.zeros(matrices_in[0].in_features)
    for e, w in zip(experts, weights):
        gate, up = _bf16(_product(matrices_in[e], x_D)).chunk(2)
        a = _bf16(_bf16(F.silu(gate)) * up)
        y += w * _bf16(_product(matrices_out[e], a))
    return y
