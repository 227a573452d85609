"""The MoE layer's expert executor seam: another executor changes where experts run, not the layer's math."""

from __future__ import annotations

import torch

from moekit.nn import ExpertExecutor
from tests.nn.helpers import grads_of, make_layer


class TwoIdenticalRanks(ExpertExecutor):
    """The row path of the base class, with statistics summed as if a second rank saw the same batch."""

    def reduce(self, sums):
        return {k: v * 2 for k, v in sums.items()}


def test_the_row_executor_equals_the_fused_local_one():
    layer = make_layer("softmax_topk", num_shared_experts=1, shared_expert_gate=True)
    x = torch.randn(3, 7, 12)
    upstream = torch.randn(3, 7, 12)
    y_fused, g_fused = grads_of(layer, x, lambda t: layer(t)[0], upstream)
    _, aux_fused = layer(x)
    layer.executor = ExpertExecutor()
    y_rows, g_rows = grads_of(layer, x, lambda t: layer(t)[0], upstream)
    _, aux_rows = layer(x)
    assert torch.allclose(y_rows, y_fused, atol=1e-5)
    for name in g_fused:
        assert torch.allclose(g_rows[name], g_fused[name], atol=1e-5), name
    assert torch.equal(aux_rows.loss, aux_fused.loss)
    assert torch.equal(aux_rows.tokens_per_expert, aux_fused.tokens_per_expert)


def test_statistics_and_losses_come_from_the_executors_sums():
    layer = make_layer("sigmoid_topk", capacity_factor=0.5).train()
    x = torch.randn(2, 9, 12)
    _, local = layer(x)
    load = layer.router.load_since_update.clone()
    layer.router.load_since_update.zero_()
    layer.executor = TwoIdenticalRanks()
    _, doubled = layer(x)
    # Counts are sums: twice the batch, twice the count; losses and entropy are ratios: unchanged.
    assert torch.equal(doubled.tokens_per_expert, 2 * local.tokens_per_expert)
    assert torch.equal(doubled.dropped_assignments, 2 * local.dropped_assignments) and local.dropped_assignments > 0
    assert torch.equal(layer.router.load_since_update, 2 * load)
    assert doubled.losses.keys() == local.losses.keys() == {"aux", "seq_aux", "z"}
    for name in local.losses:
        assert torch.allclose(doubled.losses[name], local.losses[name]), name
    assert torch.allclose(doubled.router_entropy, local.router_entropy)
