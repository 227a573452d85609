"""Expert-threshold routing (Sun et al. 2026, arXiv 2603.11535): a token goes to every expert whose score passes
that expert's threshold, an exponential moving average of the score that expert choice would have cut at.

Causal (a token's experts depend on that token alone, in training and in generation), no auxiliary loss, and a
variable number of experts per token whose average tends to ``top_k``.

Choices where the paper's text left room (ours, documented):
* scores are the softmax over experts (expert choice's scores), and a chosen expert's combine weight is its score
  times ``routed_scaling_factor`` (expert choice's weights, no renormalisation);
* the cutoff an expert's threshold tracks is its C-th largest score over the valid tokens of the global batch,
  C = round(top_k * tokens / E): the expert-choice capacity that makes top_k experts per token on average;
* the threshold moves after each training batch, by ``threshold_decay`` (new = decay * old + (1 - decay) * cutoff);
* before the first training batch has set the thresholds, tokens take their top_k experts (a data-driven start:
  that batch's cutoffs become the thresholds).

Shape legend: T tokens, E experts, C the expert-choice capacity, P processes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from moekit.nn.config import MoEConfig
from moekit.nn.router import Router
from moekit.nn.routing import Routing


class ExpertThresholdRouter(Router):
    """Token -> every expert whose softmax score reaches the expert's running threshold."""

    threshold_E: torch.Tensor  # buffers, registered in __init__
    calibrated: torch.Tensor

    def __init__(self, config: MoEConfig, hidden_size: int):
        super().__init__(config, hidden_size)
        self.register_buffer("threshold_E", torch.zeros(config.num_experts, dtype=torch.float32))
        self.register_buffer("calibrated", torch.zeros((), dtype=torch.bool))

    def forward(
        self, x_TD: torch.Tensor, valid_T: torch.Tensor | None = None, token_ids_T: torch.Tensor | None = None
    ) -> Routing:
        logits_TE = self.logits(x_TD)
        probs_TE = logits_TE.detach().softmax(dim=-1)
        if bool(self.calibrated):
            chosen_TE = probs_TE >= self.threshold_E.to(probs_TE.dtype)
        else:  # no thresholds yet: top-k, whose cutoffs observe() turns into the first thresholds
            chosen_TE = torch.zeros_like(probs_TE, dtype=torch.bool)
            chosen_TE.scatter_(1, probs_TE.topk(self.config.top_k, dim=-1).indices, True)
        return self.assign(logits_TE, chosen_TE, valid_T)

    def assign(self, logits_TE: torch.Tensor, chosen_TE: torch.Tensor, valid_T: torch.Tensor | None) -> Routing:
        """The Routing that sends token t to expert e where ``chosen_TE`` (its passed thresholds, or a replayed
        record), weighted by the softmax score times ``routed_scaling_factor``; padding goes nowhere."""
        probs_TE = logits_TE.softmax(dim=-1)
        if valid_T is not None:
            chosen_TE = chosen_TE & valid_T.unsqueeze(1)
        token_idx_A, expert_idx_A = chosen_TE.nonzero(as_tuple=True)  # token-major, experts in id order
        # A token's rank among its own choices (0 for its first expert): the order a capacity policy would read.
        choice_rank_TE = chosen_TE.long().cumsum(dim=1) - 1
        return Routing(
            token_idx_A=token_idx_A,
            expert_idx_A=expert_idx_A,
            weight_A=probs_TE[token_idx_A, expert_idx_A] * self.config.routed_scaling_factor,
            choice_rank_A=choice_rank_TE[token_idx_A, expert_idx_A],
            logits_TE=logits_TE,
            probs_TE=probs_TE,
            num_tokens=probs_TE.shape[0],
            valid_T=valid_T,
        )

    @torch.no_grad()
    def observe(
        self, routing: Routing, num_valid: int, gather: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> None:
        """Move the thresholds toward this training batch's expert-choice cutoffs. ``num_valid``: the valid
        tokens of the global batch; ``gather`` stacks a same-shaped tensor from every process ([P, ...]),
        so the cutoff is the global batch's exactly (default: this process only)."""
        if num_valid <= 0 or routing.probs_TE is None:
            return
        E = self.config.num_experts
        capacity = min(num_valid, max(1, round(self.config.top_k * num_valid / E)))
        probs_TE = routing.probs_TE.detach().float()
        if routing.valid_T is not None:
            probs_TE = probs_TE[routing.valid_T]
        # This process's best C scores per expert, padded with -1 (below any score) when it has fewer tokens.
        local_CE = torch.full((capacity, E), -1.0, device=probs_TE.device)
        take = min(capacity, probs_TE.shape[0])
        local_CE[:take] = probs_TE.topk(take, dim=0).values
        everyone_CE = local_CE.unsqueeze(0) if gather is None else gather(local_CE)
        cutoff_E = everyone_CE.reshape(-1, E).topk(capacity, dim=0).values[-1]
        if bool(self.calibrated):
            decay = self.config.threshold_decay
            self.threshold_E.mul_(decay).add_((1.0 - decay) * cutoff_E.to(self.threshold_E.dtype))
        else:
            self.threshold_E.copy_(cutoff_E)
            self.calibrated.fill_(True)


def reference_threshold_choices(router: ExpertThresholdRouter, x_TD: torch.Tensor) -> list[list[int]]:
    """The experts each token takes, by a plain loop over tokens and experts (the slow reference)."""
    probs_TE = router.logits(x_TD).softmax(dim=-1)
    chosen = []
    for t in range(probs_TE.shape[0]):
        if bool(router.calibrated):
            row = [e for e in range(probs_TE.shape[1]) if probs_TE[t, e].item() >= router.threshold_E[e].item()]
        else:
            row = sorted(probs_TE[t].topk(router.config.top_k).indices.tolist())
        chosen.append(row)
    return chosen
