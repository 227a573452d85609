"""Named LMConfigs, each with where its numbers come from.

Parameter counts in the comments are ``MoELM(cfg).num_parameters()`` (checked in tests/models/test_presets.py).
"""

from __future__ import annotations

from typing import Any

from moekit.config import closest, require
from moekit.errors import ConfigError
from moekit.models.config import LMConfig
from moekit.models.resolve import check_overrides
from moekit.nn.attention import QKNorm
from moekit.nn.config import MoEConfig, RouterType


def dense_equivalent(config: LMConfig) -> LMConfig:
    """The dense LMConfig with the same active parameters per token as ``config``'s MoE layers.

    Every layer gets an MLP of ``experts_per_token * expert_hidden_size + shared hidden`` (same
    activation as the experts): a token's FLOPs through the FFN match the MoE's, minus the router.
    Exact when every layer of ``config`` is sparse; dense layers of the MoE model (``first_k_dense``...)
    are widened too. A dense config is returned unchanged.
    """
    m = config.moe
    if m is None:
        return config
    width = m.experts_per_token * m.expert_hidden_size + m.shared_hidden_size
    return config.replace(
        moe=None,
        intermediate_size=width,
        activation=m.activation,
        first_k_dense=0,
        moe_layer_freq=1,
        moe_layers=None,
        moe_layer_overrides=None,
    )


# Test preset: the smallest model that exercises GQA, tied embeddings and a top-2 MoE in every layer.
TINY = LMConfig(
    vocab_size=256,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    tie_word_embeddings=True,
    moe=MoEConfig(num_experts=4, top_k=2, expert_hidden_size=32),
)

# CPU demo: byte-level tiny-shakespeare in ~2 minutes on 2 cores (nanoGPT's shakespeare_char scale,
# shrunk). Three layers of width 96 (heads of 32) rather than four of 128: on 2 cores the step count within two
# minutes matters more than the width (1,653 steps to val 1.62 in 86 s against 897 steps to 1.75 for 4 x 128;
# benchmarks/results/demo_recipe_trials.md). Layers 1 and 2 are MoE, 16 experts top-2 of width 192: each token
# sees a SwiGLU FFN of 384 = 4 x hidden, like a standard transformer, while a layer holds 8x those expert weights.
# Layer 0 is dense (DeepSeek's first_k_dense_replace): at equal tokens (benchmarks/lm_quality.py, 600 steps) it
# costs ~0.015 nats of the MoE's lead over the equal-active dense model (+0.039 instead of +0.054) and cuts the
# step-time premium from 1.16-1.20x to 1.08-1.13x; 16 experts beat 8 and 32 (benchmarks/results/lm_quality.txt).
# 2.02M parameters in total, 0.47M active per token.
DEMO = LMConfig(
    vocab_size=256,
    hidden_size=96,
    intermediate_size=384,
    num_hidden_layers=3,
    num_attention_heads=3,
    max_position_embeddings=128,
    tie_word_embeddings=True,
    first_k_dense=1,
    moe=MoEConfig(num_experts=16, top_k=2, expert_hidden_size=192, aux_loss_coef=0.01),
)

# A small model for a 32k BPE vocabulary (Llama/Mistral tokenizer size); moekit's own sizes, laid out like
# Mixtral (Jiang et al. 2024, arXiv:2401.04088: 8 experts, top-2, GQA), with tied embeddings as small
# models do. 35.9M total, 20.0M active (12.3M of both are the embedding).
SMALL = LMConfig(
    vocab_size=32000,
    hidden_size=384,
    intermediate_size=1536,
    num_hidden_layers=6,
    num_attention_heads=6,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    tie_word_embeddings=True,
    moe=MoEConfig(num_experts=8, top_k=2, expert_hidden_size=384, aux_loss_coef=0.01),
)

# OLMoE-1B-7B (Muennighoff et al. 2024; HF allenai/OLMoE-1B-7B-0924 config.json): 64 fine-grained
# experts, top-8 without renormalisation, QK-norm over the full projections, z-loss 1e-3.
# 6.92B total, 1.28B active.
OLMOE_1B_7B = LMConfig(
    vocab_size=50304,
    hidden_size=2048,
    intermediate_size=1024,
    num_hidden_layers=16,
    num_attention_heads=16,
    num_key_value_heads=16,
    max_position_embeddings=4096,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    qk_norm=QKNorm.FULL,
    moe=MoEConfig(
        num_experts=64,
        top_k=8,
        expert_hidden_size=1024,
        norm_topk_prob=False,
        aux_loss_coef=0.01,
        z_loss_coef=0.001,
    ),
)

