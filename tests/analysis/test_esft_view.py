"""The analysis report shows an ESFT selection: which experts train per layer, every expert's relevance."""

from __future__ import annotations

import json
import re
import shutil

import torch

from moekit.cli import main
from moekit.recipes.esft import SELECTION_FILE, write_selection


def _selection(path):
    """Two MoE layers of 4 experts: layer 0 trains expert 1, layer 1 experts 1 and 3 (top_p 0.5 vs 0.8)."""
    scores = [torch.tensor([0.1, 0.6, 0.05, 0.25]), torch.tensor([0.1, 0.6, 0.05, 0.25])]
    return write_selection(path, {0: [1], 1: [1, 3]}, scores, "gate", 0.5)


def test_a_finetuned_runs_selection_is_found_and_drawn(tiny_run, tmp_path, capsys):
    run, data = tiny_run
    esft_run = tmp_path / "run"
    shutil.copytree(run, esft_run)
    _selection(esft_run / SELECTION_FILE)
    out = tmp_path / "report"
    code = main(["analyze", "--checkpoint", str(esft_run), "--data", str(data / "prose.txt"), "--out", str(out),
                 "--max-tokens", "256"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    page = (out / "report.html").read_text(encoding="utf-8")
    assert 'id="esft"' in page and "MoE layer 1: trains 2 of 4 experts (85% of the relevance)" in page
    chosen = {(int(e), int(c)) for e, c in re.findall(r'data-expert="(\d+)" data-chosen="(\d)"', page)}
    assert {(1, 1), (3, 1), (0, 0), (2, 0)} <= chosen
    stats = json.loads((out / "stats.json").read_text())
    assert stats["esft"]["layers"][1]["experts"] == [1, 3]


def test_no_selection_no_section_and_a_bad_file_is_a_one_line_error(tiny_run, tmp_path, capsys):
    run, data = tiny_run
    out = tmp_path / "plain"
    assert main(["analyze", "--checkpoint", str(run), "--data", str(data / "prose.txt"), "--out", str(out),
                 "--max-tokens", "256"]) == 0  # fmt: skip
    assert 'id="esft"' not in (out / "report.html").read_text(encoding="utf-8")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"layers": [{"moe_layer": 0, "experts": [7], "scores": [0.5, 0.5]}]}))
    code = main(["analyze", "--checkpoint", str(run), "--data", str(data / "prose.txt"), "--out", str(tmp_path / "x"),
                 "--esft-selection", str(bad)])  # fmt: skip
    err = capsys.readouterr().err
    assert code != 0 and "is not an ESFT selection file" in err and "Traceback" not in err
