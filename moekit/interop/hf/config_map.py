"""Hugging Face ``config.json`` -> :class:`LMConfig`, one family (``model_type``) at a time.

Import reads the fields each family's transformers 5 modeling code uses, with that family's class
defaults for absent ones (checked against transformers in tests/interop/test_hf_config.py). A field
that would change the math and that moekit cannot represent raises :class:`ConfigError` naming the
field and its value; nothing is silently ignored. Fields that do not change a forward pass at
inference (token ids, ``use_cache``, ``attention_dropout``...) are read or skipped; unknown fields are
logged.

Export (LMConfig -> config.json) is :mod:`moekit.interop.hf.config_export`; the family tables and
defaults are :mod:`moekit.interop.hf.families`.

Notes on numerics, checked against transformers 5.23's modeling files:
* Mixtral renormalises its top-k softmax weights (== a softmax over the top-k logits); Qwen2/3-MoE and
  OLMoE follow ``norm_topk_prob`` (OLMoE's default False); all are ``softmax_topk`` here.
* DeepSeek-V3 (``sigmoid_topk``): group score = sum of the top-2 biased scores per group, the
  ``topk_group`` best groups kept, the others masked with -inf before the top-k (transformers 5.23
  masks with -inf, as moekit does; older remote code masked with 0.0, which only differs when fewer
  than ``top_k`` experts of the kept groups have a positive biased score); weights are the unbiased
  sigmoid scores, divided by (their sum + 1e-20) when ``norm_topk_prob``, then times
  ``routed_scaling_factor``. Same order in :class:`moekit.nn.router.SigmoidTopKRouter`.
* Qwen2-MoE always builds a gated shared expert; ``shared_expert_intermediate_size=0`` makes it zero-width,
  so it adds exactly 0 and the model has no shared expert (its ``shared_expert_gate`` weight is read and
  dropped). Export writes MoEs with dense layers and no QK-norm this way (see :mod:`.config_export`).
* Balancing-loss coefficients only matter in training. Transformers averages the balance loss over
  layers, moekit sums per-layer losses, so ``aux_loss_coef = router_aux_loss_coef / MoE layers``.
  Mixtral's ``router_jitter_noise`` maps to ``router_jitter``; transformers also jitters the experts'
  input, moekit only the router's (training only).
"""

from __future__ import annotations

import logging
import math
from typing import Any

from moekit.config import closest
from moekit.errors import ConfigError
from moekit.interop.hf.families import (
    ALIASES,
    COMMON_DEFAULTS,
    DENSE_FAMILIES,
    FAMILIES,
    FAMILY_DEFAULTS,
    HARMLESS,
    SIGMOID_FAMILIES,
)
from moekit.models.config import AttentionType, LMConfig
from moekit.nn.attention import QKNorm
from moekit.nn.config import MoEConfig, RouterType

logger = logging.getLogger(__name__)


class _Fields:
    """Reads one config.json, remembering which keys were used and naming the file in errors."""

    def __init__(self, raw: dict[str, Any], family: str, where: str):
        self.raw, self.family, self.where = raw, family, where
        self.defaults = {**COMMON_DEFAULTS, **FAMILY_DEFAULTS[family]}
        self.used: set[str] = set()
        self.quiet = False

    def has(self, name: str) -> bool:
        return self._key(name) is not None

    def _key(self, name: str) -> str | None:
        for key in (name, *ALIASES.get(self.family, {}).get(name, ())):
            if key in self.raw:
                return key
        return None

    def get(self, name: str, default: Any = ...) -> Any:
        key = self._key(name)
        if key is not None:
            self.used.add(key)
            return self.raw[key]
        if default is not ...:
            return default
        if name in self.defaults:
            return self.defaults[name]
        raise ConfigError(f"{self.where}: {self.family} config lacks {name!r}")

    def int(self, name: str, minimum: int = 1, default: Any = ...) -> int:
        value = self.get(name, default)
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= minimum):
            raise ConfigError(f"{self.where}: {name}={value!r} must be an integer >= {minimum}")
        return value

    def num(self, name: str, default: Any = ...) -> float:
        value = self.get(name, default)
        if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)):
            raise ConfigError(f"{self.where}: {name}={value!r} must be a finite number")
        return float(value)

    def flag(self, name: str, default: Any = ...) -> bool:
        value = self.get(name, default)
        if not isinstance(value, bool):
            raise ConfigError(f"{self.where}: {name}={value!r} must be true or false")
        return value

    def unsupported(self, name: str, value: Any, why: str) -> ConfigError:
        return ConfigError(
            f"{self.where}: {self.family} option {name}={value!r} is not supported by moekit ({why}); "
            f"it would change the model's outputs, so the import stops here"
        )

    def require_value(self, name: str, allowed: tuple, why: str) -> None:
        """Refuse ``name`` unless it holds one of ``allowed`` (or is absent and its default is allowed)."""
        value = self.get(name, allowed[0])
        if value not in allowed:
            raise self.unsupported(name, value, why)


