"""Router replay: record which experts every MoE layer chose, then make a later forward use those choices.

In RL fine-tuning the experts picked at rollout (generation, often bf16 and batched) differ from those a
training forward (fp32, other batch) picks for many tokens, and runs collapse; replaying the rollout's choices
in the training forward fixes it (R3, arXiv 2510.11370; Megatron-Core ``RouterReplay``). Under replay the
*choices* come from the record, the combine weights from the live router logits, so the router keeps its
gradient.

A record is a tensor [B, S, L, W] of expert ids (long): batch row, position, MoE layer, slot. Token-choice
routers fill W = top_k slots in choice order (hash: 1; dense: every expert); expert choice and relu routing, whose
tokens get a varying number of experts, use W = E slots, slot e holding e when expert e took the token. Unused slots and
tokens that were not routed (padding) hold -1. Successive forwards under one context append along S (prefill,
then one position per decoding step), and a replayed forward consumes the next S positions of each layer.

Shape legend: B batch, S positions, L MoE layers, W slots, T = B*S tokens, E experts, K choices per token.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from moekit.errors import ShapeError
from moekit.nn.config import RouterType
from moekit.nn.relu_router import ReLURouter
from moekit.nn.router import ExpertChoiceRouter, HashRouter, TopKRouter, token_choice
from moekit.nn.routing import Routing
from moekit.nn.threshold_router import ExpertThresholdRouter

if TYPE_CHECKING:  # moe imports this module
    from moekit.nn.moe import MoE


def slot_width(layer: MoE) -> int:
    """W, the record's slots per token for ``layer``'s router."""
    router, cfg = layer.router, layer.config
    if isinstance(router, HashRouter):
        return 1
    if isinstance(router, (ExpertChoiceRouter, ReLURouter, ExpertThresholdRouter)) or cfg.router == RouterType.DENSE:
        return cfg.num_experts
    return cfg.top_k


def experts_of(routing: Routing, width: int) -> torch.Tensor:
    """The routing's choices as slots [T, W] (-1 = empty), the record's layout (see the module docstring)."""
    ids_TW = torch.full((routing.num_tokens, width), -1, dtype=torch.long, device=routing.expert_idx_A.device)
    slot_A = routing.choice_rank_A if routing.top_k is not None else routing.expert_idx_A
    ids_TW[routing.token_idx_A, slot_A] = routing.expert_idx_A
    return ids_TW


def replayed_routing(
    layer: MoE,
    ids_TW: torch.Tensor,
    x_TD: torch.Tensor,
    valid_T: torch.Tensor | None,
    token_ids_T: torch.Tensor | None,
) -> Routing:
    """The Routing of ``layer`` with its expert choices taken from ``ids_TW``, weights from the live logits."""
    router = layer.router
    if isinstance(router, ExpertChoiceRouter):
        logits_TE = router.logits(x_TD)
        probs_TE = logits_TE.softmax(dim=-1)
        chosen_TE = ids_TW >= 0
        if valid_T is not None:
            chosen_TE &= valid_T.unsqueeze(1)
        # Expert-major, each expert's tokens by falling score: the order expert choice itself emits.
        score_ET = probs_TE.detach().t().masked_fill(~chosen_TE.t(), -1.0)
        order_EC = score_ET.argsort(dim=-1, descending=True, stable=True)
        taken_EC = chosen_TE.t().gather(1, order_EC)
        expert_EC = torch.arange(layer.config.num_experts, device=x_TD.device).unsqueeze(1).expand_as(order_EC)
        rank_EC = torch.arange(order_EC.shape[1], device=x_TD.device).expand_as(order_EC)
        token_A, expert_A = order_EC[taken_EC], expert_EC[taken_EC]
        return Routing(
            token_idx_A=token_A,
            expert_idx_A=expert_A,
            weight_A=probs_TE[token_A, expert_A],
            choice_rank_A=rank_EC[taken_EC],
            logits_TE=logits_TE,
            probs_TE=probs_TE,
            num_tokens=x_TD.shape[0],
            valid_T=valid_T,
        )
    if isinstance(router, (ReLURouter, ExpertThresholdRouter)):  # slot e holds e: the recorded experts, live weights
        return router.assign(router.logits(x_TD), ids_TW >= 0, valid_T)
    # Token choice: padding tokens hold -1 and are dropped by valid_T; any id is fine for them.
    idx_TK = ids_TW.clamp(min=0) if valid_T is not None else ids_TW
    if isinstance(router, HashRouter):
        weight_TK = torch.ones(idx_TK.shape, dtype=torch.float32, device=x_TD.device)
        return token_choice(idx_TK, weight_TK, None, None, valid_T)
    if not isinstance(router, TopKRouter):
        raise ShapeError(f"router replay does not know the router {type(router).__name__}")
    logits_TE = router.logits(x_TD)
    weight_TK, probs_TE = router.gate_weights(logits_TE, idx_TK)
    return token_choice(idx_TK, weight_TK, logits_TE, probs_TE, valid_T)


class _LayerReplay:
    """One MoE layer's part of a :class:`RouterReplay`: its recorded calls, or its record and read position."""

    def __init__(self, index: int, width: int, record_LW: torch.Tensor | None):
        self.index, self.width = index, width
        self.calls: list[torch.Tensor] = []  # recorded [B, S, W] per forward
        self.record = record_LW  # [B, S_total, W] to replay, or None when recording
        self.position = 0

    def __call__(
        self,
        layer: MoE,
        lead: tuple[int, ...],
        x_TD: torch.Tensor,
        valid_T: torch.Tensor | None,
        token_ids_T: torch.Tensor | None,
    ) -> Routing:
        B, S = (1, lead[0]) if len(lead) == 1 else lead
        if self.record is None:
            routing = layer.route(x_TD, valid_T, token_ids_T)
            self.calls.append(experts_of(routing, self.width).view(B, S, self.width))
            return routing
        ids_TW = self._next(B, S).reshape(B * S, self.width).to(x_TD.device)
        self._check(layer, ids_TW, valid_T)
        return replayed_routing(layer, ids_TW, x_TD, valid_T, token_ids_T)

    def _next(self, B: int, S: int) -> torch.Tensor:
        assert self.record is not None
        have_B, have_S = self.record.shape[0], self.record.shape[1]
        if have_B != B:
            raise ShapeError(f"router replay: the record has {have_B} rows but the forward has batch {B}")
        if self.position + S > have_S:
            raise ShapeError(
                f"router replay: MoE layer {self.index} needs positions {self.position}..{self.position + S - 1} "
                f"but the record covers only {have_S} positions"
            )
        ids = self.record[:, self.position : self.position + S]
        self.position += S
        return ids

    def _check(self, layer: MoE, ids_TW: torch.Tensor, valid_T: torch.Tensor | None) -> None:
        E = layer.config.num_experts
        if bool((ids_TW >= E).any()):
            raise ShapeError(
                f"router replay: the record names expert {int(ids_TW.max())} but MoE layer {self.index} has {E} experts"
            )
        if isinstance(layer.router, (ExpertChoiceRouter, ReLURouter, ExpertThresholdRouter)):  # a token may have none
            return
        routed_T = torch.ones(ids_TW.shape[0], dtype=torch.bool, device=ids_TW.device) if valid_T is None else valid_T
        if bool((ids_TW[routed_T] < 0).any()):
            raise ShapeError(
                f"router replay: the record has no expert choice (-1) for a routed token of MoE layer {self.index} "
                "(a record of other tokens, or of padding)"
            )


