"""The trainer: exact resume, non-finite guard, budgets, param groups, metrics, clear errors."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from moekit.errors import CheckpointError, ConfigError, DataError, NonFiniteError
from moekit.train import TrainConfig, Trainer, train
from moekit.train.metrics import read_metrics
from moekit.train.optim import build_optimizer, parameter_groups

FAST = dict(
    model="tiny",
    batch_size=4,
    block_size=16,
    eval_interval=5,
    eval_batches=2,
    progress=False,
    tensorboard=False,
    log_interval=1,
)


def test_resume_is_bit_exact(tmp_path):
    whole = train(max_steps=12, out_dir=str(tmp_path / "a"), checkpoint_interval=6, **FAST)
    first = train(max_steps=6, out_dir=str(tmp_path / "b"), checkpoint_interval=6, **FAST)
    rest = train(max_steps=12, out_dir=str(tmp_path / "b"), checkpoint_interval=6, resume=True, **FAST)
    assert whole.train_losses == first.train_losses + rest.train_losses
    assert whole.val_losses[-1] == rest.val_losses[-1]


def test_resume_with_sigmoid_router_and_accumulation_is_bit_exact(tmp_path):
    opts = dict(FAST, grad_accum=2, model_overrides={"moe": {"router": "sigmoid_topk", "bias_update_rate": 0.01}})
    whole = train(max_steps=8, out_dir=str(tmp_path / "a"), **opts)
    train(max_steps=4, out_dir=str(tmp_path / "b"), **opts)
    rest = train(max_steps=8, out_dir=str(tmp_path / "b"), resume=True, **opts)
    assert whole.train_losses[4:] == rest.train_losses


def test_training_reduces_loss_and_logs_metrics(tmp_path):
    result = train(max_steps=30, out_dir=str(tmp_path / "r"), lr=3e-3, **{**FAST, "tensorboard": True})
    assert result.val_losses[-1][1] < result.val_losses[0][1]
    records = read_metrics(tmp_path / "r")
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 30 and all("imbalance" in r and "tokens_per_sec" in r for r in steps)
    assert any("val_loss" in r for r in records)
    assert list((tmp_path / "r" / "tb").glob("events.out.tfevents.*"))
    run = json.loads((tmp_path / "r" / "run.json").read_text())
    assert run["parameters"]["active"] < run["parameters"]["total"]


def test_time_budget_stops_early(tmp_path):
    result = train(max_steps=100_000, time_budget="1s", out_dir=str(tmp_path / "r"), **FAST)
    assert 0 < result.step < 100_000


def test_bf16_autocast_trains(tmp_path):
    result = train(max_steps=4, precision="bfloat16", out_dir=str(tmp_path / "r"), **FAST)
    assert all(torch.isfinite(torch.tensor(result.train_losses)))


def test_non_finite_loss_stops_before_any_update(tmp_path):
    trainer = Trainer(TrainConfig(max_steps=5, out_dir=str(tmp_path / "r"), **FAST))
    with torch.no_grad():
        trainer.model.embed_tokens.weight[:] = float("nan")
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(NonFiniteError, match=r"non-finite loss .* at step 0; no weight was updated"):
        trainer.run()
    after = trainer.model.state_dict()
    for name, tensor in before.items():
        assert torch.equal(tensor, after[name]) or (tensor.isnan() == after[name].isnan()).all()
    assert not trainer.optimizer.state  # AdamW never stepped


def test_parameter_groups_skip_norms_and_biases():
    trainer_model = Trainer(TrainConfig(max_steps=1, out_dir=None, **FAST)).model
    decay, no_decay = parameter_groups(trainer_model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"])
    norm_weights = {id(m.weight) for m in trainer_model.modules() if type(m).__name__ == "RMSNorm"}
    assert norm_weights and norm_weights <= {id(p) for p in no_decay["params"]}


def test_output_folder_with_another_run_is_refused(tmp_path):
    train(max_steps=2, out_dir=str(tmp_path / "r"), **FAST)
    marker = (tmp_path / "r" / "run.json").read_text()
    with pytest.raises(CheckpointError, match=r"already holds a run; pass --resume"):
        train(max_steps=2, out_dir=str(tmp_path / "r"), **FAST)
    assert (tmp_path / "r" / "run.json").read_text() == marker


def test_resume_with_a_different_config_is_refused(tmp_path):
    train(max_steps=2, out_dir=str(tmp_path / "r"), **FAST)
    with pytest.raises(ConfigError, match=r"--resume: lr=0.01 differs .*\(lr=0.003\)"):
        train(max_steps=4, out_dir=str(tmp_path / "r"), resume=True, **{**FAST, "lr": 0.01})


def test_bad_data_is_refused(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(DataError, match="empty"):
        train(max_steps=1, data=str(empty), out_dir=str(tmp_path / "a"), **FAST)
    binary = tmp_path / "blob.txt"
    binary.write_bytes(b"abc\x00\x01\x02" * 100)
    with pytest.raises(DataError, match="blob.txt"):
        train(max_steps=1, data=str(binary), out_dir=str(tmp_path / "b"), **FAST)
    short = tmp_path / "short.txt"
    short.write_text("to be or not to be, " * 3)
    with pytest.raises(DataError, match=r"needs at least 17"):
        train(max_steps=1, data=str(short), out_dir=str(tmp_path / "c"), **FAST)
    assert not (tmp_path / "a" / "checkpoints").exists()


def test_unknown_keys_name_the_closest():
    with pytest.raises(ConfigError, match=r"unknown train config key 'learning_rat'"):
        train(learning_rat=0.1)
    with pytest.raises(ConfigError, match=r"'hiden_size'; did you mean 'hidden_size'"):
        Trainer(TrainConfig(model="tiny", model_overrides={"hiden_size": 8}, progress=False))
    with pytest.raises(ConfigError, match=r"block_size=100 exceeds the model's max_position_embeddings=64"):
        Trainer(TrainConfig(model="tiny", block_size=100, progress=False))


def test_fused_adamw_matches_the_per_tensor_reference():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4))
    reference = copy.deepcopy(model)
    config = TrainConfig(lr=1e-2, weight_decay=0.1)
    fast = build_optimizer(model, config)
    assert fast.defaults["fused"] is True
    slow = torch.optim.AdamW(
        parameter_groups(reference, 0.1), lr=1e-2, betas=(config.beta1, config.beta2), foreach=False
    )
    for step in range(5):
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(step))
        for net, opt in ((model, fast), (reference, slow)):
            opt.zero_grad()
            net(x).square().sum().backward()
            opt.step()
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
