"""LMConfig -> Hugging Face ``config.json``: the export half of :mod:`moekit.interop.hf.config_map`.

Every math field is derived from the LMConfig, written over the ``hf_config`` an import kept (so token ids,
spellings and other non-math fields come back as they were), then the result is imported again and its
math compared with the model's: a model the family cannot express (a capacity factor, hash routing,
per-layer expert counts...) raises ConfigError naming the first field that differs.

Dense layers among sparse ones (``first_k_dense``, ``moe_layer_freq``, ``moe_layers``; the ``demo`` preset's
dense first layer) are exact in four families: Qwen2-MoE and Qwen3-MoE list them in ``mlp_only_layers``
(with ``decoder_sparse_step=1``; any pattern), DeepSeek-V3 and GLM-4-MoE count them in
``first_k_dense_replace`` (leading ones only). Mixtral and OLMoE make every layer sparse. Qwen3-MoE always
applies QK-norm and DeepSeek-V3 always uses MLA, so a softmax-routed MoE with dense layers, no QK-norm and no
shared expert (``demo``) is exported as Qwen2-MoE with ``shared_expert_intermediate_size=0``: the zero-width
shared expert adds exactly 0 (transformers builds and loads it; :mod:`.config_map` reads it back as no shared
expert). Sigmoid routing with grouped-query attention (``deepseek-small``) is GLM-4-MoE with
``partial_rotary_factor=1.0``: its router is DeepSeek-V3's, its attention Llama's with q/k/v biases and
optional per-head QK-norm.
"""

from __future__ import annotations

from typing import Any

from moekit.config import closest
from moekit.errors import ConfigError
from moekit.interop.hf.config_map import lm_config_from_hf
from moekit.interop.hf.families import ALIASES, ARCHITECTURES, DENSE_FAMILIES, FAMILIES, SIGMOID_FAMILIES
from moekit.models.config import AttentionType, LMConfig
from moekit.nn.attention import QKNorm
from moekit.nn.config import MoEConfig, RouterType


def infer_family(config: LMConfig) -> str:
    """The HF family a native moekit config is closest to (export then checks it can express everything)."""
    if config.attention_type == AttentionType.MLA:
        return "deepseek_v3"
    if config.moe is None:
        if config.qk_norm == QKNorm.HEAD:
            return "qwen3"
        if config.attention_bias and not config.attention_out_bias:
            return "qwen2"
        if config.sliding_window is not None:
            return "mistral"
        return "llama"
    moe = config.moe
    if moe.router == RouterType.SIGMOID_TOPK:  # MLA returned above
        return "glm4_moe"
    if moe.shared_expert_gate or moe.num_shared_experts:
        return "qwen2_moe"
    if config.qk_norm == QKNorm.FULL:
        return "olmoe"
    if config.qk_norm == QKNorm.HEAD:
        return "qwen3_moe"
    if len(config.sparse_layers) < config.num_hidden_layers:  # dense layers: mlp_only_layers, no QK-norm
        return "qwen2_moe"
    return "mixtral"


def hf_config_from_lm(
    config: LMConfig, family: str | None = None, dtype: str | None = None, family_flag: str = "family="
) -> dict[str, Any]:
    """The ``config.json`` dict that makes transformers build ``config``'s model in ``family``.

    Args:
        config: the model's LMConfig (its ``hf_config``, if any, supplies token ids and other non-math fields).
        family: an HF ``model_type``; default: the imported one, else :func:`infer_family`.
        dtype: the weights' dtype name (``"float32"``, ``"bfloat16"``...) to record.
        family_flag: how the caller spells the family option in the hint of an error (``--family`` on the CLI).

    Raises:
        ConfigError: ``family`` is unknown or cannot express the model (naming the field that differs).
    """
    source = config.hf_config or {}
    family = family or source.get("model_type") or infer_family(config)
    if family not in FAMILIES:
        hint = closest(str(family), FAMILIES)
        extra = f"; did you mean {hint!r}?" if hint else ""
        raise ConfigError(f"cannot export to family {family!r}; moekit exports {', '.join(FAMILIES)}{extra}")
    base = dict(source) if source.get("model_type") == family else {}
    for stale in ("rope_scaling", "torch_dtype", "auto_map", "quantization_config"):
        base.pop(stale, None)
    fields = _export_fields(config, family, base)  # may drop stale spellings from base
    out = {**base, **fields}
    out["architectures"] = [ARCHITECTURES[family]]
    out["model_type"] = family
    if dtype is not None:
        out["dtype"] = dtype
    _check_expressible(config, out, family, family_flag)
    return out