def moe_layers(model: nn.Module) -> list[MoE]:
    """The model's MoE layers in module order (the record's layer axis)."""
    from moekit.nn.moe import MoE

    return [m for m in model.modules() if isinstance(m, MoE)]


class RouterReplay:
    """Record the experts every MoE layer of ``model`` chooses, or replay a record (``experts=...``).

    ::

        with RouterReplay(model) as rollout:      # record
            model(ids)
        record = rollout.experts()                # [B, S, L, W] long
        with RouterReplay(model, experts=record):  # replay: same choices, weights from the live logits
            loss = model(ids, labels=ids).loss

    ``experts`` may be [S, L, W] for one row. A record too short for the forward, of another batch size, layer
    count or slot width, or naming experts the model lacks, is a :class:`~moekit.errors.ShapeError`.
    """

    def __init__(self, model: nn.Module, experts: torch.Tensor | None = None):
        self.layers = moe_layers(model)
        if not self.layers:
            raise ShapeError("router replay needs a model with MoE layers; this one has none")
        self.widths = [slot_width(layer) for layer in self.layers]
        self.replaying = experts is not None
        self._handlers = [_LayerReplay(i, w, None) for i, w in enumerate(self.widths)]
        if experts is not None:
            self._handlers = [_LayerReplay(i, w, r) for i, (w, r) in enumerate(zip(self.widths, self._split(experts)))]

    def _split(self, experts: torch.Tensor) -> list[torch.Tensor]:
        """The record [B, S, L, W] as one [B, S, W_l] per layer, after checking its layer and slot axes."""
        if experts.dim() == 3:
            experts = experts.unsqueeze(0)
        if experts.dim() != 4 or experts.dtype not in (torch.long, torch.int32, torch.int16, torch.int8):
            raise ShapeError(
                f"router replay: experts must be integer ids [batch, positions, layers, slots], got "
                f"{experts.dtype} of shape {tuple(experts.shape)}"
            )
        L, W = experts.shape[2], experts.shape[3]
        if L != len(self.layers):
            raise ShapeError(f"router replay: the record has {L} MoE layers but the model has {len(self.layers)}")
        if W < max(self.widths):
            raise ShapeError(
                f"router replay: the record has {W} slots per token but the model's routers need {max(self.widths)}"
            )
        return [experts[:, :, i, :w].long() for i, w in enumerate(self.widths)]

    def __enter__(self) -> RouterReplay:
        if any(layer.replay is not None for layer in self.layers):
            raise ShapeError("router replay: this model is already inside a RouterReplay context")
        for layer, handler in zip(self.layers, self._handlers):
            layer.replay = handler
        return self

    def __exit__(self, *exc: object) -> None:
        for layer in self.layers:
            layer.replay = None

    def experts(self) -> torch.Tensor:
        """The recorded choices [B, S, L, W] (W the widest layer's slots, -1 padded), every forward appended on S."""
        if any(not h.calls for h in self._handlers):
            raise ShapeError("router replay: nothing was recorded (run a forward inside the context first)")
        W = max(self.widths)
        per_layer = []
        for h in self._handlers:
            ids_BSw = torch.cat(h.calls, dim=1)
            per_layer.append(torch.nn.functional.pad(ids_BSw, (0, W - h.width), value=-1))
        return torch.stack(per_layer, dim=2)
