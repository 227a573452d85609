"""Grouped matrix multiply over contiguous row slices: out[rows of e] = x[rows of e] @ w[e].

One function, :func:`grouped_mm`, with an implementation per device:

* CPU: a hand-written autograd Function whose per-expert GEMMs are jobs of the CPU scheduler
  (:func:`moekit.nn.kernels.schedule.run_jobs`). Its backward writes each expert's weight gradient
  straight into one [E, ...] buffer; indexing ``w[e]`` inside autograd would instead materialise a
  full-size zero gradient per expert and sum them (what makes per-expert loops slow at many experts).
* CUDA, bf16, compute capability >= 9.0: :func:`grouped_mm_torch`, PyTorch's one-kernel grouped GEMM
  ``torch._grouped_mm`` (with its own backward), when the operands meet its layout rules.
* any other device or dtype: :func:`grouped_mm_padded`, every expert's rows padded to the largest count
  and one ``torch.bmm``.

:func:`grouped_mm_reference` is the slow oracle all of them are tested against.

:func:`compute_dtype` is the dtype moekit's expert GEMMs run in. bf16/fp16 GEMMs on a CPU without native
support (no AVX512-BF16/AMX: oneDNN is not used and ATen falls back to scalar loops, 1-10 GF/s vs 60 GF/s
for fp32 on AVX2) are done in fp32 on the widened operands; this is exactly a bf16 GEMM with fp32
accumulation (the products of two bf16 values are exact in fp32), only faster.

Shape legend: N rows (kept assignments sorted by expert), E experts, I input, O output features,
M the largest rows-per-expert count.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterator

import torch

from moekit.nn.kernels.schedule import run_jobs

# -- GEMM dtypes -----------------------------------------------------------------------------------


@functools.cache
def _cpu_has_native(dtype: torch.dtype) -> bool:
    try:
        if dtype == torch.bfloat16:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        if dtype == torch.float16:
            return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):  # pragma: no cover - builds without oneDNN
        return False
    return True


def compute_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype moekit runs a GEMM of ``dtype`` operands in on ``device`` (see module docstring)."""
    if device.type == "cpu" and dtype in (torch.bfloat16, torch.float16) and not _cpu_has_native(dtype):
        return torch.float32
    return dtype


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """Sums over a token's experts are kept in fp32 for half-precision inputs."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype``, without a copy when it already is."""
    return t if t.dtype == dtype else t.to(dtype)


