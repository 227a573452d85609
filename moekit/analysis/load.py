"""Tokens each expert processed per MoE layer over some batches: a quick load count without the
bookkeeping of :class:`~moekit.analysis.recorder.RoutingRecorder` (whose ``processed`` totals agree)."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from moekit.models import MoELM


@torch.no_grad()
def expert_load(model: MoELM, batches: Iterable[torch.Tensor]) -> tuple[list[int], torch.Tensor]:
    """(MoE layer indices, int64 loads [L_moe, E]): tokens each expert processed over ``batches`` of input ids
    [B, S], in eval mode (restored). Layers differ in E only after pruning; rows are then zero-padded."""
    layers = model.moe_layers()
    num_experts = max((moe.config.num_experts for _, moe in layers), default=0)
    load = torch.zeros(len(layers), num_experts, dtype=torch.long)
    was_training = model.training
    model.eval()
    for input_ids in batches:
        out = model(input_ids)
        for row, aux in enumerate(out.moe_aux):
            load[row, : aux.tokens_per_expert.numel()] += aux.tokens_per_expert.cpu()
    model.train(was_training)
    return [i for i, _ in layers], load
