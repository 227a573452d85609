"""Grouped matrix multiply over contiguous row slices: out[rows of e] = x[rows of e] @ w[e].

A hand-written backward writes each expert's weight gradient straight into one [E, ...] buffer.
Indexing ``w[e]`` inside autograd would instead materialise a full-size zero gradient per expert
and sum them (what makes per-expert loops slow in backward at many experts).

Shape legend: N rows (kept assignments sorted by expert), E experts, I input, O output features.
"""

from __future__ import annotations

import torch


def _slices(counts: tuple[int, ...]):
    start = 0
    for expert, n in enumerate(counts):
        if n:
            yield expert, start, start + n
        start += n


class _GroupedMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_NI: torch.Tensor, w_EIO: torch.Tensor, counts: tuple[int, ...]) -> torch.Tensor:
        out_NO = x_NI.new_empty(x_NI.shape[0], w_EIO.shape[-1])
        for e, lo, hi in _slices(counts):
            torch.mm(x_NI[lo:hi], w_EIO[e], out=out_NO[lo:hi])
        ctx.save_for_backward(x_NI, w_EIO)
        ctx.counts = counts
        return out_NO

    @staticmethod
    def backward(ctx, grad_NO: torch.Tensor):
        x_NI, w_EIO = ctx.saved_tensors
        grad_NO = grad_NO.contiguous()
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = x_NI.new_empty(x_NI.shape)
            for e, lo, hi in _slices(ctx.counts):
                torch.mm(grad_NO[lo:hi], w_EIO[e].t(), out=grad_x[lo:hi])
        if ctx.needs_input_grad[1]:
            grad_w = torch.zeros_like(w_EIO)
            for e, lo, hi in _slices(ctx.counts):
                torch.mm(x_NI[lo:hi].t(), grad_NO[lo:hi], out=grad_w[e])
        return grad_x, grad_w, None


def grouped_mm(x_NI: torch.Tensor, w_EIO: torch.Tensor, counts: tuple[int, ...]) -> torch.Tensor:
    """Rows of x in expert-sorted slices of sizes ``counts``, each times its expert's matrix.

    Args:
        x_NI: [N, I] rows sorted by expert, N == sum(counts).
        w_EIO: [E, I, O] stacked weights.
        counts: rows per expert (python ints), len(counts) == E.

    Returns:
        [N, O], in x's dtype.
    """
    if x_NI.dtype != w_EIO.dtype:
        w_EIO = w_EIO.to(x_NI.dtype)
    return _GroupedMM.apply(x_NI.contiguous(), w_EIO, counts)


def grouped_mm_reference(x_NI: torch.Tensor, w_EIO: torch.Tensor, counts: tuple[int, ...]) -> torch.Tensor:
    """Plain-autograd version of :func:`grouped_mm`, the oracle its tests compare with."""
    pieces = torch.split(x_NI, list(counts))
    return torch.cat([p @ w_EIO[e] for e, p in enumerate(pieces)], dim=0)
