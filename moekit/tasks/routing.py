"""Which experts take which classes: top-1 expert of every token, counted by the example's label.

Built on :class:`moekit.analysis.recorder.RoutingRecorder` (works for every router of ``moekit.nn.MoE``;
Soft MoE has no per-token expert and is left out).
"""

from __future__ import annotations

from pathlib import Path

import torch

from moekit.analysis.recorder import RoutingRecorder, find_moe_layers
from moekit.models.ensemble import EnsembleClassifier


@torch.no_grad()
def routing_by_label(model, examples, num_labels: int, max_examples: int = 2000, batch_size: int = 256):
    """{MoE layer index: counts [num_labels, E]} of tokens whose top-1 expert is e, by their example's label.

    An ensemble reports its first member (each member learns its own division of labour).
    """
    if isinstance(model, EnsembleClassifier):
        model = model.members[0]
    if not find_moe_layers(model):
        return {}
    recorder = RoutingRecorder(model, label_names=[str(n) for n in range(num_labels)])
    was_training = model.training
    model.eval()
    seen_examples = 0
    for x, mask, y in examples.batches(batch_size):
        if seen_examples >= max_examples:
            break
        recorder.update(x, y, mask=mask)  # one label per example: every token of it
        seen_examples += len(y)
    model.train(was_training)
    return {agg.layer: agg.label_top1 for agg in recorder.layers}


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
