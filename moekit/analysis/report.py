"""The routing report: a self-contained ``report.html`` + ``stats.json`` + PNG copies of the plots.

The HTML has no external reference at all (images are base64 ``data:`` URIs, CSS is inline, the
layer selector of the token view is plain HTML/CSS radio buttons), so it opens offline and can be
mailed as one file. Every number in its tables carries ``data-stat="path.in.stats.json"``, and the
plots draw only numbers stored in ``stats.json``.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moekit.analysis.readings import readings
from moekit.io.safe_io import atomic_write_bytes, atomic_write_json, atomic_write_text

if TYPE_CHECKING:  # plots imports matplotlib, which only drawing needs
    from moekit.analysis.plots import Plot

# -- HTML -----------------------------------------------------------------------------------------
CSS = """
:root { --ink:#1f2430; --muted:#5f6b7a; --line:#e3e7ee; --card:#f6f8fb; --accent:#3b6fd8; }
* { box-sizing: border-box; }
body { margin:0; font:15px/1.5 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       color:var(--ink); background:#fff; }
header { background:linear-gradient(120deg,#24324f,#3b6fd8); color:#fff; padding:28px 0 22px; }
header h1 { margin:0 0 4px; font-size:28px; font-weight:650; letter-spacing:.2px; }
header .sub { margin:0; opacity:.85; font-size:14px; }
.wrap { max-width:1120px; margin:0 auto; padding:0 28px; }
nav { position:sticky; top:0; background:#fff; border-bottom:1px solid var(--line); z-index:5; }
nav a { display:inline-block; padding:10px 12px 9px; color:var(--muted); text-decoration:none; font-size:13.5px; }
nav a:hover { color:var(--accent); }
section { padding:26px 0 8px; border-bottom:1px solid var(--line); }
section:last-of-type { border-bottom:none; }
h2 { font-size:21px; margin:0 0 12px; }
h3 { font-size:15px; margin:18px 0 8px; color:var(--muted); font-weight:600; }
.cards { display:grid; grid-template-columns:repeat(auto-fit,minmax(150px,1fr)); gap:12px; margin:6px 0 16px; }
.card { background:var(--card); border:1px solid var(--line); border-radius:10px; padding:12px 14px; }
.card .v { font-size:22px; font-weight:650; }
.card .k { color:var(--muted); font-size:12.5px; text-transform:uppercase; letter-spacing:.4px; }
ul.reading { margin:8px 0 14px; padding:0; list-style:none; }
ul.reading li { background:#eef4ff; border-left:4px solid var(--accent); padding:7px 12px; margin:6px 0;
                border-radius:0 6px 6px 0; }
figure { margin:10px 0 18px; }
figure img { max-width:100%; height:auto; border:1px solid var(--line); border-radius:8px; display:block; }
figcaption { color:var(--muted); font-size:13.5px; margin-top:6px; max-width:900px; }
table { border-collapse:collapse; margin:6px 0 16px; font-size:13.5px; }
th, td { padding:5px 10px; border-bottom:1px solid var(--line); text-align:right; white-space:nowrap; }
th { background:var(--card); font-weight:600; color:var(--muted); }
td:first-child, th:first-child { text-align:left; }
.note { color:var(--muted); font-size:13.5px; }
.tv-radio { position:absolute; opacity:0; pointer-events:none; }
.tv-tabs { margin:6px 0 10px; }
.tv-tabs label { display:inline-block; padding:5px 12px; margin:0 6px 6px 0; border:1px solid var(--line);
                 border-radius:16px; cursor:pointer; font-size:13px; color:var(--muted); background:#fff; }
.tv-layer { display:none; }
.legend { margin:4px 0 12px; font-size:12.5px; }
.legend span { display:inline-block; padding:1px 7px; margin:0 4px 4px 0; border-radius:4px; }
.sample { margin:0 0 14px; }
.sample h4 { margin:8px 0 4px; font-size:13px; color:var(--muted); font-weight:600; }
.text { font:13px/1.9 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; white-space:pre-wrap;
        word-break:break-word; background:#fbfbfd; border:1px solid var(--line); border-radius:8px;
        padding:10px 12px; }
.text span { border-radius:3px; padding:1px 0; }
.text .nl { opacity:.45; }
footer { color:var(--muted); font-size:12.5px; padding:18px 0 40px; }
"""


# matplotlib's tab10, mixed with white so black text stays readable on it.
_TAB10 = ("1f77b4", "ff7f0e", "2ca02c", "d62728", "9467bd", "8c564b", "e377c2", "7f7f7f", "bcbd22", "17becf")


def expert_colour(e: int, num_experts: int) -> str:
    """A light background colour for expert ``e``: tab10 up to 10 experts, golden-angle hues beyond."""
    if num_experts <= len(_TAB10):
        r, g, b = (int(_TAB10[e][i : i + 2], 16) for i in (0, 2, 4))
        r, g, b = (round(c + (255 - c) * 0.55) for c in (r, g, b))
        return f"#{r:02x}{g:02x}{b:02x}"
    hue = (e * 137.508) % 360
    return f"hsl({hue:.0f},70%,{(74, 82, 88)[e % 3]}%)"


def _fmt(value: Any, fmt: str) -> str:
    return "n/a" if value is None else f"{value:.1%}" if fmt == "%" else format(value, fmt)


def _stat(path: str, value: Any, fmt: str = ".2f", tag: str = "td") -> str:
    """A cell showing ``value`` that names its place in stats.json."""
    attrs = f'data-stat="{html.escape(path)}" data-fmt="{html.escape(fmt)}"'
    return f"<{tag} {attrs}>{html.escape(_fmt(value, fmt))}</{tag}>"


Cell = str | tuple[str, Any, str]  # ready HTML, or (key under the row's stats.json path, value, format)


def _row(first: str, path: str, cells: Sequence[Cell]) -> str:
    body = "".join(c if isinstance(c, str) else _stat(f"{path}.{c[0]}", c[1], c[2]) for c in cells)
    return f"<tr><td>{first}</td>{body}</tr>"


def _table(head: Sequence[str], rows: Sequence[str]) -> str:
    return "<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + f"</tr>{''.join(rows)}</table>"


def _reading(lines: Sequence[str]) -> str:
    if not lines:
        return ""
    return '<ul class="reading">' + "".join(f"<li>{html.escape(t)}</li>" for t in lines) + "</ul>"


def _figure(plot: Plot) -> str:
    data = base64.b64encode(plot.png).decode("ascii")
    return (
        f'<figure id="fig-{plot.name}"><img src="data:image/png;base64,{data}" alt="{html.escape(plot.title)}">'
        f"<figcaption>{html.escape(plot.caption)}</figcaption></figure>"
    )


def _load_table(summary: dict[str, Any]) -> str:
    rows = []
    for n, layer in enumerate(summary["layers"]):
        ent = layer.get("entropy")
        cells: list[Cell] = [("imbalance", layer["imbalance"], ".2f"), ("cv", layer["cv"], ".2f")]
        cells += [("max_expert", layer["max_expert"], "d"), ("max_token_share", layer["max_token_share"], "%")]
        cells.append(f"<td>{html.escape(', '.join(map(str, layer['dead_experts'])) or '-')}</td>")
        cells.append(("entropy.mean_normalised", ent["mean_normalised"], ".2f") if ent else "<td>n/a</td>")
        cells += [("dropped_token_share", layer["dropped_token_share"], "%"), ("tokens", layer["tokens"], ",d")]
        rows.append(_row(f"layer {layer['layer']}", f"layers.{n}", cells))
    head = ["layer", "max/mean", "CV", "busiest expert", "its token share", "dead experts", "entropy / ln E"]
    return _table([*head, "dropped", "tokens"], rows)


def _top_expert_cell(path: str, top: Sequence[dict[str, Any]]) -> str:
    if not top:
        return "<td>-</td>"
    q = html.escape(f"{path}.0")
    return (
        f'<td>e<span data-stat="{q}.expert" data-fmt="d">{top[0]["expert"]}</span> '
        f'(lift <span data-stat="{q}.lift" data-fmt=".2f">{top[0]["lift"]:.2f}</span>)</td>'
    )


def _specialisation_tables(summary: dict[str, Any]) -> str:
    names = summary["label_names"]
    rows, top_rows = [], []
    for n, layer in enumerate(summary["layers"]):
        if not (spec := layer.get("specialisation")):
            continue
        p, first = f"layers.{n}.specialisation", f"layer {layer['layer']}"
        keys = (("mi_bits", ".3f"), ("mi_normalised", "%"), ("mi_top1_bits", ".3f"), ("label_entropy_bits", ".3f"))
        rows.append(_row(first, p, [(key, spec[key], fmt) for key, fmt in keys]))
        cells = [_top_expert_cell(f"{p}.top_experts.{name}", spec["top_experts"].get(name) or []) for name in names]
        top_rows.append(f"<tr><td>{first}</td>{''.join(cells)}</tr>")
    if not rows:
        return ""
    head = ["layer", "MI(label; expert) bits", "share of H(label)", "MI with top-1 only", "H(label) bits"]
    top_head = ["layer", *(html.escape(name) for name in names)]
    return _table(head, rows) + "<h3>Most specific expert per label (highest lift)</h3>" + _table(top_head, top_rows)


def _transition_table(summary: dict[str, Any]) -> str:
    trans = summary.get("transitions") or []
    if not trans:
        return '<p class="note">Only one MoE layer: nothing to compare.</p>'
    keys = (("nmi", ".2f"), ("mi_bits", ".3f"), ("predictability", "%"), ("same_expert", "%"))
    rows = [
        _row(f"{t['from']} &rarr; {t['to']}", f"transitions.{n}", [(k, t[k], fmt) for k, fmt in keys])
        for n, t in enumerate(trans)
    ]
    return _table(["layers", "NMI", "MI bits", "follows the usual path", "same expert index"], rows)


def _drift_table(summary: dict[str, Any]) -> str:
    keys = (("top1_changed", "%"), ("topk_overlap", "%"), ("load_tv", ".3f"))
    rows = [
        _row(f"layer {d['layer']}", f"drift.{n}", [(k, d[k], fmt) for k, fmt in keys])
        for n, d in enumerate(summary["drift"])
    ]
    return _table(["layer", "top-1 changed", "top-k overlap", "load TV distance"], rows)


def _token_view(samples: Sequence[dict[str, Any]], summary: dict[str, Any]) -> str:
    """Tokens coloured by top-1 expert, one copy per layer; radio buttons pick the layer (no script)."""
    if not samples:
        return ""
    layers = summary["layers"]
    radios, tabs, css, bodies = [], [], [], []
    for n, layer in enumerate(layers):
        checked = " checked" if n == 0 else ""
        radios.append(f'<input type="radio" name="tv-layer" id="tv-l{n}" class="tv-radio"{checked}>')
        tabs.append(f'<label for="tv-l{n}">layer {layer["layer"]}</label>')
        css.append(f"#tv-l{n}:checked ~ .tv-body .tv-layer-{n} {{ display:block; }}")
        css.append(
            f"#tv-l{n}:checked ~ .tv-tabs label[for=tv-l{n}] {{ background:var(--accent); color:#fff; "
            "border-color:var(--accent); }"
        )
        E = layer["num_experts"]
        kinds = (layer.get("zero_computation") or {}).get("kinds") or ["ffn"] * E  # MoE++: label the zero-computation
        names = [f"expert {e}" if kind == "ffn" else f"{kind} expert ({e})" for e, kind in enumerate(kinds)]
        legend = "".join(f'<span style="background:{expert_colour(e, E)}">{names[e]}</span>' for e in range(E))
        parts = [f'<div class="tv-layer tv-layer-{n}"><div class="legend">{legend}</div>']
        for s in samples:
            spans = []
            for t, piece in enumerate(s["tokens"]):
                experts, weights = s["experts"][t][n], s["weights"][t][n]
                top = experts[0] if experts else -1
                tip = ", ".join(f"e{e} {w:.2f}" for e, w in zip(experts, weights) if e >= 0) or "no expert"
                shown = html.escape(piece).replace("\n", '<span class="nl">&#9166;</span>\n')
                bg = f"background:{expert_colour(top, E)}" if top >= 0 else "background:#eee"
                spans.append(f'<span style="{bg}" title="layer {layer["layer"]}: {html.escape(tip)}">{shown}</span>')
            title = html.escape(s.get("label", ""))
            parts.append(f'<div class="sample"><h4>{title}</h4><div class="text">{"".join(spans)}</div></div>')
        parts.append("</div>")
        bodies.append("".join(parts))
    return (
        f"<style>{''.join(css)}</style>"
        + "".join(radios)
        + f'<div class="tv-tabs">{"".join(tabs)}</div>'
        + f'<div class="tv-body">{"".join(bodies)}</div>'
    )


def _esft_view(record: dict[str, Any]) -> str:
    """The experts ESFT chose to train, per MoE layer: every expert's relevance as a bar, the chosen coloured."""
    parts = [
        f'<p class="note">Relevance: {html.escape(str(record.get("relevance")))}; per layer the fewest experts whose '
        f"share of it reaches top_p = {html.escape(str(record.get('top_p')))} train, every other weight is frozen.</p>"
    ]
    for entry in record["layers"]:
        scores, chosen = entry["scores"], set(entry["experts"])
        total = sum(scores) or 1.0
        share = sum(scores[e] for e in chosen) / total
        parts.append(
            f'<h3 data-esft-layer="{int(entry["moe_layer"])}">MoE layer {int(entry["moe_layer"])}: trains '
            f"{len(chosen)} of {len(scores)} experts ({share:.0%} of the relevance)</h3>"
        )
        bars = []
        for e in sorted(range(len(scores)), key=lambda i: -scores[i]):
            colour = expert_colour(e, len(scores)) if e in chosen else "#d9d9d9"
            width = 100 * scores[e] / max(max(scores), 1e-12)
            bars.append(
                f'<div class="esft-bar" data-expert="{e}" data-chosen="{int(e in chosen)}" '
                f'style="display:flex;align-items:center;gap:8px;font-size:13px">'
                f'<span style="width:3em;text-align:right">{e}</span>'
                f'<span style="display:inline-block;height:12px;width:{width:.1f}%;max-width:70%;background:{colour}">'
                f"</span><span>{scores[e] / total:.1%}</span></div>"
            )
        parts.append("".join(bars))
    return "".join(parts)


def _cards(summary: dict[str, Any]) -> str:
    layers = summary["layers"]
    model = summary.get("model") or {}
    imbs = [layer["imbalance"] for layer in layers if layer["imbalance"] is not None]
    experts = sorted({layer["num_experts"] for layer in layers})
    ks = sorted({f"{layer.get('experts_per_token', layer['top_k']):.3g}" for layer in layers}, key=float)
    cards = [
        ("MoE layers", str(len(layers))),
        ("experts per layer", "/".join(map(str, experts))),
        ("experts per token", "/".join(ks)),
        ("router", str(model.get("router", "?"))),
        ("tokens analysed", f"{summary['tokens']:,}"),
        ("worst max/mean", f"{max(imbs):.2f}" if imbs else "n/a"),
        ("dead experts", str(sum(len(layer["dead_experts"]) for layer in layers))),
    ]
    if summary["label_names"]:
        cards.append(("labels", str(len(summary["label_names"]))))
    body = "".join(
        f'<div class="card"><div class="v">{html.escape(v)}</div><div class="k">{k}</div></div>' for k, v in cards
    )
    return f'<div class="cards">{body}</div>'


def render_html(summary: dict[str, Any], plots: Sequence[Plot], samples: Sequence[dict[str, Any]] = ()) -> str:
    """The report page as one string (no external references)."""
    read = summary.get("readings") or readings(summary)
    by_name = {p.name: p for p in plots}
    model = summary.get("model") or {}
    data = summary.get("data") or {}
    sub = " &middot; ".join(
        html.escape(str(x))
        for x in (
            model.get("source"),
            f"{summary['tokens']:,} tokens",
            f"labels: {data.get('labels')}" if data.get("labels") else None,
        )
        if x
    )
    sections: list[tuple[str, str, str]] = []  # (id, title, body)
    sections.append(("overview", "At a glance", _cards(summary) + _reading(read["overview"])))
    body = _figure(by_name["load_heatmap"]) + _reading(read["load"]) + _load_table(summary)
    sections.append(("load", "Expert load", body))
    if "imbalance_training" in by_name:
        sections.append(("training", "Training", _figure(by_name["imbalance_training"]) + _reading(read["training"])))
    if "specialisation" in by_name:
        body = _figure(by_name["specialisation"]) + _reading(read["specialisation"]) + _specialisation_tables(summary)
        sections.append(("specialisation", "Specialisation", body))
    if "coactivation" in by_name:
        sections.append(
            ("coactivation", "Co-activation", _figure(by_name["coactivation"]) + _reading(read["coactivation"]))
        )
    sections.append(("layers", "Layer to layer", _reading(read["layers"]) + _transition_table(summary)))
    if "entropy" in by_name:
        sections.append(("entropy", "Router entropy", _figure(by_name["entropy"]) + _reading(read["entropy"])))
    if "drift" in by_name:
        body = _figure(by_name["drift"]) + _reading(read["drift"]) + _drift_table(summary)
        sections.append(("drift", "Drift", body))
    if summary.get("esft"):
        sections.append(("esft", "ESFT selection", _esft_view(summary["esft"])))
    if samples:
        intro = (
            '<p class="note">Each token is coloured by the expert with the largest weight (top-1) in the chosen '
            "layer; hover a token for all its experts and weights. Each sample is routed in windows of the "
            f"model's context ({samples[0].get('window', '?')} tokens).</p>"
        )
        sections.append(("tokens", "Tokens by expert", intro + _token_view(samples, summary)))
    nav = "".join(f'<a href="#{sid}">{html.escape(title)}</a>' for sid, title, _ in sections)
    main = "".join(
        f'<section id="{sid}"><div class="wrap"><h2>{html.escape(title)}</h2>{body}</div></section>'
        for sid, title, body in sections
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>moekit routing report</title><style>{CSS}</style></head><body>"
        f'<header><div class="wrap"><h1>Routing report</h1><p class="sub">{sub}</p></div></header>'
        f'<nav><div class="wrap">{nav}</div></nav>{main}'
        '<footer><div class="wrap">Made by <code>moekit analyze</code>. Every number here and in the plots is in '
        "<code>stats.json</code>; the plots are also saved as PNG files next to this page.</div></footer>"
        "</body></html>\n"
    )


def _json_safe(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def write_report(
    out_dir: str | os.PathLike,
    summary: dict[str, Any],
    plots: Sequence[Plot],
    samples: Sequence[dict[str, Any]] = (),
) -> dict[str, Path]:
    """Write ``report.html``, ``stats.json`` and one PNG per plot into ``out_dir`` (created if needed); returns
    their paths by name ("report", "stats", each plot's). ``summary`` is :func:`~moekit.analysis.stats.summarize`'s
    (readings are added if missing); ``samples`` are :func:`~moekit.analysis.tokens.token_routes` views with a label."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = dict(summary)
    summary.setdefault("readings", readings(summary))
    summary["figures"] = [
        {"file": f"{p.name}.png", "title": p.title, "caption": p.caption, "data": p.data} for p in plots
    ]
    summary["token_view"] = list(samples)
    paths: dict[str, Path] = {}
    for p in plots:
        paths[p.name] = out / f"{p.name}.png"
        atomic_write_bytes(paths[p.name], p.png)
    paths["stats"] = out / "stats.json"
    atomic_write_json(paths["stats"], _json_safe(summary))
    paths["report"] = out / "report.html"
    atomic_write_text(paths["report"], render_html(summary, plots, samples))
    return paths


def load_stats(path: str | os.PathLike) -> dict[str, Any]:
    """Read a ``stats.json`` written by :func:`write_report`."""
    return json.loads(Path(path).read_text(encoding="utf-8"))
