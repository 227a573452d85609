"""LMConfig: the causal language model's shape, with Hugging Face's field names where they exist."""

from __future__ import annotations

import dataclasses
import enum
import typing
from typing import Any

from moekit.config import Config, check_choice, require, unknown_key_error
from moekit.errors import ConfigError
from moekit.models.placement import is_moe_layer
from moekit.models.resolve import upgrade_saved
from moekit.nn.attention import QKNorm
from moekit.nn.config import Activation, MoEConfig, RouterType


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


class AttentionType(str, enum.Enum):
    MHA = "mha"  # grouped-query attention (Llama, Mistral, Qwen, Mixtral, OLMoE)
    MLA = "mla"  # DeepSeek-V2/V3 multi-head latent attention (moekit.nn.mla)


# The fields multi-head latent attention needs (DeepSeek-V3's names); all None for "mha".
MLA_FIELDS = ("kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim")
# Fields LMConfig.to_dict leaves out when they hold these defaults.
_OPTIONAL_DEFAULTS = {
    "attention_out_bias": False,
    "sliding_window": None,
    "attention_type": "mha",
    "q_lora_rank": None,
    **dict.fromkeys(MLA_FIELDS),
    "rope_interleave": False,
    "hf_config": None,
    "dropout": 0.0,
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class LMConfig(Config):
    """Configuration of :class:`moekit.models.MoELM`.

    ``moe=None`` is the dense baseline. With an MoE, layer i is sparse when it is listed in
    ``moe_layers``, or (when ``moe_layers`` is None) when ``i >= first_k_dense`` and
    ``i % moe_layer_freq == 0`` (DeepSeek's ``first_k_dense_replace`` / ``moe_layer_freq`` rule).
    Dense layers use an MLP of ``intermediate_size``.

    ``moe_layer_overrides`` maps a sparse layer's index to MoEConfig fields that differ in that layer
    (e.g. ``{3: {"num_experts": 6, "top_k": 2}}`` after pruning or merging experts); read a layer's
    resolved config with :meth:`moe_config`. JSON's string keys ("3") are accepted.

    ``num_key_value_heads`` and ``head_dim`` may be None (= ``num_attention_heads`` and
    ``hidden_size // num_attention_heads``); read the resolved values from :attr:`kv_heads` and
    :attr:`head_size`. They stay None in the config so that ``replace(hidden_size=...)`` re-derives them.

    ``attention_type="mla"`` is DeepSeek-V3's multi-head latent attention (:mod:`moekit.nn.mla`), shaped by
    ``q_lora_rank`` (None = a plain query projection), ``kv_lora_rank``, ``qk_rope_head_dim``,
    ``qk_nope_head_dim``, ``v_head_dim`` and ``rope_interleave``; ``num_key_value_heads``/``head_dim`` are
    then unused. ``sliding_window`` (Mistral) lets a query see only the last that many positions, itself
    included. ``hf_config`` is the Hugging Face ``config.json`` a model was imported from (token ids,
    architecture name...): :func:`moekit.to_hf` writes it back; the model never reads it.
    """

    # Each sparse layer's MoEConfig, set once per instance in __post_init__ (derived, so not a dataclass field).
    _layer_moe: typing.ClassVar[dict[int, MoEConfig]]
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    activation: Activation = Activation.SWIGLU  # of the dense MLPs (HF hidden_act "silu" = SwiGLU)
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    qk_norm: QKNorm | bool = QKNorm.NONE  # True = "head" (Qwen3), "full" = OLMoE's
    attention_bias: bool = False  # q/k/v biases (Qwen2)
    initializer_range: float = 0.02
    scaled_residual_init: bool = True  # std / sqrt(2 * layers) on o_proj and down projections (GPT-2)
    # In training, zero this share of the embeddings and of each attention and FFN output before it joins
    # the residual stream (nanoGPT's ``dropout``; GPT-2's residual dropout). 0 = none, as in pretraining.
    dropout: float = 0.0
    moe: MoEConfig | None = None
    first_k_dense: int = 0
    moe_layer_freq: int = 1
    moe_layers: tuple[int, ...] | None = None
    moe_layer_overrides: dict[int, dict[str, Any]] | None = None
    attention_out_bias: bool = False  # a bias on o_proj too (Llama/Qwen3/OLMoE attention_bias=True)
    sliding_window: int | None = None
    attention_type: AttentionType = AttentionType.MHA
    q_lora_rank: int | None = None
    kv_lora_rank: int | None = None
    qk_rope_head_dim: int | None = None
    qk_nope_head_dim: int | None = None
    v_head_dim: int | None = None
    rope_interleave: bool = False  # MLA: rotary pairs are (x0, x1), (x2, x3)... (DeepSeek's layout)
    hf_config: dict[str, Any] | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LMConfig:
        """As :meth:`Config.from_dict`, reading configs older moekit saved (:func:`upgrade_saved`)."""
        return super().from_dict(upgrade_saved(data) if isinstance(data, dict) else data)

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "max_position_embeddings",
            "moe_layer_freq",
        ):
            value = getattr(self, name)
            require(_positive_int(value), f"{name} must be a positive integer, got {value!r}")
        for name in ("num_key_value_heads", "head_dim", "sliding_window", "q_lora_rank", *MLA_FIELDS):
            value = getattr(self, name)
            require(value is None or _positive_int(value), f"{name} must be a positive integer or None, got {value!r}")
        require(
            self.hf_config is None or isinstance(self.hf_config, dict),
            f"hf_config must be a dict (a Hugging Face config.json) or None, got {type(self.hf_config).__name__}",
        )
        require(
            isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1,
            f"dropout must be in [0, 1), got {self.dropout!r}",
        )
        set_(self, "attention_type", check_choice("attention_type", self.attention_type, AttentionType))
        set_(self, "activation", check_choice("activation", self.activation, Activation))
        qk = self.qk_norm
        if isinstance(qk, bool):
            qk = QKNorm.HEAD if qk else QKNorm.NONE
        set_(self, "qk_norm", check_choice("qk_norm", qk, QKNorm))
        self._check_attention()
        for name in ("rope_theta", "rms_norm_eps", "initializer_range"):
            value = getattr(self, name)
            require(
                isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0,
                f"{name} must be > 0, got {value!r}",
            )
        require(
            isinstance(self.first_k_dense, int) and 0 <= self.first_k_dense <= self.num_hidden_layers,
            f"first_k_dense must be in [0, num_hidden_layers={self.num_hidden_layers}], got {self.first_k_dense!r}",
        )
        self._check_moe_placement()
        self._check_layer_overrides()

    def _check_attention(self) -> None:
        """Multi-head (GQA) or latent (MLA) attention: the fields each needs, and none of the other's."""
        heads, kv = self.num_attention_heads, self.kv_heads
        if self.attention_type == AttentionType.MLA:
            missing = [name for name in MLA_FIELDS if getattr(self, name) is None]
            require(not missing, f"attention_type='mla' needs {', '.join(missing)}")
            require(
                (self.qk_rope_head_dim or 0) % 2 == 0,
                f"qk_rope_head_dim={self.qk_rope_head_dim} must be even for rotary embeddings",
            )
            require(not self.qk_norm_enabled, "qk_norm applies to attention_type='mha' only")
        else:
            set_mla = [name for name in ("q_lora_rank", *MLA_FIELDS) if getattr(self, name) is not None]
            require(not set_mla, f"{', '.join(set_mla)} need attention_type='mla' (got 'mha')")
            require(
                heads % kv == 0,
                f"num_attention_heads={heads} must be a multiple of num_key_value_heads={kv}",
            )
            if self.head_dim is None:
                require(
                    self.hidden_size % heads == 0,
                    f"hidden_size={self.hidden_size} is not divisible by num_attention_heads={heads}; set head_dim",
                )
            require(self.head_size % 2 == 0, f"head_dim={self.head_size} must be even for rotary embeddings")

    def _check_moe_placement(self) -> None:
        """The MoE config and which layers are sparse (``moe_layers``, or ``first_k_dense`` + frequency)."""
        set_ = object.__setattr__
        if isinstance(self.moe, dict):
            set_(self, "moe", MoEConfig.from_dict(self.moe))
        require(
            self.moe is None or isinstance(self.moe, MoEConfig),
            f"moe must be an MoEConfig, a dict or None, got {type(self.moe).__name__}",
        )
        if self.moe_layers is not None:
            layers = self.moe_layers
            require(
                isinstance(layers, (list, tuple))
                and all(isinstance(i, int) and not isinstance(i, bool) for i in layers),
                f"moe_layers must be a tuple of layer indices or None, got {layers!r}",
            )
            bad = [i for i in layers if not 0 <= i < self.num_hidden_layers]
            require(not bad, f"moe_layers={tuple(layers)} has {bad} outside [0, {self.num_hidden_layers})")
            dup = sorted({i for i in layers if list(layers).count(i) > 1})
            require(not dup, f"moe_layers={tuple(layers)} lists layers {dup} more than once")
            set_(self, "moe_layers", tuple(sorted(layers)))
        if self.moe is None:
            require(
                not self.moe_layers,
                f"moe_layers={self.moe_layers} needs an moe config (moe is None: the dense baseline)",
            )
        else:
            require(
                bool(self.sparse_layers),
                f"moe is set but no layer is sparse (num_hidden_layers={self.num_hidden_layers}, "
                f"first_k_dense={self.first_k_dense}, moe_layer_freq={self.moe_layer_freq}, "
                f"moe_layers={self.moe_layers})",
            )

    def _check_layer_overrides(self) -> None:
        """Normalise ``moe_layer_overrides`` (int keys, sorted, plain values; {} -> None) and resolve each
        sparse layer's MoEConfig once, naming the layer in any error."""
        set_ = object.__setattr__
        overrides = self.moe_layer_overrides
        if overrides is not None:
            require(isinstance(overrides, dict), f"moe_layer_overrides must be a dict or None, got {overrides!r}")
            require(self.moe is not None, "moe_layer_overrides needs an moe config (moe is None: the dense baseline)")
        moe = self.moe
        if moe is None:  # the dense baseline: no sparse layer
            set_(self, "_layer_moe", {})
            return
        normalised: dict[int, dict[str, Any]] = {}
        for key, fields in (overrides or {}).items():
            try:
                layer = int(key)
            except (TypeError, ValueError):
                raise ConfigError(f"moe_layer_overrides key {key!r} is not a layer index") from None
            require(
                layer in self.sparse_layers,
                f"moe_layer_overrides names layer {layer}, which is not an MoE layer {list(self.sparse_layers)}",
            )
            require(layer not in normalised, f"moe_layer_overrides lists layer {layer} more than once")
            require(isinstance(fields, dict), f"moe_layer_overrides[{layer}] must be a dict of MoEConfig fields")
            require("hidden_size" not in fields, f"moe_layer_overrides[{layer}] may not change hidden_size")
            for name in fields:
                if name not in MoEConfig.field_names():
                    raise unknown_key_error(name, MoEConfig.field_names(), f"moe_layer_overrides[{layer}] MoEConfig")
            try:
                resolved = MoEConfig.from_dict({**moe.to_dict(), **fields})
            except ConfigError as e:
                raise ConfigError(f"moe_layer_overrides[{layer}]: {e}") from None
            plain = resolved.to_dict()
            normalised[layer] = {name: plain[name] for name in fields}
        set_(self, "moe_layer_overrides", {k: normalised[k] for k in sorted(normalised)} or None)
        layer_moe = {i: moe.replace(**normalised[i]) if i in normalised else moe for i in self.sparse_layers}
        for i, layer_config in layer_moe.items():
            # Expert choice ranks a batch's tokens against each other, later positions included: a causal LM
            # would route a token by its future in training and without it in generation.
            require(
                layer_config.router != RouterType.EXPERT_CHOICE,
                f"router='expert_choice' (layer {i}) lets each expert pick among all tokens of the batch, so in a "
                "causal language model a token's experts would depend on later tokens in training but not in "
                "generation; use router='expert_threshold' (expert choice made causal: per-expert running "
                "thresholds), or a top-k router",
            )
        set_(self, "_layer_moe", layer_moe)

    # -- derived values --------------------------------------------------------------------------
    @property
    def kv_heads(self) -> int:
        """Key/value heads (``num_key_value_heads``, defaulting to ``num_attention_heads``)."""
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def head_size(self) -> int:
        """Per-head dim (``head_dim``, defaulting to ``hidden_size // num_attention_heads``)."""
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def qk_norm_enabled(self) -> bool:
        return self.qk_norm != QKNorm.NONE

    @property
    def rope_dim(self) -> int:
        """Dims the rotary embedding turns: the head dim, or ``qk_rope_head_dim`` for MLA."""
        if self.attention_type == AttentionType.MLA and self.qk_rope_head_dim is not None:
            return self.qk_rope_head_dim
        return self.head_size

    def moe_config(self, layer_idx: int) -> MoEConfig | None:
        """The MoEConfig of layer ``layer_idx`` (``moe`` with its ``moe_layer_overrides``); None for a dense layer."""
        return self._layer_moe.get(layer_idx)

    def to_dict(self) -> dict[str, Any]:
        """As :meth:`Config.to_dict`; ``moe_layer_overrides`` gets string keys (JSON's) and is left out when None,
        so configs without per-layer overrides serialise exactly as before the field existed."""
        out = super().to_dict()
        # Attention variants and import metadata are left out at their defaults, for the same reason.
        for name, default in _OPTIONAL_DEFAULTS.items():
            if out[name] == default:
                del out[name]
        if out["moe_layer_overrides"] is None:
            del out["moe_layer_overrides"]
        else:
            out["moe_layer_overrides"] = {str(k): dict(v) for k, v in out["moe_layer_overrides"].items()}
        return out

    @property
    def sparse_layers(self) -> tuple[int, ...]:
        """Indices of the MoE layers, ascending."""
        if self.moe is None:
            return ()
        n, every, first_k_dense = self.num_hidden_layers, self.moe_layer_freq, self.first_k_dense
        return tuple(
            i
            for i in range(n)
            if is_moe_layer(i, n, every=every, first_k_dense=first_k_dense, moe_layers=self.moe_layers)
        )
