"""analyze -> report.html + stats.json + PNGs: self-contained, holds every plot, numbers match stats.json."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
from html.parser import HTMLParser

import pytest

from moekit.analysis import stats, tokens
from moekit.analysis.traces import read_traces


class Page(HTMLParser):
    """Collects images, every attribute value and the text of each data-stat element."""

    def __init__(self):
        super().__init__()
        self.images, self.attributes, self.stats, self.tags = [], [], [], []
        self._open: list[list] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        self.attributes.extend((tag, k, v or "") for k, v in attrs.items())
        if tag == "img":
            self.images.append(attrs)
        if "data-stat" in attrs:
            self._open.append([attrs["data-stat"], attrs["data-fmt"], ""])
        elif self._open:
            self._open[-1].append(None)  # a nested tag inside a stat cell: not expected

    def handle_endtag(self, tag):
        if self._open:
            entry = self._open[-1]
            if len(entry) == 3:
                self.stats.append(tuple(self._open.pop()))
            else:
                entry.pop()

    def handle_data(self, data):
        if self._open and len(self._open[-1]) == 3:
            self._open[-1][2] += data


def _lookup(obj, path):
    for part in path.split("."):
        obj = obj[int(part)] if isinstance(obj, list) else obj[part]
    return obj


def _format(value, fmt):
    if value is None:
        return "n/a"
    return f"{value:.1%}" if fmt == "%" else format(value, fmt)


@pytest.fixture(scope="module")
def page(analysis):
    html = analysis.report.read_text(encoding="utf-8")
    parser = Page()
    parser.feed(html)
    parser.close()
    return html, parser


def test_outputs_exist(analysis):
    out = analysis.out
    summary = json.loads(analysis.stats.read_text())
    assert (out / "report.html").is_file() and (out / "stats.json").is_file()
    names = [f["file"] for f in summary["figures"]]
    assert {"load_heatmap.png", "imbalance_training.png", "specialisation.png", "coactivation.png", "entropy.png",
            "drift.png"} <= set(names)  # fmt: skip
    for name in names:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_is_self_contained_and_holds_every_plot(analysis, page):
    html, parser = page
    summary = json.loads(analysis.stats.read_text())
    assert parser.tags[0] == "html" and "body" in parser.tags
    srcs = [img["src"] for img in parser.images]
    assert len(srcs) == len(summary["figures"])
    assert all(src.startswith("data:image/png;base64,") for src in srcs)
    embedded = {base64.b64decode(src.split(",", 1)[1]) for src in srcs}
    for fig in summary["figures"]:
        assert (analysis.out / fig["file"]).read_bytes() in embedded
    assert "http://" not in html and "https://" not in html
    for tag, key, value in parser.attributes:
        if key in ("src", "href"):
            assert value.startswith(("data:", "#")), (tag, key, value)
    assert "link" not in parser.tags and "iframe" not in parser.tags
    assert "url(" not in html and "@import" not in html


def test_report_numbers_match_stats_json(analysis, page):
    _, parser = page
    summary = json.loads(analysis.stats.read_text())
    assert len(parser.stats) > 20
    for path, fmt, text in parser.stats:
        assert text == _format(_lookup(summary, path), fmt), path


def test_stats_content(analysis):
    s = json.loads(analysis.stats.read_text())
    assert s["label_names"] == ["code", "prose"] and s["data"]["labels"] == "file"
    assert s["tokens"] == sum(src["tokens"] for src in s["data"]["sources"]) == 1200
    for layer in s["layers"]:
        assert sum(layer["load"]) == 2 * s["tokens"]  # top-2
        assert layer["imbalance"] == pytest.approx(stats.imbalance(layer["load"]), abs=1e-6)
        assert layer["specialisation"]["label_tokens"] == [600, 600]
    for d in s["drift"]:  # compared with itself
        assert d["top1_changed"] == 0.0 and d["load_tv"] == 0.0
    assert "route every token identically" in s["readings"]["drift"][0]
    assert s["training"]["steps"] == list(range(1, 11)) and s["training"]["val_steps"] == [5, 10]
    assert {v["label"] for v in s["token_view"]} == {"code", "prose"}
    assert all(r for r in s["readings"]["load"])


def test_traces_match_the_aggregates(analysis):
    index, t = read_traces(analysis.out / "traces")
    s = json.loads(analysis.stats.read_text())
    assert index["tokens"] == s["tokens"] and index["label_names"] == ["code", "prose"]
    for n, layer in enumerate(s["layers"]):
        top1 = t["experts"][:, n, 0].long()
        assert [int((top1 == e).sum()) for e in range(layer["num_experts"])] == layer["top1"]


def test_token_view_is_coloured_per_layer(page, analysis):
    html, _ = page
    s = json.loads(analysis.stats.read_text())
    for n in range(len(s["layers"])):
        assert f'id="tv-l{n}"' in html and f"tv-layer-{n}" in html
    assert html.count('title="layer ') >= 2 * 48


def test_cli_category_labels(tiny_run, tmp_path):
    run, data = tiny_run
    out = tmp_path / "cat"
    proc = subprocess.run(
        [sys.executable, "-m", "moekit", "analyze", "--checkpoint", str(run), "--data", str(data / "code.py"),
         "--labels", "category", "--max-tokens", "400", "--view-tokens", "32", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "report:" in proc.stdout and re.search(r"analysed [\d,]+ tokens", proc.stdout)
    s = json.loads((out / "stats.json").read_text())
    assert s["label_names"] == list(tokens.CATEGORIES)
    counts = dict(zip(s["label_names"], s["layers"][0]["specialisation"]["label_tokens"]))
    assert counts["letters"] > 0 and counts["digits"] > 0 and counts["whitespace"] > 0
    assert s["drift"] is None


def test_cli_errors_and_hf_option(tmp_path, tiny_run, capsys):
    import importlib.util

    from moekit.cli import main

    run, _ = tiny_run
    with pytest.raises(SystemExit):
        main(["analyze", "--help"])
    has_hf = importlib.util.find_spec("moekit.interop.hf") is not None
    assert ("--model HF_DIR" in capsys.readouterr().out) == has_hf
    code = main(["analyze", "--checkpoint", str(run), "--data", str(tmp_path / "missing.txt"), "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "missing.txt" in err and "does not exist" in err


def test_many_experts_and_hash_routing_render(tmp_path):
    """80 experts (no conditional co-activation kept) and a hash layer (no router scores) still render."""
    import torch

    from moekit.analysis import plots, report
    from moekit.analysis.recorder import RoutingRecorder
    from tests.analysis.helpers import FakeMoEModel, make_aux

    model = FakeMoEModel(num_layers=2, num_experts=80, top_k=2)
    rec = RoutingRecorder(model, label_names=["a", "b"])
    g = torch.Generator().manual_seed(0)
    experts = torch.stack([torch.randperm(80, generator=g)[:2] for _ in range(400)])
    rec.observe([make_aux(experts, num_experts=80), make_aux(experts.flip(1), num_experts=80)],
                labels=torch.arange(400) % 2)  # fmt: skip
    summary = stats.summarize(rec.aggregates())
    assert summary["layers"][0]["coactivation_conditional"] is None
    assert summary["layers"][0]["entropy"] is None  # no router scores
    figures = plots.make_plots(summary)
    assert [p.name for p in figures] == ["load_heatmap", "specialisation"]
    paths = report.write_report(tmp_path, summary, figures)
    assert paths["report"].read_text().count("<img ") == 2
