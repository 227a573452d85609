"""MoE++'s zero-computation experts and gating residual (Jin et al., ICLR 2025, arXiv 2410.07348).

The router scores ``num_experts`` FFN experts and, after them, ``zero_experts`` zero experts (output 0: the token
skips that choice), ``copy_experts`` copy experts (output x) and ``constant_experts`` constant experts
(output a1 * x + a2 * v_j, [a1, a2] = softmax(W_c^j x), v_j learned). Top-k picks among all of them; only the
FFN assignments go through dispatch and the expert executor, the others are added here with a few element-wise
ops. Candidate ids: FFN ``[0, E)``, zero ``[E, E+Z)``, copy ``[E+Z, E+Z+C)``, constant ``[E+Z+C, N)``.

The gating residual adds a learned projection of the previous MoE layer's router logits to this layer's:
G_j(x) = W_j x + W_g^j G_{j-1}(x); the first MoE layer has none.

Shape legend: T tokens, D hidden, N candidates (FFN + zero-computation experts), A assignments.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from moekit.errors import ShapeError
from moekit.nn.config import MoEConfig
from moekit.nn.routing import Routing

FFN, ZERO, COPY, CONSTANT = "ffn", "zero", "copy", "constant"


def candidate_kinds(config: MoEConfig) -> list[str]:
    """The kind of each router candidate, in id order (``ffn`` for the E experts, then zero, copy, constant)."""
    c = config
    return [FFN] * c.num_experts + [ZERO] * c.zero_experts + [COPY] * c.copy_experts + [CONSTANT] * c.constant_experts


def split_routing(routing: Routing, num_experts: int) -> tuple[Routing, Routing]:
    """(the FFN experts' assignments, the zero-computation experts' assignments) of a routing over all candidates."""
    ffn_A = routing.expert_idx_A < num_experts

    def keep(mask_A: torch.Tensor) -> Routing:
        return dataclasses.replace(
            routing,
            token_idx_A=routing.token_idx_A[mask_A],
            expert_idx_A=routing.expert_idx_A[mask_A],
            weight_A=routing.weight_A[mask_A],
            choice_rank_A=routing.choice_rank_A[mask_A],
        )

    return keep(ffn_A), keep(~ffn_A)


def skipped_tokens(routing: Routing, num_experts: int) -> torch.Tensor:
    """Routed tokens none of whose choices is an FFN expert (they skip the FFN; long scalar)."""
    has_ffn_T = torch.zeros(routing.num_tokens, dtype=torch.bool, device=routing.token_idx_A.device)
    has_ffn_T[routing.token_idx_A[routing.expert_idx_A < num_experts]] = True
    routed_T = ~has_ffn_T if routing.valid_T is None else routing.valid_T & ~has_ffn_T
    return routed_T.sum()


def weigh_balance(probs_N: torch.Tensor, config: MoEConfig) -> torch.Tensor:
    """MoE++'s heterogeneous balance loss sum_i eta_i f_i P_i: the summed router probabilities P times
    eta = 1 for the FFN experts and tau (``zero_expert_balance_weight``) for the zero-computation ones."""
    eta_N = torch.ones_like(probs_N)
    eta_N[config.num_experts :] = config.zero_expert_balance_weight
    return probs_N * eta_N


class ZeroComputationExperts(nn.Module):
    """The zero, copy and constant experts of one MoE layer; :meth:`forward` adds their weighted outputs."""

    def __init__(self, config: MoEConfig, hidden_size: int):
        super().__init__()
        c = config
        self.num_experts, self.zero = c.num_experts, c.zero_experts
        self.copy, self.constant = c.copy_experts, c.constant_experts
        # v_j and W_c^j of each constant expert; W_c^j is [2, D], one row per mixing weight.
        self.constant_vectors = nn.Parameter(torch.empty(self.constant, hidden_size))
        self.constant_gates = nn.Parameter(torch.empty(self.constant, 2, hidden_size))
        if not self.constant_vectors.is_meta:
            nn.init.normal_(self.constant_vectors, std=hidden_size**-0.5)
            nn.init.normal_(self.constant_gates, std=hidden_size**-0.5)

    def extra_repr(self) -> str:
        return f"zero={self.zero}, copy={self.copy}, constant={self.constant}"

    def constant_output(self, x_AD: torch.Tensor, j_A: torch.Tensor) -> torch.Tensor:
        """a1 * x + a2 * v_j with [a1, a2] = softmax(W_c^j x), for rows x_AD sent to constant experts j_A."""
        mix_A2 = torch.einsum("ad,akd->ak", x_AD, self.constant_gates[j_A].to(x_AD.dtype)).softmax(dim=-1)
        return mix_A2[:, :1] * x_AD + mix_A2[:, 1:] * self.constant_vectors[j_A].to(x_AD.dtype)

    def forward(self, x_TD: torch.Tensor, extra: Routing) -> torch.Tensor:
        """y_TD[t] = sum over t's zero-computation assignments of weight * output (zero experts add nothing)."""
        first_copy = self.num_experts + self.zero
        busy_A = extra.expert_idx_A >= first_copy  # zero experts are skipped outright
        token_A, expert_A = extra.token_idx_A[busy_A], extra.expert_idx_A[busy_A]
        x_AD = x_TD[token_A]
        out_AD = x_AD
        if self.constant:
            j_A = (expert_A - first_copy - self.copy).clamp(min=0)
            out_AD = torch.where(
                (expert_A < first_copy + self.copy).unsqueeze(-1), x_AD, self.constant_output(x_AD, j_A)
            )
        out_AD = out_AD * extra.weight_A[busy_A].unsqueeze(-1).to(out_AD.dtype)
        return torch.zeros_like(x_TD).index_add_(0, token_A, out_AD)

    def reference(self, x_D: torch.Tensor, expert: int) -> torch.Tensor:
        """One candidate's output for one token, the obvious way (:func:`moekit.nn.moe.reference_moe`)."""
        first_copy = self.num_experts + self.zero
        if expert < first_copy:
            return torch.zeros_like(x_D)
        if expert < first_copy + self.copy:
            return x_D
        j = expert - first_copy - self.copy
        a1, a2 = (self.constant_gates[j].to(x_D.dtype) @ x_D).softmax(dim=-1)
        return a1 * x_D + a2 * self.constant_vectors[j].to(x_D.dtype)


class GatingResidual(nn.Module):
    """W_g of MoE++'s gating residual: maps the previous MoE layer's logits [T, N] onto this layer's [T, N].

    Zero at initialisation (a choice: MoE++ does not say), so a new layer routes as without the residual and
    learns how much of the previous layer's decision to keep.
    """

    def __init__(self, num_candidates: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_candidates, num_candidates))

    def forward(self, prev_logits_TN: torch.Tensor) -> torch.Tensor:
        if prev_logits_TN.shape[-1] != self.weight.shape[1]:
            raise ShapeError(
                f"the previous MoE layer scores {prev_logits_TN.shape[-1]} candidates, this layer's gating residual "
                f"expects {self.weight.shape[1]} (give every MoE layer the same experts)"
            )
        return prev_logits_TN @ self.weight.to(prev_logits_TN.dtype).t()
