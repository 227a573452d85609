"""Routing: the explicit result every router returns (no module globals).

Any router's decision is a list of assignments ``(token, expert, weight)``; the dispatcher sees
only these, so a new router never touches the fast path.

Shape legend: T tokens, E experts, K choices per token, A assignments.
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class Routing:
    """Who goes where, with what weight: the assignments (token, expert, weight) of a router's decision."""

    token_idx_A: torch.Tensor  # long
    expert_idx_A: torch.Tensor  # long
    weight_A: torch.Tensor  # combine weight, fp32
    choice_rank_A: torch.Tensor  # 0 for a token's first choice, 1 for its second... (the position drop policy's order)
    logits_TE: torch.Tensor | None  # router logits, fp32; None for hash routing, which has no router
    # Normalised router scores, fp32 (softmax, or sigmoid scores divided by their sum): what the balancing losses
    # and the entropy read. None for hash routing.
    probs_TE: torch.Tensor | None
    num_tokens: int  # T, masked tokens included
    valid_T: torch.Tensor | None = None  # bool mask of the tokens that were routed (None = all)
    top_k: int | None = None  # K, assignments per token, for token-choice routers

    @property
    def num_assignments(self) -> int:
        return int(self.token_idx_A.numel())

    def num_valid_tokens(self) -> int:
        return self.num_tokens if self.valid_T is None else int(self.valid_T.sum())


@dataclasses.dataclass
class MoEAux:
    """What one MoE layer hands back besides its output."""

    loss: torch.Tensor  # weighted sum of the enabled balancing losses (fp32 scalar): add it to the task loss
    losses: dict[str, torch.Tensor]  # the unweighted loss terms by name (aux, seq_aux, z)
    tokens_per_expert: torch.Tensor  # [E] assignments each expert processed, after capacity drops (long)
    dropped_assignments: torch.Tensor  # dropped by capacity (long scalar)
    dropped_tokens: torch.Tensor  # tokens that lost every assignment: only the residual carries them
    router_entropy: torch.Tensor  # mean entropy of the router distribution over valid tokens (nats)
    routing: Routing | None = None  # the full Routing when the layer was asked to record it
    # MoE++ (moekit.nn.zero_experts): assignments per zero, copy and constant expert [Z+C+K] (long), and the
    # tokens whose every choice was one of them (skipped the FFN); None for a layer without them.
    zero_computation_load: torch.Tensor | None = None
    ffn_skipped_tokens: torch.Tensor | None = None
    gate_logits: torch.Tensor | None = None  # router logits [T, N]: what the next layer's gating residual reads
