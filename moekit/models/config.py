"""LMConfig: the causal language model's shape, with Hugging Face's field names where they exist."""

from __future__ import annotations

import dataclasses

from moekit.config import Config, check_choice, require
from moekit.nn.attention import QKNorm
from moekit.nn.config import Activation, MoEConfig


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclasses.dataclass(frozen=True, kw_only=True)
class LMConfig(Config):
    """Configuration of :class:`moekit.models.MoELM`.

    ``moe=None`` is the dense baseline. With an MoE, layer i is sparse when it is listed in
    ``moe_layers``, or (when ``moe_layers`` is None) when ``i >= first_k_dense`` and
    ``i % moe_layer_freq == 0`` (DeepSeek's ``first_k_dense_replace`` / ``moe_layer_freq`` rule).
    Dense layers use an MLP of ``intermediate_size``.

    ``num_key_value_heads`` and ``head_dim`` may be None (= ``num_attention_heads`` and
    ``hidden_size // num_attention_heads``); read the resolved values from :attr:`kv_heads` and
    :attr:`head_size`. They stay None in the config so that ``replace(hidden_size=...)`` re-derives them.
    """

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
    moe: MoEConfig | None = None
    first_k_dense: int = 0
    moe_layer_freq: int = 1
    moe_layers: tuple[int, ...] | None = None

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
        for name in ("num_key_value_heads", "head_dim"):
            value = getattr(self, name)
            require(value is None or _positive_int(value), f"{name} must be a positive integer or None, got {value!r}")
        set_(self, "activation", check_choice("activation", self.activation, Activation))
        qk = self.qk_norm
        if isinstance(qk, bool):
            qk = QKNorm.HEAD if qk else QKNorm.NONE
        set_(self, "qk_norm", check_choice("qk_norm", qk, QKNorm))
        heads, kv = self.num_attention_heads, self.kv_heads
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
                self.moe.hidden_size == self.hidden_size,
                f"moe.hidden_size={self.moe.hidden_size} must equal hidden_size={self.hidden_size}",
            )
            require(
                bool(self.sparse_layers),
                f"moe is set but no layer is sparse (num_hidden_layers={self.num_hidden_layers}, "
                f"first_k_dense={self.first_k_dense}, moe_layer_freq={self.moe_layer_freq}, "
                f"moe_layers={self.moe_layers})",
            )

    # -- derived values --------------------------------------------------------------------------
    @property
    def kv_heads(self) -> int:
        """Key/value heads (``num_key_value_heads``, defaulting to ``num_attention_heads``)."""
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def head_size(self) -> int:
        """Per-head dim (``head_dim``, defaulting to ``hidden_size // num_attention_heads``)."""
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Whether layer ``layer_idx`` has an MoE instead of a dense MLP."""
        if self.moe is None:
            return False
        if self.moe_layers is not None:
            return layer_idx in self.moe_layers
        return layer_idx >= self.first_k_dense and layer_idx % self.moe_layer_freq == 0

    @property
    def sparse_layers(self) -> tuple[int, ...]:
        """Indices of the MoE layers, ascending."""
        return tuple(i for i in range(self.num_hidden_layers) if self.is_moe_layer(i))
