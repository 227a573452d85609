"""The automatic reading of a routing summary: short plain-language observations per report section.

Thresholds: max/mean load up to 1.25 reads as balanced, above 2 as imbalanced; a layer whose busiest
expert sees more than half the tokens at 2x its fair share or more reads as collapsed (the same rule
as :class:`moekit.analysis.health.CollapseMonitor`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

BALANCED = 1.25  # max/mean at or below this reads as balanced
IMBALANCED = 2.0  # above this reads as imbalanced
MIN_LABEL_TOKENS = 50  # labels with fewer tokens (or under 1% of them) get no per-label reading


def _experts(ids: Sequence[int]) -> str:
    ids = list(ids)
    if len(ids) > 8:
        return f"experts {', '.join(map(str, ids[:8]))} and {len(ids) - 8} more"
    return f"expert{'s' if len(ids) > 1 else ''} {', '.join(map(str, ids))}"


def _layer_load_reading(layer: dict[str, Any]) -> str:
    name = f"layer {layer['layer']}"
    imb, cv = layer["imbalance"], layer["cv"]
    if imb is None:
        return f"{name} routed no tokens"
    top, share = layer["max_expert"], layer["max_token_share"] or 0.0
    dead = layer["dead_experts"]
    if share > 0.5 and imb >= IMBALANCED:
        text = f"{name} has collapsed onto expert {top} ({share:.0%} of its tokens, max/mean {imb:.2f})"
    elif imb <= BALANCED:
        text = f"{name} is balanced (max/mean {imb:.2f}, CV {cv:.2f})"
    elif imb <= IMBALANCED:
        text = f"{name} is mildly imbalanced (max/mean {imb:.2f}, CV {cv:.2f}): expert {top} gets {imb:.1f}x"
        text += " its fair share"
    else:
        text = f"{name} is imbalanced (max/mean {imb:.2f}, CV {cv:.2f}): expert {top} gets {imb:.1f}x its fair share"
    if dead:
        verb = "are" if len(dead) > 1 else "is"
        text += f"; {_experts(dead)} {verb} dead (under {layer['dead_fraction']:.0%} of the fair share)"
    if layer["dropped_tokens"]:
        text += f"; {layer['dropped_token_share']:.1%} of tokens were dropped at capacity"
    return text


def _zero_computation(layers: list[dict[str, Any]]) -> list[str]:
    """MoE++ layers: how many tokens skipped the FFN, and where the assignments went."""
    out = []
    for layer in layers:
        if not (zc := layer.get("zero_computation")):
            continue
        shares = ", ".join(f"{kind} {share:.0%}" for kind, share in zc["assignment_share"].items())
        out.append(
            f"{zc['ffn_skipped_share']:.0%} of tokens skipped the FFN in layer {layer['layer']} (every choice a "
            f"zero-computation expert); assignments: {shares}"
        )
    return out


def _overview(layers: list[dict[str, Any]], load: list[str]) -> list[str]:
    imbs = [layer["imbalance"] for layer in layers if layer["imbalance"] is not None]
    if imbs and max(imbs) <= BALANCED and not any(layer["dead_experts"] for layer in layers):
        return [
            f"All {len(layers)} MoE layers are balanced (max/mean {min(imbs):.2f} to {max(imbs):.2f}); no dead experts."
        ]
    return [t for t in load if not t.split(" (")[0].endswith("is balanced")]


def _training(training: dict[str, Any] | None) -> list[str]:
    out = []
    if training and training["steps"]:
        first, last = training["imbalance"][0], training["imbalance"][-1]
        if first is not None and last is not None:
            trend = "fell" if last < first else "rose" if last > first else "stayed"
            out.append(
                f"Mean imbalance over layers {trend} from {first:.2f} at step {training['steps'][0]} "
                f"to {last:.2f} at step {training['steps'][-1]}."
            )
    if training and training.get("val_steps"):
        val = training["val_layer_imbalance"][-1]
        worst = max(range(len(val)), key=lambda n: val[n] or 0)
        out.append(
            f"At the last evaluation (step {training['val_steps'][-1]}) the most imbalanced MoE layer was "
            f"number {worst} (max/mean {val[worst]:.2f} on validation data)."
        )
    return out


def _specialisation(layers: list[dict[str, Any]], label_names: Sequence[str]) -> list[str]:
    specs = [(layer, layer["specialisation"]) for layer in layers if layer.get("specialisation")]
    if not specs:
        return []
    best = max(specs, key=lambda ls: ls[1]["mi_bits"] or 0)
    worst = min(specs, key=lambda ls: ls[1]["mi_bits"] or 0)
    b = best[1]
    out = [
        f"Layer {best[0]['layer']} is the most label-specific: knowing its expert gives {b['mi_bits']:.3f} bits "
        f"about the label ({b['mi_normalised']:.1%} of H(label) = {b['label_entropy_bits']:.2f} bits)."
    ]
    if len(specs) > 1:
        w = worst[1]
        out.append(f"Layer {worst[0]['layer']} is the least: {w['mi_bits']:.3f} bits ({w['mi_normalised']:.1%}).")
    counts = dict(zip(label_names, b["label_tokens"]))
    total = sum(counts.values())
    for name, top in b["top_experts"].items():
        n = counts.get(name, 0)
        if not top or n < max(MIN_LABEL_TOKENS, 0.01 * total):
            continue  # a lift measured on a handful of tokens is noise
        t = top[0]
        out.append(
            f"In layer {best[0]['layer']}, {name} ({n:,} tokens) prefers expert {t['expert']} "
            f"(lift {t['lift']:.2f}: {t['share']:.0%} of its assignments)."
        )
    return out


def _coactivation(layers: list[dict[str, Any]]) -> list[str]:
    pairs = []
    for layer in layers:
        k, E = layer["top_k"], layer["num_experts"]
        if k < 2 or E < 3 or layer["coactivation_conditional"] is None:
            continue
        m = layer["coactivation_conditional"]
        for i in range(E):
            for j in range(E):
                if i != j and m[i][j] is not None:
                    pairs.append((m[i][j], layer, i, j, (k - 1) / (E - 1)))
    if not pairs:
        return []
    p, layer, i, j, uniform = max(pairs, key=lambda t: t[0] / t[4])
    return [
        f"Strongest pairing: layer {layer['layer']}, expert {i} is joined by expert {j} for {p:.0%} of its "
        f"tokens ({p / uniform:.1f}x the {uniform:.0%} expected if partners were uniform)."
    ]


def _layers(trans: list[dict[str, Any]]) -> list[str]:
    if not trans:
        return []
    nmis = [t["nmi"] for t in trans if t["nmi"] is not None]
    best = max(trans, key=lambda t: t["nmi"] or 0)
    span = f"{min(nmis):.2f}" if f"{min(nmis):.2f}" == f"{max(nmis):.2f}" else f"{min(nmis):.2f} to {max(nmis):.2f}"
    return [
        f"Between consecutive MoE layers the normalised mutual information of top-1 choices is {span}; "
        f"the most coupled pair is {best['from']} -> {best['to']} (a token goes to the most common "
        f"successor of its expert {best['predictability']:.0%} of the time)."
    ]


def _entropy(layers: list[dict[str, Any]]) -> list[str]:
    ents = [(layer, layer["entropy"]) for layer in layers if layer.get("entropy")]
    if not ents:
        return []
    lo = min(ents, key=lambda le: le[1]["mean_normalised"])
    hi = max(ents, key=lambda le: le[1]["mean_normalised"])
    lo_v, hi_v = lo[1]["mean_normalised"], hi[1]["mean_normalised"]
    if len(ents) == 1 or hi_v - lo_v < 0.01:
        out = [f"Mean router entropy is {hi_v:.2f} of its maximum in every layer."]
    else:
        out = [
            f"The router of layer {lo[0]['layer']} is the most decisive (mean entropy {lo_v:.2f} of its "
            f"maximum), that of layer {hi[0]['layer']} the least ({hi_v:.2f})."
        ]
    if hi_v > 0.9:
        out.append(
            "Mean entropy above 0.9 of the maximum: router scores are close to uniform, so the top-k choices "
            "rest on small margins (common early in training, or with small router logits)."
        )
    return out


def _drift(drift: list[dict[str, Any]] | None) -> list[str]:
    if not drift:
        return []
    most = max(drift, key=lambda d: d["top1_changed"] or 0)
    if (most["top1_changed"] or 0) == 0 and all((d["load_tv"] or 0) == 0 for d in drift):
        return ["The two checkpoints route every token identically."]
    return [
        f"Layer {most['layer']} changed most: {most['top1_changed']:.0%} of tokens have a different top-1 "
        f"expert (load TV distance {most['load_tv']:.3f})."
    ]


def readings(summary: dict[str, Any]) -> dict[str, list[str]]:
    """Short plain-language observations per report section (``overview`` holds the headline ones)."""
    layers = summary["layers"]
    load = [_layer_load_reading(layer) for layer in layers]
    out = {
        "overview": _overview(layers, load),
        "load": load,
        "training": _training(summary.get("training")),
        "specialisation": _specialisation(layers, summary["label_names"]),
        "coactivation": _coactivation(layers),
        "layers": _layers(summary.get("transitions") or []),
        "entropy": _entropy(layers),
        "drift": _drift(summary.get("drift")),
    }
    # The headline: unbalanced layers (above), then the most label-specific layer and the drift.
    zero_computation = _zero_computation(layers)
    out["load"] += zero_computation
    out["overview"] += zero_computation + out["specialisation"][:1] + out["drift"][:1]
    return out
