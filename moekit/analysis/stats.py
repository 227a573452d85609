"""Routing statistics: balance, entropy, co-activation, layer agreement, drift and specialisation.

Pure functions of counts (lists, numpy arrays or tensors), plus :func:`summarize`, which turns a
recorder's aggregates into the JSON-ready dict behind ``stats.json`` and the report. Token categories
and the per-token view of one text are in :mod:`moekit.analysis.tokens`.

Conventions:
- *load* of an expert = assignments the router sent to it (a top-2 token counts once for each of
  its two experts), before capacity drops.
- *imbalance* = max / mean load (1 = perfect balance, E = one expert takes everything);
  *CV* = population standard deviation / mean.
- *dead* expert: load below ``dead_fraction`` (default 1%) of the mean load, i.e. of its fair share.
- Information is in bits. MI(label; expert) is computed from the joint counts of (label of a token,
  expert it was sent to) over assignments; normalised MI = MI / H(label), the share of the label's
  uncertainty the expert removes (1 when each label has its own experts, 0 when routing ignores
  the label). *Lift* of (label, expert) = P(expert | label) / P(expert).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from moekit.analysis.recorder import DriftMeter, LayerAggregate, RoutingAggregates

DEAD_FRACTION = 0.01
ANALYSIS_FORMAT = "moekit-analysis"
ANALYSIS_VERSION = 1


def _arr(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def _num(x: float, digits: int = 6) -> float | None:
    """A JSON-safe float (None for NaN/inf), rounded so stats.json stays readable."""
    x = float(x)
    return round(x, digits) if math.isfinite(x) else None


def _nums(a, digits: int = 6) -> list:
    a = _arr(a)
    if a.ndim == 0:
        return _num(a, digits)
    return [_nums(row, digits) for row in a] if a.ndim > 1 else [_num(v, digits) for v in a]


# -- balance ------------------------------------------------------------------------------------
def load_share(load) -> np.ndarray:
    """Each expert's share of the assignments (sums to 1; zeros if there were none)."""
    load = _arr(load)
    total = load.sum()
    return load / total if total > 0 else np.zeros_like(load)


def imbalance(load) -> float:
    """max / mean load: 1.0 is perfect balance, E means one expert takes all (NaN with no load)."""
    load = _arr(load)
    mean = load.mean() if load.size else 0.0
    return float(load.max() / mean) if mean > 0 else float("nan")


def coefficient_of_variation(load) -> float:
    """Population standard deviation / mean of the load (0 = perfect balance)."""
    load = _arr(load)
    mean = load.mean() if load.size else 0.0
    return float(load.std() / mean) if mean > 0 else float("nan")


def dead_experts(load, dead_fraction: float = DEAD_FRACTION) -> list[int]:
    """Experts whose load is below ``dead_fraction`` of the mean load (with 0: exactly zero load)."""
    load = _arr(load)
    if load.sum() <= 0:
        return list(range(load.size))
    limit = dead_fraction * load.mean()
    return [int(i) for i in np.flatnonzero(load <= limit if dead_fraction == 0 else load < limit)]


def total_variation(p, q) -> float:
    """Total-variation distance between two load vectors, each normalised to a distribution: in [0, 1]."""
    return float(0.5 * np.abs(load_share(p) - load_share(q)).sum())


# -- information --------------------------------------------------------------------------------
def entropy_bits(counts) -> float:
    """Shannon entropy in bits of the distribution given by non-negative counts (or probabilities)."""
    p = load_share(_arr(counts).ravel())
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


def mutual_information(joint) -> float:
    """I(row; column) in bits from a joint count table [rows, columns]."""
    joint = _arr(joint)
    total = joint.sum()
    if total <= 0:
        return 0.0
    p = joint / total
    pr = p.sum(axis=1, keepdims=True)
    pc = p.sum(axis=0, keepdims=True)
    nz = p > 0
    mi = float((p[nz] * np.log2(p[nz] / (pr @ pc)[nz])).sum())
    return max(mi, 0.0)  # rounding can leave -1e-17


def normalised_mutual_information(joint) -> float:
    """MI / H(row): 0 = the column says nothing about the row, 1 = the column determines the row."""
    h = entropy_bits(_arr(joint).sum(axis=1))
    return mutual_information(joint) / h if h > 0 else 0.0


# -- co-activation and layer agreement ----------------------------------------------------------
def coactivation_conditional(coactivation) -> np.ndarray:
    """P(expert j chosen | expert i chosen) from co-activation counts; the diagonal is set to 0.

    For top-k routing each row sums to k - 1.
    """
    c = _arr(coactivation)
    diag = np.diag(c).copy()
    out = np.divide(c, diag[:, None], out=np.zeros_like(c), where=diag[:, None] > 0)
    np.fill_diagonal(out, 0.0)
    return out


