"""Routers: hidden states -> Routing. All router math (logits, softmax/sigmoid, top-k, bias) is
fp32 even when the model runs in bf16: top-k on bf16 scores ties and flips experts.

Shape legend: T tokens, D hidden, E experts, K choices per token, G expert groups, C capacity.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moekit.errors import ShapeError
from moekit.nn.config import MoEConfig
from moekit.nn.routing import Routing


def routing_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32, or fp64 when the model runs in fp64 (gradient checks)."""
    return torch.promote_types(dtype, torch.float32)


class Router(nn.Module):
    """Base class: a linear gate whose logits are computed in fp32; ``forward(x_TD, valid_T, token_ids_T)``
    of a subclass returns the Routing."""

    def __init__(self, config: MoEConfig, hidden_size: int):
        super().__init__()
        self.config = config
        # One row per candidate: the FFN experts, then MoE++'s zero-computation experts (moekit.nn.zero_experts).
        self.weight = nn.Parameter(torch.empty(config.num_candidates, hidden_size))
        self.bias = nn.Parameter(torch.zeros(config.num_candidates)) if config.router_bias else None
        if not self.weight.is_meta:  # built to be given loaded tensors (an init op on meta costs ~1 s of imports)
            nn.init.normal_(self.weight, std=hidden_size**-0.5)

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        """Router logits [T, E] in fp32, outside any autocast region."""
        if self.training and self.config.router_jitter > 0:
            eps = self.config.router_jitter
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1.0 - eps, 1.0 + eps)
        dtype = routing_dtype(x_TD.dtype)
        bias = None if self.bias is None else self.bias.to(dtype)
        if not torch.is_autocast_enabled(x_TD.device.type):  # entering the context costs a decode step 3 us
            return F.linear(x_TD.to(dtype), self.weight.to(dtype), bias)
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            return F.linear(x_TD.to(dtype), self.weight.to(dtype), bias)


def token_choice(
    topk_idx_TK: torch.Tensor,
    weight_TK: torch.Tensor,
    logits_TE: torch.Tensor | None,
    probs_TE: torch.Tensor | None,
    valid_T: torch.Tensor | None,
) -> Routing:
    """Flatten per-token choices [T, K] into token-major assignments, dropping masked tokens."""
    T, K = topk_idx_TK.shape
    token_idx_A = torch.arange(T, device=topk_idx_TK.device).repeat_interleave(K)
    choice_rank_A = torch.arange(K, device=topk_idx_TK.device).repeat(T)
    expert_idx_A = topk_idx_TK.reshape(-1)
    weight_A = weight_TK.reshape(-1)
    if valid_T is not None:
        keep_A = valid_T.repeat_interleave(K)
        token_idx_A, expert_idx_A = token_idx_A[keep_A], expert_idx_A[keep_A]
        weight_A, choice_rank_A = weight_A[keep_A], choice_rank_A[keep_A]
    return Routing(
        token_idx_A=token_idx_A,
        expert_idx_A=expert_idx_A,
        weight_A=weight_A,
        choice_rank_A=choice_rank_A,
        logits_TE=logits_TE,
        probs_TE=probs_TE,
        num_tokens=T,
        valid_T=valid_T,
        top_k=K,
    )


