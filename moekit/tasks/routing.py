"""Which experts take which classes: top-1 expert of every token, counted by the example's label.

Built on :func:`moekit.analysis.recorder.capture_routing` (works for every router of ``moekit.nn.MoE``;
Soft MoE has no per-token expert and is left out).
"""

from __future__ import annotations

from pathlib import Path

import torch

from moekit.analysis.recorder import capture_routing, find_moe_layers, layer_routing
from moekit.models.ensemble import EnsembleClassifier


@torch.no_grad()
def routing_by_label(model, examples, num_labels: int, max_examples: int = 2000, batch_size: int = 256):
    """{MoE layer index: counts [num_labels, E]} of tokens whose top-1 expert is e, by their example's label.

    An ensemble reports its first member (each member learns its own division of labour).
    """
    if isinstance(model, EnsembleClassifier):
        model = model.members[0]
    layers = find_moe_layers(model)
    if not layers:
        return {}
    was_training = model.training
    model.eval()
    counts = {index: torch.zeros(num_labels, moe.config.num_experts, dtype=torch.long) for index, _, moe in layers}
    seen_examples = 0
    with capture_routing(model) as seen:
        for x, mask, y in examples.batches(batch_size):
            if seen_examples >= max_examples:
                break
            seen.clear()
            model(x, mask)
            seen_examples += len(y)
            for position, aux in seen:
                index, _, moe = layers[position]
                top1 = layer_routing(aux, moe.config.num_experts).top1_T.view(len(y), -1)  # [B, S]
                label = y[:, None].expand_as(top1)
                keep = (top1 >= 0) & (label >= 0)
                flat = label[keep] * moe.config.num_experts + top1[keep]
                counts[index] += torch.bincount(flat, minlength=counts[index].numel()).view_as(counts[index])
    model.train(was_training)
    return counts


def routing_table(counts: dict[int, torch.Tensor], names: list[str]) -> str:
    """Markdown: per MoE layer, each label's share (%) of tokens per expert, and its favourite expert."""
    lines = []
    for index, table in counts.items():
        E = table.shape[1]
        lines += [
            f"### layer {index}: share of each label's tokens per expert (%)",
            "",
            "| label | " + " | ".join(f"e{e}" for e in range(E)) + " | top expert |",
            "|---|" + "---:|" * E + "---|",
        ]
        for name, row in zip(names, table):
            share = row.float() / row.sum().clamp_min(1) * 100
            lines.append(f"| {name} | " + " | ".join(f"{s:.0f}" for s in share) + f" | e{int(row.argmax())} |")
        lines.append("")
    return "\n".join(lines)


def write_routing_report(model, examples, names: list[str], path: str | Path) -> Path | None:
    """Write the routing-by-label tables to ``path`` (None when the model has no sparse MoE layer)."""
    counts = routing_by_label(model, examples, len(names))
    if not counts:
        return None
    path = Path(path)
    path.write_text("# Routing by label\n\n" + routing_table(counts, names), encoding="utf-8")
    return path