def layer_agreement(transition) -> dict[str, float]:
    """How one MoE layer's top-1 choice relates to the previous layer's, from their transition counts.

    Returns:
        ``same_expert``: share of tokens whose top-1 index is the same in both layers (meaningful when
        expert indices correspond, e.g. after upcycling); ``predictability``: share of tokens that go
        to the most common successor of their expert (1 = the path is deterministic);
        ``mi_bits``; ``nmi``: MI / sqrt(H(a) H(b)) (0 = independent, 1 = one-to-one).
    """
    t = _arr(transition)
    total = t.sum()
    if total <= 0:
        return {"same_expert": float("nan"), "predictability": float("nan"), "mi_bits": 0.0, "nmi": 0.0}
    n = min(t.shape)
    mi = mutual_information(t)
    ha, hb = entropy_bits(t.sum(axis=1)), entropy_bits(t.sum(axis=0))
    return {
        "same_expert": float(np.trace(t[:n, :n]) / total),
        "predictability": float(t.max(axis=1).sum() / total),
        "mi_bits": mi,
        "nmi": mi / math.sqrt(ha * hb) if ha > 0 and hb > 0 else 0.0,
    }


# -- specialisation -----------------------------------------------------------------------------
def specialisation(label_expert, label_names: Sequence[str], top: int = 3) -> dict[str, Any]:
    """How each label spreads over the experts of one layer, from ``label_expert`` counts [labels, experts] (rows
    named by ``label_names``): ``distribution`` P(expert | label), ``lift`` P(expert | label) / P(expert),
    ``mi_bits``, ``label_entropy_bits``, ``mi_normalised``, and ``top_experts``: per label, the ``top`` experts
    by lift (ties by share) with their share and lift."""
    joint = _arr(label_expert)
    rows = joint.sum(axis=1, keepdims=True)
    dist = np.divide(joint, rows, out=np.zeros_like(joint), where=rows > 0)
    p_e = load_share(joint.sum(axis=0))
    lift = np.divide(dist, p_e[None, :], out=np.zeros_like(dist), where=p_e[None, :] > 0)
    top_experts = {}
    for i, name in enumerate(label_names):
        if rows[i, 0] <= 0:
            top_experts[name] = []
            continue
        order = sorted(range(joint.shape[1]), key=lambda e: (-lift[i, e], -dist[i, e], e))[:top]
        top_experts[name] = [{"expert": e, "share": float(dist[i, e]), "lift": float(lift[i, e])} for e in order]
    return {
        "distribution": dist,
        "lift": lift,
        "mi_bits": mutual_information(joint),
        "label_entropy_bits": entropy_bits(joint.sum(axis=1)),
        "mi_normalised": normalised_mutual_information(joint),
        "top_experts": top_experts,
    }


# -- summary -----------------------------------------------------------------------------------
def layer_summary(agg: LayerAggregate, label_names: Sequence[str], dead_fraction: float = DEAD_FRACTION) -> dict:
    """The numbers of one layer (JSON-ready)."""
    E = agg.num_experts
    load = _arr(agg.routed)
    share = load_share(load)
    tokens = max(agg.tokens, 1)
    # Balance is that of the FFN experts: MoE++'s zero-computation experts (after them) are meant to differ.
    ffn = load[: agg.kinds.count("ffn")] if agg.kinds is not None else load
    out: dict[str, Any] = {
        "layer": agg.layer,
        "name": agg.name,
        "num_experts": E,
        "top_k": agg.top_k,
        # Measured: relu routing and expert choice give tokens a varying number of experts around top_k.
        "experts_per_token": _num(load.sum() / tokens),
        "tokens": agg.tokens,
        "load": [int(v) for v in agg.routed.tolist()],
        "load_share": _nums(share),
        "load_relative": _nums(share * E),  # load / fair share
        "token_share": _nums(load / tokens),  # share of tokens each expert saw
        "processed": [int(v) for v in agg.processed.tolist()],
        "top1": [int(v) for v in agg.top1.tolist()],
        "weight_sum": _nums(agg.weight_sum),
        "weight_mean": _nums(np.divide(_arr(agg.weight_sum), load, out=np.zeros(E), where=load > 0)),
        "imbalance": _num(imbalance(ffn)),
        "cv": _num(coefficient_of_variation(ffn)),
        "max_expert": int(np.argmax(ffn)) if ffn.size else None,
        "max_token_share": _num(ffn.max() / tokens) if ffn.size else None,
        "dead_experts": dead_experts(ffn, dead_fraction),
        "dead_fraction": dead_fraction,
        "load_entropy_bits": _num(entropy_bits(load)),
        "dropped_tokens": agg.dropped_tokens,
        "dropped_assignments": agg.dropped_assignments,
        "dropped_token_share": _num(agg.dropped_tokens / tokens),
        "coactivation": agg.coactivation.tolist(),
        # Derivable from the counts; kept for readable E only, so stats.json stays small for 256-expert models.
        "coactivation_conditional": _nums(coactivation_conditional(agg.coactivation)) if E <= 64 else None,
    }
    if agg.kinds is not None:
        out["zero_computation"] = _zero_computation_summary(agg, load)
    out["entropy"] = _entropy_summary(agg)
    out["specialisation"] = _specialisation_summary(agg, label_names)
    return out


