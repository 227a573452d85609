"""Load-balancing losses, all computed in fp32 from the router's output, padding masked out.

Shape legend: T tokens, E experts, B sequences, S tokens per sequence, A assignments.
"""

from __future__ import annotations

import torch

from moekit.nn.routing import Routing


def _valid_probs(routing: Routing) -> torch.Tensor:
    probs_TE = routing.probs_TE
    return probs_TE if routing.valid_T is None else probs_TE[routing.valid_T]


def switch_aux_loss(routing: Routing, num_experts: int) -> torch.Tensor:
    """Switch Transformer / GShard balance loss: E * sum_e f_e * P_e.

    f_e: fraction of valid tokens routed to expert e, summed over the k choices (before capacity
    drops); P_e: mean router probability of e over valid tokens. Equals k at perfect balance
    (the convention of HF's ``load_balancing_loss_func``). Gradients flow through P only.
    """
    n_valid = max(routing.num_valid_tokens(), 1)
    f_E = torch.bincount(routing.expert_idx_A, minlength=num_experts).float() / n_valid
    P_E = _valid_probs(routing).mean(dim=0)
    return num_experts * (f_E * P_E).sum()


def sequence_aux_loss(routing: Routing, num_experts: int, seq_len: int) -> torch.Tensor:
    """DeepSeek-V3 sequence-wise balance loss, averaged over sequences.

    Per sequence: f_i = E / (K * S) * #tokens choosing i; P_i = mean over its tokens of the
    normalised scores s'_i; loss = sum_i f_i * P_i (1 at perfect balance). Masked tokens count
    in neither S nor the sums.
    """
    T = routing.num_tokens
    B = T // seq_len
    k = routing.top_k or 1
    seq_A = routing.token_idx_A // seq_len
    counts_BE = torch.zeros(B, num_experts, device=seq_A.device)
    counts_BE.index_put_((seq_A, routing.expert_idx_A), torch.ones_like(seq_A, dtype=torch.float32), accumulate=True)
    probs_BSE = routing.probs_TE.view(B, seq_len, num_experts)
    if routing.valid_T is None:
        n_valid_B = torch.full((B,), float(seq_len), device=seq_A.device)
        probs_sum_BE = probs_BSE.sum(dim=1)
    else:
        valid_BS = routing.valid_T.view(B, seq_len).float()
        n_valid_B = valid_BS.sum(dim=1)
        probs_sum_BE = (probs_BSE * valid_BS.unsqueeze(-1)).sum(dim=1)
    has_tokens_B = n_valid_B > 0
    n_B = n_valid_B.clamp(min=1).unsqueeze(-1)
    f_BE = counts_BE * num_experts / (k * n_B)
    P_BE = probs_sum_BE / n_B
    per_seq_B = (f_BE * P_BE).sum(dim=-1)
    return per_seq_B[has_tokens_B].mean() if has_tokens_B.any() else per_seq_B.sum() * 0


def router_z_loss(routing: Routing) -> torch.Tensor:
    """ST-MoE router z-loss: mean over valid tokens of logsumexp(logits)^2."""
    logits_TE = routing.logits_TE if routing.valid_T is None else routing.logits_TE[routing.valid_T]
    if logits_TE.shape[0] == 0:
        return routing.logits_TE.sum() * 0
    return torch.logsumexp(logits_TE, dim=-1).square().mean()


def router_entropy(routing: Routing) -> torch.Tensor:
    """Mean entropy (nats) of the router distribution over valid tokens; 0 for hash routing."""
    if routing.probs_TE is None:
        return torch.zeros(())
    probs = _valid_probs(routing).detach()
    if probs.shape[0] == 0:
        return torch.zeros(())
    return -(probs * probs.clamp_min(1e-30).log()).sum(dim=-1).mean()
