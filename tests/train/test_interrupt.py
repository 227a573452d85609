"""SIGINT and SIGTERM stop a real training process after its step with a checkpoint; resuming continues it
exactly, and metrics.jsonl ends up as the uninterrupted run's (no replayed steps), also after SIGKILL."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from moekit.io.safe_io import load_tensors
from moekit.train import resolve_checkpoint, train

ARGS = dict(
    model="tiny", batch_size=4, block_size=16, eval_interval=50, log_interval=1, max_steps=120,
    checkpoint_interval=10_000, checkpoint_every=None, progress=False, tensorboard=False,
)  # fmt: skip


def _cli_args(out: Path) -> list[str]:
    flags = []
    for key, value in ARGS.items():
        flags += [f"--{key.replace('_', '-')}", "null" if value is None else str(value).lower()]
    return [sys.executable, "-m", "moekit", "train", *flags, "--out", str(out)]


def _wait_for_steps(run: Path, steps: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        metrics = run / "metrics.jsonl"
        if metrics.is_file() and metrics.read_text().count('"loss"') >= steps:
            return
        time.sleep(0.01)
    raise AssertionError(f"the run did not reach step {steps} (exit code {proc.poll()})")


def _steps_and_losses(run: Path) -> list[tuple[int, float | None]]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r.get("loss", r.get("val_loss"))) for r in records]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run = tmp_path_factory.mktemp("whole") / "run"
    train(out_dir=str(run), **ARGS)
    return run


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_signal_checkpoints_the_step_and_resume_is_exact(tmp_path, uninterrupted, signum):
    run = tmp_path / "run"
    proc = subprocess.Popen(_cli_args(run), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_steps(run, 3, proc)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    match = re.search(rf"stopped by {signum.name} after step (\d+); checkpoint (\S+) is complete", err)
    assert match and "Traceback" not in err, err
    step = int(match.group(1))
    assert 3 <= step < ARGS["max_steps"]
    assert resolve_checkpoint(run).name == f"step-{step:06d}"
    assert max(s for s, _ in _steps_and_losses(run)) == step

    train(out_dir=str(run), resume=True, **ARGS)
    a = load_tensors(resolve_checkpoint(run) / "model.safetensors")
    b = load_tensors(resolve_checkpoint(uninterrupted) / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _steps_and_losses(run) == _steps_and_losses(uninterrupted)


def test_metrics_after_a_kill_and_resume_equal_the_uninterrupted_runs(tmp_path, uninterrupted):
    run = tmp_path / "run"
    args = {**ARGS, "checkpoint_interval": 7}
    command = _cli_args(run)
    command[command.index("--checkpoint-interval") + 1] = "7"
    proc = subprocess.Popen(command, start_new_session=True)
    try:
        _wait_for_steps(run, 17, proc)  # past two checkpoints, some steps after the last one
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    train(out_dir=str(run), resume=True, **args)
    assert _steps_and_losses(run) == _steps_and_losses(uninterrupted)


def test_time_based_checkpoints_do_not_change_the_run(tmp_path, uninterrupted):
    result = train(out_dir=str(tmp_path / "run"), **{**ARGS, "checkpoint_every": 1e-6, "keep_checkpoints": 200})
    saved = sorted((tmp_path / "run" / "checkpoints").glob("step-*"))
    assert len(saved) == ARGS["max_steps"]  # every step was due
    a = load_tensors(result.checkpoint / "model.safetensors")
    b = load_tensors(resolve_checkpoint(uninterrupted) / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_takes_every_setting_from_the_run_folder(tmp_path, uninterrupted):
    run = tmp_path / "run"
    proc = subprocess.Popen(_cli_args(run), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_steps(run, 3, proc)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=120)
    assert proc.returncode == 130
    resume = [sys.executable, "-m", "moekit", "train", "--out", str(run), "--resume"]
    changed = subprocess.run([*resume, "--lr", "0.5"], capture_output=True, text=True, timeout=300)
    assert changed.returncode == 2 and "lr=0.5 differs from the run" in changed.stderr
    done = subprocess.run([*resume, "--progress", "false"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    a = load_tensors(resolve_checkpoint(run) / "model.safetensors")
    b = load_tensors(resolve_checkpoint(uninterrupted) / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _steps_and_losses(run) == _steps_and_losses(uninterrupted)


def test_a_time_budgeted_run_killed_at_random_points_resumes_exactly(tmp_path):
    """SIGKILL at random steps, each time resumed with the README's ``--resume``: the run keeps its time budget and
    the plan made from it, and ends as a copy of it resumed from its first planned checkpoint without kills."""
    run, rng = tmp_path / "run", random.Random(os.getpid())
    command = _cli_args(run)
    command[command.index("--max-steps") + 1] = "100000"
    command[command.index("--checkpoint-interval") + 1] = "10"
    command += ["--time-budget", "3s", "--keep-checkpoints", "100000"]
    resume = [sys.executable, "-m", "moekit", "train", "--out", str(run), "--resume"]
    for i, kill_at in enumerate(sorted(rng.sample(range(12, 300), 3))):  # after the first checkpoint
        proc = subprocess.Popen(resume if i else command, start_new_session=True)
        try:
            _wait_for_steps(run, kill_at, proc)
        except AssertionError:
            if proc.wait() == 0:  # a slow machine: the run planned fewer steps and ended first
                break
            raise
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    done = subprocess.run(resume, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    state = json.loads((resolve_checkpoint(run) / "trainer_state.json").read_text())
    plan = state["plan"]
    assert state["train_config"]["time_budget"] == 3.0 and state["step"] == plan["steps"] < 100_000
    # the reference: the same run resumed once from its first checkpoint after the plan
    again = tmp_path / "again"
    shutil.copytree(run, again)
    saved = sorted(int(p.name.split("-")[1]) for p in (again / "checkpoints").glob("step-*"))
    first = next(s for s in saved if s > plan["start"])
    for step in saved:
        if step > first:
            shutil.rmtree(again / "checkpoints" / f"step-{step:06d}")
    (again / "checkpoints" / "latest").write_text(f"step-{first:06d}\n")
    redone = subprocess.run(
        [*resume[:-3], "--out", str(again), "--resume"], capture_output=True, text=True, timeout=300
    )
    assert redone.returncode == 0, redone.stderr
    assert _steps_and_losses(run) == _steps_and_losses(again)
    a = load_tensors(resolve_checkpoint(run) / "model.safetensors")
    b = load_tensors(resolve_checkpoint(again) / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