def _export_fields(c: LMConfig, family: str, base: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "rms_norm_eps": c.rms_norm_eps,
        "max_position_embeddings": c.max_position_embeddings,
        "tie_word_embeddings": c.tie_word_embeddings,
        "hidden_act": "silu",
        "initializer_range": c.initializer_range,
    }
    # transformers 5 reads rope_parameters, 4.x rope_theta: keep the imported spelling, write both otherwise.
    if "rope_parameters" in base or "rope_theta" not in base:
        out["rope_parameters"] = {"rope_type": "default", "rope_theta": c.rope_theta}
        if family == "glm4_moe":  # its default rotates half of each head
            out["rope_parameters"]["partial_rotary_factor"] = 1.0
    if "rope_theta" in base or "rope_parameters" not in base:
        out["rope_theta"] = c.rope_theta
    if "layer_types" in base:  # sliding layers are refused on import, so every layer is full attention
        out["layer_types"] = ["full_attention"] * c.num_hidden_layers
    out.update(_attention_fields(c, family, base))
    if family in DENSE_FAMILIES:
        out["intermediate_size"] = c.intermediate_size
        return out
    out.update(_moe_fields(c, family, base))
    return out


def _attention_fields(c: LMConfig, family: str, base: dict[str, Any]) -> dict[str, Any]:
    """The attention fields of ``family``'s config.json (MLA's, or GQA's with each family's bias and window)."""
    out: dict[str, Any] = {}
    if c.attention_type == AttentionType.MLA:
        out.update(
            q_lora_rank=c.q_lora_rank,
            kv_lora_rank=c.kv_lora_rank,
            qk_rope_head_dim=c.qk_rope_head_dim,
            qk_nope_head_dim=c.qk_nope_head_dim,
            qk_head_dim=c.qk_nope_head_dim + c.qk_rope_head_dim,
            v_head_dim=c.v_head_dim,
            head_dim=c.qk_rope_head_dim,
            rope_interleave=c.rope_interleave,
            attention_bias=c.attention_bias,
        )
        out["num_key_value_heads"] = base.get("num_key_value_heads", c.num_attention_heads)  # unused by MLA
    else:
        out["num_key_value_heads"] = c.kv_heads
        if family != "olmoe" and (c.head_dim is not None or family in ("qwen3", "glm4_moe")):
            out["head_dim"] = c.head_size
        elif "head_dim" in base and family != "olmoe":
            out["head_dim"] = None  # the default (hidden_size // heads), as the imported config said
        if family in ("llama", "qwen3", "qwen3_moe", "olmoe", "deepseek_v3", "glm4_moe"):
            out["attention_bias"] = c.attention_bias
        if family == "glm4_moe":
            out["use_qk_norm"] = c.qk_norm == QKNorm.HEAD
        if family == "qwen2_moe":
            out["qkv_bias"] = c.attention_bias
        if family in ("mistral", "mixtral"):
            out["sliding_window"] = c.sliding_window
        elif family == "qwen3_moe":
            out["use_sliding_window"] = c.sliding_window is not None
            if c.sliding_window is not None:
                out["sliding_window"] = c.sliding_window
        elif family in ("qwen2", "qwen3", "qwen2_moe"):
            out["use_sliding_window"] = False
    return out


def _moe_fields(c: LMConfig, family: str, base: dict[str, Any]) -> dict[str, Any]:
    """The MoE fields of ``family``'s config.json: experts, routing and which layers are sparse."""
    out: dict[str, Any] = {}
    sparse = list(c.sparse_layers)
    moe = c.moe or MoEConfig(num_experts=1, top_k=1, expert_hidden_size=1)
    n_sparse = max(1, len(sparse))
    dense = [i for i in range(c.num_hidden_layers) if i not in sparse]
    out["num_experts_per_tok"] = moe.top_k
    if family in ("mixtral", "olmoe"):
        out["intermediate_size"] = moe.expert_hidden_size
    else:
        out["moe_intermediate_size"] = moe.expert_hidden_size
        out["intermediate_size"] = c.intermediate_size
    if family not in SIGMOID_FAMILIES:
        out["router_aux_loss_coef"] = _aux_coef(base.get("router_aux_loss_coef"), moe.aux_loss_coef, n_sparse)
    out[_expert_count_key(family, base)] = moe.num_experts
    if family == "mixtral":
        out["router_jitter_noise"] = moe.router_jitter
    elif family in ("qwen2_moe", "qwen3_moe", "olmoe"):
        out["norm_topk_prob"] = moe.norm_topk_prob
    if family in ("qwen2_moe", "qwen3_moe"):
        out.update(_qwen_sparse_fields(base, dense, c.num_hidden_layers))
    if family == "qwen2_moe":
        out["shared_expert_intermediate_size"] = moe.shared_hidden_size
    if family in SIGMOID_FAMILIES:
        leading = 0
        while leading < c.num_hidden_layers and leading not in sparse:
            leading += 1
        out.update(
            n_group=moe.n_group,
            topk_group=moe.topk_group,
            routed_scaling_factor=moe.routed_scaling_factor,
            norm_topk_prob=moe.norm_topk_prob,
            n_shared_experts=moe.num_shared_experts,
            first_k_dense_replace=leading,
        )
    if family == "glm4_moe":  # moekit has no multi-token-prediction module
        out["num_nextn_predict_layers"] = base.get("num_nextn_predict_layers", 0)
    return out


_EXPERT_COUNT = {"mixtral": "num_local_experts", "deepseek_v3": "n_routed_experts", "glm4_moe": "n_routed_experts"}


