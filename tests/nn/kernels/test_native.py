"""The C decode kernels against ATen: same results up to the order of fp32 sums, and the fallbacks."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from moekit.nn.kernels import native

# CI runs on a machine like the development one (AVX512-BF16, a C compiler): there the kernels must be built.
pytestmark = pytest.mark.skipif(
    native.library() is None and not os.environ.get("CI"), reason="no AVX512-BF16 CPU or C compiler here"
)


@pytest.fixture(autouse=True)
def _decode_c_kernels(monkeypatch):
    """These tests are of decode.c's kernels (ATen's numerics); qdot.c's have tests/nn/kernels/test_qdot.py."""
    monkeypatch.setenv("MOEKIT_QDOT", "0")


def test_the_kernels_are_built_where_ci_runs():
    assert native.library() is not None, "native decode kernels did not build (needs cc and an AVX512-BF16 CPU)"


def _close_in_bf16(a: torch.Tensor, b: torch.Tensor) -> None:
    # the products are exact and the sums fp32 in both: only the sum order differs, so a result rounded to
    # bf16 may differ by one bf16 step (2**-8 relative) where the fp32 sums straddle a rounding boundary
    torch.testing.assert_close(a.float(), b.float(), rtol=2**-7, atol=1e-3 * b.float().abs().max().item())


@pytest.mark.parametrize("out_features,in_features", [(64, 1024), (33, 40), (7, 5)])
def test_gemv_matches_aten_mv_with_ragged_tails(out_features, in_features):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(out_features, in_features, generator=g).bfloat16()
    x = torch.randn(in_features, generator=g).bfloat16()
    y = native.gemv_bf16(w, x)
    assert y is not None and y.dtype == torch.bfloat16
    _close_in_bf16(y, torch.mv(w, x))


def test_gemv_reads_strided_rows():
    w = torch.randn(16, 96).bfloat16()[:, :64]  # rows 96 elements apart
    x = torch.randn(64).bfloat16()
    _close_in_bf16(native.gemv_bf16(w, x), torch.mv(w, x))


def test_gemv_declines_what_it_does_not_do():
    assert native.gemv_bf16(torch.randn(8, 8), torch.randn(8)) is None  # fp32
    assert native.gemv_bf16(torch.randn(8, 8).bfloat16().t(), torch.randn(8).bfloat16()) is None  # columns


def _swiglu_reference(x, w_in, w_out, experts, weights):
    """Per expert with ATen bf16 ops, summed in fp32 in the given order (the few-token path's loop)."""
    y = torch.zeros(x.shape[0])
    for e, w in zip(experts, weights):
        gate, up = torch.mv(w_in[e], x).chunk(2)
        y.add_(torch.mv(w_out[e], F.silu(gate) * up), alpha=w)
    return y


@pytest.mark.parametrize("dim,hidden", [(256, 64), (96, 40)])
def test_swiglu_experts_match_the_aten_loop(dim, hidden):
    g = torch.Generator().manual_seed(1)
    E = 6
    w_in = (torch.randn(E, 2 * hidden, dim, generator=g) * dim**-0.5).bfloat16()
    w_out = (torch.randn(E, dim, hidden, generator=g) * hidden**-0.5).bfloat16()
    x = torch.randn(dim, generator=g).bfloat16()
    experts, weights = [0, 2, 5], [0.5, 0.3, 0.2]
    y = torch.full((dim,), 0.25)  # adds to what is there
    assert native.swiglu_experts_bf16(x, w_in, w_out, experts, weights, y)
    expected = _swiglu_reference(x, w_in, w_out, experts, weights) + 0.25
    torch.testing.assert_close(y, expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())
    assert not torch.equal(y, torch.full((dim,), 0.25))


def test_swiglu_experts_decline_fp32_and_leave_the_sum_alone():
    y = torch.zeros(8)
    assert not native.swiglu_experts_bf16(torch.randn(8), torch.randn(2, 4, 8), torch.randn(2, 8, 2), [0], [1.0], y)
    assert torch.equal(y, torch.zeros(8))