# ----------------------------------------------------------------------------------------------------- import


def check_family(raw: dict[str, Any], where: str = "config.json") -> str:
    """The ``model_type`` of an HF config, or ConfigError (suggesting the closest supported one)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must hold a JSON object, got {type(raw).__name__}")
    model_type = raw.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise ConfigError(f"{where} has no 'model_type'; is this a Hugging Face model folder?")
    if model_type not in FAMILIES:
        hint = closest(model_type, FAMILIES)
        extra = f"; did you mean {hint!r}?" if hint else ""
        raise ConfigError(
            f"{where}: model_type={model_type!r} is not supported; moekit imports {', '.join(FAMILIES)}{extra}"
        )
    return model_type


def lm_config_from_hf(raw: dict[str, Any], where: str = "config.json", quiet: bool = False) -> LMConfig:
    """The :class:`LMConfig` of a Hugging Face ``config.json`` (its dict), keeping ``raw`` as ``hf_config``.

    Raises:
        ConfigError: unknown ``model_type`` (with the closest supported one), a malformed field, or a field
            that changes the math and that moekit cannot represent (naming it and its value).
    """
    family = check_family(raw, where)
    f = _Fields(raw, family, where)
    f.quiet = quiet
    _refuse_common(f)
    fields = _common(f)
    if family == "deepseek_v3":
        fields.update(_mla(f))
    else:
        fields.update(_mha(f))
    fields.update(_ffn(f, fields["num_hidden_layers"]))
    unknown = sorted(set(raw) - f.used - HARMLESS - _checked_keys(family))
    if unknown and not quiet:
        logger.warning("%s: ignoring %s fields moekit does not know: %s", where, family, ", ".join(unknown))
    try:
        return LMConfig(**fields, hf_config=dict(raw))
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def _checked_keys(family: str) -> set[str]:
    """Keys _refuse_common / the family readers look at without necessarily marking them used."""
    return {"rope_scaling", "rope_parameters", "rope_theta", "partial_rotary_factor", "quantization_config"}


def _refuse_common(f: _Fields) -> None:
    raw = f.raw
    if raw.get("quantization_config") is not None:
        method = raw["quantization_config"]
        method = method.get("quant_method", method) if isinstance(method, dict) else method
        raise f.unsupported(
            "quantization_config", method, "quantized weights; dequantize to bf16/fp32 safetensors first"
        )
    act = f.get("hidden_act")
    if act not in ("silu", "swish"):
        raise f.unsupported("hidden_act", act, "moekit's gated MLPs use SiLU (SwiGLU) only")
    dropout = f.num("attention_dropout")
    if dropout > 0 and not f.quiet:
        logger.warning(
            "%s: attention_dropout=%s is not applied by moekit (no effect at inference; fine-tuning runs without it)",
            f.where,
            dropout,
        )
    factor = raw.get("partial_rotary_factor")
    params = raw.get("rope_parameters")
    if isinstance(params, dict) and "partial_rotary_factor" in params:  # where transformers 5 keeps it
        factor = params["partial_rotary_factor"]
    if factor is None and f.family == "glm4_moe":
        factor = 0.5  # Glm4MoeConfig's default
    if factor is not None and factor != 1.0:
        raise f.unsupported("partial_rotary_factor", factor, "moekit rotates the whole head dim")


def _rope_theta(f: _Fields) -> float:
    """rope_theta from v5's ``rope_parameters`` or the legacy ``rope_theta`` / ``rope_scaling``; scaled rope refused."""
    raw = f.raw
    theta = raw.get("rope_theta")
    params = raw.get("rope_parameters")
    if params is not None:
        if not isinstance(params, dict):
            raise ConfigError(f"{f.where}: rope_parameters must be an object, got {params!r}")
        kind = params.get("rope_type", params.get("type", "default"))
        if kind != "default":
            raise f.unsupported("rope_parameters", params, f"rope_type={kind!r}; only unscaled RoPE is implemented")
        extra = sorted(set(params) - {"rope_type", "type", "rope_theta", "partial_rotary_factor"})  # factor: above
        if extra:
            raise f.unsupported("rope_parameters", params, f"fields {extra} of scaled RoPE")
        theta = params.get("rope_theta", theta)
    scaling = raw.get("rope_scaling")
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type")) if isinstance(scaling, dict) else scaling
        if kind not in (None, "default"):
            raise f.unsupported(
                "rope_scaling", scaling, "scaled RoPE (linear, dynamic, yarn, llama3...) is not implemented"
            )
    if theta is None:
        theta = f.defaults["rope_theta"]
    if not (isinstance(theta, (int, float)) and not isinstance(theta, bool) and theta > 0):
        raise ConfigError(f"{f.where}: rope_theta={theta!r} must be a positive number")
    return float(theta)


