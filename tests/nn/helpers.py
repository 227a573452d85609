"""Builders shared by the nn tests."""

from __future__ import annotations

import torch

from moekit.nn import MoE

ROUTERS = ["softmax_topk", "sigmoid_topk", "expert_choice", "hash", "dense", "expert_threshold"]
TOKEN_CHOICE = ["softmax_topk", "sigmoid_topk", "hash"]


def make_layer(router="softmax_topk", *, dtype=torch.float32, seed=0, **overrides) -> MoE:
    """A small MoE layer with all balancing losses on and a few non-default options."""
    fields = dict(
        hidden_size=12,
        num_experts=6,
        top_k=2,
        expert_hidden_size=10,
        router=router,
        aux_loss_coef=0.01,
        z_loss_coef=0.001,
        seq_aux_loss_coef=0.001,
    )
    if router == "sigmoid_topk":
        fields.update(n_group=3, topk_group=2, routed_scaling_factor=2.5)
    fields.update(overrides)
    torch.manual_seed(seed)
    layer = MoE(**fields).to(dtype)
    if router == "expert_threshold":  # thresholds from one training batch, then frozen (eval) so that the fast
        layer(torch.randn(64, fields["hidden_size"], dtype=dtype))  # path and the reference route alike
        layer.eval()
    return layer


def grads_of(layer: MoE, x: torch.Tensor, forward, upstream: torch.Tensor):
    """Output and gradients (input and every parameter) of sum(forward(x) * upstream)."""
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    y = forward(x)
    (y * upstream).sum().backward()
    grads = {"x": x.grad.clone()}
    for name, p in layer.named_parameters():
        grads[name] = torch.zeros_like(p) if p.grad is None else p.grad.clone()
    return y.detach(), grads
