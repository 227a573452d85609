"""Muon + AdamW: the orthogonalisation, which parameters it takes, training and exact resume."""

from __future__ import annotations

import torch

from moekit.models.lm import MoELM
from moekit.models.presets import get_preset
from moekit.train import TrainConfig, train
from moekit.train.muon import MuonAdamW, orthogonalize
from moekit.train.optim import build_optimizer

FAST = dict(
    model="tiny", batch_size=4, block_size=16, eval_interval=5, eval_batches=2, progress=False, tensorboard=False
)


def test_orthogonalize_is_close_to_the_polar_factor_of_each_matrix():
    torch.manual_seed(0)
    grads = torch.randn(3, 24, 80)  # a stack of 3 wide matrices, like expert weights
    result = orthogonalize(grads)
    u, _, vh = torch.linalg.svd(grads, full_matrices=False)
    polar = u @ vh
    cosine = torch.nn.functional.cosine_similarity(result.flatten(1), polar.flatten(1))
    assert (cosine > 0.95).all()
    singular = torch.linalg.svdvals(result)
    assert singular.min() > 0.5 and singular.max() < 1.3
    # each matrix on its own: orthogonalising one alone gives the same as inside the stack
    torch.testing.assert_close(orthogonalize(grads[1]), result[1])
    # tall matrices too
    tall = orthogonalize(grads.transpose(1, 2))
    torch.testing.assert_close(tall, result.transpose(1, 2), rtol=1e-4, atol=1e-5)


def test_muon_takes_hidden_matrices_and_experts_but_not_embeddings_or_router():
    model = MoELM(get_preset("tiny"))
    optimizer = build_optimizer(model, TrainConfig(optimizer="muon"))
    assert isinstance(optimizer, MuonAdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for g in optimizer.param_groups if g["muon"] for p in g["params"]}
    assert any("experts" in n for n in muon) and any("q_proj" in n for n in muon)
    assert not any("embed" in n or "router" in n or "norm" in n for n in muon)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(names)


def test_training_with_muon_reduces_loss_and_resumes_bit_exactly(tmp_path):
    opts = dict(FAST, optimizer="muon", lr=3e-3, checkpoint_interval=6)
    whole = train(max_steps=12, out_dir=str(tmp_path / "a"), **opts)
    assert whole.val_losses[-1][1] < whole.val_losses[0][1]
    train(max_steps=6, out_dir=str(tmp_path / "b"), **opts)
    rest = train(max_steps=12, out_dir=str(tmp_path / "b"), resume=True, **opts)
    assert whole.train_losses[6:] == rest.train_losses
