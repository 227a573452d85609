"""Checkpoints survive a real kill mid-save; corrupt files give precise errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import moekit
from moekit.errors import CheckpointError
from moekit.train import load_model, resolve_checkpoint, train

FAST = dict(model="tiny", batch_size=4, block_size=16, eval_interval=1000, progress=False, tensorboard=False)


def test_load_returns_a_model_with_logits(tmp_path):
    result = train(max_steps=3, out_dir=str(tmp_path / "r"), **FAST)
    model = moekit.load(tmp_path / "r")
    out = model(torch.randint(0, 256, (2, 10)))
    assert out.logits.shape == (2, 10, 256)
    model2, tokenizer = load_model(result.checkpoint)
    assert torch.equal(model2(torch.arange(8)[None]).logits, model(torch.arange(8)[None]).logits)
    assert tokenizer.decode(tokenizer.encode("hi")) == "hi"


def test_kill_during_training_keeps_a_loadable_checkpoint(tmp_path):
    run = tmp_path / "r"
    code = (
        "from moekit.train import train\n"
        f"train(max_steps=100000, checkpoint_interval=1, keep_checkpoints=2, out_dir={str(run)!r}, "
        "model='tiny', batch_size=4, block_size=16, eval_interval=100000, progress=False, tensorboard=False)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and len(list((run / "checkpoints").glob("step-*"))) < 2:
            time.sleep(0.05)
        time.sleep(0.37)  # land somewhere inside a later save
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    ckpt = resolve_checkpoint(run)
    model, _ = load_model(ckpt)
    assert torch.isfinite(model(torch.arange(8)[None]).logits).all()


def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    result = train(max_steps=2, out_dir=str(tmp_path / "r"), **FAST)
    good = resolve_checkpoint(tmp_path / "r")
    from moekit import checkpoint as ckpt

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt, "save_tensors", disk_full)
    with pytest.raises(OSError):
        train(max_steps=4, out_dir=str(tmp_path / "r"), resume=True, **FAST)
    monkeypatch.undo()
    assert resolve_checkpoint(tmp_path / "r") == good == result.checkpoint
    load_model(good)


def test_corrupt_weights_are_named(tmp_path):
    result = train(max_steps=1, out_dir=str(tmp_path / "r"), **FAST)
    weights = result.checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(result.checkpoint)


def test_missing_checkpoint_is_clear(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        load_model(tmp_path / "empty")