def _common(f: _Fields) -> dict[str, Any]:
    heads = f.int("num_attention_heads")
    return {
        "vocab_size": f.int("vocab_size"),
        "hidden_size": f.int("hidden_size"),
        "num_hidden_layers": f.int("num_hidden_layers"),
        "num_attention_heads": heads,
        "rms_norm_eps": f.num("rms_norm_eps"),
        "max_position_embeddings": f.int("max_position_embeddings"),
        "tie_word_embeddings": f.flag("tie_word_embeddings"),
        "rope_theta": _rope_theta(f),
        "initializer_range": f.num("initializer_range"),
    }


def _sliding_window(f: _Fields, num_layers: int) -> int | None:
    """The global sliding window, or None; per-layer patterns are refused."""
    family = f.family
    if family in ("mistral", "mixtral"):
        window = f.get("sliding_window")
    elif family == "qwen3_moe":  # one window for every layer when enabled (Qwen3MoeConfig)
        window = f.get("sliding_window") if f.flag("use_sliding_window") else None
        f.used.add("sliding_window")
    elif family in ("qwen2", "qwen3", "qwen2_moe"):
        f.used.update({"sliding_window", "max_window_layers", "layer_types"})
        layer_types = f.raw.get("layer_types")
        if layer_types is None and f.flag("use_sliding_window"):
            limit = f.int("max_window_layers", minimum=0)
            if family == "qwen2_moe":  # Qwen2MoeConfig: odd-numbered layers below max_window_layers
                layer_types = ["sliding_attention" if (i + 1) % 2 and i < limit else "full" for i in range(num_layers)]
            else:
                layer_types = ["sliding_attention" if i >= limit else "full" for i in range(num_layers)]
        else:
            f.get("use_sliding_window")
        sliding = [i for i, t in enumerate(layer_types or []) if t == "sliding_attention"]
        if sliding:
            raise f.unsupported(
                "use_sliding_window", f.raw.get("use_sliding_window"), f"sliding-window attention in layers {sliding}"
            )
        other = sorted({t for t in layer_types or [] if t not in ("full_attention", "full", "sliding_attention")})
        if other:
            raise f.unsupported("layer_types", other, "only full attention is implemented")
        return None
    else:  # llama, olmoe, deepseek_v3, glm4_moe: no sliding window in their modeling code
        return None
    if window is None or window == 0:
        return None
    if not (isinstance(window, int) and not isinstance(window, bool) and window >= 1):
        raise ConfigError(f"{f.where}: sliding_window={window!r} must be a positive integer or null")
    return window


def _mha(f: _Fields) -> dict[str, Any]:
    family = f.family
    heads = f.int("num_attention_heads")
    kv = f.get("num_key_value_heads")
    kv = heads if kv is None else f.int("num_key_value_heads")
    head_dim = f.get("head_dim")
    if head_dim is not None:
        head_dim = f.int("head_dim")
    if family == "olmoe":  # OLMoE's q/k norms span hidden_size: head_dim must be the default
        if head_dim is not None and head_dim * heads != f.raw["hidden_size"]:
            raise f.unsupported("head_dim", head_dim, "OLMoE's q_norm spans hidden_size = heads x head_dim")
        clip = f.get("clip_qkv")
        if clip is not None:
            raise f.unsupported("clip_qkv", clip, "moekit does not clamp q/k/v")
    out: dict[str, Any] = {"num_key_value_heads": kv, "head_dim": head_dim}
    if family in ("llama", "qwen3", "qwen3_moe", "olmoe"):
        bias = f.flag("attention_bias")
        out.update(attention_bias=bias, attention_out_bias=bias)
    elif family == "qwen2":
        out.update(attention_bias=True)
    elif family == "qwen2_moe":
        out.update(attention_bias=f.flag("qkv_bias"))
    elif family == "glm4_moe":  # q/k/v biases, none on o_proj
        out.update(attention_bias=f.flag("attention_bias"))
    if family in ("qwen3", "qwen3_moe") or (family == "glm4_moe" and f.flag("use_qk_norm")):
        out["qk_norm"] = QKNorm.HEAD
    elif family == "olmoe":
        out["qk_norm"] = QKNorm.FULL
    if family == "llama" and f.flag("mlp_bias"):
        raise f.unsupported("mlp_bias", True, "moekit's MLPs have no biases")
    out["sliding_window"] = _sliding_window(f, f.int("num_hidden_layers"))
    return out