class TopKRouter(Router):
    """Token choice: each token picks its top k experts from the scores that :meth:`choose` derives."""

    def choose(self, logits_TE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(expert ids [T, k], combine weights [T, k], normalised scores [T, E]); few_tokens calls it too."""
        raise NotImplementedError

    def gate_weights(self, logits_TE: torch.Tensor, idx_TK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(combine weights [T, k], normalised scores [T, E]) of given expert choices (router replay)."""
        raise NotImplementedError

    def forward(
        self, x_TD: torch.Tensor, valid_T: torch.Tensor | None = None, token_ids_T: torch.Tensor | None = None
    ) -> Routing:
        logits_TE = self.logits(x_TD)
        topk_idx_TK, weight_TK, probs_TE = self.choose(logits_TE)
        return token_choice(topk_idx_TK, weight_TK, logits_TE, probs_TE, valid_T)


class SoftmaxTopKRouter(TopKRouter):
    """Softmax over all experts, keep the top k (Switch k=1, Mixtral k=2, OLMoE/Qwen k=8).

    With ``norm_topk_prob`` the k kept probabilities are renormalised to sum to one (Mixtral's
    softmax over the top-k logits is the same thing), then multiplied by ``routed_scaling_factor``
    (DeepSeek-V2's softmax gate; 1 in Mixtral, Qwen-MoE and OLMoE).
    """

    def choose(self, logits_TE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        probs_TE = logits_TE.softmax(dim=-1)
        weight_TK, idx_TK = probs_TE.topk(self.config.top_k, dim=-1)
        return idx_TK, self._combine(weight_TK), probs_TE

    def gate_weights(self, logits_TE: torch.Tensor, idx_TK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(combine weights [T, k], scores [T, E]) of given expert choices, as :meth:`choose` weighs its own
        (router replay: the choices are fixed, the weights and their gradient come from the live logits)."""
        probs_TE = logits_TE.softmax(dim=-1)
        return self._combine(probs_TE.gather(1, idx_TK)), probs_TE

    def _combine(self, weight_TK: torch.Tensor) -> torch.Tensor:
        """The chosen experts' probabilities as combine weights (renormalised, scaled)."""
        cfg = self.config
        if cfg.norm_topk_prob:
            weight_TK = weight_TK / weight_TK.sum(dim=-1, keepdim=True)
        if cfg.routed_scaling_factor != 1.0:
            weight_TK = weight_TK * cfg.routed_scaling_factor
        return weight_TK


class SigmoidTopKRouter(TopKRouter):
    """DeepSeek-V3 routing: sigmoid scores, aux-loss-free balancing bias, group-limited top-k.

    The per-expert bias ``e_score_correction_bias`` is added to the scores for *selection only*;
    combine weights come from the unbiased scores. :meth:`update_bias` nudges it from the observed
    load (DeepSeek-V3 tech report, sec. 2.1.2): b_i += gamma * sign(mean_load - load_i), i.e. an
    overloaded expert's bias goes down by gamma and an underloaded one's goes up.
    """

    e_score_correction_bias: torch.Tensor  # buffers, registered in __init__
    load_since_update: torch.Tensor

    def __init__(self, config: MoEConfig, hidden_size: int):
        super().__init__(config, hidden_size)
        self.register_buffer("e_score_correction_bias", torch.zeros(config.num_candidates, dtype=torch.float32))
        # Load observed since the last update_bias(), summed over micro-batches by the MoE layer in training
        # (over all ranks under expert parallelism).
        self.register_buffer("load_since_update", torch.zeros(config.num_candidates), persistent=False)

    def choose(self, logits_TE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cfg = self.config
        scores_TE = logits_TE.sigmoid()
        choice_TE = scores_TE.detach() + self.e_score_correction_bias.to(scores_TE.dtype)
        if cfg.n_group > 1:
            T = choice_TE.shape[0]
            grouped_TGe = choice_TE.view(T, cfg.n_group, -1)
            # A group's score is the sum of its top-2 experts (DeepSeek-V3); top-1 for 1-expert groups.
            group_score_TG = grouped_TGe.topk(min(2, grouped_TGe.shape[-1]), dim=-1).values.sum(-1)
            keep_group_TG = torch.zeros_like(group_score_TG, dtype=torch.bool)
            keep_group_TG.scatter_(1, group_score_TG.topk(cfg.topk_group, dim=-1).indices, True)
            choice_TE = grouped_TGe.masked_fill(~keep_group_TG.unsqueeze(-1), float("-inf")).view(T, -1)
        # The balancing bias steers only which experts are chosen; the weights come from the raw scores.
        idx_TK = choice_TE.topk(cfg.top_k, dim=-1).indices
        return (idx_TK, *self._weigh(scores_TE, idx_TK))

    def gate_weights(self, logits_TE: torch.Tensor, idx_TK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(combine weights [T, k], scores [T, E]) of given expert choices, as :meth:`choose` weighs its own."""
        return self._weigh(logits_TE.sigmoid(), idx_TK)

    def _weigh(self, scores_TE: torch.Tensor, idx_TK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(combine weights of the chosen experts, from the raw scores; normalised scores [T, E])."""
        cfg = self.config
        weight_TK = scores_TE.gather(1, idx_TK)
        if cfg.norm_topk_prob:
            weight_TK = weight_TK / (weight_TK.sum(dim=-1, keepdim=True) + 1e-20)
        return weight_TK * cfg.routed_scaling_factor, scores_TE / scores_TE.sum(dim=-1, keepdim=True)

    @torch.no_grad()
    def update_bias(self, load_E: torch.Tensor | None = None) -> None:
        """Apply one aux-loss-free balancing step from the tokens per expert ``load_E`` (default: the load accumulated
        in training since the last call, reduced over ranks by the caller when distributed), then reset that load."""
        load_E = self.load_since_update if load_E is None else load_E.float()
        if load_E.sum() > 0 and self.config.bias_update_rate > 0:
            self.e_score_correction_bias += self.config.bias_update_rate * torch.sign(load_E.mean() - load_E)
        self.load_since_update.zero_()


class ExpertChoiceRouter(Router):
    """Expert choice (Zhou et al. 2022): each expert takes its top-C tokens by softmax score.

    C = ceil(expert_choice_capacity * T_valid / E), capped at T_valid. A token may be taken by
    several experts or by none. Non-causal: a token's experts depend on the other tokens.
    """

    def forward(
        self, x_TD: torch.Tensor, valid_T: torch.Tensor | None = None, token_ids_T: torch.Tensor | None = None
    ) -> Routing:
        E = self.config.num_experts
        logits_TE = self.logits(x_TD)
        probs_TE = logits_TE.softmax(dim=-1)
        T = probs_TE.shape[0]
        n_valid = T if valid_T is None else int(valid_T.sum())
        capacity = min(n_valid, math.ceil(self.config.expert_choice_capacity * n_valid / E))
        choose_ET = probs_TE.t()
        if valid_T is not None:
            choose_ET = choose_ET.masked_fill(~valid_T.unsqueeze(0), -1.0)
        weight_EC, token_idx_EC = choose_ET.topk(capacity, dim=-1)
        expert_idx_EC = torch.arange(E, device=x_TD.device).unsqueeze(1).expand(E, capacity)
        return Routing(
            token_idx_A=token_idx_EC.reshape(-1),
            expert_idx_A=expert_idx_EC.reshape(-1),
            weight_A=weight_EC.reshape(-1),
            choice_rank_A=torch.arange(capacity, device=x_TD.device).repeat(E),
            logits_TE=logits_TE,
            probs_TE=probs_TE,
            num_tokens=T,
            valid_T=valid_T,
        )


class HashRouter(nn.Module):
    """Hash layers (Roller et al. 2021): a fixed, balanced map token id -> expert, weight 1.

    The map is a seeded multiplicative hash, so it needs no vocabulary size and never changes.
    """

    def __init__(self, config: MoEConfig, hidden_size: int):
        super().__init__()
        self.config = config

    def expert_of(self, token_ids: torch.Tensor) -> torch.Tensor:
        # Knuth's multiplicative hash on 32 bits; ids < 2**31 keep the product inside int64.
        mixed = (token_ids.long() * 2654435761 + self.config.hash_seed * 40503) % (2**32)
        return (mixed >> 7) % self.config.num_experts

    def forward(
        self, x_TD: torch.Tensor, valid_T: torch.Tensor | None = None, token_ids_T: torch.Tensor | None = None
    ) -> Routing:
        if token_ids_T is None:
            raise ShapeError("router='hash' needs token_ids (the input ids of the tokens) in forward()")
        if token_ids_T.shape[0] != x_TD.shape[0]:
            raise ShapeError(f"token_ids has {token_ids_T.shape[0]} tokens but x has {x_TD.shape[0]}")
        expert_TK = self.expert_of(token_ids_T).unsqueeze(1)
        weight_TK = torch.ones(expert_TK.shape, dtype=torch.float32, device=x_TD.device)
        return token_choice(expert_TK, weight_TK, None, None, valid_T)


class DenseRouter(TopKRouter):
    """Classic soft mixture (Jacobs et al. 1991): every expert runs, weighted by the softmax."""

    def choose(self, logits_TE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        probs_TE = logits_TE.softmax(dim=-1)
        T, E = probs_TE.shape
        return torch.arange(E, device=logits_TE.device).expand(T, E), probs_TE, probs_TE

    def gate_weights(self, logits_TE: torch.Tensor, idx_TK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(combine weights [T, E], softmax [T, E]) of given choices (every expert, in the recorded order)."""
        probs_TE = logits_TE.softmax(dim=-1)
        return probs_TE.gather(1, idx_TK), probs_TE
