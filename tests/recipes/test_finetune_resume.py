"""moekit finetune --resume: N steps then a resume to 2N equal 2N steps straight, bit for bit (fp32: weights,
adapters, optimizer state and losses), for every method; the ESFT selection comes back from the run folder, not
from the calibration data; a resume whose settings differ from the run's is a one-line error."""

from __future__ import annotations

import pytest
import torch

from moekit.checkpoint import OPTIMIZER_FILE, WEIGHTS_FILE, find_checkpoint
from moekit.errors import CheckpointError, ConfigError
from moekit.io.safe_io import load_tensors
from moekit.recipes.esft import read_selection
from moekit.recipes.finetune import ADAPTER_FILE, FinetuneConfig, FinetuneTrainer, finetune
from moekit.train import train
from moekit.train.config import TrainConfig
from tests.recipes.test_finetune import MATH, PROSE

N = 3
# Within warmup the learning rate depends on the step only, not on max_steps: N-step and 2N-step runs agree.
RUN = dict(
    model="tiny",
    batch_size=4,
    block_size=32,
    eval_interval=1000,
    eval_batches=2,
    progress=False,
    tensorboard=False,
    lr=1e-2,
    warmup_steps=100,
    checkpoint_interval=N,
)
METHODS = {
    "lora": dict(method="lora", lora_rank=2, lora_dropout=0.1),  # dropout: the RNG must come back too
    "esft": dict(method="esft", esft="token", top_p=0.5),
    "esft+lora": dict(method="esft+lora", esft="gate", top_p=0.5, lora_rank=2),
    "full": dict(method="full", freeze_router=True),
}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    (root / "prose.txt").write_text(PROSE)
    (root / "math.txt").write_text(MATH)
    train(dict(RUN, data=str(root / "prose.txt"), max_steps=2, out_dir=str(root / "base")))
    return root


def options(root, out, steps: int) -> dict:
    return dict(RUN, data=str(root / "math.txt"), init_from=str(root / "base"), max_steps=steps, out_dir=str(out))


def checkpoint_tensors(run_dir) -> dict[str, torch.Tensor]:
    """Everything the run's last checkpoint holds, by file and name."""
    folder = find_checkpoint(run_dir)
    out = {}
    for file in (WEIGHTS_FILE, ADAPTER_FILE, OPTIMIZER_FILE):
        if (folder / file).is_file():
            out.update({f"{file}:{k}": v for k, v in load_tensors(folder / file).items()})
    return out


@pytest.mark.parametrize("method", list(METHODS))
def test_resume_equals_a_straight_run_bit_for_bit(base, tmp_path, method):
    ft = dict(METHODS[method])
    if method.startswith("esft"):
        calibration = tmp_path / "calibration.txt"  # deleted before the resume: it must not be read again
        calibration.write_text(MATH)
        ft["calibration_data"] = str(calibration)
    whole = finetune(options(base, tmp_path / "whole", 2 * N), ft)
    first = finetune(options(base, tmp_path / "split", N), ft)
    if method.startswith("esft"):
        calibration.unlink()
    rest = finetune(options(base, tmp_path / "split", 2 * N), ft, resume=True)
    assert first.step == N and rest.step == whole.step == 2 * N
    assert whole.train_losses == first.train_losses + rest.train_losses
    a, b = checkpoint_tensors(whole.run_dir), checkpoint_tensors(rest.run_dir)
    assert set(a) == set(b) and any(k.startswith(OPTIMIZER_FILE) for k in a)
    assert (ADAPTER_FILE + ":" in " ".join(a)) == ("lora" in method)
    for key in a:
        assert torch.equal(a[key], b[key]), key  # bit-identical, not merely close
    if method.startswith("esft"):
        assert read_selection(whole.run_dir / "esft_selection.json") == read_selection(
            rest.run_dir / "esft_selection.json"
        )


