"""A run takes the cores that are free when it starts (real busy processes), keeps the count in its checkpoints and
takes it again on resume; ``threads`` pins it."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys

import pytest
import torch

from moekit.train import resolve_checkpoint, train
from moekit.train.threads import DEFAULT_THREADS, free_cores, threads_for, use_threads

FAST = dict(model="tiny", batch_size=2, block_size=16, max_steps=3, progress=False, tensorboard=False)


@pytest.fixture(autouse=True)
def _restore_threads():
    yield
    torch.set_num_threads(DEFAULT_THREADS)


@contextlib.contextmanager
def _every_core_busy():
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 1)]
    try:
        yield
    finally:
        for p in spinners:
            p.kill()
            p.wait()


@pytest.fixture
def every_core_busy():
    with _every_core_busy():
        yield


@pytest.mark.parametrize(
    ("free", "most", "threads"), [(None, 4, 4), (1.35, 2, 2), (1.25, 2, 1), (1.0, 2, 1), (0.0, 2, 1), (7.9, 4, 4)]
)
def test_threads_are_the_free_cores_at_least_one_at_most_torchs(free, most, threads):
    assert threads_for(free, most) == threads


def test_beside_busy_processes_a_run_takes_one_thread_and_keeps_it_on_resume(tmp_path):
    run = tmp_path / "run"
    with _every_core_busy():
        assert free_cores() < 0.5
        train(out_dir=str(run), **FAST)
    state = json.loads((resolve_checkpoint(run) / "trainer_state.json").read_text())
    assert state["threads"] == 1 and torch.get_num_threads() == 1
    torch.set_num_threads(DEFAULT_THREADS)
    # the cores are free again, but a resumed run takes its count from the checkpoint, not from a new look
    train(out_dir=str(run), resume=True, **{**FAST, "max_steps": 5})
    assert json.loads((resolve_checkpoint(run) / "trainer_state.json").read_text())["threads"] == 1


def test_a_requested_or_recorded_count_wins_over_the_free_cores(every_core_busy):
    assert use_threads(2, None) == 2 == torch.get_num_threads()
    assert use_threads(None, 3) == 3 == torch.get_num_threads()
    assert use_threads(None, None, choose=False) == DEFAULT_THREADS
    assert use_threads(None, None) == 1


@pytest.mark.parametrize(("given", "seen"), [(None, "3000"), ("300000", "300000")])
def test_importing_moekit_shortens_openmps_spin_wait_unless_the_user_set_it(given, seen):
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"} | ({"GOMP_SPINCOUNT": given} if given else {})
    code = "import os, sys, moekit; assert 'torch' not in sys.modules; print(os.environ['GOMP_SPINCOUNT'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == seen
