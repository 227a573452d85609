"""Expert and data parallelism on real processes (gloo): equal to one process, sharded checkpoints, failures.

Every multi-process test runs its workers through :func:`moekit.distributed.launch.launch` with a hard
``timeout``: a hang kills the workers and fails the test instead of stalling CI. The worker code is in
``tests/distributed/workers.py``; each rank compares itself with the single-process computation on the
whole global batch and reports the largest differences.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import moekit
from moekit.checkpoint import EP_INDEX_FILE, load_model, read_model_tensors
from moekit.data.corpus import builtin_corpus
from moekit.distributed import DistContext, shard_model
from moekit.distributed.launch import launch
from moekit.errors import CheckpointError, ConfigError
from moekit.models import MoELM
from moekit.models.presets import TINY
from moekit.train import train
from moekit.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
TOL = 1e-5
TRAIN_ARGS = dict(
    model="tiny",
    batch_size=4,
    block_size=16,
    eval_interval=10,
    eval_batches=2,
    log_interval=1,
    checkpoint_interval=10,
    progress=False,
    tensorboard=False,
)


def _cli_args(**kw) -> list[str]:
    return [f"--{k.replace('_', '-')}={str(v).lower() if isinstance(v, bool) else v}" for k, v in kw.items()]


def _env() -> dict[str, str]:
    return {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}


def _workers(case: str, nproc: int, out: Path, *args: str, timeout: float = 120, grace: float = 5.0):
    """Run a worker case on nproc ranks; returns (exit code, per-rank results, per-rank output)."""
    out.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "tests.distributed.workers", case, str(out), *args]
    code, logs = launch(command, nproc, env=_env(), timeout=timeout, grace=grace, capture=True)
    results = []
    for r in range(nproc):
        f = out / f"{case}-rank{r}.json"
        results.append(json.loads(f.read_text()) if f.is_file() else None)
    return code, results, logs


def _assert_equal_to_one_process(results, logs) -> None:
    assert all(r is not None and "exception" not in r for r in results), (results, logs)
    for rank, cases in enumerate(results):
        for case, errs in cases.items():
            for key, err in errs.items():
                if key == "params_checked":
                    assert err == 1.0, (rank, case)
                elif key != "tokens_received_by_my_experts":
                    assert err <= TOL, f"rank {rank}, {case}: {key} differs from one process by {err:.3g}"


def _train_one_thread(**kw):
    """train() on one intra-op thread (a tiny model only loses time to more), leaving the setting as it was."""
    threads = torch.get_num_threads()
    try:
        return train(threads=1, **kw)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 20-step run through ``moekit train --nproc 2 --ep 2`` and the same run on one process."""
    root = tmp_path_factory.mktemp("runs")
    data = root / "corpus.txt"
    data.write_text(builtin_corpus()[:60_000])
    args = dict(TRAIN_ARGS, data=str(data), max_steps=20, grad_accum=2)
    proc = subprocess.run(
        [sys.executable, "-m", "moekit", "train", "--nproc", "2", "--ep", "2", "--out", str(root / "ep2")]
        + _cli_args(**args),
        env={**os.environ, **_env()},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    one = _train_one_thread(out_dir=str(root / "one"), **args)
    return {"root": root, "ep2": root / "ep2", "one": root / "one", "one_result": one, "stdout": proc.stdout, **args}


# -- equivalence ----------------------------------------------------------------------------------------
def test_two_ranks_equal_one_process(tmp_path):
    """ep=2 (balanced, skewed both ways, sigmoid + groups + shared expert, relu), dp=2 x ep=1 (sigmoid, relu), and
    a masked layer where one rank sends no tokens: outputs, losses, statistics, every gradient, clipping, AdamW
    steps, the aux-free bias update and relu's L1 coefficient update equal one process on the global batch."""
    code, results, logs = _workers("equivalence", 2, tmp_path)
    assert code == 0, logs
    _assert_equal_to_one_process(results, logs)
    # The skewed cases really starve one rank's experts.
    assert results[1]["skew_first_rank"]["tokens_received_by_my_experts"] == 0
    assert results[0]["skew_last_rank"]["tokens_received_by_my_experts"] == 0
    assert results[0]["skew_first_rank"]["tokens_received_by_my_experts"] > 0


def test_four_ranks_equal_one_process_and_load_any_ep_degree(tmp_path, runs):
    """ep=4 and dp=2 x ep=2 equal one process; the checkpoint written by 2 ranks gives one process's logits
    when sharded at EP degree 1, 2 and 4."""
    checkpoint = runs["ep2"] / "checkpoints" / "step-000020"
    code, results, logs = _workers("equivalence", 4, tmp_path, str(checkpoint), timeout=180)
    assert code == 0, logs
    _assert_equal_to_one_process(results, logs)
    assert {"checkpoint_ep1", "checkpoint_ep2", "checkpoint_ep4", "dp2_ep2"} <= set(results[0])
    assert [r["skew_first_rank"]["tokens_received_by_my_experts"] for r in results][2:] == [0, 0]


def test_two_rank_training_tracks_one_process(runs):
    ep2 = [m for m in read_metrics(runs["ep2"]) if "loss" in m]
    one = [m for m in read_metrics(runs["one"]) if "loss" in m]
    assert [m["step"] for m in ep2] == list(range(1, 21)) == [m["step"] for m in one]
    for a, b in zip(ep2, one):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-4)
        assert a["aux_loss"] == pytest.approx(b["aux_loss"], abs=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-3)
        assert a["imbalance"] == pytest.approx(b["imbalance"])
    val2 = [m["val_loss"] for m in read_metrics(runs["ep2"]) if "val_loss" in m]
    val1 = [m["val_loss"] for m in read_metrics(runs["one"]) if "val_loss" in m]
    assert val2 == pytest.approx(val1, abs=1e-4)
    run = json.loads((runs["ep2"] / "run.json").read_text())
    assert run["parameters"] == json.loads((runs["one"] / "run.json").read_text())["parameters"]
    assert "val_loss" in runs["stdout"]


