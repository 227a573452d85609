"""Hand-made routings and tiny models for the analysis tests."""

from __future__ import annotations

import torch

from moekit.checkpoint import save_checkpoint
from moekit.data.tokenizers import ByteTokenizer
from moekit.models import MoELM
from moekit.models.presets import TINY
from moekit.nn.routing import MoEAux, Routing


def make_aux(experts_TK, weights_TK=None, num_experts=4, probs_TE=None) -> MoEAux:
    """An MoEAux holding a token-choice Routing with the given experts per token (-1 = no assignment)."""
    experts_TK = torch.as_tensor(experts_TK, dtype=torch.long)
    T, K = experts_TK.shape
    if weights_TK is None:
        weights_TK = torch.full((T, K), 1.0 / K)
    weights_TK = torch.as_tensor(weights_TK, dtype=torch.float32)
    keep = experts_TK >= 0
    token_A = torch.arange(T).repeat_interleave(K)[keep.reshape(-1)]
    rank_A = torch.arange(K).repeat(T)[keep.reshape(-1)]
    routing = Routing(
        token_idx_A=token_A,
        expert_idx_A=experts_TK[keep],
        weight_A=weights_TK[keep],
        choice_rank_A=rank_A,
        logits_TE=None if probs_TE is None else probs_TE.log(),
        probs_TE=probs_TE,
        num_tokens=T,
        top_k=K,
    )
    counts = torch.bincount(experts_TK[keep], minlength=num_experts)
    zero = torch.zeros((), dtype=torch.long)
    return MoEAux(
        loss=torch.zeros(()),
        losses={},
        tokens_per_expert=counts,
        dropped_assignments=zero,
        dropped_tokens=zero,
        router_entropy=torch.zeros(()),
        routing=routing,
    )


class FakeMoEModel(torch.nn.Module):
    """Stands in for a model: holds real MoE layers (so the recorder finds them) but is fed auxes by hand."""

    def __init__(self, num_layers=2, num_experts=4, top_k=1):
        super().__init__()
        from moekit.nn import MoE

        self.layers = torch.nn.ModuleList(
            [MoE(hidden_size=8, num_experts=num_experts, top_k=top_k, expert_hidden_size=8) for _ in range(num_layers)]
        )


def tiny_model(seed=0, **moe) -> MoELM:
    torch.manual_seed(seed)
    cfg = TINY if not moe else TINY.replace(moe=TINY.moe.replace(**moe))
    return MoELM(cfg).eval()


def save_tiny_checkpoint(run_dir, seed=0, step=10, **moe):
    model = tiny_model(seed, **moe)
    return save_checkpoint(run_dir, step, model, ByteTokenizer())
