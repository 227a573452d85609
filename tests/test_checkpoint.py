"""Checkpoints survive a real kill mid-save; corrupt files give precise errors."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import moekit
from moekit.errors import CheckpointError
from moekit.inference.generate import generate
from moekit.io.safe_io import load_tensors
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


# -- run folders written before one checkpoint format (tests/fixtures/old-runs/README.md) ---------------------
OLD_RUNS = Path(__file__).parent / "fixtures" / "old-runs"
OLD_LM = dict(
    model="tiny", data="corpus.txt", checkpoint_interval=2, eval_interval=2, eval_batches=1, batch_size=2,
    block_size=16, progress=False, tensorboard=False, tokenizer="char",
    model_overrides={"hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "num_key_value_heads": 1, "head_dim": 8, "moe": {"num_experts": 4, "expert_hidden_size": 8}},
)  # fmt: skip
OLD_CLASSIFY = dict(
    task="classify", checkpoint_interval=2, eval_interval=2, batch_size=8, ema_decay=0.5, progress=False,
    model_overrides={"hidden_size": 8, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 8,
                     "moe": {"num_experts": 2}, "max_length": 16},
)  # fmt: skip


def _weights(run) -> dict[str, torch.Tensor]:
    return load_tensors(resolve_checkpoint(run) / "model.safetensors")


def test_an_old_language_model_run_loads_generates_exports_and_resumes_exactly(tmp_path, monkeypatch):
    shutil.copytree(OLD_RUNS, tmp_path / "old")
    monkeypatch.chdir(tmp_path / "old")  # the run's data path is relative
    model, tokenizer = load_model("lm-run")
    assert resolve_checkpoint("lm-run").name == "step-000004"
    new = generate(model, [tokenizer.encode("the quick")], max_new_tokens=5, temperature=0)
    assert len(new[0]) == 5
    hf = pytest.importorskip("moekit.interop.hf")
    back = hf.from_hf(hf.convert_to_hf("lm-run", tmp_path / "hf"))
    back = back[0] if isinstance(back, tuple) else back
    x = torch.tensor([tokenizer.encode("the lazy dog")])
    torch.testing.assert_close(back(x).logits, model(x).logits, atol=1e-5, rtol=0)
    # Today's code from scratch to step 6 equals the old run resumed from its step 4, bit for bit.
    resumed = train(max_steps=6, out_dir="lm-run", resume=True, **OLD_LM)
    whole = train(max_steps=6, out_dir="whole", **OLD_LM)
    assert resumed.step == 6 and whole.train_losses[4:] == resumed.train_losses
    a, b = _weights("lm-run"), _weights("whole")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_an_old_layout_task_run_predicts_and_resumes_into_the_new_layout(tmp_path):
    from moekit.data.labelled import BUILTIN_SENTIMENT
    from moekit.tasks.classify import load_classifier, predict, train_classifier

    old = shutil.copytree(OLD_RUNS / "classify-run", tmp_path / "old")
    model, _, names, task = load_classifier(old)
    assert task == "classify" and len(names) == 2
    _, predictions, acc = predict(old, BUILTIN_SENTIMENT)
    assert set(predictions) <= set(names) and 0 <= acc <= 1
    resumed = train_classifier(out_dir=str(old), resume=True, max_steps=6, **OLD_CLASSIFY)
    assert resumed.step == 6 and [r["step"] for r in resumed.history] == [2, 4, 6]
    assert (old / "checkpoints" / "step-000006" / "trained.safetensors").is_file()  # the new layout from here on
    # ... and it equals today's run of 6 steps from scratch, EMA included.
    whole = train_classifier(out_dir=str(tmp_path / "whole"), max_steps=6, **OLD_CLASSIFY)
    assert whole.accuracy == resumed.accuracy
    a, b = load_classifier(old)[0].state_dict(), load_classifier(whole.run_dir)[0].state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_non_finite_weights_are_refused_by_load_eval_and_generate(tmp_path):
    from moekit.io.safe_io import save_tensors

    result = train(max_steps=1, out_dir=str(tmp_path / "r"), **FAST)
    weights = result.checkpoint / "model.safetensors"
    tensors = load_tensors(weights)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = float("nan")
    save_tensors(tensors, weights)
    with pytest.raises(CheckpointError, match=f"{name}.*1 NaN or infinite"):
        moekit.load(tmp_path / "r")
    text = tmp_path / "t.txt"
    text.write_text("some held-out text " * 30)
    for verb in (["eval", "--data", str(text)], ["generate", "--prompt", "a", "--max-new-tokens", "2"]):
        proc = subprocess.run(
            [sys.executable, "-m", "moekit", verb[0], "--checkpoint", str(tmp_path / "r"), *verb[1:]],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert proc.returncode == 2 and "NaN or infinite" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("version", [99, 0, "1", True])
def test_an_unknown_checkpoint_format_version_is_refused(tmp_path, version):
    import json

    result = train(max_steps=1, out_dir=str(tmp_path / "r"), **FAST)
    config = result.checkpoint / "config.json"
    data = json.loads(config.read_text())
    config.write_text(json.dumps({**data, "version": version}))
    with pytest.raises(CheckpointError, match=f"checkpoint format version {version!r}; this moekit reads versions 1"):
        moekit.load(tmp_path / "r")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_a_tensor_in_another_dtype_than_the_rest_is_refused(tmp_path, dtype):
    # (float32 among bfloat16 tensors loads: moekit keeps a router's bias in float32; tests/interop/test_hf_cli.py)
    from moekit.io.safe_io import save_tensors

    result = train(max_steps=1, out_dir=str(tmp_path / "r"), **FAST)
    weights = result.checkpoint / "model.safetensors"
    tensors = load_tensors(weights)
    name = sorted(tensors)[-1]
    tensors[name] = tensors[name].to(dtype)
    save_tensors(tensors, weights)
    with pytest.raises(CheckpointError, match=rf"tensor '{re.escape(name)}' is {dtype} among torch.float32 tensors"):
        moekit.load(tmp_path / "r")