def _zero_computation_summary(agg: LayerAggregate, load: np.ndarray) -> dict[str, Any]:
    """MoE++ layers: each candidate's kind, the share of assignments per kind, and the share of tokens that skipped
    the FFN (every choice a zero, copy or constant expert)."""
    assert agg.kinds is not None, "called for MoE++ layers only"
    total = max(load.sum(), 1.0)
    kinds = list(dict.fromkeys(agg.kinds))
    return {
        "kinds": list(agg.kinds),
        "assignment_share": {k: _num(sum(v for v, kind in zip(load, agg.kinds) if kind == k) / total) for k in kinds},
        "ffn_skipped_tokens": agg.ffn_skipped_tokens,
        "ffn_skipped_share": _num(agg.ffn_skipped_tokens / max(agg.tokens, 1)),
    }


def _entropy_summary(agg: LayerAggregate) -> dict[str, Any] | None:
    n, E = int(agg.entropy_hist.sum()), agg.num_experts
    if not agg.has_scores or n <= 0:
        return None
    return {
        "mean_nats": _num(agg.entropy_sum / n),
        "mean_normalised": _num(agg.entropy_sum / n / math.log(E)) if E > 1 else 0.0,
        "max_nats": _num(math.log(E)),
        "bin_edges": _nums(np.linspace(0.0, 1.0, agg.entropy_bins + 1)),
        "histogram": [int(v) for v in agg.entropy_hist.tolist()],
    }


def _specialisation_summary(agg: LayerAggregate, label_names: Sequence[str]) -> dict[str, Any] | None:
    if not label_names or int(agg.label_tokens.sum()) <= 0:
        return None
    spec = specialisation(agg.label_routed, label_names)
    return {
        "label_tokens": [int(v) for v in agg.label_tokens.tolist()],
        "counts": agg.label_routed.tolist(),
        "top1_counts": agg.label_top1.tolist(),
        "distribution": _nums(spec["distribution"]),
        "lift": _nums(spec["lift"]),
        "mi_bits": _num(spec["mi_bits"]),
        "mi_top1_bits": _num(mutual_information(agg.label_top1)),
        "label_entropy_bits": _num(spec["label_entropy_bits"]),
        "mi_normalised": _num(spec["mi_normalised"]),
        "top_experts": {
            name: [{k: _num(v) if isinstance(v, float) else v for k, v in d.items()} for d in lst]
            for name, lst in spec["top_experts"].items()
        },
    }


def drift_summary(a: RoutingAggregates, b: RoutingAggregates, meter: DriftMeter) -> list[dict[str, Any]]:
    """Per layer: total-variation distance of the loads, share of tokens whose top-1 changed, top-k overlap."""
    out = []
    for n, (la, lb) in enumerate(zip(a.layers, b.layers)):
        tokens = max(meter.tokens[n], 1)
        out.append(
            {
                "layer": la.layer,
                "tokens": meter.tokens[n],
                "load_tv": _num(total_variation(la.routed, lb.routed)),
                "top1_changed": _num(meter.top1_changed[n] / tokens),
                "topk_overlap": _num(meter.topk_overlap[n] / tokens),
                "load": [la.routed.tolist(), lb.routed.tolist()],
            }
        )
    return out


def training_summary(records: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """Imbalance over training from metrics.jsonl records (None when they hold none)."""
    train = [r for r in records if "layer_imbalance" in r and "step" in r]
    val = [r for r in records if "val_layer_imbalance" in r and "step" in r]
    if not train and not val:
        return None
    return {
        "steps": [r["step"] for r in train],
        "imbalance": [_num(r.get("imbalance", float("nan"))) for r in train],
        "layer_imbalance": [[_num(v) for v in r["layer_imbalance"]] for r in train],
        "val_steps": [r["step"] for r in val],
        "val_layer_imbalance": [[_num(v) for v in r["val_layer_imbalance"]] for r in val],
    }


def summarize(
    agg: RoutingAggregates,
    dead_fraction: float = DEAD_FRACTION,
    drift: list[dict[str, Any]] | None = None,
    training: dict[str, Any] | None = None,
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything the report shows, as a JSON-ready dict (the content of ``stats.json``)."""
    layers = [layer_summary(layer, agg.label_names, dead_fraction) for layer in agg.layers]
    transitions = []
    for n, t in enumerate(agg.transitions):
        transitions.append(
            {
                "from": agg.layers[n].layer,
                "to": agg.layers[n + 1].layer,
                "matrix": t.tolist(),
                **{k: _num(v) for k, v in layer_agreement(t).items()},
            }
        )
    return {
        "format": ANALYSIS_FORMAT,
        "version": ANALYSIS_VERSION,
        **(meta or {}),
        "tokens": agg.layers[0].tokens if agg.layers else 0,
        "sequences": agg.sequences,
        "label_names": list(agg.label_names),
        "layers": layers,
        "transitions": transitions,
        "drift": drift,
        "training": training,
    }
