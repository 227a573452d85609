"""Plots of a routing summary (the dict of :func:`moekit.analysis.stats.summarize`) as PNG bytes.

matplotlib's object API with the Agg canvas: no pyplot, no global backend switch, safe in threads
and on machines without a display. Every plot draws only numbers that are in the summary (and so
in ``stats.json``); :class:`Plot.data` names where.
"""

from __future__ import annotations

import dataclasses
import io
import math
from collections.abc import Sequence
from typing import Any

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure

DPI = 110
MAX_GRID_LAYERS = 12


@dataclasses.dataclass
class Plot:
    """One figure: file name, title, caption (what it shows), PNG bytes and its stats.json source."""

    name: str
    title: str
    caption: str
    png: bytes
    data: str


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight", facecolor="white")
    return buf.getvalue()


def _matrix(rows: Sequence[Sequence[float | None]]) -> np.ndarray:
    width = max((len(r) for r in rows), default=0)
    out = np.full((len(rows), width), np.nan)
    for i, r in enumerate(rows):
        out[i, : len(r)] = [np.nan if v is None else v for v in r]
    return out


def _annotate(ax, values: np.ndarray, fmt: str, norm=None, cmap=None, size: float = 8, shade=None) -> None:
    """Write each cell's value, dark on light cells and light on dark ones (``shade``: the coloured values)."""
    shade = values if shade is None else shade
    n_rows, n_cols = values.shape
    if n_rows * n_cols > 400:
        return
    for i in range(n_rows):
        for j in range(n_cols):
            v = values[i, j]
            if not np.isfinite(v):
                continue
            color = "black"
            if norm is not None and cmap is not None:
                r, g, b, _ = cmap(norm(shade[i, j]))
                color = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"
            ax.text(j, i, format(v, fmt), ha="center", va="center", fontsize=size, color=color)


def _grid(n: int, max_cols: int = 4) -> tuple[int, int]:
    cols = min(n, max_cols)
    return math.ceil(n / cols), cols


def _pick_layers(summary: dict[str, Any], key, limit: int = MAX_GRID_LAYERS) -> list[int]:
    """Positions of the layers to draw: all, or the ``limit`` with the largest ``key(layer)``."""
    layers = summary["layers"]
    if len(layers) <= limit:
        return list(range(len(layers)))
    ranked = sorted(range(len(layers)), key=lambda n: -(key(layers[n]) or 0.0))[:limit]
    return sorted(ranked)