def _mla(f: _Fields) -> dict[str, Any]:
    q_lora = f.get("q_lora_rank")
    nope, rope = f.int("qk_nope_head_dim"), f.int("qk_rope_head_dim")
    qk_head_dim = f.raw.get("qk_head_dim")
    if qk_head_dim is not None and qk_head_dim != nope + rope:
        raise ConfigError(f"{f.where}: qk_head_dim={qk_head_dim} is not qk_nope_head_dim + qk_rope_head_dim")
    f.used.update({"num_key_value_heads", "head_dim"})  # unused by MLA (every head gets its own k/v)
    return {
        "attention_type": AttentionType.MLA,
        "q_lora_rank": None if q_lora is None else f.int("q_lora_rank"),
        "kv_lora_rank": f.int("kv_lora_rank"),
        "qk_rope_head_dim": rope,
        "qk_nope_head_dim": nope,
        "v_head_dim": f.int("v_head_dim"),
        "rope_interleave": f.flag("rope_interleave"),
        "attention_bias": f.flag("attention_bias"),
    }


def _sparse_layers(f: _Fields, num_layers: int) -> list[int]:
    family = f.family
    if family in ("mixtral", "olmoe"):
        return list(range(num_layers))
    if family in ("qwen2_moe", "qwen3_moe"):
        step = f.int("decoder_sparse_step")
        only = f.get("mlp_only_layers")
        if not isinstance(only, list) or not all(isinstance(i, int) for i in only):
            raise ConfigError(f"{f.where}: mlp_only_layers={only!r} must be a list of layer indices")
        num_experts = f.int("num_experts", minimum=0)
        return [i for i in range(num_layers) if i not in only and num_experts > 0 and (i + 1) % step == 0]
    # deepseek_v3, glm4_moe
    freq = f.int("moe_layer_freq") if family == "deepseek_v3" else 1
    if freq != 1:
        raise f.unsupported(
            "moe_layer_freq", freq, "transformers' DeepSeek-V3 makes every layer past first_k_dense_replace sparse"
        )
    first = f.int("first_k_dense_replace", minimum=0)
    return list(range(first, num_layers))


def _ffn(f: _Fields, num_layers: int) -> dict[str, Any]:
    family = f.family
    if family in DENSE_FAMILIES:
        return {"intermediate_size": f.int("intermediate_size")}
    sparse = _sparse_layers(f, num_layers)
    if family in ("mixtral", "olmoe"):
        expert_size = f.int("intermediate_size")
        dense_size = expert_size  # no dense layer; LMConfig still needs a value
    else:
        expert_size = f.int("moe_intermediate_size")
        dense_size = f.int("intermediate_size")
    out: dict[str, Any] = {"intermediate_size": dense_size}
    if not sparse:
        return out
    coef = f.num("router_aux_loss_coef", 0.0) / len(sparse) if family not in SIGMOID_FAMILIES else 0.0
    moe: dict[str, Any] = {
        "top_k": f.int("num_experts_per_tok"),
        "expert_hidden_size": expert_size,
        "capacity_factor": None,
        "aux_loss_coef": coef,
    }
    if family == "mixtral":
        moe.update(
            num_experts=f.int("num_local_experts"), norm_topk_prob=True, router_jitter=f.num("router_jitter_noise")
        )
    elif family in ("qwen2_moe", "qwen3_moe", "olmoe"):
        moe.update(num_experts=f.int("num_experts"), norm_topk_prob=f.flag("norm_topk_prob"))
    shared_size = f.int("shared_expert_intermediate_size", minimum=0) if family == "qwen2_moe" else 0
    if shared_size:  # 0: a zero-width shared expert adds exactly nothing (how moekit exports MoEs without one)
        moe.update(num_shared_experts=1, shared_expert_hidden_size=shared_size, shared_expert_gate=True)
    if family in SIGMOID_FAMILIES:
        f.require_value("scoring_func", ("sigmoid",), f"transformers' {family} routes with sigmoid scores")
        f.require_value("topk_method", ("noaux_tc",), f"transformers' {family} routes with group-limited noaux_tc")
        shared = f.int("n_shared_experts", minimum=0)
        moe.update(
            num_experts=f.int("n_routed_experts"),
            router=RouterType.SIGMOID_TOPK,
            n_group=f.int("n_group"),
            topk_group=f.int("topk_group"),
            routed_scaling_factor=f.num("routed_scaling_factor"),
            norm_topk_prob=f.flag("norm_topk_prob"),
            num_shared_experts=shared,
            shared_expert_hidden_size=expert_size,
        )
        per_group = moe["num_experts"] // moe["n_group"]
        if moe["n_group"] > 1 and per_group < 2:
            raise f.unsupported("n_group", moe["n_group"], "transformers scores a group by its top-2 experts")
    out["moe"] = MoEConfig(**moe)
    if family in SIGMOID_FAMILIES:
        out["first_k_dense"] = sparse[0]
    elif len(sparse) < num_layers:
        out["moe_layers"] = tuple(sparse)
    return out
