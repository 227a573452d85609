"""Dispatch: assignments -> contiguous per-expert slices, with capacity and drop accounting.

Shape legend: T tokens, E experts, A assignments, N kept assignments (sorted by expert).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from moekit.nn.config import DropPolicy
from moekit.nn.routing import Routing


@dataclasses.dataclass(frozen=True)
class Dispatch:
    """Kept assignments sorted by expert; expert e owns rows [offsets[e], offsets[e] + counts[e])."""

    token_idx_N: torch.Tensor
    weight_N: torch.Tensor
    counts: tuple[int, ...]  # python ints: slice bounds must not need a device sync per expert
    tokens_per_expert_E: torch.Tensor
    dropped_assignments: torch.Tensor
    dropped_tokens: torch.Tensor


def expert_capacity(capacity_factor: float, num_valid_tokens: int, k: int, num_experts: int) -> int:
    """Slots per expert: ceil(capacity_factor * T * k / E) (GShard / Switch Transformer)."""
    return math.ceil(capacity_factor * num_valid_tokens * k / num_experts)


def dispatch(
    routing: Routing,
    num_experts: int,
    capacity_factor: float | None = None,
    drop_policy: DropPolicy = DropPolicy.POSITION,
) -> Dispatch:
    """Sort the router's assignments by expert and apply the capacity limit: with a ``capacity_factor`` (None:
    dropless) each expert keeps at most :func:`expert_capacity` assignments, by ``drop_policy`` (``position``:
    first choices before second choices, then earlier tokens; ``score``: the highest routing weights)."""
    expert_A = routing.expert_idx_A
    device = expert_A.device
    A = expert_A.numel()
    if capacity_factor is None:
        # Assignments are token-major, so a stable sort keeps token order inside each expert.
        order_A = torch.sort(expert_A, stable=True).indices
        counts_E = torch.bincount(expert_A, minlength=num_experts)
        zero = torch.zeros((), dtype=torch.long, device=device)
        return Dispatch(
            token_idx_N=routing.token_idx_A[order_A],
            weight_N=routing.weight_A[order_A],
            counts=tuple(counts_E.tolist()),
            tokens_per_expert_E=counts_E,
            dropped_assignments=zero,
            dropped_tokens=zero.clone(),
        )

    k = routing.top_k or 1
    capacity = expert_capacity(capacity_factor, routing.num_valid_tokens(), k, num_experts)
    if drop_policy == DropPolicy.POSITION:
        priority_A = routing.choice_rank_A * routing.num_tokens + routing.token_idx_A
    else:
        priority_A = -routing.weight_A.detach()
    # Lexicographic sort by (expert, priority): sort by priority, then stably by expert.
    by_priority_A = torch.sort(priority_A, stable=True).indices
    order_A = by_priority_A[torch.sort(expert_A[by_priority_A], stable=True).indices]
    routed_E = torch.bincount(expert_A, minlength=num_experts)
    starts_E = torch.cumsum(routed_E, 0) - routed_E
    sorted_expert_A = expert_A[order_A]
    rank_A = torch.arange(A, device=device) - starts_E[sorted_expert_A]
    keep_A = rank_A < capacity
    kept_order_N = order_A[keep_A]
    counts_E = routed_E.clamp(max=capacity)
    token_idx_N = routing.token_idx_A[kept_order_N]
    served_T = torch.zeros(routing.num_tokens, dtype=torch.bool, device=device)
    served_T[token_idx_N] = True
    routed_T = torch.zeros_like(served_T)
    routed_T[routing.token_idx_A] = True
    return Dispatch(
        token_idx_N=token_idx_N,
        weight_N=routing.weight_A[kept_order_N],
        counts=tuple(counts_E.tolist()),
        tokens_per_expert_E=counts_E,
        dropped_assignments=(A - keep_A.sum()).to(torch.long),
        dropped_tokens=(routed_T & ~served_T).sum(),
    )