def matmul(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """a @ b (into ``out`` when given, of a's dtype). One half-precision row times a weight stored [out, in]
    (``b`` a transposed view, as imported experts are) runs as ATen's mv on that weight: the product is bound
    by reading it, and mv reads it about twice as fast as mm (bf16 [1, 1024] x [1024, 1024]: 121 vs 205 us).
    Without native half-precision GEMMs mv is the fast kernel for either layout (no widened copy of b)."""
    half = a.dtype in (torch.bfloat16, torch.float16) and b.dtype == a.dtype
    if half and a.shape[0] == 1 and (b.t().is_contiguous() or compute_dtype(a.dtype, a.device) != a.dtype):
        if out is None:
            return torch.mv(b.t(), a[0])[None]
        torch.mv(b.t(), a[0], out=out[0])
        return out
    return torch.mm(a, b) if out is None else torch.mm(a, b, out=out)


def mm_into(dst: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """dst = a @ b, computed in a's dtype and written (cast) into dst."""
    if dst.dtype == a.dtype:
        matmul(a, b, out=dst)
    else:
        dst.copy_(matmul(a, b))


# -- grouped GEMM ----------------------------------------------------------------------------------
def expert_slices(counts: tuple[int, ...]) -> Iterator[tuple[int, int, int]]:
    """(expert, first row, end row) of each expert with rows, for rows sorted by expert in slices of ``counts``."""
    start = 0
    for expert, n in enumerate(counts):
        if n:
            yield expert, start, start + n
        start += n


class _GroupedMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_NI: torch.Tensor, w_EIO: torch.Tensor, counts: tuple[int, ...]) -> torch.Tensor:
        cdt = compute_dtype(x_NI.dtype, x_NI.device)
        out_NO = x_NI.new_empty(x_NI.shape[0], w_EIO.shape[-1])

        def job(s):
            e, lo, hi = s
            mm_into(out_NO[lo:hi], cast(x_NI[lo:hi], cdt), cast(w_EIO[e], cdt))

        slices = list(expert_slices(counts))
        run_jobs(job, slices, x_NI.device, cost=[hi - lo for _, lo, hi in slices])
        ctx.save_for_backward(x_NI, w_EIO)
        ctx.counts = counts
        return out_NO

    @staticmethod
    def backward(ctx, grad_NO: torch.Tensor):
        x_NI, w_EIO = ctx.saved_tensors
        grad_NO = grad_NO.contiguous()
        cdt = compute_dtype(x_NI.dtype, x_NI.device)
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_x = x_NI.new_empty(x_NI.shape) if need_x else None
        grad_w = None
        if need_w:
            grad_w = torch.empty_like(w_EIO)
            empty = [e for e, n in enumerate(ctx.counts) if n == 0]
            if empty:
                grad_w[empty] = 0

        def job(s):
            e, lo, hi = s
            g = cast(grad_NO[lo:hi], cdt)
            if grad_x is not None:  # (allocated when need_x)
                mm_into(grad_x[lo:hi], g, cast(w_EIO[e], cdt).t())
            if grad_w is not None:  # (allocated when need_w)
                mm_into(grad_w[e], cast(x_NI[lo:hi], cdt).t(), g)

        slices = list(expert_slices(ctx.counts))
        run_jobs(job, slices, x_NI.device, cost=[hi - lo for _, lo, hi in slices])
        return grad_x, grad_w, None


def _torch_kernel_fits(x_NI: torch.Tensor, w_EIO: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm``'s CUDA kernel takes these operands (torch 2.13: bf16 on sm90+, rows of a
    multiple of 16 bytes, fewer than 1024 groups; a backward through 0 rows fails, so those stay off it)."""
    if x_NI.device.type != "cuda" or x_NI.dtype != torch.bfloat16 or x_NI.shape[0] == 0:
        return False
    E, I, O = w_EIO.shape
    return torch.cuda.get_device_capability(x_NI.device) >= (9, 0) and E < 1024 and I % 8 == 0 and O % 8 == 0


def grouped_mm_torch(x_NI: torch.Tensor, w_EIO: torch.Tensor, counts: tuple[int, ...]) -> torch.Tensor:
    """:func:`grouped_mm` by ``torch._grouped_mm`` (``offs``: the int32 cumulative row counts, i.e. where
    each expert's rows end). Its CUDA kernel is bf16-only (see ``_torch_kernel_fits``); on CPU it also
    runs fp32, which is how it is tested without a GPU."""
    offs_E = torch.tensor(list(itertools.accumulate(counts)), dtype=torch.int32, device=x_NI.device)
    return torch._grouped_mm(x_NI, w_EIO.contiguous(), offs=offs_E)


def grouped_mm_padded(x_NI: torch.Tensor, w_EIO: torch.Tensor, counts: tuple[int, ...]) -> torch.Tensor:
    """:func:`grouped_mm` as one ``torch.bmm``: each expert's rows padded with zeros to the largest count
    ([E, M, I] @ [E, I, O]), then the padding dropped. Plain autograd; any device and dtype."""
    device, N = x_NI.device, x_NI.shape[0]
    counts_E = torch.tensor(counts, device=device)
    expert_N = torch.repeat_interleave(torch.arange(len(counts), device=device), counts_E, output_size=N)
    row_N = torch.arange(N, device=device) - (counts_E.cumsum(0) - counts_E)[expert_N]
    x_EMI = x_NI.new_zeros(len(counts), max(counts, default=0), x_NI.shape[1])
    x_EMI = x_EMI.index_put((expert_N, row_N), x_NI)
    return torch.bmm(x_EMI, w_EIO)[expert_N, row_N]


def grouped_mm(x_NI: torch.Tensor, w_EIO: torch.Tensor, counts: tuple[int, ...]) -> torch.Tensor:
    """Rows of ``x_NI`` in expert-sorted slices of sizes ``counts`` (python ints, one per expert), each times its
    expert's matrix of ``w_EIO``: [N, O] in x's dtype."""
    if x_NI.dtype != w_EIO.dtype:
        w_EIO = w_EIO.to(x_NI.dtype)
    if x_NI.device.type == "cpu":
        return _GroupedMM.apply(x_NI.contiguous(), w_EIO, counts)
    if _torch_kernel_fits(x_NI, w_EIO):
        return grouped_mm_torch(x_NI.contiguous(), w_EIO, counts)
    return grouped_mm_padded(x_NI, w_EIO, counts)


def grouped_mm_reference(x_NI: torch.Tensor, w_EIO: torch.Tensor, counts: tuple[int, ...]) -> torch.Tensor:
    """Plain-autograd version of :func:`grouped_mm`, the oracle its tests compare with."""
    pieces = torch.split(x_NI, list(counts))
    return torch.cat([p @ w_EIO[e] for e, p in enumerate(pieces)], dim=0)
