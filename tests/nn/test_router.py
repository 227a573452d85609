"""Routers against hand-written, loop-per-token versions of their papers' rules."""

from __future__ import annotations

import math

import torch

from tests.nn.helpers import make_layer


def test_softmax_topk_matches_manual():
    layer = make_layer("softmax_topk", top_k=3, norm_topk_prob=False)
    x = torch.randn(7, 12)
    r = layer.route(x)
    probs = (x @ layer.router.weight.t()).softmax(-1)
    for t in range(7):
        mine = r.expert_idx_A[r.token_idx_A == t].tolist()
        assert set(mine) == set(probs[t].topk(3).indices.tolist())
        assert torch.allclose(r.weight_A[r.token_idx_A == t], probs[t, mine], atol=1e-6)


def test_norm_topk_prob_renormalises():
    x = torch.randn(5, 12)
    r = make_layer("softmax_topk", top_k=2, norm_topk_prob=True).route(x)
    sums = torch.zeros(5).index_add_(0, r.token_idx_A, r.weight_A)
    assert torch.allclose(sums, torch.ones(5), atol=1e-6)


def test_softmax_weights_are_scaled_after_renormalising():
    x = torch.randn(5, 12)
    torch.manual_seed(0)
    plain = make_layer("softmax_topk", top_k=2, norm_topk_prob=True).route(x)
    torch.manual_seed(0)
    scaled = make_layer("softmax_topk", top_k=2, norm_topk_prob=True, routed_scaling_factor=2.0).route(x)
    assert torch.equal(plain.expert_idx_A, scaled.expert_idx_A)
    sums = torch.zeros(5).index_add_(0, scaled.token_idx_A, scaled.weight_A)
    assert torch.allclose(sums, torch.full((5,), 2.0), atol=1e-6)


def test_sigmoid_group_limited_matches_manual():
    layer = make_layer("sigmoid_topk", num_experts=8, top_k=3, n_group=4, topk_group=2, routed_scaling_factor=2.5)
    with torch.no_grad():
        layer.router.e_score_correction_bias.copy_(torch.linspace(-0.3, 0.3, 8))
    x = torch.randn(9, 12)
    r = layer.route(x)
    scores = (x @ layer.router.weight.t()).sigmoid()
    biased = scores + layer.router.e_score_correction_bias
    for t in range(9):
        groups = [sorted(biased[t, 2 * g : 2 * g + 2].tolist(), reverse=True) for g in range(4)]
        group_scores = [sum(g[:2]) for g in groups]
        best_groups = sorted(range(4), key=lambda g: -group_scores[g])[:2]
        allowed = [e for e in range(8) if e // 2 in best_groups]
        expected = sorted(allowed, key=lambda e: -biased[t, e].item())[:3]
        chosen = r.expert_idx_A[r.token_idx_A == t].tolist()
        assert sorted(chosen) == sorted(expected)
        raw = scores[t, chosen]
        expected_w = raw / raw.sum() * 2.5  # weights use the unbiased scores
        assert torch.allclose(r.weight_A[r.token_idx_A == t], expected_w, atol=1e-6)


def test_bias_update_moves_load_towards_balance():
    layer = make_layer("sigmoid_topk", n_group=1, topk_group=1, bias_update_rate=0.05)
    layer.train()
    x = torch.randn(64, 12)
    x[:, 0] = 1.0
    with torch.no_grad():
        layer.router.weight[:, 0] = 0.0
        layer.router.weight[0, 0] = 3.0  # every token prefers expert 0
    before = layer(x)[1].tokens_per_expert.clone()
    layer.update_bias()
    bias = layer.router.e_score_correction_bias
    assert bias[0] < 0, "the overloaded expert's bias must go down"
    assert torch.all(bias[before < before.float().mean()] > 0)
    assert layer.router.load_since_update.sum() == 0
    for _ in range(40):
        layer(x)
        layer.update_bias()
    after = layer(x)[1].tokens_per_expert
    assert after.max() < before.max()


def test_expert_choice_picks_top_tokens_per_expert():
    layer = make_layer("expert_choice", expert_choice_capacity=1.5)
    x = torch.randn(10, 12)
    r = layer.route(x)
    probs = (x @ layer.router.weight.t()).softmax(-1)
    capacity = math.ceil(1.5 * 10 / 6)
    for e in range(6):
        mine = r.token_idx_A[r.expert_idx_A == e]
        assert len(mine) == capacity
        assert set(mine.tolist()) == set(probs[:, e].topk(capacity).indices.tolist())


def test_expert_choice_never_picks_masked_tokens():
    layer = make_layer("expert_choice", expert_choice_capacity=4.0)
    x = torch.randn(2, 6, 12)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]])
    r = layer.route(x.reshape(-1, 12), mask.reshape(-1).bool())
    assert mask.reshape(-1)[r.token_idx_A].all()


def test_hash_routing_is_fixed_and_spread():
    layer = make_layer("hash", num_experts=8)
    ids = torch.arange(4000)
    experts = layer.router.expert_of(ids)
    assert torch.equal(experts, layer.router.expert_of(ids.clone()))
    counts = torch.bincount(experts, minlength=8).float()
    assert counts.min() > 0.8 * counts.mean()
    x = torch.randn(4000, 12)
    r = layer.route(x, token_ids_T=ids)
    assert torch.equal(r.expert_idx_A, experts)
    assert torch.all(r.weight_A == 1)


def test_dense_router_uses_every_expert():
    layer = make_layer("dense")
    r = layer.route(torch.randn(4, 12))
    assert r.num_assignments == 4 * 6
    sums = torch.zeros(4).index_add_(0, r.token_idx_A, r.weight_A)
    assert torch.allclose(sums, torch.ones(4), atol=1e-6)


def test_jitter_only_in_training():
    layer = make_layer("softmax_topk", router_jitter=0.5)
    x = torch.randn(16, 12)
    layer.eval()
    assert torch.equal(layer.route(x).logits_TE, layer.route(x).logits_TE)
    layer.train()
    assert not torch.equal(layer.route(x).logits_TE, layer.route(x).logits_TE)
