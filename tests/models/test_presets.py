"""Presets: every one builds (on the meta device: no memory), round-trips, and has the documented size."""

from __future__ import annotations

import json

import pytest
import torch

from moekit.errors import ConfigError
from moekit.models import PRESETS, LMConfig, MoELM, dense_equivalent, get_preset

# name -> (total, active) parameters, in millions, as documented in presets.py (rounded as there).
DOCUMENTED = {
    "demo": (2.02, 0.47),
    "dense-demo": (0.47, 0.47),
    "small": (35.9, 20.0),
    "olmoe-1b-7b": (6920, 1280),  # OLMoE paper: 6.9B total, 1.3B active
    "qwen3-30b-a3b": (30500, 3350),  # Qwen3 report: 30.5B total, 3.3B active
    "deepseek-small": (133, 53),
}


def meta_model(cfg: LMConfig) -> MoELM:
    with torch.device("meta"):
        return MoELM(cfg)


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_builds_and_round_trips(name):
    cfg = get_preset(name)
    assert LMConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    model = meta_model(cfg)
    n = model.num_parameters()
    if cfg.moe is None:
        assert n["active"] == n["total"] and model.moe_layers() == []
    else:
        assert n["active"] < n["total"] and len(model.moe_layers()) == len(cfg.sparse_layers)
    if name in DOCUMENTED:
        total, active = DOCUMENTED[name]
        assert n["total"] / 1e6 == pytest.approx(total, rel=0.01)
        assert n["active"] / 1e6 == pytest.approx(active, rel=0.01)


def test_tiny_preset_is_what_the_tests_expect():
    cfg = get_preset("tiny")
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == (2, 32, 256)
    assert (cfg.moe.num_experts, cfg.moe.top_k) == (4, 2)


def test_dense_demo_is_the_equal_active_baseline_of_demo():
    demo, dense = get_preset("demo"), get_preset("dense-demo")
    assert dense == dense_equivalent(demo) and dense.moe is None
    assert dense.intermediate_size == demo.moe.top_k * demo.moe.expert_hidden_size
    sparse_model, dense_model = meta_model(demo), meta_model(dense)
    routers = sum(p.numel() for _, m in sparse_model.moe_layers() for p in m.router.parameters())
    assert sparse_model.num_parameters()["active"] - dense_model.num_parameters()["active"] == routers


def test_unknown_preset_names_the_closest():
    with pytest.raises(ConfigError, match="unknown preset 'dem'; did you mean 'demo'"):
        get_preset("dem")
    with pytest.raises(ConfigError, match="presets: tiny, demo"):
        get_preset("zzzzzz")
