"""Weight-only quantised experts: the math, each kernel against dequantise-then-matmul, the MoE layer."""

from __future__ import annotations

import pytest
import torch

import moekit.nn.quantized as quantized_module
from moekit.errors import ConfigError
from moekit.inference.generate import generate
from moekit.models import MoELM
from moekit.models.presets import TINY
from moekit.models.quantization import quantize_model, uniform_spec
from moekit.nn import MoE, few_tokens
from moekit.nn.experts import Experts
from moekit.nn.quantized import (
    DENSE_MIN_ROWS,
    QuantizedExperts,
    QuantMatrix,
    int4_kernel_weight,
    quantize_int4,
    quantize_int8,
    unpack_int4,
)


def test_int8_error_is_at_most_half_a_step_and_representable_values_come_back_exactly():
    torch.manual_seed(0)
    w = torch.randn(40, 96)
    q, scales = quantize_int8(w)
    deq = q.float() * scales.float()[:, None]
    assert q.dtype == torch.int8 and int(q.abs().max()) <= 127
    assert bool(((deq - w).abs() <= scales.float()[:, None] / 2 + 1e-6).all())
    exact = deq  # values on the grid: quantising again gives them back bit for bit
    q2, scales2 = quantize_int8(exact)
    assert torch.equal(q2.float() * scales2.float()[:, None], exact)


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_packs_two_values_per_byte_and_stays_within_a_step(group):
    torch.manual_seed(1)
    w = torch.randn(24, 256)
    m = QuantMatrix.from_float(w, 4, group)
    assert m.q.shape == (24, 128) and m.q.dtype == torch.uint8
    values = unpack_int4(m.q)
    assert int(values.max()) <= 15 and values.shape == (24, 256)
    step = m.scales.float().repeat_interleave(group, dim=1)
    assert bool(((m.dequantize() - w).abs() <= step * 0.5 + 1e-2 * step + 1e-6).all())
    q, scales, zeros = quantize_int4(w, group)  # the module stores exactly what the function returns
    assert torch.equal(q, m.q) and torch.equal(scales, m.scales) and torch.equal(zeros, m.zeros)


@pytest.mark.parametrize("bits,group", [(8, 32), (4, 32), (4, 64), (4, 128)])
@pytest.mark.parametrize("rows", [1, 7])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_each_kernel_equals_dequantise_then_matmul(bits, group, rows, dtype):
    torch.manual_seed(2)
    m = QuantMatrix.from_float(torch.randn(160, 256) * 0.05, bits, group)
    x = torch.randn(rows, 256).to(dtype)
    ref = x.to(torch.bfloat16).float() @ m.dequantize().t()  # the kernels take bf16 activations
    out = m(x)
    assert out.dtype == dtype and out.shape == (rows, 160)
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2 * float(ref.abs().max()))


@pytest.mark.parametrize("rows", [1, 20])
def test_int4_with_an_output_width_aten_cannot_pack_runs_dequantised(rows):
    m = QuantMatrix.from_float(torch.randn(65, 64), 4, 32)  # a character vocabulary's head: 65 outputs
    x = torch.randn(rows, 64).bfloat16()
    ref = x.float() @ m.dequantize().t()
    torch.testing.assert_close(m(x).float(), ref, rtol=2e-2, atol=2e-2 * float(ref.abs().max()))


@pytest.mark.parametrize("bits", [8, 4])
def test_strided_rows_give_the_contiguous_result(bits):
    m = QuantMatrix.from_float(torch.randn(64, 128), bits, 32)
    x = torch.randn(3, 2, 128).bfloat16()[:, -1]  # the last position of each row: rows 256 apart
    assert not x.is_contiguous()
    assert torch.equal(m(x), m(x.contiguous()))


def test_bad_widths_and_groups_are_config_errors():
    with pytest.raises(ConfigError, match="bits=3"):
        QuantMatrix(8, 64, 3)
    with pytest.raises(ConfigError, match="group_size=48"):
        QuantMatrix(8, 96, 4, 48)
    with pytest.raises(ConfigError, match="does not divide the input width 96"):
        QuantMatrix(8, 96, 4, 64)


def _layer_pair(bits):
    torch.manual_seed(3)
    layer = MoE(hidden_size=64, num_experts=8, top_k=2, expert_hidden_size=64, num_shared_experts=1).eval()
    quantized = QuantizedExperts.from_experts(layer.experts, bits, 32)
    reference = MoE(hidden_size=64, num_experts=8, top_k=2, expert_hidden_size=64, num_shared_experts=1).eval()
    reference.load_state_dict(layer.state_dict())
    with torch.no_grad():  # the float layer with the dequantised weights: what the quantised one must compute
        for e in range(8):
            reference.experts.w_in[e] = quantized.q_in[e].dequantize().t()
            reference.experts.w_out[e] = quantized.q_out[e].dequantize().t()
    layer.experts = quantized
    return layer, reference


@pytest.mark.parametrize("shape", [(1, 1, 64), (3, 5, 64)])
def test_a_moe_layer_with_mixed_quantised_experts_computes_its_dequantised_twin(shape):
    layer, reference = _layer_pair([8, 4, 4, 8, 4, 8, 8, 4])
    x = torch.randn(shape).to(torch.bfloat16).float()
    with torch.inference_mode():
        assert few_tokens.applies(layer, x, None, False) == (shape[1] == 1)
        out, aux = layer(x)
        ref, ref_aux = reference(x)
    assert torch.equal(aux.tokens_per_expert, ref_aux.tokens_per_expert)
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2 * float(ref.abs().max()))
    assert layer.experts.nbytes() < sum(p.numel() * 4 for p in reference.experts.parameters()) / 3


