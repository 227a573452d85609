"""Every grouped GEMM implementation equals plain autograd, forward and backward, over a table of shapes.

``grouped_mm`` picks one per device (CPU: the hand-written kernel; CUDA: ``torch._grouped_mm`` or the
padded ``bmm``); the other two run on CPU too, so all three are checked here without a GPU.
"""

from __future__ import annotations

import pytest
import torch

from moekit.nn.kernels.fused_experts import _moe_experts_grouped, moe_experts
from moekit.nn.kernels.grouped_mm import grouped_mm, grouped_mm_padded, grouped_mm_reference, grouped_mm_torch, matmul

COUNTS = [(3, 0, 5, 1), (0, 0, 0, 7), (1,), (0, 4, 0, 0, 2), (16, 16), (0, 0, 0), (9, 1, 0, 30, 2, 0, 0, 5)]
IMPLEMENTATIONS = {"cpu_kernel": grouped_mm, "padded_bmm": grouped_mm_padded, "torch_grouped_mm": grouped_mm_torch}


def _supported(name: str, counts: tuple[int, ...], I: int, O: int) -> bool:
    # torch._grouped_mm needs rows of 16-byte multiples and fails backward on 0 rows; grouped_mm never
    # sends it such shapes (`_torch_kernel_fits`), so those cells are not generated.
    return name != "torch_grouped_mm" or (sum(counts) > 0 and I % 8 == 0 and O % 8 == 0)


CASES = [
    (name, counts, I, O)
    for name in IMPLEMENTATIONS
    for counts in COUNTS
    for I, O in [(6, 5), (16, 8)]
    if _supported(name, counts, I, O)
]


@pytest.mark.parametrize(("name", "counts", "I", "O"), CASES, ids=str)
def test_grouped_mm_matches_reference(name, counts, I, O):
    impl = IMPLEMENTATIONS[name]
    torch.manual_seed(sum(counts))
    E = len(counts)
    x = torch.randn(sum(counts), I, requires_grad=True)
    w = torch.randn(E, I, O, requires_grad=True)
    g = torch.randn(sum(counts), O)
    y = impl(x, w, counts)
    gx, gw = torch.autograd.grad((y * g).sum(), (x, w))
    y_ref = grouped_mm_reference(x, w, counts)
    gx_ref, gw_ref = torch.autograd.grad((y_ref * g).sum(), (x, w))
    assert y.shape == y_ref.shape
    assert torch.allclose(y, y_ref, atol=1e-5)
    assert torch.allclose(gx, gx_ref, atol=1e-5)
    assert torch.allclose(gw, gw_ref, atol=1e-5)
    empty = [e for e, n in enumerate(counts) if n == 0]
    assert torch.all(gw[empty] == 0)


@pytest.mark.parametrize("name", ["padded_bmm", "torch_grouped_mm"])
def test_bf16_grouped_mm_close_to_reference(name):
    counts = (3, 0, 13, 1)
    x = torch.randn(sum(counts), 16).bfloat16()
    w = torch.randn(4, 16, 8).bfloat16()
    ref = grouped_mm_reference(x.double(), w.double(), counts)
    y = IMPLEMENTATIONS[name](x, w, counts)
    assert y.dtype == torch.bfloat16 and torch.allclose(y.double(), ref, atol=0.1, rtol=2e-2)


def test_grouped_mm_gradcheck_float64():
    counts = (2, 0, 3)
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 4, 3, dtype=torch.float64, requires_grad=True)
    for impl in (grouped_mm, grouped_mm_padded):
        assert torch.autograd.gradcheck(lambda a, b, impl=impl: impl(a, b, counts), (x, w))


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("shared", [False, True])
def test_grouped_experts_path_equals_the_cpu_kernel(activation, shared):
    """moe_experts off the CPU (grouped GEMMs + plain autograd) computes what the fused CPU kernel does."""
    torch.manual_seed(4)
    T, D, H, S = 9, 8, 6, 4
    X, XS = (2 * H, 2 * S) if activation == "swiglu" else (H, S)
    counts = (4, 0, 7, 3)
    token_idx = torch.randint(0, T, (sum(counts),))
    x = torch.randn(T, D, requires_grad=True)
    weight = torch.rand(sum(counts), requires_grad=True)
    w_in = torch.randn(4, D, X, requires_grad=True)
    w_out = torch.randn(4, H, D, requires_grad=True)
    mask = (torch.rand(sum(counts), H) > 0.3).float() * 2
    extra = (torch.randn(D, XS), torch.randn(S, D), torch.rand(T)) if shared else (None, None, None)
    params = (x, weight, w_in, w_out)
    g = torch.randn(T, D)
    fused = moe_experts(x, token_idx, weight, counts, w_in, w_out, activation, *extra, threads=1, dropout_mask_NH=mask)
    grouped = _moe_experts_grouped(x, token_idx, weight, w_in, w_out, *extra, mask, counts, activation)
    assert torch.allclose(grouped, fused, atol=1e-5)
    for a, b in zip(torch.autograd.grad((grouped * g).sum(), params), torch.autograd.grad((fused * g).sum(), params)):
        assert torch.allclose(a, b, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("layout", ["in_out", "out_in_view"])
def test_matmul_takes_mv_for_a_half_row_and_equals_the_product(dtype, rows, layout):
    torch.manual_seed(0)
    w = torch.randn(64, 48) if layout == "in_out" else torch.randn(48, 64).t()  # [in, out] either way
    a, w = torch.randn(rows, 64).to(dtype), w.to(dtype)
    ref = (a.double() @ w.double()).to(dtype)  # exact products, one rounding
    out = matmul(a, w)
    into = torch.full((rows, 48), float("nan"), dtype=dtype)
    assert matmul(a, w, out=into) is into
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    for got in (out, into):
        assert got.shape == (rows, 48) and got.dtype == dtype
        torch.testing.assert_close(got.float(), ref.float(), rtol=tol, atol=tol)
