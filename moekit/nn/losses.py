"""Load-balancing losses and routing statistics, in fp32 from the router's output, padding masked out.

Every one is a ratio of sums over tokens (or sequences): :func:`routing_sums` gives the sums of a batch,
:func:`losses_from_sums` the ratios. The MoE layer hands the sums to its expert executor in between
(:meth:`moekit.nn.executor.ExpertExecutor.reduce`: the identity on one process, an all-reduce under
expert parallelism), so the losses are always those of the global batch.

Shape legend: T tokens, E experts, B sequences, S tokens per sequence, A assignments.
"""

from __future__ import annotations

from collections.abc import Collection

import torch

from moekit.nn.routing import Routing


def routing_sums(
    routing: Routing, num_experts: int, seq_len: int | None = None, losses: Collection[str] = ("aux", "seq_aux", "z")
) -> dict[str, torch.Tensor]:
    """The sums of one batch that the named ``losses`` and the statistics are ratios of.

    Always ``n_valid`` (routed tokens), ``routed_E`` (assignments per expert before capacity drops) and
    ``entropy`` (summed over valid tokens, detached; 0 for hash routing, which has no scores). Routers
    without scores (hash) take no loss; ``seq_aux`` needs ``seq_len``.
    """
    probs_TE = routing.probs_TE
    dtype = torch.float32 if probs_TE is None else probs_TE.dtype
    device = routing.expert_idx_A.device
    n_valid = routing.num_tokens if routing.valid_T is None else routing.valid_T.sum()
    sums = {
        "n_valid": torch.as_tensor(n_valid, dtype=dtype, device=device),
        "routed_E": torch.bincount(routing.expert_idx_A, minlength=num_experts).to(dtype),
    }
    if probs_TE is None:
        return {**sums, "entropy": torch.zeros((), dtype=dtype, device=device)}
    valid_probs = probs_TE if routing.valid_T is None else probs_TE[routing.valid_T]
    p = valid_probs.detach()
    sums["entropy"] = -(p * p.clamp_min(1e-30).log()).sum()
    if "aux" in losses:
        sums["probs_E"] = valid_probs.sum(dim=0)
    if "seq_aux" in losses:
        if seq_len is None:
            raise ValueError("the seq_aux sums need seq_len")
        sums["seq_aux"], sums["n_seq"] = _sequence_sums(routing, probs_TE, num_experts, seq_len)
    if "z" in losses:
        assert routing.logits_TE is not None, "a router with scores has logits"
        logits_TE = routing.logits_TE if routing.valid_T is None else routing.logits_TE[routing.valid_T]
        sums["z"] = torch.logsumexp(logits_TE, dim=-1).square().sum()
    return sums


def _sequence_sums(
    routing: Routing, probs_TE: torch.Tensor, num_experts: int, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum over sequences of the per-sequence loss, number of sequences with a valid token)."""
    B = routing.num_tokens // seq_len
    k = routing.top_k or 1
    seq_A = routing.token_idx_A // seq_len
    counts_BE = torch.zeros(B, num_experts, device=seq_A.device)
    counts_BE.index_put_((seq_A, routing.expert_idx_A), torch.ones_like(seq_A, dtype=torch.float32), accumulate=True)
    probs_BSE = probs_TE.view(B, seq_len, num_experts)
    n_valid_B = torch.full((B,), float(seq_len), device=seq_A.device)
    if routing.valid_T is not None:
        valid_BS = routing.valid_T.view(B, seq_len).float()
        n_valid_B, probs_BSE = valid_BS.sum(dim=1), probs_BSE * valid_BS.unsqueeze(-1)
    probs_sum_BE = probs_BSE.sum(dim=1)
    n_B = n_valid_B.clamp(min=1).unsqueeze(-1)
    f_BE = counts_BE * num_experts / (k * n_B)
    P_BE = probs_sum_BE / n_B
    # A sequence without valid tokens has f = P = 0, so it adds nothing to the sum.
    return (f_BE * P_BE).sum(), (n_valid_B > 0).sum().to(probs_BSE.dtype)


def losses_from_sums(sums: dict[str, torch.Tensor], num_experts: int) -> dict[str, torch.Tensor]:
    """The losses whose sums are present, by name.

    * ``aux``: Switch Transformer / GShard balance loss E * sum_e f_e * P_e. f_e: fraction of valid tokens
      routed to e, summed over the k choices (before capacity drops); P_e: mean router probability of e.
      Equals k at perfect balance (the convention of HF's ``load_balancing_loss_func``). Gradients flow
      through P only.
    * ``seq_aux``: DeepSeek-V3 sequence-wise balance loss, averaged over sequences. Per sequence:
      f_i = E / (K * S) * #tokens choosing i; P_i = mean over its tokens of the normalised scores s'_i;
      loss = sum_i f_i * P_i (1 at perfect balance). Masked tokens count in neither S nor the sums.
    * ``z``: ST-MoE router z-loss, the mean over valid tokens of logsumexp(logits)^2.
    """
    n = sums["n_valid"].clamp(min=1)
    losses = {}
    if "probs_E" in sums:
        losses["aux"] = num_experts * ((sums["routed_E"] / n) * (sums["probs_E"] / n)).sum()
    if "seq_aux" in sums:
        losses["seq_aux"] = sums["seq_aux"] / sums["n_seq"].clamp(min=1)
    if "z" in sums:
        losses["z"] = sums["z"] / n
    return losses