# -- plots ------------------------------------------------------------------------------------
def load_heatmap(summary: dict[str, Any]) -> Plot:
    """Layer x expert load relative to the fair share (1 = balanced)."""
    layers = summary["layers"]
    rel = _matrix([layer["load_relative"] for layer in layers])
    L, E = rel.shape
    fig = Figure(figsize=(min(2.0 + 0.55 * E, 16), 1.4 + 0.45 * L))
    ax = fig.add_subplot()
    vmax = max(2.0, float(np.nanmax(rel)) if rel.size else 2.0)
    norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=vmax)
    cmap = matplotlib.colormaps["RdBu_r"]
    im = ax.imshow(rel, cmap=cmap, norm=norm, aspect="auto")
    ax.set_xticks(range(E))
    ax.set_yticks(range(L), [f"layer {layer['layer']}" for layer in layers])
    ax.set_xlabel("expert")
    if E > 24:
        ax.set_xticks(range(0, E, max(1, E // 16)))
    _annotate(ax, rel, ".2f", norm, cmap, size=7 if E > 12 else 8)
    for n, layer in enumerate(layers):
        for e in layer["dead_experts"]:
            ax.add_patch(_dead_box(e, n))
    fig.colorbar(im, ax=ax, label="load / fair share", shrink=0.9)
    ax.set_title("Expert load per layer (1.00 = fair share)")
    return Plot(
        "load_heatmap",
        "Expert load",
        "Share of each layer's assignments that each expert received, divided by the fair share 1/E: "
        "1.00 is perfect balance, red experts are overloaded, blue ones underused, a boxed cell is a dead expert.",
        _png(fig),
        "layers[*].load_relative",
    )


def _dead_box(e: int, n: int):
    from matplotlib.patches import Rectangle

    return Rectangle((e - 0.5, n - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=2.0)


def imbalance_curve(training: dict[str, Any]) -> Plot:
    """max/mean load per layer over training steps (train batches), with validation points."""
    fig = Figure(figsize=(8, 3.6))
    ax = fig.add_subplot()
    steps = training["steps"]
    per_layer = _matrix(training["layer_imbalance"]) if training["layer_imbalance"] else np.zeros((0, 0))
    colors = matplotlib.colormaps["tab10"]
    for n in range(per_layer.shape[1]):
        ax.plot(steps, per_layer[:, n], color=colors(n % 10), linewidth=1.2, label=f"MoE layer {n}")
    if training.get("val_steps"):
        val = _matrix(training["val_layer_imbalance"])
        for n in range(val.shape[1]):
            ax.plot(training["val_steps"], val[:, n], "o", color=colors(n % 10), markersize=4)
    ax.axhline(1.0, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("training step")
    ax.set_ylabel("max / mean expert load")
    ax.set_title("Load imbalance during training")
    if 0 < per_layer.shape[1] <= 12 and len(steps):
        ax.legend(fontsize=7, ncol=2, frameon=False)
    ax.grid(alpha=0.25)
    return Plot(
        "imbalance_training",
        "Imbalance during training",
        "max/mean expert load of each MoE layer on the training batches (lines, from metrics.jsonl) and on "
        "the validation data at each evaluation (dots); 1 is perfect balance. Layers are numbered among MoE "
        "layers in order.",
        _png(fig),
        "training.layer_imbalance, training.val_layer_imbalance",
    )


def specialisation_grid(summary: dict[str, Any], layers: Sequence[int] | None = None) -> Plot | None:
    """Label x expert lift per layer (a grid of heatmaps); None without labels."""
    with_spec = [n for n, layer in enumerate(summary["layers"]) if layer.get("specialisation")]
    if not with_spec:
        return None
    if layers is None:
        chosen = _pick_layers(summary, lambda layer: (layer.get("specialisation") or {}).get("mi_bits"))
        layers = [n for n in chosen if n in with_spec]
    names = summary["label_names"]
    rows, cols = _grid(len(layers), 2 if len(layers) == 4 else 3)
    E = max(summary["layers"][n]["num_experts"] for n in layers)
    fig = Figure(figsize=(cols * min(1.2 + 0.42 * E, 7), rows * (0.9 + 0.36 * len(names))), layout="constrained")
    cmap = matplotlib.colormaps["PuOr_r"]
    norm = TwoSlopeNorm(vmin=-2.0, vcenter=0.0, vmax=2.0)
    im = None
    for i, n in enumerate(layers):
        layer = summary["layers"][n]
        spec = layer["specialisation"]
        lift = _matrix(spec["lift"])
        ax = fig.add_subplot(rows, cols, i + 1)
        log_lift = np.log2(np.clip(lift, 1 / 8, 8))
        im = ax.imshow(log_lift, cmap=cmap, norm=norm, aspect="auto")
        ax.set_yticks(range(len(names)), names if i % cols == 0 else [""] * len(names), fontsize=8)
        ax.set_xticks(range(lift.shape[1]))
        ax.tick_params(axis="x", labelsize=7)
        _annotate(ax, lift, ".1f", norm=norm, cmap=cmap, size=7, shade=log_lift)
        ax.set_title(f"layer {layer['layer']}: MI {spec['mi_bits']:.2f} bits ({spec['mi_normalised']:.0%})", fontsize=9)
        ax.set_xlabel("expert", fontsize=8)
    fig.colorbar(im, ax=fig.axes, label="log2 lift", shrink=0.8)
    return Plot(
        "specialisation",
        "Expert specialisation",
        "For each label (row) and expert (column): lift = P(expert | label) / P(expert), the share of the "
        "label's tokens the expert gets relative to its share of all tokens (numbers; colour is log2 lift, "
        "orange = preferred, purple = avoided). Titles give the mutual information between label and expert "
        "and its share of H(label).",
        _png(fig),
        "layers[*].specialisation.lift",
    )


def coactivation_grid(summary: dict[str, Any]) -> Plot | None:
    """P(j | i) per layer; None when every token has a single expert (top-1)."""
    layers = summary["layers"]
    picked = [
        n
        for n in _pick_layers(summary, lambda layer: layer.get("imbalance"))
        if layers[n]["top_k"] > 1 and layers[n]["coactivation_conditional"] is not None
    ]
    if not picked:
        return None
    rows, cols = _grid(len(picked), 4)
    E = max(summary["layers"][n]["num_experts"] for n in picked)
    size = min(1.0 + 0.3 * E, 5.5)
    fig = Figure(figsize=(cols * size, rows * size), layout="constrained")
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#dddddd")
    vmax = 0.0
    mats = []
    for n in picked:
        m = _matrix(summary["layers"][n]["coactivation_conditional"])
        np.fill_diagonal(m, np.nan)
        mats.append(m)
        vmax = max(vmax, float(np.nanmax(m)) if np.isfinite(m).any() else 0.0)
    im = None
    for i, (n, m) in enumerate(zip(picked, mats)):
        ax = fig.add_subplot(rows, cols, i + 1)
        im = ax.imshow(m, cmap=cmap, vmin=0.0, vmax=vmax or 1.0)
        ax.set_title(f"layer {summary['layers'][n]['layer']}", fontsize=9)
        ax.set_xlabel("expert j", fontsize=8)
        ax.set_ylabel("expert i", fontsize=8)
        ax.tick_params(labelsize=7)
        if m.shape[0] <= 10:
            _annotate(ax, m, ".2f", norm=matplotlib.colors.Normalize(0.0, vmax or 1.0), cmap=cmap, size=6)
    fig.colorbar(im, ax=fig.axes, label="P(j chosen | i chosen)", shrink=0.8)
    return Plot(
        "coactivation",
        "Expert co-activation",
        "For tokens routed to expert i (row), the share also routed to expert j (column); the diagonal is "
        "grey. Each row sums to k - 1. Bright pairs are experts that usually work together.",
        _png(fig),
        "layers[*].coactivation_conditional",
    )


def entropy_grid(summary: dict[str, Any]) -> Plot | None:
    """Histogram of per-token router entropy (normalised by ln E) per layer; None without router scores."""
    picked = [n for n in range(len(summary["layers"])) if summary["layers"][n].get("entropy")]
    if not picked:
        return None
    picked = picked[:MAX_GRID_LAYERS]
    rows, cols = _grid(len(picked), 4)
    fig = Figure(figsize=(cols * 3.0, rows * 2.3), layout="constrained")
    for i, n in enumerate(picked):
        ent = summary["layers"][n]["entropy"]
        edges = np.asarray(ent["bin_edges"])
        hist = np.asarray(ent["histogram"], dtype=float)
        share = hist / max(hist.sum(), 1.0)
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.bar(edges[:-1], share, width=np.diff(edges), align="edge", color="#4c72b0", edgecolor="white")
        ax.axvline(ent["mean_normalised"], color="#c44e52", linewidth=1.5)
        ax.set_xlim(0, 1)
        ax.set_title(f"layer {summary['layers'][n]['layer']}: mean {ent['mean_normalised']:.2f}", fontsize=9)
        ax.tick_params(labelsize=7)
        if i % cols == 0:
            ax.set_ylabel("share of tokens", fontsize=8)
        ax.set_xlabel("entropy / ln E", fontsize=8)
    return Plot(
        "entropy",
        "Router entropy",
        "Distribution over tokens of the router's entropy divided by its maximum ln E: near 0 the router is "
        "sure of one expert, near 1 it spreads its scores evenly. The red line is the mean.",
        _png(fig),
        "layers[*].entropy.histogram",
    )


def drift_bars(summary: dict[str, Any]) -> Plot | None:
    """Per-layer routing drift between two checkpoints; None without a comparison."""
    drift = summary.get("drift")
    if not drift:
        return None
    labels = [f"layer {d['layer']}" for d in drift]
    x = np.arange(len(drift))
    fig = Figure(figsize=(max(5.0, 1.0 + 0.8 * len(drift)), 3.4))
    ax = fig.add_subplot()
    w = 0.38
    top1 = [d["top1_changed"] or 0.0 for d in drift]
    tv = [d["load_tv"] or 0.0 for d in drift]
    b1 = ax.bar(x - w / 2, top1, w, label="tokens whose top-1 expert changed", color="#dd8452")
    b2 = ax.bar(x + w / 2, tv, w, label="total-variation distance of the loads", color="#4c72b0")
    ax.bar_label(b1, fmt="%.2f", fontsize=7)
    ax.bar_label(b2, fmt="%.2f", fontsize=7)
    ax.set_xticks(x, labels)
    ax.set_ylim(0, max(1.0, *top1, *tv) * 1.1)
    ax.legend(fontsize=8, frameon=False, loc="upper left")
    ax.set_title("Routing drift between the two checkpoints")
    return Plot(
        "drift",
        "Drift between checkpoints",
        "On the same tokens, the share whose top-1 expert differs between the two checkpoints (orange) and the "
        "total-variation distance between the two load distributions (blue); 0 means identical routing.",
        _png(fig),
        "drift[*].top1_changed, drift[*].load_tv",
    )


def make_plots(summary: dict[str, Any]) -> list[Plot]:
    """Every plot the summary supports, in report order."""
    plots = [load_heatmap(summary)]
    if summary.get("training") and (summary["training"]["steps"] or summary["training"]["val_steps"]):
        plots.append(imbalance_curve(summary["training"]))
    for make in (specialisation_grid, coactivation_grid, entropy_grid, drift_bars):
        p = make(summary)
        if p is not None:
            plots.append(p)
    return plots
