"""Tokens each expert processed per MoE layer over some batches: a quick load count without the
bookkeeping of :class:`~moekit.analysis.recorder.RoutingRecorder` (whose ``processed`` totals agree)."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from moekit.models import MoELM


@torch.no_grad()
def expert_load(model: MoELM, batches: Iterable[torch.Tensor]) -> tuple[list[int], torch.Tensor]:
    """Tokens each expert processed, per MoE layer.

    Args:
        model: the model (put in eval mode here; restored afterwards).
        batches: input-id tensors [B, S].

    Returns:
        (MoE layer indices, loads [L_moe, E] as int64 counts). Layers may differ in E only if the
        model was pruned; then rows are padded with zeros to the largest E.
    """
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
