"""Router name -> router class: :func:`build_router` makes the router a :class:`MoEConfig` names."""

from __future__ import annotations

from torch import nn

from moekit.nn.config import MoEConfig, RouterType
from moekit.nn.relu_router import ReLURouter
from moekit.nn.router import DenseRouter, ExpertChoiceRouter, HashRouter, SigmoidTopKRouter, SoftmaxTopKRouter
from moekit.nn.threshold_router import ExpertThresholdRouter

ROUTERS: dict[RouterType, type[nn.Module]] = {
    RouterType.SOFTMAX_TOPK: SoftmaxTopKRouter,
    RouterType.SIGMOID_TOPK: SigmoidTopKRouter,
    RouterType.EXPERT_CHOICE: ExpertChoiceRouter,
    RouterType.HASH: HashRouter,
    RouterType.DENSE: DenseRouter,
    RouterType.EXPERT_THRESHOLD: ExpertThresholdRouter,
    RouterType.RELU: ReLURouter,
}


def build_router(config: MoEConfig, hidden_size: int) -> nn.Module:
    """The router module that ``config.router`` names, for tokens of ``hidden_size``."""
    return ROUTERS[config.router](config, hidden_size)
