"""Training-time router health: warn once, clearly, when an MoE layer collapses.

A layer is *collapsed* at an evaluation when one expert receives more than ``max_token_share`` of
the tokens (and at least ``min_ratio`` times its fair share, so that top-k with few experts, where
half the tokens *is* the fair share, does not count), or when some experts are dead (load below
``dead_fraction`` of the mean). After ``patience`` consecutive collapsed evaluations the monitor
logs one warning naming the layer, what it saw and the usual remedies; it never warns twice for
the same layer.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch

log = logging.getLogger(__name__)

REMEDIES = (
    "raise the balancing loss (model.moe.aux_loss_coef, e.g. x10)",
    "or switch to router=sigmoid_topk with aux-loss-free bias updates (bias_update=true)",
    "lower the learning rate",
    "add the router z-loss (model.moe.z_loss_coef=1e-3)",
)


def _as_list(load) -> list[float]:
    if isinstance(load, torch.Tensor):
        return [float(v) for v in load.detach().cpu().reshape(-1).tolist()]
    return [float(v) for v in load]


class CollapseMonitor:
    """Watches per-layer expert loads at each evaluation and warns once per collapsed layer (when a layer counts
    as collapsed: the module docstring); the warning goes to ``logger`` (default: this module's logger)."""

    def __init__(
        self,
        patience: int = 3,
        max_token_share: float = 0.5,
        min_ratio: float = 2.0,
        dead_fraction: float = 0.01,
        logger: logging.Logger | None = None,
    ):
        if patience < 1:
            raise ValueError(f"patience={patience} must be >= 1")
        self.patience = patience
        self.max_token_share = max_token_share
        self.min_ratio = min_ratio
        self.dead_fraction = dead_fraction
        self.log = logger or log
        self.streak: dict[int, int] = {}
        self.warned: set[int] = set()
        self.messages: list[str] = []

    def diagnose(self, load, top_k: int = 1) -> str | None:
        """What is wrong with one layer's load vector [E], or None if it is healthy."""
        values = _as_list(load)
        total = sum(values)
        if not values or total <= 0:
            return None
        E = len(values)
        mean = total / E
        tokens = total / max(top_k, 1)
        problems = []
        top = max(range(E), key=lambda e: values[e])
        share = values[top] / tokens
        if share > self.max_token_share and values[top] >= self.min_ratio * mean:
            problems.append(f"expert {top} takes {share:.0%} of the tokens ({values[top] / mean:.1f}x its fair share)")
        dead = [e for e in range(E) if values[e] < self.dead_fraction * mean]
        if dead:
            names = ", ".join(map(str, dead))
            problems.append(f"expert{'s' if len(dead) > 1 else ''} {names} {'are' if len(dead) > 1 else 'is'} dead")
        return "; ".join(problems) if problems else None

    def update(
        self,
        loads: Sequence | Mapping[int, object],
        top_k: int | Sequence[int] = 1,
        layers: Sequence[int] | None = None,
        step: int | None = None,
    ) -> str | None:
        """Feed one evaluation's loads: a load vector [E] (tensor or list) per MoE layer, named by ``layers``
        (default 0, 1, ...), or a dict layer -> load. ``top_k`` (one for all layers or one per layer) turns loads
        into token shares; ``step`` goes into the message. Returns the warning text if this call warned."""
        if isinstance(loads, Mapping):
            layers, loads = list(loads.keys()), list(loads.values())
        layers = list(layers) if layers is not None else list(range(len(loads)))
        ks = [top_k] * len(loads) if isinstance(top_k, int) else list(top_k)
        fresh = []
        for layer, load, k in zip(layers, loads, ks):
            problem = self.diagnose(load, k)
            self.streak[layer] = self.streak.get(layer, 0) + 1 if problem else 0
            if problem and self.streak[layer] >= self.patience and layer not in self.warned:
                self.warned.add(layer)
                fresh.append(f"layer {layer}: {problem}")
        if not fresh:
            return None
        when = f" at step {step}" if step is not None else ""
        message = (
            f"MoE routing collapse{when} (for {self.patience} evaluations in a row) in "
            + "; ".join(fresh)
            + ". Remedies: "
            + "; ".join(REMEDIES)
            + "."
        )
        self.log.warning(message)
        self.messages.append(message)
        return message
