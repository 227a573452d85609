"""Soft MoE equals its per-sequence, per-slot reference loop; masks and gradients behave."""

from __future__ import annotations

import torch

from moekit.nn import SoftMoE, reference_soft_moe


def test_soft_moe_matches_reference_outputs_and_grads():
    torch.manual_seed(0)
    layer = SoftMoE(12, num_experts=4, slots_per_expert=2, expert_hidden_size=10)
    x = torch.randn(3, 7, 12, requires_grad=True)
    g = torch.randn(3, 7, 12)
    y, aux = layer(x)
    grads = torch.autograd.grad((y * g).sum(), [x, *layer.parameters()])
    y_ref = reference_soft_moe(layer, x)
    grads_ref = torch.autograd.grad((y_ref * g).sum(), [x, *layer.parameters()])
    assert (y - y_ref).abs().max() <= 1e-5
    for a, b in zip(grads, grads_ref):
        assert (a - b).abs().max() <= 1e-5
    assert aux.tokens_per_expert.tolist() == [3 * 2] * 4  # each slot's dispatch weights sum to 1


def test_soft_moe_mask_hides_padding():
    torch.manual_seed(0)
    layer = SoftMoE(12, num_experts=2, slots_per_expert=3, expert_hidden_size=8)
    x = torch.randn(1, 6, 12)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    y, _ = layer(x, mask=mask)
    y_short, _ = layer(x[:, :4])
    x_changed = x.clone()
    x_changed[:, 4:] = 100.0
    assert torch.allclose(y[:, :4], y_short, atol=1e-5)  # padding changes no slot
    assert torch.allclose(layer(x_changed, mask=mask)[0], y, atol=1e-5)
    assert torch.all(y[:, 4:] == 0)