def test_resume_reads_the_selection_back_from_the_run(base, tmp_path):
    ft = FinetuneConfig(**METHODS["esft"])
    finetune(options(base, tmp_path / "r", N), ft)
    # Another (valid) selection in the run folder: the resumed run trains those experts, proving it was read.
    (tmp_path / "r" / "esft_selection.json").write_text(
        '{"method": "esft", "relevance": "token", "top_p": 0.5, "layers": ['
        '{"moe_layer": 0, "experts": [3], "scores": [0, 0, 0, 1]},'
        '{"moe_layer": 1, "experts": [0, 2], "scores": [0.5, 0, 0.5, 0]}]}'
    )
    trainer = FinetuneTrainer(TrainConfig.from_options(options(base, tmp_path / "r", 2 * N)), ft, resume=True)
    assert trainer.chosen["selection"] == {0: [3], 1: [0, 2]}
    trained = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trained == [f"layers.{i}.mlp.experts.train_w_{w}" for i in (0, 1) for w in ("in", "out")]
    assert trainer.model.layers[0].mlp.experts.train_w_in.shape[0] == 1


def test_only_what_trains_gets_a_gradient(base, tmp_path):
    """What the loop clips and a multi-process run all-reduces: the parameters that hold gradients."""
    for method, ft in METHODS.items():
        trainer = FinetuneTrainer(TrainConfig.from_options(options(base, tmp_path / method, 1)), FinetuneConfig(**ft))
        trainer.task.loss(trainer.task.next_batch()).loss.backward()
        with_grad = {n for n, p in trainer.model.named_parameters() if p.grad is not None}
        trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
        assert with_grad <= trainable, method
        if method != "full":
            assert all(".lora_" in n or ".train_w_" in n or ".router." in n for n in trainable), method


def test_resume_refuses_other_settings(base, tmp_path):
    run = tmp_path / "r"
    finetune(options(base, run, N), METHODS["lora"])
    opts = options(base, run, 2 * N)
    with pytest.raises(ConfigError, match=r"--resume: method='esft' differs .*\(method='lora'\)"):
        finetune(opts, {**METHODS["lora"], "method": "esft"}, resume=True)
    with pytest.raises(ConfigError, match=r"--resume: lora_rank=4 differs .*\(lora_rank=2\)"):
        finetune(opts, {**METHODS["lora"], "lora_rank": 4}, resume=True)
    with pytest.raises(ConfigError, match=r"--resume: lr=0.5 differs"):
        finetune({**opts, "lr": 0.5}, METHODS["lora"], resume=True)
    with pytest.raises(CheckpointError, match="cannot resume"):
        finetune(options(base, tmp_path / "empty", 2 * N), METHODS["lora"], resume=True)
    with pytest.raises(CheckpointError, match="records no fine-tuning settings"):  # a `moekit train` run
        finetune(options(base, base / "base", 2 * N), METHODS["lora"], resume=True)


def test_resume_from_the_command_line(base, tmp_path, capsys):
    from moekit.cli import main

    run = tmp_path / "run"
    common = ["--data", base / "math.txt", "--batch-size", 2, "--block-size", 16, "--eval-batches", 1]
    common += ["--progress", "false", "--tensorboard", "false", "--warmup-steps", 100]
    args = ["finetune", "--init-from", base / "base", "--method", "esft", "--top-p", 0.5, "--out", run, *common]
    assert main([str(a) for a in [*args, "--max-steps", 2]]) == 0
    capsys.readouterr()
    # --resume takes every setting from the run; only how long it runs changes here.
    assert main(["finetune", "--resume", "--out", str(run), "--max-steps", "4"]) == 0
    assert "step 4: val_loss=" in capsys.readouterr().out
    assert main(["finetune", "--resume", "--out", str(run), "--max-steps", "6", "--method", "lora"]) == 2
    assert "moekit finetune: error: --resume: method='lora' differs" in capsys.readouterr().err
    assert main(["finetune", "--resume", "--max-steps", "6"]) == 2
    assert "--resume needs --out" in capsys.readouterr().err
    assert main(["finetune", "--out", str(tmp_path / "new")]) == 2
    assert "needs --init-from" in capsys.readouterr().err
