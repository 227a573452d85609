"""Routing recorder: watch any model's moekit MoE layers and keep bounded, streaming aggregates.

The recorder hooks every :class:`moekit.nn.MoE` inside a model (an ``MoELM``, a classifier, an
imported Hugging Face model...), asks each layer to keep its :class:`Routing`, and folds it into
per-layer counters whose size does not grow with the data:

    routed [E], processed [E], top1 [E], weight_sum [E], prob_sum [E]   per expert
    coactivation [E, E]          tokens sent to both i and j (diagonal: tokens sent to i)
    entropy_hist [bins]          router entropy / ln(E) per token, in ``bins`` equal bins on [0, 1]
    transition [E_l, E_l+1]      top-1 expert in layer l -> top-1 expert in the next MoE layer
    label_tokens [N], label_routed [N, E], label_top1 [N, E]    when tokens carry labels
    dropped_tokens, dropped_assignments                          capacity drops

The per-pass view it folds in (:class:`LayerRouting`, top-1 expert, the hooks) is in
:mod:`moekit.analysis.capture`.

Raw traces (only when asked, ``trace_dir=``) are written by :mod:`moekit.analysis.traces`.

Shape legend: T tokens, E experts, K choices per token, L MoE layers, A assignments.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moekit.analysis.capture import LayerRouting, capture_routing, find_moe_layers, layer_routing
from moekit.errors import ConfigError, ShapeError
from moekit.nn.routing import MoEAux
from moekit.nn.zero_experts import candidate_kinds


# -- streaming aggregates ----------------------------------------------------------------------
@dataclasses.dataclass
class LayerAggregate:
    """Running totals of one MoE layer (see the module docstring)."""

    layer: int
    name: str
    num_experts: int
    top_k: int
    has_scores: bool
    entropy_bins: int
    num_labels: int
    tokens: int = 0
    routed: torch.Tensor = None
    processed: torch.Tensor = None
    top1: torch.Tensor = None
    weight_sum: torch.Tensor = None
    coactivation: torch.Tensor = None
    entropy_hist: torch.Tensor = None
    entropy_sum: float = 0.0
    dropped_tokens: int = 0
    dropped_assignments: int = 0
    label_tokens: torch.Tensor = None
    label_routed: torch.Tensor = None
    label_top1: torch.Tensor = None
    # MoE++: the kind of each candidate ("ffn", "zero", "copy", "constant"; None: all FFN experts) and the
    # tokens whose every choice was a zero-computation expert.
    kinds: list[str] | None = None
    ffn_skipped_tokens: int = 0

    def __post_init__(self):
        E, N = self.num_experts, self.num_labels
        self.routed = torch.zeros(E, dtype=torch.long)
        self.processed = torch.zeros(E, dtype=torch.long)
        self.top1 = torch.zeros(E, dtype=torch.long)
        self.weight_sum = torch.zeros(E, dtype=torch.float64)
        self.coactivation = torch.zeros(E, E, dtype=torch.long)
        self.entropy_hist = torch.zeros(self.entropy_bins, dtype=torch.long)
        self.label_tokens = torch.zeros(N, dtype=torch.long)
        self.label_routed = torch.zeros(N, E, dtype=torch.long)
        self.label_top1 = torch.zeros(N, E, dtype=torch.long)

    def add(self, r: LayerRouting, labels_T: torch.Tensor | None) -> None:
        E = self.num_experts
        valid_T = r.valid_T
        experts_VK = r.experts_TK[valid_T]
        weights_VK = r.weights_TK[valid_T]
        chosen_VK = experts_VK >= 0
        self.tokens += int(valid_T.sum())
        self.routed += r.routed_E
        self.processed += r.processed_E
        self.dropped_tokens += r.dropped_tokens
        self.dropped_assignments += r.dropped_assignments
        if self.kinds is not None:
            ffn_VK = chosen_VK & (experts_VK < self.kinds.count("ffn"))
            self.ffn_skipped_tokens += int((chosen_VK.any(dim=1) & ~ffn_VK.any(dim=1)).sum())
        flat_e = experts_VK[chosen_VK]
        self.weight_sum += torch.bincount(flat_e, weights=weights_VK[chosen_VK].double(), minlength=E)
        top1_V = experts_VK[:, 0]
        has_top1_V = top1_V >= 0
        self.top1 += torch.bincount(top1_V[has_top1_V], minlength=E)
        member_VE = torch.zeros(experts_VK.shape[0], E + 1)
        member_VE.scatter_(1, experts_VK.masked_fill(~chosen_VK, E), 1.0)
        member_VE = member_VE[:, :E].double()  # fp64: exact counts for any realistic batch
        self.coactivation += (member_VE.t() @ member_VE).round().long()
        if r.entropy_T is not None:
            ent_V = r.entropy_T[valid_T].double()
            self.entropy_sum += float(ent_V.sum())
            norm_V = ent_V / math.log(E) if E > 1 else torch.zeros_like(ent_V)
            bins_V = (norm_V * self.entropy_bins).floor().long().clamp(0, self.entropy_bins - 1)
            self.entropy_hist += torch.bincount(bins_V, minlength=self.entropy_bins)
        if labels_T is not None and self.num_labels:
            lab_V = labels_T[valid_T]
            known_V = (lab_V >= 0) & (lab_V < self.num_labels)
            N = self.num_labels
            self.label_tokens += torch.bincount(lab_V[known_V], minlength=N)
            lab_VK = lab_V.unsqueeze(1).expand_as(experts_VK)
            keep_VK = chosen_VK & known_V.unsqueeze(1)
            pair = lab_VK[keep_VK] * E + experts_VK[keep_VK]
            self.label_routed += torch.bincount(pair, minlength=N * E).view(N, E)
            keep_V = known_V & has_top1_V
            pair = lab_V[keep_V] * E + top1_V[keep_V]
            self.label_top1 += torch.bincount(pair, minlength=N * E).view(N, E)

    def to_dict(self) -> dict[str, Any]:
        """Plain-python totals (JSON-ready)."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.tolist() if isinstance(v, torch.Tensor) else v
        return out


