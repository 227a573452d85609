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
from moekit.nn.config import MoEConfig, RouterType
from moekit.nn.routing import Routing


def routing_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32, or fp64 when the model runs in fp64 (gradient checks)."""
    return torch.promote_types(dtype, torch.float32)


class Router(nn.Module):
    """Base class: a linear gate whose logits are computed in fp32."""

    def __init__(self, config: MoEConfig):
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))
        self.bias = nn.Parameter(torch.zeros(config.num_experts)) if config.router_bias else None
        nn.init.normal_(self.weight, std=config.hidden_size**-0.5)

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        """Router logits [T, E] in fp32, outside any autocast region."""
        if self.training and self.config.router_jitter > 0:
            eps = self.config.router_jitter
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1.0 - eps, 1.0 + eps)
        dtype = routing_dtype(x_TD.dtype)
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            bias = None if self.bias is None else self.bias.to(dtype)
            return F.linear(x_TD.to(dtype), self.weight.to(dtype), bias)

    def forward(
        self, x_TD: torch.Tensor, valid_T: torch.Tensor | None = None, token_ids_T: torch.Tensor | None = None
    ) -> Routing:
        raise NotImplementedError


def _token_choice(
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


class SoftmaxTopKRouter(Router):
    """Softmax over all experts, keep the top k (Switch k=1, Mixtral k=2, OLMoE/Qwen k=8).

    With ``norm_topk_prob`` the k kept probabilities are renormalised to sum to one (Mixtral's
    softmax over the top-k logits is the same thing), then multiplied by ``routed_scaling_factor``
    (DeepSeek-V2's softmax gate; 1 in Mixtral, Qwen-MoE and OLMoE).
    """

    def forward(self, x_TD, valid_T=None, token_ids_T=None) -> Routing:
        logits_TE = self.logits(x_TD)
        probs_TE = logits_TE.softmax(dim=-1)
        topk_idx_TK, weight_TK = softmax_topk_select(probs_TE, self.config)
        return _token_choice(topk_idx_TK, weight_TK, logits_TE, probs_TE, valid_T)


class SigmoidTopKRouter(Router):
    """DeepSeek-V3 routing: sigmoid scores, aux-loss-free balancing bias, group-limited top-k.

    The per-expert bias ``e_score_correction_bias`` is added to the scores for *selection only*;
    combine weights come from the unbiased scores. :meth:`update_bias` nudges it from the observed
    load (DeepSeek-V3 tech report, sec. 2.1.2): b_i += gamma * sign(mean_load - load_i), i.e. an
    overloaded expert's bias goes down by gamma and an underloaded one's goes up.
    """

    def __init__(self, config: MoEConfig):
        super().__init__(config)
        self.register_buffer("e_score_correction_bias", torch.zeros(config.num_experts, dtype=torch.float32))
        # Load observed since the last update_bias(), summed over micro-batches.
        self.register_buffer("load_since_update", torch.zeros(config.num_experts), persistent=False)

    def forward(self, x_TD, valid_T=None, token_ids_T=None) -> Routing:
        cfg = self.config
        logits_TE = self.logits(x_TD)
        scores_TE = logits_TE.sigmoid()
        topk_idx_TK, weight_TK = sigmoid_topk_select(scores_TE, self.e_score_correction_bias, cfg)
        probs_TE = scores_TE / scores_TE.sum(dim=-1, keepdim=True)
        routing = _token_choice(topk_idx_TK, weight_TK, logits_TE, probs_TE, valid_T)
        if self.training:
            with torch.no_grad():
                self.load_since_update += torch.bincount(routing.expert_idx_A, minlength=cfg.num_experts).float()
        return routing

    @torch.no_grad()
    def update_bias(self, load_E: torch.Tensor | None = None) -> None:
        """Apply one aux-loss-free balancing step, then reset the accumulated load.

        Args:
            load_E: tokens per expert to balance; defaults to the load accumulated in training
                since the last call (already reduced over ranks by the caller when distributed).
        """
        load_E = self.load_since_update if load_E is None else load_E.float()
        if load_E.sum() > 0 and self.config.bias_update_rate > 0:
            self.e_score_correction_bias += self.config.bias_update_rate * torch.sign(load_E.mean() - load_E)
        self.load_since_update.zero_()


class ExpertChoiceRouter(Router):
    """Expert choice (Zhou et al. 2022): each expert takes its top-C tokens by softmax score.

    C = ceil(expert_choice_capacity * T_valid / E), capped at T_valid. A token may be taken by
    several experts or by none. Non-causal: a token's experts depend on the other tokens.
    """

    def forward(self, x_TD, valid_T=None, token_ids_T=None) -> Routing:
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

    def __init__(self, config: MoEConfig):
        super().__init__()
        self.config = config

    def expert_of(self, token_ids: torch.Tensor) -> torch.Tensor:
        # Knuth's multiplicative hash on 32 bits; ids < 2**31 keep the product inside int64.
        mixed = (token_ids.long() * 2654435761 + self.config.hash_seed * 40503) % (2**32)
        return (mixed >> 7) % self.config.num_experts

    def forward(self, x_TD, valid_T=None, token_ids_T=None) -> Routing:
        if token_ids_T is None:
            raise ShapeError("router='hash' needs token_ids (the input ids of the tokens) in forward()")
        if token_ids_T.shape[0] != x_TD.shape[0]:
            raise ShapeError(f"token_ids has {token_ids_T.shape[0]} tokens but x has {x_TD.shape[0]}")
        expert_TK = self.expert_of(token_ids_T).unsqueeze(1)
        weight_TK = torch.ones(expert_TK.shape, dtype=torch.float32, device=x_TD.device)
        return _token_choice(expert_TK, weight_TK, None, None, valid_T)


class DenseRouter(Router):
    """Classic soft mixture (Jacobs et al. 1991): every expert runs, weighted by the softmax."""

    def forward(self, x_TD, valid_T=None, token_ids_T=None) -> Routing:
        logits_TE = self.logits(x_TD)
        probs_TE = logits_TE.softmax(dim=-1)
        T, E = probs_TE.shape
        all_TE = torch.arange(E, device=x_TD.device).expand(T, E)
        return _token_choice(all_TE, probs_TE, logits_TE, probs_TE, valid_T)


ROUTERS: dict[RouterType, type[nn.Module]] = {
    RouterType.SOFTMAX_TOPK: SoftmaxTopKRouter,
    RouterType.SIGMOID_TOPK: SigmoidTopKRouter,
    RouterType.EXPERT_CHOICE: ExpertChoiceRouter,
    RouterType.HASH: HashRouter,
    RouterType.DENSE: DenseRouter,
}


def build_router(config: MoEConfig) -> nn.Module:
    """The router module that ``config.router`` names."""
    return ROUTERS[config.router](config)


def softmax_topk_select(probs_TE: torch.Tensor, cfg: MoEConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(expert ids [T, k], combine weights [T, k]) from softmax probabilities: the k largest, renormalised
    to sum to one when ``norm_topk_prob``, then times ``routed_scaling_factor``. Shared with the few-token path."""
    weight_TK, idx_TK = probs_TE.topk(cfg.top_k, dim=-1)
    if cfg.norm_topk_prob:
        weight_TK = weight_TK / weight_TK.sum(dim=-1, keepdim=True)
    if cfg.routed_scaling_factor != 1.0:
        weight_TK = weight_TK * cfg.routed_scaling_factor
    return idx_TK, weight_TK


def sigmoid_topk_select(
    scores_TE: torch.Tensor, bias_E: torch.Tensor, cfg: MoEConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3 selection: (expert ids [T, k], gate weights [T, k]) from sigmoid scores.

    The balancing bias steers only which experts are chosen; the weights come from the raw scores.
    """
    choice_TE = scores_TE.detach() + bias_E.to(scores_TE.dtype)
    if cfg.n_group > 1:
        T = choice_TE.shape[0]
        grouped_TGe = choice_TE.view(T, cfg.n_group, -1)
        # A group's score is the sum of its top-2 experts (DeepSeek-V3); top-1 for 1-expert groups.
        group_score_TG = grouped_TGe.topk(min(2, grouped_TGe.shape[-1]), dim=-1).values.sum(-1)
        keep_group_TG = torch.zeros_like(group_score_TG, dtype=torch.bool)
        keep_group_TG.scatter_(1, group_score_TG.topk(cfg.topk_group, dim=-1).indices, True)
        choice_TE = grouped_TGe.masked_fill(~keep_group_TG.unsqueeze(-1), float("-inf")).view(T, -1)
    idx_TK = choice_TE.topk(cfg.top_k, dim=-1).indices
    weight_TK = scores_TE.gather(1, idx_TK)
    if cfg.norm_topk_prob:
        weight_TK = weight_TK / (weight_TK.sum(dim=-1, keepdim=True) + 1e-20)
    return idx_TK, weight_TK * cfg.routed_scaling_factor
