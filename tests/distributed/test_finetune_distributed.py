"""Data-parallel fine-tuning on real processes: ``torchrun --nproc-per-node 2 -m moekit finetune`` (gloo, CPU) equals
one process on the whole batch, for LoRA and ESFT, and resumes a one-process checkpoint.

Tolerance: 1e-6 absolute on every saved tensor (weights, adapters, Adam moments; they are O(0.01..1)). The two
runs compute the same sums in another order (each rank's mean over half the batch, then the mean of the two;
the grouped-GEMM expert path of the distributed executor instead of the fused kernel), so they differ by fp32
round-off, about 1e-8 after these steps; a missing all-reduce or a rank on the wrong rows moves them by ~1e-3.
Ranks that fell out of sync would not get that far: at every checkpoint they compare a hash of what trains.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moekit.checkpoint import OPTIMIZER_FILE, WEIGHTS_FILE, find_checkpoint
from moekit.io.safe_io import load_tensors
from moekit.recipes.esft import read_selection
from moekit.recipes.finetune import ADAPTER_FILE, finetune
from moekit.train import train
from moekit.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
TOL = 1e-6
PROSE = "The old house stood at the end of the lane, and every evening the lamps were lit at six. " * 40
MATH = "12 + 30 = 42. 7 * 6 = 42. 100 - 58 = 42. 84 / 2 = 42. " * 60
RUN = dict(
    batch_size=4, block_size=32, lr=1e-2, eval_batches=2, log_interval=1, progress=False, tensorboard=False, threads=1
)
METHODS = {"lora": ["--method", "lora", "--lora-rank", "2"], "esft": ["--method", "esft", "--top-p", "0.5"]}


def _env() -> dict[str, str]:
    return {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}


def _options(**kw) -> list[str]:
    return [f"--{k.replace('_', '-')}={str(v).lower() if isinstance(v, bool) else v}" for k, v in kw.items()]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft-dist")
    (root / "prose.txt").write_text(PROSE)
    (root / "math.txt").write_text(MATH)
    train(dict(RUN, model="tiny", data=str(root / "prose.txt"), max_steps=2, out_dir=str(root / "base")))
    return root


def torchrun(base: Path, out: Path, method: str, steps: int, *extra: str) -> None:
    """``torchrun --standalone --nproc-per-node 2 -m moekit finetune`` (standalone: a free port of its own)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command += ["-m", "moekit", "finetune", "--init-from", str(base / "base"), "--out", str(out), *METHODS[method]]
    command += _options(**RUN, data=base / "math.txt", max_steps=steps) + list(extra)
    proc = subprocess.run(command, env={**os.environ, **_env()}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def one_process(base: Path, out: Path, method: str, steps: int, resume: bool = False):
    ft = dict(method=method, lora_rank=2) if method == "lora" else dict(method=method, top_p=0.5)
    options = dict(RUN, data=str(base / "math.txt"), init_from=str(base / "base"), max_steps=steps, out_dir=str(out))
    threads = torch.get_num_threads()
    try:
        return finetune(options, ft, resume=resume)
    finally:
        torch.set_num_threads(threads)


def assert_same_checkpoints(a: Path, b: Path) -> None:
    fa, fb = find_checkpoint(a), find_checkpoint(b)
    assert fa.name == fb.name
    files = [f for f in (WEIGHTS_FILE, ADAPTER_FILE, OPTIMIZER_FILE) if (fa / f).is_file()]
    assert files == [f for f in (WEIGHTS_FILE, ADAPTER_FILE, OPTIMIZER_FILE) if (fb / f).is_file()]
    for file in files:
        ta, tb = load_tensors(fa / file), load_tensors(fb / file)
        assert set(ta) == set(tb), file
        for name in ta:
            if name != "rng.torch" and ta[name].is_floating_point():
                torch.testing.assert_close(ta[name], tb[name], rtol=0, atol=TOL, msg=f"{file}: {name}")
    la = [m["loss"] for m in read_metrics(a) if "loss" in m]
    lb = [m["loss"] for m in read_metrics(b) if "loss" in m]
    assert len(la) == len(lb) > 0 and la == pytest.approx(lb, abs=1e-5)


@pytest.mark.parametrize("method", ["lora", "esft"])
def test_two_ranks_on_halves_equal_one_process_on_the_batch(base, tmp_path, method):
    torchrun(base, tmp_path / "two", method, 4)
    one_process(base, tmp_path / "one", method, 4)
    assert_same_checkpoints(tmp_path / "two", tmp_path / "one")
    if method == "esft":
        assert read_selection(tmp_path / "two" / "esft_selection.json") == read_selection(
            tmp_path / "one" / "esft_selection.json"
        )
    else:
        assert (find_checkpoint(tmp_path / "two") / ADAPTER_FILE).is_file()


def test_torchrun_resumes_a_one_process_run(base, tmp_path):
    one_process(base, tmp_path / "one", "lora", 4)
    one_process(base, tmp_path / "split", "lora", 2)
    shutil.copytree(tmp_path / "split", tmp_path / "two")
    torchrun(base, tmp_path / "two", "lora", 4, "--resume")
    assert_same_checkpoints(tmp_path / "two", tmp_path / "one")
