"""Bad configs and inputs give a clear error naming the field and the value."""

from __future__ import annotations

import pytest
import torch

from moekit.errors import ConfigError, ShapeError
from moekit.nn import MoE, MoEConfig, SoftMoE

FIELDS = dict(num_experts=4, top_k=2, expert_hidden_size=6)  # MoEConfig
BASE = dict(hidden_size=8, **FIELDS)  # MoE(...) keywords


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ({"top_k": 5}, r"top_k=5 exceeds num_experts=4"),
        ({"router": "softmax_top"}, r"router='softmax_top' is not one of .*did you mean 'softmax_topk'"),
        ({"activation": "relu"}, r"activation='relu'"),
        ({"num_experts": 0}, r"num_experts must be a positive integer, got 0"),
        ({"capacity_factor": -1.0}, r"capacity_factor must be > 0"),
        ({"router": "expert_choice", "capacity_factor": 1.0}, r"capacity_factor applies to token-choice top-k"),
        ({"router": "sigmoid_topk", "n_group": 3}, r"num_experts=4 is not divisible by n_group=3"),
        ({"n_group": 2, "topk_group": 3}, r"topk_group=3 exceeds n_group=2"),
        ({"drop_policy": "random"}, r"drop_policy='random'"),
        ({"expert_dropout": 1.0}, r"expert_dropout must be in \[0, 1\), got 1.0"),
    ],
)
def test_bad_config(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        MoE(**{**BASE, **override})


def test_renormalised_top1_warns_that_the_router_gets_no_task_gradient(caplog):
    with caplog.at_level("WARNING", logger="moekit.nn.config"):
        MoEConfig(**{**FIELDS, "top_k": 1})
    assert "norm_topk_prob=False" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="moekit.nn.config"):
        MoEConfig(**{**FIELDS, "top_k": 1, "norm_topk_prob": False})
        MoEConfig(**FIELDS)
    assert caplog.text == ""


def test_unknown_key_names_closest():
    with pytest.raises(ConfigError, match=r"unknown MoEConfig key 'num_expert'; did you mean 'num_experts'"):
        MoE(**BASE, num_expert=3)
    with pytest.raises(ConfigError, match=r"unknown MoEConfig key 'topk'"):
        MoEConfig.from_dict({**FIELDS, "topk": 2})


def test_wrong_shapes():
    layer = MoE(**BASE)
    with pytest.raises(ShapeError, match=r"hidden size 7 .* hidden_size=8"):
        layer(torch.randn(3, 7))
    with pytest.raises(ShapeError, match=r"must be \[batch, seq, hidden\]"):
        layer(torch.randn(8))
    with pytest.raises(ShapeError, match=r"mask has shape \(2, 4\) but x's leading shape is \(2, 5\)"):
        layer(torch.randn(2, 5, 8), mask=torch.ones(2, 4))


def test_hash_needs_token_ids():
    layer = MoE(**BASE, router="hash")
    with pytest.raises(ShapeError, match=r"router='hash' needs token_ids"):
        layer(torch.randn(2, 3, 8))
    with pytest.raises(ShapeError, match=r"token_ids has shape \(2, 2\)"):
        layer(torch.randn(2, 3, 8), token_ids=torch.zeros(2, 2, dtype=torch.long))


def test_soft_moe_bad_input():
    with pytest.raises(ShapeError, match=r"slots_per_expert must be a positive integer, got 0"):
        SoftMoE(8, 4, 0, 6)
    with pytest.raises(ShapeError, match=r"SoftMoE expects"):
        SoftMoE(8, 4, 2, 6)(torch.randn(2, 3, 5))


def test_norm_topk_prob_none_renormalises_only_above_top1():
    assert MoEConfig(**{**FIELDS, "norm_topk_prob": None}).norm_topk_prob is True
    assert MoEConfig(**{**FIELDS, "top_k": 1, "norm_topk_prob": None}).norm_topk_prob is False
