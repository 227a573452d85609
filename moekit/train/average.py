"""An exponential moving average of a model's weights, which the training loop evaluates and saves."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from moekit.errors import CheckpointError


class WeightAverage:
    """An exponential moving average of a model's trainable parameters (Polyak & Juditsky 1992).

    The decay ramps up as ``min(decay, (1 + t) / (10 + t))`` so that the first steps' random weights fade
    quickly. ``applied()`` swaps the average into the model for a while (evaluation, saving).
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        self.params: list[torch.Tensor] = [p for _, p in self.named]
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Fold in the weights after optimizer step ``step`` (counted from 0): one fused op per step."""
        decay = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self.shadow, self.params, 1.0 - decay)

    @torch.no_grad()
    def swap(self) -> None:
        for p, avg in zip(self.params, self.shadow):
            held = p.clone()
            p.copy_(avg)
            avg.copy_(held)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        self.swap()
        try:
            yield
        finally:
            self.swap()

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: avg for (name, _), avg in zip(self.named, self.shadow)}

    @torch.no_grad()
    def load(self, tensors: dict[str, torch.Tensor], source: Path) -> None:
        for name, avg in zip([name for name, _ in self.named], self.shadow):
            if name not in tensors or tensors[name].shape != avg.shape:
                raise CheckpointError(f"{source}: the averaged weights do not match the model's parameter {name}")
            avg.copy_(tensors[name])
