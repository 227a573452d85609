"""Every preset moekit ships exports with the default family: transformers loads it cleanly and computes the same
logits. Presets are shrunk (width, experts, depth) but keep their structure: which layers are dense, routing,
attention kind, QK-norm, shared experts, tied embeddings."""

from __future__ import annotations

import json

import pytest
import torch

import moekit
from moekit.errors import ConfigError
from moekit.interop.hf import hf_config_from_lm, infer_family
from moekit.models import LMConfig, MoELM
from moekit.models.presets import PRESETS
from moekit.nn.config import MoEConfig
from tests.interop.hf_models import VOCAB, one_torch_thread, padded_batch, transformers  # noqa: F401


def shrunk(config: LMConfig) -> LMConfig:
    """``config`` at test size: narrow, few experts, at most 4 layers (enough for a dense one among sparse ones)."""
    fewer = config.replace(
        num_hidden_layers=min(config.num_hidden_layers, 4),
        first_k_dense=min(config.first_k_dense, 1),
        moe_layers=None if config.moe_layers is None else tuple(i for i in config.moe_layers if i < 4),
    )
    moe = config.moe
    return fewer.replace(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_attention_heads=4,
        num_key_value_heads=None if config.kv_heads == config.num_attention_heads else 2,
        head_dim=None if config.head_dim is None else 12,
        max_position_embeddings=64,
        initializer_range=0.1,  # spread router logits so top-k choices are not near-ties
        moe=None if moe is None else moe.replace(num_experts=min(moe.num_experts, 16), expert_hidden_size=16),
    )


@torch.no_grad()
def _perturbed(config: LMConfig, seed: int = 0) -> MoELM:
    torch.manual_seed(seed)
    model = MoELM(config).eval()
    for name, p in model.named_parameters():
        if "norm" in name:
            p.add_(torch.randn_like(p) * 0.2)
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.copy_(torch.randn_like(b) * 0.1)
    return model


def test_shrinking_keeps_each_preset_s_structure():
    for name, config in PRESETS.items():
        small = shrunk(config)
        assert infer_family(small) == infer_family(config), name
        assert (small.moe is None) == (config.moe is None) and small.qk_norm == config.qk_norm, name
        assert (0 in small.sparse_layers) == (0 in config.sparse_layers), name


@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_preset_exports_and_transformers_computes_the_same_logits(tmp_path, preset):
    config = shrunk(PRESETS[preset])
    model = _perturbed(config)
    out = moekit.to_hf(model, tmp_path / "hf")
    exported = json.loads((out / "config.json").read_text())
    assert exported["model_type"] == infer_family(PRESETS[preset])
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert all(not v for v in info.values()), info
    ids, mask, positions = padded_batch()
    with torch.no_grad():
        theirs = hf.eval()(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        mine = model(ids, attention_mask=mask).logits
    assert (mine - theirs).abs()[mask.bool()].max() <= 1e-4
    back = moekit.from_hf(out)  # and moekit reads its own export back, tensor for tensor
    assert back.config.sparse_layers == config.sparse_layers
    again = back.state_dict()
    assert all(torch.equal(again[k], v) for k, v in model.state_dict().items())


def test_demo_dense_first_layer_is_a_qwen2_moe_mlp_only_layer_with_no_shared_expert():
    hf = hf_config_from_lm(PRESETS["demo"])
    assert hf["model_type"] == "qwen2_moe" and hf["mlp_only_layers"] == [0] and hf["decoder_sparse_step"] == 1
    assert hf["shared_expert_intermediate_size"] == 0 and hf["qkv_bias"] is False
    with pytest.raises(ConfigError, match="qk_norm"):  # Qwen3-MoE always normalises q and k
        hf_config_from_lm(PRESETS["demo"], family="qwen3_moe")
    with pytest.raises(ConfigError, match="sparse_layers"):
        hf_config_from_lm(PRESETS["demo"], family="mixtral")


@pytest.mark.parametrize("attention", ["mha", "mla"])
def test_a_sigmoid_routed_moe_without_shared_experts_exports_a_zero_width_one(tmp_path, attention):
    mla = dict(kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8) if attention == "mla" else {}
    config = LMConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        first_k_dense=1,
        initializer_range=0.1,
        attention_type=attention,
        moe=MoEConfig(num_experts=8, top_k=2, expert_hidden_size=16, router="sigmoid_topk", n_group=2, topk_group=1),
        **mla,
    )
    model = _perturbed(config)
    out = moekit.to_hf(model, tmp_path / "hf")
    exported = json.loads((out / "config.json").read_text())
    assert exported["model_type"] == ("deepseek_v3" if mla else "glm4_moe") and exported["n_shared_experts"] == 0
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert all(not v for v in info.values()), info
    ids, mask, positions = padded_batch()
    with torch.no_grad():
        theirs = hf.eval()(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        assert (model(ids, attention_mask=mask).logits - theirs).abs()[mask.bool()].max() <= 1e-4
    back = moekit.from_hf(out)
    assert back.config.moe.num_shared_experts == 0
    assert all(torch.equal(back.state_dict()[k], v) for k, v in model.state_dict().items())