def test_disabled_by_environment_and_a_missing_compiler(tmp_path):
    code = "from moekit.nn.kernels import native; print(native.library() is None)"
    for env in ({"MOEKIT_NATIVE": "0"}, {"CC": "no-such-compiler", "MOEKIT_KERNEL_CACHE": str(tmp_path)}):
        out = subprocess.run(
            [sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True, check=True
        )
        assert out.stdout.strip() == "True", env
    assert list(tmp_path.iterdir()) == []  # a failed build leaves nothing behind


def test_a_fresh_cache_builds_the_library(tmp_path):
    code = "from moekit.nn.kernels import native; print(native.library() is not None)"
    env = {**os.environ, "MOEKIT_KERNEL_CACHE": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"
    assert [p.suffix for p in tmp_path.iterdir()] == [".so"]


def test_imported_bf16_experts_run_a_token_through_the_kernel():
    """Experts stored [out, in] (an HF import's transposed views) take one kernel call for a token's k experts."""
    from moekit.nn.experts import Experts

    experts = Experts(num_experts=4, hidden_size=64, expert_hidden_size=32).to(torch.bfloat16)
    with torch.no_grad():
        experts.w_in = torch.nn.Parameter(experts.w_in.transpose(1, 2).contiguous().transpose(1, 2))
        experts.w_out = torch.nn.Parameter(experts.w_out.transpose(1, 2).contiguous().transpose(1, 2))
    x = torch.randn(1, 64).bfloat16()
    w_in_rows, w_out_rows = experts.w_in.transpose(1, 2), experts.w_out.transpose(1, 2)
    assert native.swiglu_experts_bf16(x[0], w_in_rows, w_out_rows, [1], [1.0], torch.zeros(64))  # it applies
    with torch.inference_mode():
        y = torch.zeros(64)
        experts.run_chosen(x, [1, 3], [0.7, 0.3], y)
        loop = torch.zeros(64)
        for e, w in ((1, 0.7), (3, 0.3)):
            loop.add_(experts.run_one(e, x)[0], alpha=w)
    torch.testing.assert_close(y, loop, rtol=2e-2, atol=2e-2 * loop.abs().max().item())


@pytest.mark.parametrize("bits", [[8, 8, 8, 8], [4, 4, 4, 4], [8, 4, 4, 8]])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_quantised_experts_in_one_call_match_their_aten_kernels(bits, group):
    """The C kernel reads the stored int8/int4 form; ATen's kernels (run_one, per expert) are the reference."""
    from moekit.nn.experts import Experts
    from moekit.nn.quantized import QuantizedExperts

    torch.manual_seed(2)
    dense = Experts(num_experts=4, hidden_size=256, expert_hidden_size=384)
    experts = QuantizedExperts.from_experts(dense, bits, group_size=group)
    x = torch.randn(1, 256).bfloat16()
    chosen, weights = [0, 2, 3], [0.5, 0.25, 0.25]
    table = native.QuantTable(list(experts.q_in), list(experts.q_out), group)
    assert table.usable
    with torch.inference_mode():
        loop = torch.zeros(256)
        for e, w in zip(chosen, weights):
            loop.add_(experts.run_one(e, x)[0].float(), alpha=w)
        via_layer = torch.zeros(256)
        experts.run_chosen(x, chosen, weights, via_layer)
        y = torch.zeros(256)
        assert native.swiglu_experts_quantized(x[0], table, chosen, weights, y)
    torch.testing.assert_close(y, loop, rtol=2e-2, atol=2e-2 * loop.abs().max().item())
    assert torch.equal(via_layer, y)


def test_int4_widths_off_the_kernels_block_run_atens_kernel():
    from moekit.nn.experts import Experts
    from moekit.nn.quantized import QuantizedExperts

    experts = QuantizedExperts.from_experts(Experts(num_experts=2, hidden_size=96, expert_hidden_size=64), [4, 4])
    table = native.QuantTable(list(experts.q_in), list(experts.q_out), 32)
    assert not table.usable  # 96 is not a multiple of 128
    x = torch.randn(1, 96).bfloat16()
    with torch.inference_mode():
        y = torch.zeros(96)
        experts.run_chosen(x, [0, 1], [0.5, 0.5], y)
        want = 0.5 * experts.run_one(0, x)[0].float() + 0.5 * experts.run_one(1, x)[0].float()
    torch.testing.assert_close(y, want)


def test_int8_gemv_matches_atens_int8_kernel():
    from moekit.nn.quantized import QuantMatrix

    torch.manual_seed(3)
    m = QuantMatrix.from_float(torch.randn(96, 256), bits=8)
    x = torch.randn(256).bfloat16()
    y = native.gemv_int8(m.q, m.scales, x)
    assert y is not None and y.dtype == torch.bfloat16
    _close_in_bf16(y, m(x[None])[0])
    ragged = QuantMatrix.from_float(torch.randn(8, 200), bits=8)  # a tail of 8 columns; vs the dequantised weight
    _close_in_bf16(native.gemv_int8(ragged.q, ragged.scales, x[:200]), ragged.dequantize() @ x[:200].float())
    assert native.gemv_int8(m.q.t(), m.scales, x) is None  # columns: not this kernel's layout


@pytest.mark.parametrize("bits,group", [(8, 32), (4, 32), (4, 64), (4, 128)])
def test_dequantize_is_the_fp32_reference_rounded_to_bf16_bit_for_bit(bits, group):
    from moekit.nn.quantized import QuantMatrix

    torch.manual_seed(11)
    m = QuantMatrix.from_float(torch.randn(96, 256) * 0.05, bits, group)
    zeros = m.zeros if bits == 4 else None
    w = native.dequantize(m.q, m.scales, zeros, group)
    assert w is not None and torch.equal(w, m.dequantize().to(torch.bfloat16))
    assert native.dequantize(m.q[:, ::2], m.scales, zeros, group) is None  # not contiguous: the caller's fallback