# -- checkpoints --------------------------------------------------------------------------------------
def test_each_rank_writes_only_its_shard(runs):
    ckpt = runs["ep2"] / "checkpoints" / "step-000020"
    index = json.loads((ckpt / EP_INDEX_FILE).read_text())
    assert index["ep_size"] == 2 and not (ckpt / "model.safetensors").exists()
    from moekit.io.safe_io import load_tensors

    shard0, shard1 = (load_tensors(ckpt / f) for f in index["files"])
    experts = set(index["expert_tensors"])
    assert set(shard1) == experts and experts < set(shard0)
    assert all(shard1[k].shape[0] == 2 for k in experts)  # 4 experts, 2 per rank
    merged = read_model_tensors(ckpt)
    single = read_model_tensors(runs["one"])
    assert set(merged) == set(single)
    assert all(merged[k].shape == single[k].shape for k in single)
    for k in single:
        torch.testing.assert_close(merged[k], single[k], atol=1e-4, rtol=0)


def test_two_rank_checkpoint_loads_in_one_process(runs):
    from moekit.analysis.load import expert_load
    from moekit.inference.generate import generate

    model = moekit.load(runs["ep2"])
    ref = moekit.load(runs["one"])
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(model(x).logits, ref(x).logits, atol=1e-3, rtol=0)
    model, tokenizer = load_model(runs["ep2"])
    text = generate(model, [torch.tensor(tokenizer.encode("ROMEO:"))], max_new_tokens=4)
    assert text is not None
    layers, load = expert_load(model, [x])
    assert load.shape == (2, 4) and int(load.sum()) == 2 * 2 * 16 * 2


def test_two_rank_checkpoint_exports_to_hugging_face(runs, tmp_path):
    hf = pytest.importorskip("moekit.interop.hf")
    out = hf.convert_to_hf(runs["ep2"], tmp_path / "hf")
    model = moekit.load(runs["ep2"])
    back = hf.from_hf(out)
    back = back[0] if isinstance(back, tuple) else back
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(back(x).logits, model(x).logits, atol=1e-5, rtol=0)


