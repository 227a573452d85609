"""One forward pass's routing, per token: hooks that make a model's MoE layers keep their Routing,
and the per-token view of it that the recorder, the token view and the task reports read.

The model's outputs are unchanged: the hooks only flip ``record_routing`` on, which makes the layer
keep a reference to the Routing it computed anyway. A token's *top-1* expert is its assignment with
the largest combine weight (ties: the lower expert index), which is the first choice for softmax
top-k and the strongest expert for dense, sigmoid and expert-choice routing.

Shape legend: T tokens, E experts, K choices per token, A assignments.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from moekit.errors import ConfigError, ShapeError
from moekit.nn.moe import MoE
from moekit.nn.routing import MoEAux, Routing


@dataclasses.dataclass
class LayerRouting:
    """One MoE layer's routing of one forward pass, per token (CPU tensors)."""

    experts_TK: torch.Tensor  # the token's experts sorted by combine weight, -1 where it has fewer (long)
    weights_TK: torch.Tensor  # their combine weights (fp32, 0 where -1)
    valid_T: torch.Tensor  # tokens that were routed (not padding)
    entropy_T: torch.Tensor | None  # router entropy in nats per token; None for routers without scores (hash)
    routed_E: torch.Tensor  # assignments the router made per expert (before capacity drops)
    processed_E: torch.Tensor  # assignments the experts processed (after capacity drops)
    dropped_tokens: int  # capacity drops in this pass
    dropped_assignments: int

    @property
    def top1_T(self) -> torch.Tensor:
        """Top-1 expert per token; -1 for padding and for tokens no expert took (expert choice)."""
        top1 = self.experts_TK[:, 0].clone()
        top1[~self.valid_T] = -1
        return top1

    @property
    def num_experts(self) -> int:
        return int(self.routed_E.numel())


def layer_routing(aux: MoEAux, num_experts: int) -> LayerRouting:
    """Per-token view of one layer's :class:`MoEAux` (which must hold its ``routing``)."""
    routing: Routing | None = aux.routing
    if routing is None:
        raise ShapeError("this MoEAux holds no routing; run the layer with record_routing=True")
    processed_E = aux.tokens_per_expert.detach().cpu().long()
    if aux.zero_computation_load is not None:  # MoE++: the zero, copy and constant experts follow the FFN ones
        processed_E = torch.cat([processed_E, aux.zero_computation_load.detach().cpu().long()])
    T, E = routing.num_tokens, max(num_experts, processed_E.numel())
    token_A = routing.token_idx_A.detach().cpu()
    expert_A = routing.expert_idx_A.detach().cpu()
    weight_A = routing.weight_A.detach().float().cpu()
    valid_T = torch.ones(T, dtype=torch.bool) if routing.valid_T is None else routing.valid_T.detach().cpu().bool()
    # An expert appears at most once per token, so a dense [T, E] table of weights is exact.
    weight_TE = torch.full((T, E), -math.inf)
    weight_TE[token_A, expert_A] = weight_A
    per_token = torch.bincount(token_A, minlength=T)
    K = routing.top_k if routing.top_k is not None else int(per_token.max()) if T else 1
    K = max(1, min(K, E))
    # Sort by weight, ties to the lower expert index: stable sort of the experts in index order.
    order_TE = torch.sort(weight_TE, dim=-1, descending=True, stable=True).indices[:, :K]
    weights_TK = weight_TE.gather(1, order_TE)
    missing_TK = torch.isinf(weights_TK)
    experts_TK = order_TE.masked_fill(missing_TK, -1)
    weights_TK = weights_TK.masked_fill(missing_TK, 0.0)
    entropy_T = None
    if routing.probs_TE is not None:
        p_TE = routing.probs_TE.detach().float().cpu()
        entropy_T = -(p_TE * p_TE.clamp_min(1e-30).log()).sum(dim=-1)
    return LayerRouting(
        experts_TK=experts_TK,
        weights_TK=weights_TK,
        valid_T=valid_T,
        entropy_T=entropy_T,
        routed_E=torch.bincount(expert_A, minlength=E),
        processed_E=processed_E,
        dropped_tokens=int(aux.dropped_tokens),
        dropped_assignments=int(aux.dropped_assignments),
    )


def stack_layers(records: Sequence[LayerRouting], k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """All layers' experts_TLK (long, -1 = none) and weights_TLK (fp32), padded to at least ``k`` choices."""
    K = max(k, *(r.experts_TK.shape[1] for r in records))  # expert choice: layers may differ
    experts_TLK = torch.full((records[0].experts_TK.shape[0], len(records), K), -1, dtype=torch.long)
    weights_TLK = torch.zeros(experts_TLK.shape)
    for n, r in enumerate(records):
        experts_TLK[:, n, : r.experts_TK.shape[1]] = r.experts_TK
        weights_TLK[:, n, : r.weights_TK.shape[1]] = r.weights_TK
    return experts_TLK, weights_TLK


def find_moe_layers(model: nn.Module) -> list[tuple[int, str, MoE]]:
    """(layer index, module name, MoE) for every moekit MoE inside ``model``, in forward order.

    The layer index is the block number for ``MoELM`` (``layers.N.mlp``), else the position.
    """
    found = []
    for position, (name, module) in enumerate((n, m) for n, m in model.named_modules() if isinstance(m, MoE)):
        parts = name.split(".")
        index = next((int(p) for p in reversed(parts) if p.isdigit()), position)
        found.append((index, name, module))
    if len({i for i, _, _ in found}) != len(found):  # numbering by name is ambiguous: use positions
        found = [(pos, name, m) for pos, (_, name, m) in enumerate(found)]
    return found


@contextlib.contextmanager
def capture_routing(model: nn.Module) -> Iterator[list[tuple[int, MoEAux]]]:
    """Inside the block, every MoE of ``model`` records its routing; yields the list it fills.

    Each forward appends ``(position in find_moe_layers order, MoEAux)`` per MoE layer call.
    The layers' outputs are untouched: the hook only sets ``record_routing=True``.
    """
    layers = find_moe_layers(model)
    if not layers:
        raise ConfigError(f"{type(model).__name__} holds no moekit MoE layer to record")
    seen: list[tuple[int, MoEAux]] = []
    handles = []

    def pre_hook(module, args, kwargs):
        if len(args) >= 4:  # forward(x, mask, token_ids, record_routing) called positionally
            return (*args[:3], True, *args[4:]), kwargs
        return args, {**kwargs, "record_routing": True}

    for position, (_, _, moe) in enumerate(layers):

        def post_hook(module, args, kwargs, output, position=position):
            seen.append((position, output[1]))

        handles.append(moe.register_forward_pre_hook(pre_hook, with_kwargs=True))
        handles.append(moe.register_forward_hook(post_hook, with_kwargs=True))
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()
