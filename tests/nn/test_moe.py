"""The fast MoE path equals the slow reference loop, in outputs and gradients, for every router."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moekit.nn import MLP, reference_moe
from tests.nn.helpers import ROUTERS, TOKEN_CHOICE, grads_of, make_layer

TOL = 1e-5


def assert_matches_reference(layer, x, mask=None, token_ids=None):
    torch.manual_seed(123)
    upstream = torch.randn(x.shape)
    y_fast, g_fast = grads_of(layer, x, lambda t: layer(t, mask=mask, token_ids=token_ids)[0], upstream)
    y_ref, g_ref = grads_of(layer, x, lambda t: reference_moe(layer, t, mask=mask, token_ids=token_ids), upstream)
    assert (y_fast - y_ref).abs().max() <= TOL
    assert g_fast.keys() == g_ref.keys()
    for name in g_fast:
        # Large gradients (sums over many tokens) carry fp32 rounding that grows with magnitude.
        scale = max(1.0, g_ref[name].abs().max().item())
        diff = (g_fast[name] - g_ref[name]).abs().max().item()
        assert diff <= TOL * scale, f"gradient of {name} differs by {diff} (scale {scale:.1f})"
    return g_fast


def token_ids_for(x):
    return torch.randint(0, 500, x.shape[:-1], generator=torch.Generator().manual_seed(7))


# capacity_factor applies to token-choice routers only (others reject it: see test_bad_input).
ROUTER_CAPACITY = [(r, None) for r in ROUTERS] + [(r, 0.75) for r in TOKEN_CHOICE]


@pytest.mark.parametrize(("router", "capacity_factor"), ROUTER_CAPACITY)
@pytest.mark.parametrize("shape", [(1, 12), (2, 9, 12), (33, 12)], ids=["one-token", "batch", "flat"])
def test_fast_path_equals_reference(router, capacity_factor, shape):
    layer = make_layer(router, capacity_factor=capacity_factor, num_shared_experts=1, shared_expert_gate=True)
    x = torch.randn(shape)
    grads = assert_matches_reference(layer, x, token_ids=token_ids_for(x))
    if router not in ("hash",):
        assert grads["router.weight"].abs().sum() > 0, "no gradient reached the router"


@pytest.mark.parametrize("router", TOKEN_CHOICE)
def test_experts_without_tokens(router):
    layer = make_layer(router, num_experts=16, top_k=1, n_group=1, topk_group=1)
    x = torch.randn(3, 12)
    _, aux = layer(x, token_ids=token_ids_for(x))
    assert (aux.tokens_per_expert == 0).sum() >= 13
    assert_matches_reference(layer, x, token_ids=token_ids_for(x))


@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_all_tokens_on_one_expert(capacity_factor):
    layer = make_layer("softmax_topk", top_k=1, capacity_factor=capacity_factor)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[3] = 1.0
    x = torch.rand(20, 12) + 0.1  # positive inputs: expert 3 has the largest logit for every token
    _, aux = layer(x)
    if capacity_factor is None:
        assert aux.tokens_per_expert.tolist() == [0, 0, 0, 20, 0, 0]
        assert aux.dropped_tokens.item() == 0
    else:
        capacity = 4  # ceil(1.0 * 20 tokens * 1 / 6 experts)
        assert aux.tokens_per_expert.tolist() == [0, 0, 0, capacity, 0, 0]
        assert aux.dropped_assignments.item() == 20 - capacity
        assert aux.dropped_tokens.item() == 20 - capacity
    assert_matches_reference(layer, x)


@pytest.mark.parametrize("policy", ["position", "score"])
def test_capacity_drop_priority(policy):
    layer = make_layer("softmax_topk", top_k=1, capacity_factor=1.0, drop_policy=policy, norm_topk_prob=False)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0, 0] = 1.0
    x = torch.zeros(12, 12)
    x[:, 0] = torch.linspace(0.1, 1.2, 12)  # later tokens have larger scores for expert 0
    y, aux = layer(x)
    kept = (y.abs().sum(-1) > 0).nonzero().flatten().tolist()
    assert len(kept) == 2 == aux.tokens_per_expert[0].item()
    assert kept == ([0, 1] if policy == "position" else [10, 11])


def test_masked_tokens_are_not_routed():
    layer = make_layer("softmax_topk", num_shared_experts=0)
    x = torch.randn(2, 5, 12)
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1]])
    y, aux = layer(x, mask=mask)
    assert torch.all(y[mask == 0] == 0)
    assert aux.tokens_per_expert.sum().item() == mask.sum().item() * layer.config.top_k
    assert_matches_reference(layer, x, mask=mask)


def test_single_expert_equals_dense_mlp():
    layer = make_layer("softmax_topk", num_experts=1, top_k=1, n_group=1)
    mlp = MLP(12, 10, "swiglu")
    with torch.no_grad():
        gate, up = layer.experts.w_in[0].chunk(2, dim=-1)
        mlp.gate_proj.weight.copy_(gate.t())
        mlp.up_proj.weight.copy_(up.t())
        mlp.down_proj.weight.copy_(layer.experts.w_out[0].t())
    x = torch.randn(4, 7, 12)
    assert (layer(x)[0] - mlp(x)).abs().max() <= TOL


@pytest.mark.parametrize("router", ["softmax_topk", "sigmoid_topk", "dense"])
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_identical_experts_equal_one_mlp(router, activation):
    layer = make_layer(router, activation=activation, norm_topk_prob=True, routed_scaling_factor=1.0)
    with torch.no_grad():
        layer.experts.w_in.copy_(layer.experts.w_in[:1].expand_as(layer.experts.w_in))
        layer.experts.w_out.copy_(layer.experts.w_out[:1].expand_as(layer.experts.w_out))
    x = torch.randn(3, 5, 12)
    single = layer.experts.expert_forward(0, x.reshape(-1, 12)).view_as(x)
    assert (layer(x)[0] - single).abs().max() <= TOL


def test_gradients_reach_router_float64_finite_differences():
    layer = make_layer("softmax_topk", dtype=torch.float64, num_shared_experts=1)
    x = torch.randn(2, 4, 12, dtype=torch.float64)

    def output(router_weight):
        return torch.func.functional_call(layer, {"router.weight": router_weight}, (x,))[0]

    w = layer.router.weight.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(output, (w,), eps=1e-6, atol=1e-5)


@settings(max_examples=40, deadline=None)
@given(
    router=st.sampled_from(ROUTERS),
    tokens=st.integers(1, 24),
    experts=st.integers(1, 8),
    k=st.integers(1, 4),
    capacity=st.sampled_from([None, 0.5, 1.0, 2.0]),
    shared=st.integers(0, 2),
    activation=st.sampled_from(["swiglu", "gelu"]),
    seed=st.integers(0, 10_000),
)
def test_property_fast_equals_reference(router, tokens, experts, k, capacity, shared, activation, seed):
    k = min(k, experts)
    if router in ("expert_choice", "dense", "expert_threshold"):
        capacity = None
    layer = make_layer(
        router,
        seed=seed,
        num_experts=experts,
        top_k=k,
        n_group=1,
        topk_group=1,
        capacity_factor=capacity,
        num_shared_experts=shared,
        activation=activation,
        hidden_size=8,
        expert_hidden_size=6,
    )
    x = torch.randn(tokens, 8, generator=torch.Generator().manual_seed(seed))
    assert_matches_reference(layer, x, token_ids=token_ids_for(x))


def test_bf16_runs_with_fp32_routing():
    layer = make_layer("softmax_topk").to(torch.bfloat16)
    x = torch.randn(2, 6, 12, dtype=torch.bfloat16)
    y, aux = layer(x, record_routing=True)
    assert y.dtype == torch.bfloat16
    assert aux.routing.logits_TE.dtype == torch.float32
    assert aux.loss.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer32 = make_layer("softmax_topk")
        _, aux32 = layer32(torch.randn(2, 6, 12), record_routing=True)
    assert aux32.routing.logits_TE.dtype == torch.float32
