"""The distill, prune and merge-experts verbs, run as real processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import moekit

from .helpers import save_model, text_file, tiny_model


def moekit_cli(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "moekit", *map(str, args)], capture_output=True, text=True, timeout=300, env=env
    )


def test_prune_merge_and_distill_from_the_command_line(tmp_path):
    source = save_model(tmp_path / "source", tiny_model())
    cal = text_file(tmp_path / "cal.txt")
    common = ["--calibration-data", cal, "--block-size", 32, "--batch-size", 4, "--max-batches", 2]
    proc = moekit_cli(
        "prune", "--checkpoint", source, "--keep", 3, "--criterion", "frequency", "--out", tmp_path / "p", *common
    )
    assert proc.returncode == 0, proc.stderr
    assert "layer 0: kept experts" in proc.stdout and "parameters:" in proc.stdout
    assert [m.config.num_experts for _, m in moekit.load(tmp_path / "p").moe_layers()] == [3, 3]

    proc = moekit_cli("merge-experts", "--checkpoint", tmp_path / "p", "--target", 1, "--out", tmp_path / "m", *common)
    assert proc.returncode == 0, proc.stderr
    assert "top_k 2 -> 1" in proc.stdout
    assert moekit.load(tmp_path / "m").config.moe_config(1).num_experts == 1

    proc = moekit_cli(
        "distill", "--teacher", tmp_path / "p", "--student", "tiny", "--alpha", 0.25, "--top-k-logits", 4,
        "--data", cal, "--max-steps", 2, "--batch-size", 2, "--block-size", 16, "--progress", "false",
        "--tensorboard", "false", "--out", tmp_path / "s",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "student val_loss=" in proc.stdout
    assert json.loads((tmp_path / "s" / "distill.json").read_text())["top_k_logits"] == 4


def test_bad_arguments_exit_2_with_a_clear_message(tmp_path):
    source = save_model(tmp_path / "source", tiny_model())
    cal = text_file(tmp_path / "cal.txt")
    proc = moekit_cli("prune", "--checkpoint", source, "--keep", 9, "--calibration-data", cal, "--out", tmp_path / "p")
    assert proc.returncode == 2
    assert "moekit prune: error: keep=9 exceeds the 4 experts of layer 0" in proc.stderr
