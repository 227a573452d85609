"""The int8-activation decode kernels (qdot.c) against their slow torch references, and their wiring."""

import pytest
import torch

from moekit.nn.experts import Experts
from moekit.nn.kernels import native
from moekit.nn.kernels.native import qdot
from moekit.nn.quantized import QuantizedExperts, QuantLinear, QuantMatrix

pytestmark = pytest.mark.skipif(not qdot.enabled(), reason="qdot kernels not built here (no AVX512-VNNI or no cc)")


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    # same exact integer products; only the order of fp32 sums differs: one bf16 step where a sum straddles a rounding
    torch.testing.assert_close(a.float(), b.float(), rtol=2**-7, atol=1e-3 * b.float().abs().max().item())


@pytest.mark.parametrize(
    "bits,group,out_f,in_f",
    [(8, 32, 96, 256), (8, 32, 8, 200), (8, 32, 7, 5), (4, 32, 96, 256), (4, 64, 40, 192), (4, 128, 33, 384),
     (4, 32, 5, 96)],
)  # fmt: skip
def test_gemv_matches_the_reference_with_ragged_widths(bits, group, out_f, in_f):
    torch.manual_seed(0)
    m = QuantMatrix.from_float(torch.randn(out_f, in_f) * 0.05, bits, group)
    x = torch.randn(in_f)
    y = qdot.gemv(m, x)
    assert y is not None and y.dtype == torch.bfloat16
    _close(y, qdot.gemv_reference(m, x))


@pytest.mark.parametrize("bits", [[8, 8, 8, 8], [4, 4, 4, 4], [8, 4, 4, 8]])
@pytest.mark.parametrize("group,dim,hidden", [(32, 256, 384), (64, 256, 384), (128, 256, 384), (32, 96, 64)])
def test_swiglu_experts_match_the_reference(bits, group, dim, hidden):
    torch.manual_seed(2)
    experts = QuantizedExperts.from_experts(Experts(4, dim, hidden), bits, group_size=group)
    table = native.QuantTable(list(experts.q_in), list(experts.q_out), group)
    assert table.readable  # widths off decode.c's 128-column block included
    x = torch.randn(dim).bfloat16()
    chosen, weights = [0, 2, 3], [0.5, 0.25, 0.25]
    y = torch.full((dim,), 0.25)
    assert qdot.swiglu_experts(x, table, chosen, weights, y)
    want = qdot.swiglu_experts_reference(list(experts.q_in), list(experts.q_out), x, chosen, weights) + 0.25
    _close(y, want)
    with torch.inference_mode():  # and the layer takes this kernel for a decode step
        via_layer = torch.full((dim,), 0.25)
        experts.run_chosen(x[None], chosen, weights, via_layer)
    assert torch.equal(via_layer, y)


def test_the_activation_quantisation_is_blockwise_int8():
    x = torch.tensor([0.0] * 32 + [1.0, -0.5, 0.25] + [0.0] * 29 + [3.0])
    deq = qdot.quantize_activation(x)
    assert torch.equal(deq[:32], torch.zeros(32))  # a block of zeros stays zero
    assert deq[32] == 1.0 and abs(deq[33] + 0.5) < 1 / 254 and deq[-1] == 3.0  # each block's max is exact
    torch.testing.assert_close(deq, x, atol=3.0 / 254, rtol=0)


def test_declined_layouts_leave_the_sum_alone():
    experts = QuantizedExperts.from_experts(Experts(2, 64, 32), [4, 4])
    m = experts.q_in[0]
    m.q = m.q.t().contiguous().t()  # not contiguous rows: not the stored layout
    table = native.QuantTable(list(experts.q_in), list(experts.q_out), 32)
    y = torch.zeros(64)
    assert not table.readable and not qdot.swiglu_experts(torch.randn(64), table, [0], [1.0], y)
    assert torch.equal(y, torch.zeros(64))
    assert qdot.gemv(m, torch.randn(64)) is None
    good = QuantMatrix.from_float(torch.randn(8, 64), 8)
    assert qdot.gemv(good, torch.randn(32)) is None  # a width that is not the matrix's


def test_quant_linear_one_row_takes_the_kernel_and_moekit_qdot_0_the_exact_one(monkeypatch):
    torch.manual_seed(3)
    lin = QuantLinear.from_linear(torch.nn.Linear(256, 48, bias=True), bits=4, group_size=64)
    x = torch.randn(1, 256)
    with torch.inference_mode():
        y = lin(x)
        _close(y[0] - lin.bias, qdot.gemv_reference(lin.quantized, x[0]).float())
        monkeypatch.setenv("MOEKIT_QDOT", "0")
        assert not qdot.enabled()
        exact = lin(x)  # ATen's int4 kernel on bf16 activations
    assert not torch.equal(y, exact)
    torch.testing.assert_close(y, exact, rtol=0.05, atol=0.05 * exact.abs().max().item())


@pytest.mark.parametrize("bits", [8, 4])
def test_greedy_tokens_of_a_small_quantised_model_match_the_exact_path(bits, monkeypatch):
    from moekit.inference.generate import generate
    from moekit.models import MoELM
    from moekit.models.presets import TINY
    from moekit.models.quantization import quantize_model, uniform_spec

    torch.manual_seed(9)
    model = MoELM(TINY).eval()
    quantize_model(model, uniform_spec(model.config, bits, 32, linear_bits=8))
    prompt = torch.randint(0, TINY.vocab_size, (1, 12))
    with torch.inference_mode():
        fast = generate(model, prompt, max_new_tokens=8, temperature=0)
        monkeypatch.setenv("MOEKIT_QDOT", "0")
        exact = generate(model, prompt, max_new_tokens=8, temperature=0)
    assert fast == exact