def _expert_count_key(family: str, base: dict[str, Any]) -> str:
    """The key that holds the number of experts: the one the imported config used (dropping the other spelling)."""
    canonical = _EXPERT_COUNT.get(family, "num_experts")
    spellings = [canonical, *ALIASES.get(family, {}).get(canonical, ())]
    used = next((key for key in spellings if key in base), canonical)
    for key in spellings:
        if key != used:
            base.pop(key, None)
    return used


def _aux_coef(stored: Any, per_layer: float, n_sparse: int) -> float:
    """HF's layer-averaged coefficient; the imported value when it still maps to ``per_layer`` exactly."""
    if isinstance(stored, (int, float)) and not isinstance(stored, bool) and stored / n_sparse == per_layer:
        return stored
    return per_layer * n_sparse


def _qwen_sparse_fields(base: dict[str, Any], dense: list[int], num_layers: int) -> dict[str, Any]:
    """decoder_sparse_step and mlp_only_layers that make exactly ``dense`` dense: the imported ones if they
    still do, else step 1 with the dense layers listed."""
    step, only = base.get("decoder_sparse_step", 1), base.get("mlp_only_layers", [])
    if isinstance(step, int) and step >= 1 and isinstance(only, list):
        theirs = [i for i in range(num_layers) if i in only or (i + 1) % step != 0]
        if theirs == dense:
            return {"decoder_sparse_step": step, "mlp_only_layers": only}
    return {"decoder_sparse_step": 1, "mlp_only_layers": dense}


def math_signature(config: LMConfig) -> dict[str, Any]:
    """Every LMConfig value that changes a forward pass at inference, flattened (per-layer for MoE)."""
    c = config
    sig: dict[str, Any] = {
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "rope_theta": c.rope_theta,
        "rms_norm_eps": c.rms_norm_eps,
        "tie_word_embeddings": c.tie_word_embeddings,
        "max_position_embeddings": c.max_position_embeddings,
        "attention_type": c.attention_type.value,
        "attention_bias": c.attention_bias,
    }
    if c.attention_type == AttentionType.MLA:
        for name in ("q_lora_rank", "kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim"):
            sig[name] = getattr(c, name)
        sig["rope_interleave"] = c.rope_interleave
    else:
        sig.update(
            num_key_value_heads=c.kv_heads,
            head_dim=c.head_size,
            qk_norm=c.qk_norm.value,
            attention_out_bias=c.attention_out_bias,
            sliding_window=_effective_window(c),
        )
    sparse = c.sparse_layers
    sig["sparse_layers"] = list(sparse)
    if len(sparse) < c.num_hidden_layers:
        sig["intermediate_size"] = c.intermediate_size
        sig["activation"] = c.activation.value
    for i in sparse:
        m = c.moe_config(i)
        layer = {
            "router": m.router.value,
            "num_experts": m.num_experts,
            "top_k": m.top_k,
            "expert_hidden_size": m.expert_hidden_size,
            "activation": m.activation.value,
            "shared_hidden_size": m.shared_hidden_size,
            "shared_expert_gate": bool(m.num_shared_experts and m.shared_expert_gate),
            "capacity_factor": m.capacity_factor,
            "router_bias": m.router_bias,
        }
        if m.num_zero_computation:  # MoE++: no Hugging Face family has these
            kinds = {"zero": m.zero_experts, "copy": m.copy_experts, "constant": m.constant_experts}
            layer["zero_computation_experts"] = kinds
        if m.gating_residual:
            layer["gating_residual"] = True
        if m.router in (RouterType.SOFTMAX_TOPK, RouterType.SIGMOID_TOPK):
            layer["norm_topk_prob"] = m.norm_topk_prob
            layer["routed_scaling_factor"] = m.routed_scaling_factor
        if m.router == RouterType.SIGMOID_TOPK:
            groups = m.n_group > 1 and m.topk_group < m.n_group
            layer.update(
                n_group=m.n_group if groups else 1,
                topk_group=m.topk_group if groups else 1,
                routed_scaling_factor=m.routed_scaling_factor,
            )
        for key, value in layer.items():
            sig[f"layers.{i}.mlp.{key}"] = value
    return sig


def _effective_window(c: LMConfig) -> int | None:
    """The sliding window when it can bite (a window as long as the context never does)."""
    return c.sliding_window if c.sliding_window and c.sliding_window < c.max_position_embeddings else None


def _check_expressible(config: LMConfig, exported: dict[str, Any], family: str, family_flag: str) -> None:
    try:
        back = lm_config_from_hf(exported, where=f"exported {family} config", quiet=True)
    except ConfigError as e:
        raise ConfigError(f"cannot export this model as {family}: {e}") from None
    mine, theirs = math_signature(config), math_signature(back)
    for key in list(mine) + [k for k in theirs if k not in mine]:
        if mine.get(key) != theirs.get(key):
            raise ConfigError(
                f"cannot export this model as {family}: {key}={mine.get(key)!r} in the model, but a {family} "
                f"config can only express {theirs.get(key)!r}"
                + ("" if config.hf_config else f" (pass {family_flag} one of {', '.join(FAMILIES)})")
            )
