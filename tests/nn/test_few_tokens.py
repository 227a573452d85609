"""The MoE layer's few-token inference path (one decoding step) equals the general path."""

from __future__ import annotations

import pytest
import torch

from moekit.nn import MoE, few_tokens

CASES = {
    "softmax": dict(num_experts=8, top_k=2),
    "softmax_scaled": dict(num_experts=8, top_k=2, routed_scaling_factor=2.0),
    "softmax_unnormalised_shared_gate": dict(
        num_experts=6, top_k=3, norm_topk_prob=False, num_shared_experts=1, shared_expert_gate=True
    ),
    "sigmoid_groups": dict(
        router="sigmoid_topk", num_experts=8, top_k=3, n_group=4, topk_group=2, routed_scaling_factor=2.5,
        num_shared_experts=2,
    ),
    "gelu": dict(num_experts=4, top_k=2, activation="gelu"),
}  # fmt: skip


def _layer(fields, dtype=torch.float32):
    torch.manual_seed(0)
    layer = MoE(hidden_size=16, expert_hidden_size=24, **fields).eval()
    if hasattr(layer.router, "e_score_correction_bias"):
        layer.router.e_score_correction_bias.normal_(0, 0.1)
    return layer.to(dtype)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("shape", [(1, 1, 16), (2, 1, 16), (1, 16)])
def test_same_output_and_load_as_the_general_path(name, shape):
    layer = _layer(CASES[name])
    x = torch.randn(shape)
    with torch.no_grad():  # not inference mode: the general path
        assert not few_tokens.applies(layer, x, None, False)
        ref, ref_aux = layer(x)
    with torch.inference_mode():
        assert few_tokens.applies(layer, x, None, False)
        out, aux = layer(x)
    # Same math; the general path may sum shared and routed experts in another order (last-bit differences).
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-6)
    assert torch.equal(aux.tokens_per_expert, ref_aux.tokens_per_expert)
    assert torch.allclose(aux.router_entropy, ref_aux.router_entropy)
    assert aux.routing is None and aux.losses == {} and float(aux.loss) == 0.0


def test_half_precision_stays_close():
    layer = _layer(CASES["sigmoid_groups"], torch.bfloat16)
    x = torch.randn(1, 1, 16, dtype=torch.bfloat16)
    with torch.no_grad():
        ref, _ = layer(x)
    with torch.inference_mode():
        out, _ = layer(x)
    assert out.dtype == torch.bfloat16 and torch.allclose(out.float(), ref.float(), atol=1e-2)


def test_the_general_path_keeps_everything_else():
    layer = _layer(CASES["softmax"])
    x = torch.randn(1, 1, 16)
    with torch.inference_mode():
        assert not few_tokens.applies(layer, torch.randn(3, 1, 16), None, False)  # more tokens
        assert not few_tokens.applies(layer, x, None, True)  # routing recorded
        assert not few_tokens.applies(layer, x, torch.zeros(1, 1, dtype=torch.bool), False)  # padding
        assert not few_tokens.applies(layer.train(), x, None, False)  # training
        layer.eval()
        capped = MoE(hidden_size=16, expert_hidden_size=24, num_experts=4, top_k=2, capacity_factor=1.0).eval()
        assert not few_tokens.applies(capped, x, None, False)
        _, aux = layer(x, record_routing=True)
        assert aux.routing is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_experts_stored_out_in_as_imported_give_the_same_output(dtype):
    """An HF import's experts are transposed views of [E, X, D] (the layout the decode GEMVs prefer)."""
    layer = _layer(CASES["softmax_unnormalised_shared_gate"], dtype)
    x, many = torch.randn(2, 1, 16, dtype=dtype), torch.randn(3, 4, 16, dtype=dtype)
    with torch.inference_mode():
        ref, _ = layer(x)
        ref_many, _ = layer(many)  # the fused kernel
        experts = layer.experts
        experts.w_in = torch.nn.Parameter(experts.w_in.transpose(1, 2).contiguous().transpose(1, 2))
        experts.w_out = torch.nn.Parameter(experts.w_out.transpose(1, 2).contiguous().transpose(1, 2))
        assert not experts.w_in.is_contiguous()
        out, _ = layer(x)
        out_many, _ = layer(many)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(out_many.float(), ref_many.float(), rtol=tol, atol=tol)
