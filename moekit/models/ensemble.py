"""EnsembleClassifier: classifiers trained from different seeds, predicting the mean of their probabilities.

A small labelled set (SST-2: 67k phrases) leaves a from-scratch classifier's accuracy at the mercy of its seed
(about +-1 point); averaging a few members' class probabilities removes most of that variance
(``benchmarks/results/classify.md``). Members share one config and one vocabulary, so they take the same
inputs; the weights are one state dict (``members.K.*``).
"""

from __future__ import annotations

import torch
from torch import nn

from moekit.models.encoder import EncoderClassifier, EncoderConfig, EncoderOutput


class EnsembleClassifier(nn.Module):
    """``forward(inputs, mask)`` -> EncoderOutput whose logits are log(mean of the members' softmax)."""

    def __init__(self, members: list[EncoderClassifier]):
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least two members, got {len(members)}")
        self.members = nn.ModuleList(members)
        self._members = list(members)  # the same modules, typed (ModuleList items are plain Modules to mypy)

    @property
    def config(self) -> EncoderConfig:
        return self._members[0].config

    def num_parameters(self) -> int:
        return sum(m.num_parameters() for m in self._members)

    def active_parameters(self) -> int:
        """Parameters one token passes through: every member runs on every input."""
        return sum(m.active_parameters() for m in self._members)

    def forward(self, inputs: torch.Tensor, mask: torch.Tensor | None = None, record_routing: bool = False):
        outputs = [m(inputs, mask, record_routing) for m in self.members]
        probs = torch.stack([o.logits.float().softmax(-1) for o in outputs]).mean(0)
        return EncoderOutput(
            logits=probs.log(),
            aux_loss=sum((o.aux_loss for o in outputs), torch.zeros(())),
            moe_aux=[aux for o in outputs for aux in o.moe_aux],
        )
