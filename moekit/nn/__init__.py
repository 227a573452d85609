"""moekit.nn: MoE layers, routers, experts and balancing losses."""

from moekit.nn.config import Activation, BalanceScope, DropPolicy, MoEConfig, RouterType
from moekit.nn.executor import ExpertExecutor
from moekit.nn.experts import Experts
from moekit.nn.mlp import MLP
from moekit.nn.moe import MoE, reference_moe, start_global_batch
from moekit.nn.routing import MoEAux, Routing
from moekit.nn.soft_moe import SoftMoE, reference_soft_moe

__all__ = [
    "Activation",
    "BalanceScope",
    "DropPolicy",
    "ExpertExecutor",
    "Experts",
    "MLP",
    "MoE",
    "MoEAux",
    "MoEConfig",
    "Routing",
    "RouterType",
    "SoftMoE",
    "reference_moe",
    "reference_soft_moe",
    "start_global_batch",
]
