"""Expert merging: cluster each MoE layer's experts by what they compute, and average each cluster into one.

Per layer (HC-SMoE, Chen et al. 2024, "Retraining-Free Merging of Sparse MoE via Hierarchical Clustering"):

1. Similarity: every expert runs on the same sampled calibration tokens; two experts' similarity is the
   cosine of their concatenated outputs (:meth:`LayerStats.similarity`).
2. Clustering: average-linkage agglomerative clustering on that similarity, merging the most similar
   pair of clusters until ``target`` remain (deterministic: ties go to the lowest indices).
3. Merging: each cluster's ``w_in`` and ``w_out`` become the frequency-weighted average of its members'
   (weights = calibration assignments + 1e-3, so a cluster of unused experts is a plain mean).
4. Router: the cluster's router row (and bias, and ``e_score_correction_bias``) is the same
   frequency-weighted average of its members' rows. Choice: this keeps a merged expert's logit equal to
   its members' when they share a router row, so top-1 decisions and renormalised weights are kept
   exactly for identical experts. The alternative, a logit of ``logsumexp`` of the members' logits
   (the merged expert takes the members' whole softmax mass), is not a linear function of the input,
   and its linear approximation (average row + log(cluster size) bias) shifts top-k decisions toward
   big clusters; with ``norm_topk_prob`` the mass is renormalised away anyway.

Merged experts are ordered by their lowest member. ``top_k`` is capped at ``target`` (see :mod:`prune`).
Averaging weights ignores that two experts' hidden units may be permuted copies of each other; a short
fine-tune after merging recovers most of what that loses (benchmarks/prune_curve.py).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import torch

from moekit.errors import ConfigError
from moekit.models import MoELM
from moekit.recipes.calibration import LayerStats, calibration_batches, collect_expert_stats
from moekit.recipes.prune import (
    EXPERT_TENSORS,
    check_compressible,
    check_out_dir,
    load_for_compression,
    rebuild_with_experts,
    save_compressed,
)

logger = logging.getLogger(__name__)

FREQUENCY_EPS = 1e-3


def cluster_experts(similarity: torch.Tensor, target: int) -> list[list[int]]:
    """Average-linkage agglomerative clustering of E experts by ``similarity`` [E, E] (symmetric, higher = more
    alike) into ``target`` clusters: sorted member lists, ordered by their lowest member."""
    E = similarity.shape[0]
    if not 1 <= target <= E:
        raise ConfigError(f"cannot cluster {E} experts into {target}")
    sim = similarity.double().clone()
    clusters: dict[int, list[int]] = {e: [e] for e in range(E)}  # keyed by the lowest member
    sim.fill_diagonal_(float("-inf"))
    while len(clusters) > target:
        ids = sorted(clusters)
        sub = sim[ids][:, ids]
        flat = int(torch.argmax(sub))  # first maximum in row-major order: the lowest indices win ties
        a, b = ids[flat // len(ids)], ids[flat % len(ids)]
        a, b = min(a, b), max(a, b)
        na, nb = len(clusters[a]), len(clusters[b])
        # Lance-Williams update for average linkage: sim(a+b, c) = (na sim(a, c) + nb sim(b, c)) / (na + nb).
        merged = (na * sim[a] + nb * sim[b]) / (na + nb)
        sim[a], sim[:, a] = merged, merged
        sim[a, a] = float("-inf")
        sim[b], sim[:, b] = float("-inf"), float("-inf")
        clusters[a] = sorted(clusters[a] + clusters.pop(b))
    return [clusters[k] for k in sorted(clusters)]


def merge_weights(model: MoELM, clusters: Mapping[int, list[list[int]]], stats: Mapping[int, LayerStats]):
    """Per layer, the frequency-weighted average of each cluster's per-expert tensors."""
    state = model.state_dict()
    out = {}
    for layer, groups in clusters.items():
        prefix = f"layers.{layer}.mlp."
        freq = stats[layer].frequency.double() + FREQUENCY_EPS
        tensors = {}
        for name in EXPERT_TENSORS:
            if prefix + name not in state:
                continue
            t = state[prefix + name]
            rows = []
            for group in groups:
                w = freq[group] / freq[group].sum()
                w = w.to(device=t.device, dtype=torch.float64).view(-1, *([1] * (t.dim() - 1)))
                rows.append((t[group].double() * w).sum(0).to(t.dtype))
            tensors[name] = torch.stack(rows)
        out[layer] = tensors
    return out


def merge(model: MoELM, stats: Mapping[int, LayerStats], target: int) -> tuple[MoELM, dict[str, Any]]:
    """A copy of ``model`` with every MoE layer's experts merged down to ``target`` by output similarity (``stats``
    need a Gram matrix: ``collect_expert_stats(..., similarity_tokens > 0)``), and a JSON-friendly report of
    the clusters and their mean inner similarity per layer."""
    check_compressible(model, "merge")
    check_target(model, target)
    clusters, layers = {}, {}
    for layer, _ in model.moe_layers():
        sim = stats[layer].similarity()
        clusters[layer] = cluster_experts(sim, target)
        layers[str(layer)] = {
            "clusters": clusters[layer],
            "cluster_similarity": [round(_mean_inner(sim, g), 4) for g in clusters[layer]],
            **stats[layer].to_dict(),
        }
    notes: list[str] = []
    merged = rebuild_with_experts(model, merge_weights(model, clusters, stats), notes)
    for note in notes:
        logger.warning(note)
    report = {
        "method": "merge",
        "target": target,
        "layers": layers,
        "notes": notes,
        "parameters": {"before": model.num_parameters(), "after": merged.num_parameters()},
    }
    return merged, report


def check_target(model: MoELM, target: int) -> None:
    if isinstance(target, bool) or not isinstance(target, int) or target < 1:
        raise ConfigError(f"target={target!r} must be a positive number of experts")
    for layer, moe in model.moe_layers():
        E = moe.config.num_experts
        if target >= E:
            raise ConfigError(
                f"target={target} must be below the {E} experts of layer {layer} (merging removes experts)"
            )


def _mean_inner(sim: torch.Tensor, group: list[int]) -> float:
    if len(group) == 1:
        return 1.0
    sub = sim[group][:, group]
    n = len(group)
    return float((sub.sum() - sub.diagonal().sum()) / (n * (n - 1)))


def merge_checkpoint(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    target: int,
    calibration_data: str | os.PathLike | torch.Tensor | None = None,
    similarity_tokens: int = 2048,
    block_size: int = 128,
    batch_size: int = 16,
    max_batches: int | None = 8,
) -> dict[str, Any]:
    """The function behind ``moekit merge-experts``: load, calibrate, merge, save to ``out``; returns the report
    (also in ``out/compression.json``) with ``checkpoint`` set to the new folder."""
    if calibration_data is None:
        raise ConfigError("merging needs calibration data (a text file the expert outputs are compared on)")
    if similarity_tokens < 1:
        raise ConfigError(f"similarity_tokens={similarity_tokens} must be >= 1")
    check_out_dir(out)
    model, tokenizer, source = load_for_compression(checkpoint, "merge")
    check_target(model, target)
    block = min(block_size, model.config.max_position_embeddings)
    batches = calibration_batches(tokenizer, calibration_data, block, batch_size, max_batches, model.config.vocab_size)
    stats = collect_expert_stats(model, batches, similarity_tokens=similarity_tokens)
    merged, report = merge(model, stats, target)
    path = save_compressed(out, merged, tokenizer, report, source)
    return {**report, "checkpoint": str(path)}
