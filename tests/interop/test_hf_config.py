"""Config mapping: moekit's per-family defaults are transformers' own, and legacy spellings import the same."""

from __future__ import annotations

import pytest

from moekit.errors import ConfigError
from moekit.interop.hf import hf_config_from_lm, infer_family, lm_config_from_hf
from moekit.interop.hf.config_export import math_signature
from moekit.interop.hf.families import ARCHITECTURES, FAMILY_DEFAULTS
from moekit.models.presets import get_preset
from tests.interop.hf_models import CONFIGS, hf_config, transformers

_CLASSES = {
    family: getattr(transformers, f"{arch[: -len('ForCausalLM')]}Config") for family, arch in ARCHITECTURES.items()
}


@pytest.mark.parametrize("family", list(FAMILY_DEFAULTS))
def test_defaults_are_transformers_class_defaults(family):
    """A config.json that omits a field gets what transformers would use."""
    reference = _CLASSES[family]()
    for name, mine in FAMILY_DEFAULTS[family].items():
        if name == "moe_layer_freq" or (name == "sliding_window" and "use_sliding_window" in FAMILY_DEFAULTS[family]):
            continue  # a hub-only field transformers 5 ignores; a window only read when use_sliding_window is on
        theirs = reference.rope_parameters["rope_theta"] if name == "rope_theta" else getattr(reference, name)
        if name == "num_key_value_heads" and mine is None:
            mine = reference.num_attention_heads
        assert theirs == mine, (family, name)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_a_minimal_config_json_imports_like_the_full_one(name):
    """transformers' to_diff_dict drops fields at their defaults (what a hand-written config.json looks like)."""
    config = hf_config(name)
    full = lm_config_from_hf(config.to_dict())
    minimal = lm_config_from_hf({**config.to_diff_dict(), "model_type": config.model_type})
    assert math_signature(full) == math_signature(minimal)


def test_legacy_rope_theta_and_num_experts_spellings():
    v5 = hf_config("qwen3_moe").to_dict()
    legacy = {k: v for k, v in v5.items() if k not in ("rope_parameters", "num_local_experts")}
    legacy.update(rope_theta=5000.0, rope_scaling=None, num_experts=6)
    assert math_signature(lm_config_from_hf(legacy)) == math_signature(lm_config_from_hf(v5))
    exported = hf_config_from_lm(lm_config_from_hf(legacy))
    assert exported["rope_theta"] == 5000.0 and exported["num_experts"] == 6 and "num_local_experts" not in exported


def test_native_presets_export_to_the_closest_family():
    tiny = get_preset("tiny")  # top-2 softmax MoE in every layer, renormalised, tied embeddings
    assert infer_family(tiny) == "mixtral"
    hf = hf_config_from_lm(tiny)
    assert hf["model_type"] == "mixtral" and hf["tie_word_embeddings"] is True
    assert math_signature(lm_config_from_hf(hf)) == math_signature(tiny)
    with pytest.raises(ConfigError, match="olmoe"):
        hf_config_from_lm(tiny, family="olmoe")  # OLMoE has QK-norm; tiny does not