# Qwen3-30B-A3B (Qwen3 technical report 2025; HF Qwen/Qwen3-30B-A3B config.json): 128 experts top-8,
# GQA 32:4 with head_dim 128 != hidden/heads, per-head QK-norm, no shared expert. 30.5B total, 3.3B active.
QWEN3_30B_A3B = LMConfig(
    vocab_size=151936,
    hidden_size=2048,
    intermediate_size=6144,
    num_hidden_layers=48,
    num_attention_heads=32,
    num_key_value_heads=4,
    head_dim=128,
    max_position_embeddings=40960,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    qk_norm=QKNorm.HEAD,
    moe=MoEConfig(
        num_experts=128,
        top_k=8,
        expert_hidden_size=768,
        norm_topk_prob=True,
        aux_loss_coef=0.001,
    ),
)

# DeepSeek-V3's MoE recipe (DeepSeek-AI 2024, arXiv:2412.19437 sec. 2.1.2 and 4.2) at small scale:
# sigmoid router with aux-loss-free bias balancing, group-limited routing (8 groups, top-4 groups),
# 1 shared expert, routed_scaling_factor 2.5, a tiny sequence-wise balance loss (alpha = 1e-4),
# first layer dense. Attention is plain GQA here, not MLA (MLA is moekit/nn/mla.py: attention_type='mla').
# Our own sizes: 133M total, 53M active.
DEEPSEEK_SMALL = LMConfig(
    vocab_size=32000,
    hidden_size=512,
    intermediate_size=1536,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=8,
    max_position_embeddings=2048,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    first_k_dense=1,
    moe=MoEConfig(
        num_experts=64,
        top_k=6,
        expert_hidden_size=128,
        router=RouterType.SIGMOID_TOPK,
        n_group=8,
        topk_group=4,
        routed_scaling_factor=2.5,
        num_shared_experts=1,
        aux_loss_coef=0.0,
        seq_aux_loss_coef=1e-4,
        bias_update_rate=1e-3,
    ),
)

PRESETS: dict[str, LMConfig] = {
    "tiny": TINY,
    "demo": DEMO,
    "dense-demo": dense_equivalent(DEMO),  # the equal-active dense baseline of `demo`: 0.47M parameters
    "small": SMALL,
    "olmoe-1b-7b": OLMOE_1B_7B,
    "qwen3-30b-a3b": QWEN3_30B_A3B,
    "deepseek-small": DEEPSEEK_SMALL,
}


def get_preset(name: str) -> LMConfig:
    """The LMConfig named ``name`` (see ``PRESETS``); an unknown name raises ConfigError with the closest."""
    try:
        return PRESETS[name]
    except KeyError:
        hint = closest(str(name), PRESETS)
        extra = f"; did you mean {hint!r}?" if hint else ""
        raise ConfigError(f"unknown preset {name!r}{extra} (presets: {', '.join(PRESETS)})") from None


def resolve_lm_config(preset: str, overrides: dict[str, Any], vocab_size: int, block_size: int) -> LMConfig:
    """Preset ``preset`` with ``overrides`` (``--model.*``) applied; vocab_size follows the tokenizer's
    ``vocab_size`` unless overridden, and the model must cover it and ``block_size``."""
    check_overrides(overrides, LMConfig)
    base = get_preset(preset).to_dict()
    merged = {**base, "vocab_size": vocab_size, **overrides}
    if overrides.get("moe") is not None:  # field by field; model.moe=null asks for the dense baseline
        require(base["moe"] is not None, f"model.moe overrides given, but preset {preset!r} is dense")
        merged["moe"] = {**base["moe"], **overrides["moe"]}
    config = LMConfig.from_dict(merged)
    if config.vocab_size < vocab_size:
        raise ConfigError(f"model.vocab_size={config.vocab_size} is smaller than the tokenizer's {vocab_size} tokens")
    if block_size > config.max_position_embeddings:
        raise ConfigError(
            f"block_size={block_size} exceeds the model's max_position_embeddings={config.max_position_embeddings}"
        )
    return config
