"""No command writes into a non-empty folder it did not create unless told (--overwrite), never into a
training run folder, and an existing file as --out is a one-line error (real processes)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from moekit.train import train

FAST = dict(model="tiny", batch_size=4, block_size=16, eval_interval=1000, progress=False, tensorboard=False)


def moekit(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "moekit", *map(str, args)], capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("out") / "run"
    train(max_steps=2, out_dir=str(folder), **FAST)
    return folder


def _snapshot(folder):
    return {p.relative_to(folder): p.stat().st_mtime_ns for p in folder.rglob("*")}


@pytest.mark.parametrize("verb", ["convert", "analyze", "prune"])
def test_outputs_into_a_run_a_file_or_a_full_folder_are_refused(tmp_path, run, verb):
    text = tmp_path / "text.txt"
    text.write_text("calibration and analysis text " * 40)
    args = {
        "convert": ["convert", "--to-hf", run],
        "analyze": ["analyze", "--checkpoint", run, "--data", text],
        "prune": ["prune", "--checkpoint", run, "--keep", "2", "--calibration-data", text],
    }[verb]
    a_file, full = tmp_path / "file.txt", tmp_path / "full"
    a_file.write_text("x")
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    before = _snapshot(run)
    for out, message in [(run, "is a training run (it holds run.json)"), (a_file, "is a file"), (full, "is not empty")]:
        proc = moekit(*args, "--out", out)
        assert proc.returncode == 2, proc.stderr
        assert message in proc.stderr and "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) == 1
    assert _snapshot(run) == before and a_file.read_text() == "x" and (full / "keep.txt").read_text() == "mine"
    # told to, it writes beside what is there; a training run stays refused even then
    assert moekit(*args, "--out", full, "--overwrite").returncode == 0 and (full / "keep.txt").read_text() == "mine"
    assert "is a training run" in moekit(*args, "--out", run, "--overwrite").stderr
