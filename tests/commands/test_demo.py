"""``moekit demo`` end to end, with a few seconds of training instead of two minutes."""

from __future__ import annotations

from moekit.cli import main


def test_demo_trains_samples_and_writes_a_routing_report(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["demo", "--time-budget", "3s", "--out", str(out), "--max-new-tokens", "20", "--prompt", "ROMEO:"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "val_loss" in text and "ROMEO:" in text
    assert "tokens/s over the run, evaluations included" in text  # the rate says what it covers
    assert "share of tokens per expert" in text and "max/mean" in text
    # one row per expert of the demo's 16 and one column per MoE layer, readable in an 80-column terminal
    assert "e15" in text and "layer 1" in text and "layer 2" in text
    report = out / "analysis" / "report.html"
    assert report.is_file() and "<html" in report.read_text()[:500].lower()
    assert (out / "analysis" / "stats.json").is_file()
    assert any((out / "checkpoints").iterdir())
