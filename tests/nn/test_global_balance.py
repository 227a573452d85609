"""Global-batch balancing (aux_loss_scope="global"): the expert shares of the balancing loss count every
micro-batch of an optimizer step, so the step's loss equals the loss of the whole batch at once."""

from __future__ import annotations

import pytest
import torch

from moekit.errors import ConfigError
from moekit.nn import MoEConfig, start_global_batch
from moekit.train import TrainConfig, Trainer
from tests.nn.helpers import make_layer


def micro_batches(n=4, tokens=10, hidden=12, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(tokens, hidden, generator=g) for _ in range(n)]


@pytest.mark.parametrize("router", ["softmax_topk", "sigmoid_topk"])
def test_four_micro_batches_equal_the_whole_batch(router):
    xs = micro_batches()
    whole = make_layer(router, aux_loss_scope="micro").train()
    layer = make_layer(router, aux_loss_scope="global").train()
    _, aux_whole = whole(torch.cat(xs))
    start_global_batch(layer)
    micro_losses = [layer(x)[1].losses["aux"] for x in xs]
    window = layer.balance_window_loss()
    assert window is not None
    torch.testing.assert_close(window.float(), aux_whole.losses["aux"].detach(), rtol=1e-6, atol=1e-7)
    # The micro-batches' own losses differ from the whole batch's (the micro scope would have balanced each).
    per_micro = [make_layer(router, aux_loss_scope="micro").train()(x)[1].losses["aux"] for x in xs]
    assert max(abs(a.item() - aux_whole.losses["aux"].item()) for a in per_micro) > 1e-3
    # The first micro-batch has seen only itself: its loss is the micro one.
    torch.testing.assert_close(micro_losses[0], per_micro[0])


def test_last_micro_batch_gradient_uses_the_global_shares():
    """The gradient flows through this micro-batch's mean probabilities P, weighted by the whole step's f."""
    xs = micro_batches()
    layer = make_layer(aux_loss_scope="global").train()
    start_global_batch(layer)
    for x in xs[:-1]:
        layer(x)
    layer.zero_grad()
    _, aux = layer(xs[-1])
    aux.losses["aux"].backward()
    grad = layer.router.weight.grad.clone()
    # By hand: f from the assignments of all four micro-batches, P from the last one, E * sum f * P.
    with torch.no_grad():
        counts = sum(torch.bincount(layer.route(x).expert_idx_A, minlength=6).double() for x in xs)
        f_E = (counts / sum(x.shape[0] for x in xs)).float()
    layer.zero_grad()
    probs = layer.route(xs[-1]).probs_TE
    (6 * (f_E * probs.mean(0)).sum()).backward()
    torch.testing.assert_close(grad, layer.router.weight.grad)


def test_reset_starts_a_new_global_batch_and_eval_leaves_it_alone():
    xs = micro_batches(2)
    layer = make_layer(aux_loss_scope="global").train()
    start_global_batch(layer)
    layer(xs[0])
    layer(xs[1])
    two = layer.balance_window_loss()
    start_global_batch(layer)
    assert layer.balance_window_loss() is None
    layer(xs[1])
    one = layer.balance_window_loss()
    assert one is not None and two is not None and abs(one.item() - two.item()) > 1e-6
    layer.eval()
    _, aux = layer(xs[0])  # evaluation: the micro-batch's own loss, the window untouched
    micro = make_layer(aux_loss_scope="micro").eval()(xs[0])[1].losses["aux"]
    torch.testing.assert_close(aux.losses["aux"], micro)
    assert layer.balance_window_loss().item() == one.item()


def test_training_loop_balances_over_each_steps_micro_batches(tmp_path):
    text = "the quick brown fox jumps over the lazy dog. " * 200
    (tmp_path / "corpus.txt").write_text(text)
    config = TrainConfig(
        model="tiny",
        data=str(tmp_path / "corpus.txt"),
        tokenizer="char",
        block_size=16,
        batch_size=2,
        grad_accum=3,
        max_steps=2,
        progress=False,
        tensorboard=False,
        out_dir=str(tmp_path / "run"),
        model_overrides={"moe": {"aux_loss_scope": "global"}},
    )
    trainer = Trainer(config)
    for step in range(2):
        trainer.train_step(step / 2)
        for _, moe in trainer.model.moe_layers():
            window = moe.balance_window
            assert window is not None
            assert int(window["n_valid"]) == 3 * 2 * 16  # exactly one step's three micro-batches of 2 x 16


def test_unknown_scope_is_a_config_error():
    with pytest.raises(ConfigError, match="aux_loss_scope='globl'.*did you mean 'global'"):
        MoEConfig(num_experts=4, expert_hidden_size=8, aux_loss_scope="globl")
