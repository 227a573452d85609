"""Soft MoE (Puigcerver et al. 2023, "From Sparse to Soft Mixtures of Experts").

Each expert owns ``slots_per_expert`` slots; a slot is a softmax-weighted mixture of *all* tokens
of its sequence (dispatch weights, softmax over tokens), and each token's output is a
softmax-weighted mixture of all slot outputs (combine weights, softmax over slots). Nothing is
dropped and everything is differentiable, but every slot sees the whole sequence, so the layer is
for non-causal use (vision, encoders). It reuses :class:`moekit.nn.experts.Experts`.

Shape legend: B batch, N tokens per sequence, D hidden, E experts, P slots per expert, S = E*P.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moekit.errors import ShapeError
from moekit.nn.experts import Experts
from moekit.nn.router import routing_dtype
from moekit.nn.routing import MoEAux


class SoftMoE(nn.Module):
    """Soft MoE layer: ``y, aux = layer(x, mask=None)`` for x of shape [B, N, D] or [N, D]. ``normalize``
    l2-normalises tokens and slot parameters with a learned scale (the paper's recipe at large widths)."""

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        slots_per_expert: int,
        expert_hidden_size: int,
        activation: str = "swiglu",
        normalize: bool = True,
    ):
        super().__init__()
        for name, value in (
            ("hidden_size", hidden_size),
            ("num_experts", num_experts),
            ("slots_per_expert", slots_per_expert),
            ("expert_hidden_size", expert_hidden_size),
        ):
            if not isinstance(value, int) or value < 1:
                raise ShapeError(f"SoftMoE {name} must be a positive integer, got {value!r}")
        self.hidden_size, self.num_experts, self.slots_per_expert = hidden_size, num_experts, slots_per_expert
        self.normalize = normalize
        self.slot_embeds_DS = nn.Parameter(torch.randn(hidden_size, num_experts * slots_per_expert) * hidden_size**-0.5)
        self.scale = nn.Parameter(torch.ones(())) if normalize else None
        self.experts = Experts(num_experts, hidden_size, expert_hidden_size, activation)

    def slot_logits(self, x_BND: torch.Tensor) -> torch.Tensor:
        """Token-slot affinities [B, N, S] in fp32."""
        dtype = routing_dtype(x_BND.dtype)
        x, phi = x_BND.to(dtype), self.slot_embeds_DS.to(dtype)
        if self.normalize:
            assert self.scale is not None, "normalize comes with a learned scale"
            x = F.normalize(x, dim=-1)
            phi = self.scale.to(dtype) * F.normalize(phi, dim=0)
        return x @ phi

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, MoEAux]:
        if x.dim() not in (2, 3) or x.shape[-1] != self.hidden_size:
            raise ShapeError(
                f"SoftMoE expects [batch, tokens, {self.hidden_size}] or [tokens, {self.hidden_size}], "
                f"got shape {tuple(x.shape)}"
            )
        x_BND = x if x.dim() == 3 else x.unsqueeze(0)
        B, N, D = x_BND.shape
        E, P = self.num_experts, self.slots_per_expert
        if mask is not None and tuple(mask.shape) != tuple(x.shape[:-1]):
            raise ShapeError(f"mask has shape {tuple(mask.shape)} but x's leading shape is {tuple(x.shape[:-1])}")
        logits_BNS = self.slot_logits(x_BND)
        dispatch_logits = logits_BNS
        if mask is not None:
            valid_BN = mask.reshape(B, N).bool()
            dispatch_logits = logits_BNS.masked_fill(~valid_BN.unsqueeze(-1), float("-inf"))
        dispatch_BNS = dispatch_logits.softmax(dim=1)  # each slot: convex mix of tokens
        combine_BNS = logits_BNS.softmax(dim=2)  # each token: convex mix of slots
        slots_BSD = torch.einsum("bns,bnd->bsd", dispatch_BNS.to(x.dtype), x_BND)
        # Group rows by expert: expert e owns the B*P rows of its slots.
        rows_EBPD = slots_BSD.view(B, E, P, D).transpose(0, 1).reshape(E * B * P, D)
        out_EBPD = self.experts(rows_EBPD, (B * P,) * E)
        out_BSD = out_EBPD.view(E, B, P, D).transpose(0, 1).reshape(B, E * P, D).to(x.dtype)
        y_BND = torch.einsum("bns,bsd->bnd", combine_BNS.to(x.dtype), out_BSD)
        if mask is not None:
            y_BND = y_BND * valid_BN.unsqueeze(-1).to(y_BND.dtype)
        # Slot load per expert: the dispatch mass each expert's slots drew (sums to B*P each).
        load_E = dispatch_BNS.detach().sum(dim=(0, 1)).view(E, P).sum(-1)
        zero = torch.zeros((), dtype=torch.long)
        aux = MoEAux(
            loss=torch.zeros(()),
            losses={},
            tokens_per_expert=load_E.round().long(),
            dropped_assignments=zero,
            dropped_tokens=zero.clone(),
            router_entropy=-(combine_BNS * combine_BNS.clamp_min(1e-30).log()).sum(-1).mean().detach(),
        )
        return y_BND.view(x.shape), aux


def reference_soft_moe(layer: SoftMoE, x: torch.Tensor) -> torch.Tensor:
    """Slow, loop-per-sequence-and-expert Soft MoE, the oracle for :class:`SoftMoE`."""
    x_BND = x if x.dim() == 3 else x.unsqueeze(0)
    E, P = layer.num_experts, layer.slots_per_expert
    outs = []
    for b in range(x_BND.shape[0]):
        logits_NS = layer.slot_logits(x_BND[b : b + 1])[0]
        dispatch_NS, combine_NS = logits_NS.softmax(dim=0), logits_NS.softmax(dim=1)
        slots_SD = dispatch_NS.t() @ x_BND[b]
        slot_out = [layer.experts.expert_forward(s // P, slots_SD[s : s + 1])[0] for s in range(E * P)]
        outs.append(combine_NS @ torch.stack(slot_out))
    return torch.stack(outs).view(x.shape)