@dataclasses.dataclass
class RoutingAggregates:
    """Everything a :class:`RoutingRecorder` accumulated."""

    layers: list[LayerAggregate]
    transitions: list[torch.Tensor]  # [E_l, E_l+1] top-1 -> top-1 counts between consecutive MoE layers
    label_names: list[str]
    sequences: int = 0


class RoutingRecorder:
    """Record the routing of a model's MoE layers over many batches, in bounded memory.

    Example::

        rec = RoutingRecorder(model, label_names=["code", "math"])
        for input_ids, labels in batches:        # labels: [B, S] label ids (or None)
            out = rec.update(input_ids, labels)  # the model's own output, unchanged
        agg = rec.aggregates()

    ``model`` is any module holding moekit :class:`MoE` layers, called as ``model(input_ids, **kwargs)``;
    ``label_names`` name the label ids :meth:`update` may receive. With a ``trace_dir``, raw per-token traces
    (:mod:`moekit.analysis.traces`) are written there too, ``trace_shard_tokens`` per shard.
    """

    def __init__(
        self,
        model: nn.Module,
        label_names: Sequence[str] | None = None,
        entropy_bins: int = 20,
        trace_dir: str | os.PathLike | None = None,
        trace_shard_tokens: int = 1 << 20,
    ):
        if entropy_bins < 1:
            raise ConfigError(f"entropy_bins={entropy_bins} must be >= 1")
        self.model = model
        self.moe_layers = find_moe_layers(model)
        if not self.moe_layers:
            raise ConfigError(f"{type(model).__name__} holds no moekit MoE layer: nothing to analyse")
        self.label_names = list(label_names or [])
        self.entropy_bins = entropy_bins
        self.layers = [
            LayerAggregate(
                layer=index,
                name=name,
                num_experts=moe.config.num_candidates,
                top_k=moe.config.experts_per_token,
                has_scores=moe.config.router.value != "hash",
                entropy_bins=entropy_bins,
                num_labels=len(self.label_names),
                kinds=candidate_kinds(moe.config) if moe.config.num_zero_computation else None,
            )
            for index, name, moe in self.moe_layers
        ]
        self.transitions = [
            torch.zeros(a.num_experts, b.num_experts, dtype=torch.long) for a, b in zip(self.layers, self.layers[1:])
        ]
        self.sequences = 0
        self.last: list[LayerRouting] = []
        self._traces = None
        if trace_dir is not None:
            from moekit.analysis.traces import TraceWriter

            self._traces = TraceWriter(trace_dir, self, trace_shard_tokens)

    @torch.no_grad()
    def update(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, **model_kwargs: Any) -> Any:
        """Run the model on ``input_ids`` [B, S] (with ``model_kwargs``, e.g. ``attention_mask``), fold its routing
        in, and return its output exactly as without the recorder. ``labels``: [B, S] (or [B], one per sequence)
        ids into ``label_names``, -1 = none."""
        with capture_routing(self.model) as seen:
            out = self.model(input_ids, **model_kwargs)
        self.observe([aux for _, aux in seen], input_ids=input_ids, labels=labels)
        return out

    def observe(
        self, auxes: Sequence[MoEAux], input_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None
    ) -> list[LayerRouting]:
        """Fold in one forward pass's MoEAux list (one per MoE layer, in order, each holding its routing)."""
        if len(auxes) != len(self.layers):
            raise ShapeError(f"got {len(auxes)} MoE outputs for {len(self.layers)} MoE layers")
        records = [layer_routing(aux, agg.num_experts) for aux, agg in zip(auxes, self.layers)]
        labels_T = self._labels_per_token(labels, input_ids, records[0].valid_T.numel())
        for agg, r in zip(self.layers, records):
            if r.valid_T.numel() != records[0].valid_T.numel():
                raise ShapeError(f"layer {agg.layer} routed {r.valid_T.numel()} tokens, the first layer did not")
            agg.add(r, labels_T)
        for n, (a, b) in enumerate(zip(records, records[1:])):
            ok = (a.top1_T >= 0) & (b.top1_T >= 0)
            E_b = self.layers[n + 1].num_experts
            t = self.transitions[n]
            t += torch.bincount(a.top1_T[ok] * E_b + b.top1_T[ok], minlength=t.numel()).view_as(t)
        if self._traces is not None:
            self._traces.add(records, input_ids, labels_T, self.sequences)
        self.sequences += input_ids.shape[0] if input_ids is not None and input_ids.dim() == 2 else 1
        self.last = records
        return records

    @staticmethod
    def _labels_per_token(labels, input_ids, T) -> torch.Tensor | None:
        if labels is None:
            return None
        labels = torch.as_tensor(labels).cpu().long()
        B = input_ids.shape[0] if input_ids is not None else 0
        if labels.dim() == 1 and labels.numel() == B and T % B == 0:
            labels = labels.repeat_interleave(T // B)  # one label per sequence (or image): all its tokens
        labels = labels.reshape(-1)
        if labels.numel() != T:
            raise ShapeError(f"labels give {labels.numel()} tokens but the layers routed {T}")
        return labels

    def aggregates(self) -> RoutingAggregates:
        """The totals so far (the recorder keeps accumulating)."""
        return RoutingAggregates(self.layers, self.transitions, self.label_names, self.sequences)

    def close(self) -> Path | None:
        """Flush raw traces (if any) and return their index file."""
        return self._traces.close() if self._traces is not None else None


# -- checkpoint drift ---------------------------------------------------------------------------
class DriftMeter:
    """Compare two models' routing token by token (same tokens fed to both).

    Per layer: tokens compared, how many changed their top-1 expert, and the summed overlap
    |top-k_a ∩ top-k_b| / k. Load distributions come from the two recorders' aggregates.
    """

    def __init__(self, num_layers: int):
        self.tokens = [0] * num_layers
        self.top1_changed = [0] * num_layers
        self.topk_overlap = [0.0] * num_layers

    def add(self, a: Sequence[LayerRouting], b: Sequence[LayerRouting]) -> None:
        if len(a) != len(b) or len(a) != len(self.tokens):
            raise ShapeError(f"the models have {len(a)} and {len(b)} MoE layers; drift needs the same layers")
        for n, (ra, rb) in enumerate(zip(a, b)):
            if ra.num_experts != rb.num_experts:
                raise ShapeError(f"MoE layer {n} has {ra.num_experts} experts in one model and {rb.num_experts}")
            ok = ra.valid_T & rb.valid_T
            self.tokens[n] += int(ok.sum())
            self.top1_changed[n] += int((ra.top1_T[ok] != rb.top1_T[ok]).sum())
            ea, eb = ra.experts_TK[ok], rb.experts_TK[ok]
            same = (ea.unsqueeze(2) == eb.unsqueeze(1)) & (ea >= 0).unsqueeze(2)
            k = max(ea.shape[1], 1)
            self.topk_overlap[n] += float(same.any(dim=2).sum()) / k