def test_torchrun_resumes_at_another_ep_degree(runs, tmp_path):
    """``torchrun -m moekit train`` (dp=2, ep=1) and one process both resume the 2-rank (ep=2) checkpoint
    and take the same two steps."""
    a, b = tmp_path / "torchrun", tmp_path / "one"
    shutil.copytree(runs["ep2"], a)
    shutil.copytree(runs["ep2"], b)
    args = {k: runs[k] for k in (*TRAIN_ARGS, "data", "grad_accum")}
    args["max_steps"] = 22
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
        + ["-m", "moekit", "train", "--ep", "1", "--resume", "--out", str(a)]
        + _cli_args(**args),
        env={**os.environ, **_env()},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    _train_one_thread(out_dir=str(b), resume=True, **args)
    la = [m for m in read_metrics(a) if "loss" in m][-2:]
    lb = [m for m in read_metrics(b) if "loss" in m][-2:]
    assert [m["step"] for m in la] == [21, 22] == [m["step"] for m in lb]
    for x, y in zip(la, lb):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-5)
    assert (a / "checkpoints" / "step-000022" / "model.safetensors").is_file()  # ep=1: the one-process format


# -- failures -----------------------------------------------------------------------------------------
def test_differing_configs_and_a_failing_rank_stop_every_rank(tmp_path):
    code, results, logs = _workers("failures", 2, tmp_path, timeout=120)
    assert code == 0, logs
    for r in results:
        assert "ranks disagree on the train config: lr" in r["mismatch"], r
    assert results[1]["raise"].startswith("rank 1 failed at step 2: RuntimeError: boom")
    assert results[0]["raise"].startswith("rank 1 failed at step 2: RuntimeError: boom"), results[0]
    assert "rank 0 stopped at step 2" in results[0]["raise"]
    assert results[0]["seconds_to_fail"] < 20  # the collective timeout of this case


def test_a_hung_rank_fails_the_others_within_the_timeout(tmp_path):
    code, results, logs = _workers("hang", 2, tmp_path, timeout=120, grace=1.0)
    assert code == 3, logs  # rank 0 exited with its error; the launcher then stopped the hung rank 1
    message = results[0]["hang"]
    assert message.startswith("rank 0 lost its peers at step 2"), message
    assert "rank 1 reported the lowest step" in message
    assert results[1] is None  # rank 1 was still asleep


# -- in-process checks --------------------------------------------------------------------------------
def test_ranks_agree_on_the_time_budget(tmp_path):
    """Each rank reading its own clock would stop at its own step and leave the other in an all-reduce."""
    code, results, logs = _workers("budget", 2, tmp_path, timeout=90)
    assert code == 0, logs
    assert results[0]["step"] == results[1]["step"] > 1, results
    assert results[0]["final_val_loss"] == results[1]["final_val_loss"]


def _fake_ctx(ep: int, world: int, rank: int = 0) -> DistContext:
    return DistContext(
        rank=rank,
        world_size=world,
        ep_size=ep,
        dp_size=world // ep,
        ep_rank=rank % ep,
        dp_rank=rank // ep,
        ep_group=None,
        dp_group=None,
        device=torch.device("cpu"),
        timeout=1.0,
    )


def test_experts_must_divide_by_ep():
    model = MoELM(TINY)  # 4 experts
    with pytest.raises(ConfigError, match=r"layers\.0\.mlp: num_experts=4 is not divisible .* ep=3"):
        shard_model(model, _fake_ctx(ep=3, world=3))


def test_shard_model_keeps_this_ranks_experts():
    model = MoELM(TINY)
    w_in = model.layers[0].mlp.experts.w_in.detach().clone()
    shard_model(model, _fake_ctx(ep=2, world=2, rank=1))
    torch.testing.assert_close(model.layers[0].mlp.experts.w_in, w_in[2:])
    assert model.layers[0].mlp.experts.num_experts == 2


def test_cli_rejects_bad_parallel_degrees(tmp_path, monkeypatch):
    from moekit.cli import main

    for var in ("RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert main(["train", "--ep", "2", "--out", str(tmp_path / "a")]) == 2
    assert main(["train", "--nproc", "3", "--ep", "2", "--out", str(tmp_path / "b")]) == 2


def test_incomplete_ep_checkpoint_is_named(runs, tmp_path):
    broken = tmp_path / "ckpt"
    shutil.copytree(runs["ep2"] / "checkpoints" / "step-000020", broken)
    (broken / "model-ep1-of-2.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-ep1-of-2.safetensors is missing"):
        load_model(broken)
