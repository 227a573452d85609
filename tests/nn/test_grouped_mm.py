"""The grouped GEMM's hand-written backward equals plain autograd."""

from __future__ import annotations

import pytest
import torch

from moekit.nn.grouped_mm import grouped_mm, grouped_mm_reference


@pytest.mark.parametrize("counts", [(3, 0, 5, 1), (0, 0, 0, 7), (1,), (0, 4, 0, 0, 2)])
def test_grouped_mm_matches_reference(counts):
    E = len(counts)
    x = torch.randn(sum(counts), 6, requires_grad=True)
    w = torch.randn(E, 6, 5, requires_grad=True)
    g = torch.randn(sum(counts), 5)
    y = grouped_mm(x, w, counts)
    gx, gw = torch.autograd.grad((y * g).sum(), (x, w))
    y_ref = grouped_mm_reference(x, w, counts)
    gx_ref, gw_ref = torch.autograd.grad((y_ref * g).sum(), (x, w))
    assert torch.allclose(y, y_ref, atol=1e-6)
    assert torch.allclose(gx, gx_ref, atol=1e-6)
    assert torch.allclose(gw, gw_ref, atol=1e-6)
    empty = [e for e, n in enumerate(counts) if n == 0]
    assert torch.all(gw[empty] == 0)


def test_grouped_mm_gradcheck_float64():
    counts = (2, 0, 3)
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: grouped_mm(a, b, counts), (x, w))
