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
    """Who goes where, with what weight.

    Attributes:
        token_idx_A: token of each assignment (long).
        expert_idx_A: expert of each assignment (long).
        weight_A: combine weight of each assignment (fp32).
        choice_rank_A: 0 for a token's first choice, 1 for its second... (long); orders
            capacity drops under the ``position`` policy.
        logits_TE: router logits in fp32 (None for hash routing, which has no router).
        probs_TE: normalised router scores in fp32 (softmax, or sigmoid scores divided by
            their sum); what the balancing losses and entropy read. None for hash routing.
        num_tokens: T, all tokens including masked ones.
        valid_T: bool mask of the tokens that were routed (None = all).
        top_k: K for token-choice routers (assignments per token), else None.
    """

    token_idx_A: torch.Tensor
    expert_idx_A: torch.Tensor
    weight_A: torch.Tensor
    choice_rank_A: torch.Tensor
    logits_TE: torch.Tensor | None
    probs_TE: torch.Tensor | None
    num_tokens: int
    valid_T: torch.Tensor | None = None
    top_k: int | None = None

    @property
    def num_assignments(self) -> int:
        return int(self.token_idx_A.numel())

    def num_valid_tokens(self) -> int:
        return self.num_tokens if self.valid_T is None else int(self.valid_T.sum())


@dataclasses.dataclass
class MoEAux:
    """What one MoE layer hands back besides its output.

    Attributes:
        loss: weighted sum of the enabled balancing losses (fp32 scalar; add it to the task loss).
        losses: the unweighted loss terms by name (``aux``, ``seq_aux``, ``z``).
        tokens_per_expert: assignments each expert processed, after capacity drops [E] (long).
        dropped_assignments: assignments dropped by capacity (long scalar).
        dropped_tokens: tokens that lost every assignment and pass through the residual only.
        router_entropy: mean entropy of the router distribution over valid tokens (nats).
        routing: the full Routing when the layer was asked to record it, else None.
    """

    loss: torch.Tensor
    losses: dict[str, torch.Tensor]
    tokens_per_expert: torch.Tensor
    dropped_assignments: torch.Tensor
    dropped_tokens: torch.Tensor
    router_entropy: torch.Tensor
    routing: Routing | None = None
