"""Per-layer MoE overrides in LMConfig: JSON round trip, validation, per-layer models."""

from __future__ import annotations

import json

import pytest

from moekit.errors import ConfigError
from moekit.models import LMConfig, MoELM, dense_equivalent

from .helpers import TINY


def test_overrides_survive_json_with_string_keys():
    cfg = TINY.replace(moe_layer_overrides={1: {"num_experts": 3, "top_k": 1}})
    data = json.loads(json.dumps(cfg.to_dict()))
    assert data["moe_layer_overrides"] == {"1": {"num_experts": 3, "top_k": 1}}
    assert LMConfig.from_dict(data) == cfg
    assert cfg.moe_config(0).num_experts == 4 and cfg.moe_config(1).num_experts == 3
    assert cfg.moe_config(1).top_k == 1 and cfg.moe_config(0) is cfg.moe


def test_configs_without_overrides_serialise_as_before():
    assert "moe_layer_overrides" not in TINY.to_dict()
    assert TINY.replace(moe_layer_overrides={}).moe_layer_overrides is None


def test_model_builds_each_layer_from_its_config():
    cfg = TINY.replace(moe_layer_overrides={"0": {"num_experts": 2, "router": "sigmoid_topk"}})
    model = MoELM(cfg)
    (_, first), (_, second) = model.moe_layers()
    assert first.experts.w_in.shape[0] == 2 and first.config.router.value == "sigmoid_topk"
    assert second.experts.w_in.shape[0] == 4
    assert model.num_parameters()["total"] < MoELM(TINY).num_parameters()["total"]
    assert dense_equivalent(cfg).moe is None


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({5: {"num_experts": 2}}, "layer 5, which is not an MoE layer"),
        ({1: {"num_expert": 2}}, "did you mean 'num_experts'"),
        ({1: {"top_k": 9}}, r"moe_layer_overrides\[1\]: top_k=9 exceeds num_experts=4"),
        ({1: {"hidden_size": 8}}, "may not change hidden_size"),
        ({"one": {}}, "not a layer index"),
    ],
)
def test_bad_overrides_name_the_layer_and_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        TINY.replace(moe_layer_overrides=overrides)


def test_overrides_need_an_moe():
    with pytest.raises(ConfigError, match="needs an moe config"):
        TINY.replace(moe=None, moe_layer_overrides={0: {"num_experts": 2}})
