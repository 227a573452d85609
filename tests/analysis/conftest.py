"""A tiny checkpoint with a metrics log, two labelled text files, and one analysis of them."""

from __future__ import annotations

import json

import pytest

from tests.analysis.helpers import save_tiny_checkpoint

CODE = "def add(a, b):\n    return a + b  # 12 + 30 = 42\n\nfor i in range(10):\n    print(add(i, 2))\n" * 12
PROSE = "The old house stood at the end of the lane, and every evening the lamps were lit at six. " * 12


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("analysis")
    run = root / "run"
    save_tiny_checkpoint(run, seed=0, step=10)
    records = []
    for step in range(1, 11):
        records.append({"step": step, "loss": 5.0 - step / 10, "imbalance": 2.0 - step / 20,
                        "layer_imbalance": [2.0 - step / 20, 1.8 - step / 30]})  # fmt: skip
        if step % 5 == 0:
            records.append({"step": step, "val_loss": 4.5, "val_layer_imbalance": [1.6, 1.4]})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    data = root / "data"
    data.mkdir()
    (data / "code.py").write_text(CODE)
    (data / "prose.txt").write_text(PROSE)
    return run, data


@pytest.fixture(scope="session")
def analysis(tiny_run, tmp_path_factory):
    """``analyze`` with file labels, a comparison with the same checkpoint and raw traces."""
    from moekit.analysis.pipeline import analyze

    run, data = tiny_run
    out = tmp_path_factory.mktemp("report") / "out"
    result = analyze(
        checkpoint=run, data=[data], out=out, labels="file", compare=run, max_tokens=1200, raw_traces=True,
        view_tokens=48, progress=False,
    )  # fmt: skip
    return result
