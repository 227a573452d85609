"""Balancing losses against hand computations from their papers' formulas."""

from __future__ import annotations

import torch

from moekit.nn.losses import losses_from_sums, routing_sums
from moekit.nn.routing import Routing


def switch_aux_loss(r: Routing, num_experts: int) -> torch.Tensor:
    return losses_from_sums(routing_sums(r, num_experts, losses=["aux"]), num_experts)["aux"]


def sequence_aux_loss(r: Routing, num_experts: int, seq_len: int) -> torch.Tensor:
    return losses_from_sums(routing_sums(r, num_experts, seq_len, ["seq_aux"]), num_experts)["seq_aux"]


def router_z_loss(r: Routing) -> torch.Tensor:
    E = r.logits_TE.shape[1]
    return losses_from_sums(routing_sums(r, E, losses=["z"]), E)["z"]


def routing_from(choices: list[list[int]], probs: torch.Tensor, valid=None, logits=None) -> Routing:
    T, K = len(choices), len(choices[0])
    return Routing(
        token_idx_A=torch.arange(T).repeat_interleave(K)[valid.repeat_interleave(K)]
        if valid is not None
        else torch.arange(T).repeat_interleave(K),
        expert_idx_A=torch.tensor(choices).reshape(-1)[valid.repeat_interleave(K)]
        if valid is not None
        else torch.tensor(choices).reshape(-1),
        weight_A=torch.ones(T * K),
        choice_rank_A=torch.arange(K).repeat(T),
        logits_TE=logits if logits is not None else probs.log(),
        probs_TE=probs,
        num_tokens=T,
        valid_T=valid,
        top_k=K,
    )


def test_switch_aux_loss_by_hand():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.5, 0.25, 0.25], [0.2, 0.2, 0.6]])
    r = routing_from([[0], [1], [0], [2]], probs)
    f = torch.tensor([2 / 4, 1 / 4, 1 / 4])
    P = probs.mean(0)
    assert torch.allclose(switch_aux_loss(r, 3), 3 * (f * P).sum())


def test_switch_aux_loss_is_k_at_balance():
    probs = torch.full((4, 4), 0.25)
    r = routing_from([[0, 1], [2, 3], [1, 0], [3, 2]], probs)
    assert torch.allclose(switch_aux_loss(r, 4), torch.tensor(2.0))


def test_padding_is_masked_out_of_aux_loss():
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.99, 0.01]])
    valid = torch.tensor([True, True, False])
    masked = switch_aux_loss(routing_from([[0], [1], [0]], probs, valid), 2)
    unpadded = switch_aux_loss(routing_from([[0], [1]], probs[:2]), 2)
    assert torch.allclose(masked, unpadded)


def test_sequence_aux_loss_by_hand():
    probs = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.1, 0.1, 0.8], [0.3, 0.3, 0.4]])
    r = routing_from([[0], [1], [2], [2]], probs)  # two sequences of 2 tokens, k=1
    E, K, S = 3, 1, 2
    expected = []
    for seq, chosen in ((probs[:2], [0, 1]), (probs[2:], [2, 2])):
        f = torch.tensor([chosen.count(i) for i in range(E)], dtype=torch.float32) * E / (K * S)
        expected.append((f * seq.mean(0)).sum())
    assert torch.allclose(sequence_aux_loss(r, E, S), torch.stack(expected).mean())


def test_z_loss_by_hand():
    logits = torch.tensor([[1.0, 2.0], [0.0, -1.0]])
    r = routing_from([[1], [0]], logits.softmax(-1), logits=logits)
    expected = torch.logsumexp(logits, -1).square().mean()
    assert torch.allclose(router_z_loss(r), expected)


def test_sums_name_only_the_losses_asked_for_and_survive_empty_batches():
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
    r = routing_from([[0], [1]], probs, valid=torch.tensor([False, False]))
    sums = routing_sums(r, 2, 2, ["z"])
    assert set(sums) == {"n_valid", "routed_E", "entropy", "z"}
    losses = losses_from_sums(routing_sums(r, 2, 2), 2)  # every token masked: zeros, not NaN
    assert set(losses) == {"aux", "seq_aux", "z"} and all(float(v) == 0.0 for v in losses.values())


def test_layer_loss_is_weighted_sum():
    from tests.nn.helpers import make_layer

    layer = make_layer("softmax_topk", aux_loss_coef=0.5, z_loss_coef=0.25, seq_aux_loss_coef=2.0)
    _, aux = layer(torch.randn(2, 5, 12))
    expected = 0.5 * aux.losses["aux"] + 0.25 * aux.losses["z"] + 2.0 * aux.losses["seq_aux"]
    assert torch.allclose(aux.loss, expected)
    assert aux.loss.requires_grad