def test_quantised_experts_refuse_expert_dropout():
    layer, _ = _layer_pair([8] * 8)
    with pytest.raises(ConfigError, match="inference"):
        layer.experts(torch.randn(4, 64), (4, 0, 0, 0, 0, 0, 0, 0), dropout=0.1)


def test_int8_weights_anywhere_in_memory_work(tmp_path):
    """A mapped checkpoint's tensors are only dtype-aligned; ATen's int8 kernel needs 64-byte alignment."""
    m = QuantMatrix.from_float(torch.randn(64, 32), 8)
    x = torch.randn(3, 32)
    ref = m(x)
    buffer = torch.empty(64 * 32 + 8, dtype=torch.int8)
    buffer[8:].copy_(m.q.view(-1))
    moved = QuantMatrix(64, 32, 8)
    moved.q, moved.scales = buffer[8:].view(64, 32), m.scales
    assert moved.q.data_ptr() % 64 != 0
    assert torch.equal(moved(x), ref)


@pytest.mark.parametrize("rows", [128, 80])  # 80: not a whole number of 64-row blocks
def test_int4_operand_built_in_row_blocks_equals_the_whole_matrix_conversion(rows):
    packed = torch.randint(0, 256, (rows, 96), dtype=torch.uint8)
    whole = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_int4(packed).to(torch.int32), 1)
    assert torch.equal(int4_kernel_weight(packed), whole)


def test_a_dtype_cast_of_the_model_leaves_the_quantised_form_and_its_results_alone():
    """``model.to(torch.float32)`` (as ``serve --dtype`` does) must not turn the bf16 scales the kernels read
    into fp32: the quantised experts give the same output before and after, on every path."""
    torch.manual_seed(5)
    layer = MoE(hidden_size=256, num_experts=4, top_k=2, expert_hidden_size=128).to(torch.bfloat16).eval()
    layer.experts = QuantizedExperts.from_experts(layer.experts, [8, 4, 8, 4])
    x_one, x_many = torch.randn(1, 1, 256).bfloat16(), torch.randn(1, 40, 256).bfloat16()
    with torch.inference_mode():
        before = [layer(x)[0] for x in (x_one, x_many)]
        layer.float()
        assert all(m.scales.dtype == torch.bfloat16 for m in layer.experts.q_in)
        after = [layer(x.float())[0] for x in (x_one, x_many)]
    for b, a in zip(before, after):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2 * b.float().abs().max().item())


@pytest.mark.parametrize("bits,group", [(8, 32), (4, 32), (4, 128)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_many_rows_run_one_gemm_on_the_dequantised_matrix_and_equal_the_reference(bits, group, dtype):
    torch.manual_seed(7)
    m = QuantMatrix.from_float(torch.randn(160, 256) * 0.05, bits, group)
    many = m.dense_min_rows()
    for rows in (many - 1, many, many + 9):
        x = torch.randn(rows, 256).to(dtype)
        out = m(x)
        assert out.dtype == dtype and out.shape == (rows, 160)
        if rows >= many:  # many rows: the GEMM
            assert torch.equal(out, m.dense_forward(x))
        ref = x.to(torch.bfloat16).float() @ m.dequantize().t()
        torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2 * float(ref.abs().max()))


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_quantised_experts_equal_the_dequantise_then_matmul_reference_with_many_few_and_no_rows(bits, dtype):
    torch.manual_seed(8)
    quantized = QuantizedExperts.from_experts(Experts(5, 128, 64), [bits] * 5, 32)
    many = quantized.q_in[0].dense_min_rows()
    counts = (many + 3, 0, 2, many, 0)  # above the threshold, none, a few, exactly at it, none (last)
    x = torch.randn(sum(counts), 128).to(torch.bfloat16).to(dtype)
    with torch.inference_mode():
        out = quantized(x, counts)
    assert out.dtype == dtype and out.shape == (sum(counts), 128)
    start = 0
    for e, n in enumerate(counts):
        if n:
            ref = quantized.expert_forward(e, x[start : start + n].float())
            got = out[start : start + n].float()
            torch.testing.assert_close(got, ref, rtol=2e-2, atol=2e-2 * float(ref.abs().max()))
        start += n


@pytest.mark.parametrize("bits", [8, 4])
def test_greedy_generation_of_a_quantised_model_is_unchanged_by_the_many_row_gemm(bits, monkeypatch):
    """As shipped, with the GEMM from 8 rows on (so the prompt takes it here even where the shipped thresholds
    are out of the tiny model's reach), and with the weight-only kernels only (the code before the GEMM path)."""
    torch.manual_seed(9)
    model = MoELM(TINY).eval()
    quantize_model(model, uniform_spec(model.config, bits, 32, linear_bits=8))
    prompt = torch.randint(0, TINY.vocab_size, (1, 40))
    with torch.inference_mode():
        shipped, routed = generate(model, prompt, max_new_tokens=12, temperature=0, return_routed_experts=True)
        runs = []
        for threshold in (8, 1 << 30):
            monkeypatch.setattr(quantized_module, "DENSE_MIN_ROWS", dict.fromkeys(DENSE_MIN_ROWS, threshold))
            runs.append(generate(model, prompt, max_new_tokens=12, temperature=0))
    prompt_choices = routed[0][:40]  # [tokens, layers, top_k]
    assert max(int(torch.bincount(prompt_choices[:, layer].flatten()).max()) for layer in range(2)) >= 8
    assert shipped == runs[0] == runs[1]
