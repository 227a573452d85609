"""The Hugging Face families moekit maps, with transformers 5.23's class defaults for the fields it reads.

A ``config.json`` that omits a field gets these, as transformers would (tests/interop/test_hf_config.py
checks them against transformers' config classes).
"""

from __future__ import annotations

from typing import Any

MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "glm4_moe")
# Sigmoid routing with a balancing bias and group-limited top-k (DeepSeek-V3's router); GLM-4-MoE pairs it with GQA.
SIGMOID_FAMILIES = ("deepseek_v3", "glm4_moe")
DENSE_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
FAMILIES = MOE_FAMILIES + DENSE_FAMILIES

ARCHITECTURES = {
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "olmoe": "OlmoeForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
    "glm4_moe": "Glm4MoeForCausalLM",
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}

# transformers 5.23's class defaults for the math fields each family reads (absent keys take these).
COMMON_DEFAULTS: dict[str, Any] = {
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "rope_theta": 10000.0,
    "head_dim": None,
}
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {
        "num_key_value_heads": None,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 2048,
        "attention_bias": False,
        "mlp_bias": False,
    },
    "mistral": {
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 131072,
        "sliding_window": 4096,
    },
    "qwen2": {
        "num_key_value_heads": 32,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 32768,
        "use_sliding_window": False,
        "sliding_window": 4096,
        "max_window_layers": 28,
    },
    "qwen3": {
        "num_key_value_heads": 32,
        "head_dim": 128,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 32768,
        "attention_bias": False,
        "use_sliding_window": False,
        "sliding_window": 4096,
        "max_window_layers": 28,
    },
    "mixtral": {
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 131072,
        "rope_theta": 1e6,
        "sliding_window": None,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "router_jitter_noise": 0.0,
        "router_aux_loss_coef": 0.001,
    },
    "qwen2_moe": {
        "num_key_value_heads": 16,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 32768,
        "use_sliding_window": False,
        "sliding_window": 4096,
        "max_window_layers": 28,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "norm_topk_prob": False,
        "qkv_bias": True,
        "num_experts": 60,
        "num_experts_per_tok": 4,
        "moe_intermediate_size": 1408,
        "shared_expert_intermediate_size": 5632,
        "router_aux_loss_coef": 0.001,
    },
    "qwen3_moe": {
        "num_key_value_heads": 4,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 32768,
        "attention_bias": False,
        "use_sliding_window": False,
        "sliding_window": 4096,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "norm_topk_prob": False,
        "num_experts": 128,
        "num_experts_per_tok": 8,
        "moe_intermediate_size": 768,
        "router_aux_loss_coef": 0.001,
    },
    "olmoe": {
        "num_key_value_heads": None,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 4096,
        "attention_bias": False,
        "clip_qkv": None,
        "norm_topk_prob": False,
        "num_experts": 64,
        "num_experts_per_tok": 8,
        "router_aux_loss_coef": 0.01,
    },
    "deepseek_v3": {
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 4096,
        "attention_bias": False,
        "norm_topk_prob": True,
        "rope_interleave": True,
        "n_group": 8,
        "topk_group": 4,
        "routed_scaling_factor": 2.5,
        "first_k_dense_replace": 3,
        "n_shared_experts": 1,
        "q_lora_rank": 1536,
        "kv_lora_rank": 512,
        "qk_rope_head_dim": 64,
        "qk_nope_head_dim": 128,
        "v_head_dim": 128,
        "n_routed_experts": 256,
        "num_experts_per_tok": 8,
        "moe_intermediate_size": 2048,
        "moe_layer_freq": 1,
    },
    "glm4_moe": {  # partial_rotary_factor defaults to 0.5 too (set in __post_init__, read by config_map)
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 131072,
        "attention_bias": False,
        "use_qk_norm": False,
        "norm_topk_prob": True,
        "n_group": 1,
        "topk_group": 1,
        "routed_scaling_factor": 1.0,
        "first_k_dense_replace": 1,
        "n_shared_experts": 1,
        "n_routed_experts": 128,
        "num_experts_per_tok": 8,
        "moe_intermediate_size": 1408,
    },
}

# Another spelling transformers accepts for the same field (attribute_map), per family.
ALIASES = {
    "mixtral": {"num_local_experts": ("num_experts",)},
    "qwen3_moe": {"num_experts": ("num_local_experts",)},
    "olmoe": {"num_experts": ("num_local_experts",)},
    "deepseek_v3": {"n_routed_experts": ("num_local_experts",)},
    "glm4_moe": {"n_routed_experts": ("num_local_experts",)},
}

# Keys that never change what a forward pass computes (bookkeeping, generation defaults, training-only
# switches the modeling code ignores). Anything else not read by a family is logged as unknown.
HARMLESS = {
    "_name_or_path",
    "architectures",
    "auto_map",
    "bos_token_id",
    "chunk_size_feed_forward",
    "dtype",
    "eos_token_id",
    "id2label",
    "is_encoder_decoder",
    "label2id",
    "model_type",
    "output_attentions",
    "output_hidden_states",
    "output_router_logits",
    "pad_token_id",
    "pretraining_tp",
    "problem_type",
    "return_dict",
    "tie_encoder_decoder",
    "torch_dtype",
    "transformers_version",
    "use_cache",
    "use_bfloat16",
    "bias",  # Mixtral/OLMoE hub configs carry a stray one
    # DeepSeek-V3 bookkeeping: expert-parallel size, the multi-token-prediction module (not part of the
    # causal LM; its weights are skipped on import), training-only balance loss.
    "ep_size",
    "num_nextn_predict_layers",
    "aux_loss_alpha",
    "seq_aux",
    "qk_head_dim",  # derived (nope + rope), checked below
}
