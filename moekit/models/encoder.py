"""A bidirectional MoE transformer encoder with a pooled classification head, for text and images.

    text:   input_ids [B, S] -> embed_tokens -> [B, S, D]
    images: pixels [B, C, H, W] -> patch_embed (ViT, Dosovitskiy et al. 2021) -> [B, N, D]
            -> layers[0..L): x + attn(norm(x)) (no causal mask); x + ffn(norm(x))
               ffn = dense MLP, MoE (token choice, expert choice, ...) every ``moe_every``-th layer
               (V-MoE, Riquelme et al. 2021), or Soft MoE (Puigcerver et al. 2023)
            -> norm -> mean over real positions -> dropout -> head -> logits [B, num_labels]

The blocks are :class:`moekit.nn.block.Block` run with ``is_causal=False`` and a key-padding mask.
Shape legend: B batch, S tokens, N patches, D hidden, C channels.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

import torch
from torch import nn

from moekit.config import Config, check_choice, require
from moekit.errors import ConfigError, ShapeError
from moekit.models.placement import is_moe_layer
from moekit.models.resolve import complete_task_dict, equal_active_moe
from moekit.nn.attention import Attention
from moekit.nn.block import Block
from moekit.nn.config import MoEConfig
from moekit.nn.mlp import MLP
from moekit.nn.moe import MoE
from moekit.nn.norm import RMSNorm
from moekit.nn.rope import RotaryEmbedding
from moekit.nn.routing import MoEAux
from moekit.nn.soft_moe import SoftMoE


class FFNKind(str, enum.Enum):
    DENSE = "dense"  # the baseline: every layer a dense MLP
    MOE = "moe"  # sparse MoE (router from ``router``) every ``moe_every``-th layer
    SOFT = "soft"  # Soft MoE every ``moe_every``-th layer


class Pooling(str, enum.Enum):
    MEAN = "mean"  # average of the real tokens' states
    MAX = "max"  # per-feature maximum over the real tokens (Kim 2014's max-over-time)


@dataclasses.dataclass(frozen=True, kw_only=True)
class EncoderConfig(Config):
    """An encoder classifier. Exactly one of ``vocab_size`` (text) and ``image_size`` (images) is set.

    The dense baseline with equal active parameters is the same config with ``ffn="dense"``: a dense
    layer's MLP is ``intermediate_size`` wide, and an MoE token runs ``moe.top_k`` experts of
    ``intermediate_size // top_k`` each unless ``moe.expert_hidden_size`` is set (expert choice and Soft MoE:
    one expert-sized pass per token). ``moe`` may be given partially: :func:`equal_active_moe` fills it.
    """

    num_labels: int
    vocab_size: int | None = None
    image_size: int | None = None
    channels: int = 1
    patch_size: int = 7
    max_length: int = 128
    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    intermediate_size: int = 256
    ffn: FFNKind = FFNKind.MOE
    moe_every: int = 2
    moe: MoEConfig | None = None  # None: TASK_MOE_DEFAULTS
    slots_per_expert: int = 1
    dropout: float = 0.1
    token_dropout: float = 0.0  # text: in training, zero each input token's embedding with this probability
    pooling: Pooling = Pooling.MEAN
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        object.__setattr__(self, "ffn", check_choice("ffn", self.ffn, FFNKind))
        object.__setattr__(self, "moe", equal_active_moe(self.moe, self.intermediate_size))
        object.__setattr__(self, "pooling", check_choice("pooling", self.pooling, Pooling))
        require((self.vocab_size is None) != (self.image_size is None), "set exactly one of vocab_size and image_size")
        for name in ("num_labels", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
            value = getattr(self, name)
            require(isinstance(value, int) and value >= 1, f"{name} must be a positive integer, got {value!r}")
        require(self.num_labels >= 2, f"num_labels must be >= 2, got {self.num_labels}")
        require(self.moe_every >= 1, f"moe_every must be >= 1, got {self.moe_every}")
        require(self.hidden_size % self.num_attention_heads == 0, "hidden_size must be a multiple of the heads")
        require((self.hidden_size // self.num_attention_heads) % 2 == 0, "head size must be even (rotary)")
        require(0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout}")
        require(0 <= self.token_dropout < 1, f"token_dropout must be in [0, 1), got {self.token_dropout}")
        require(
            self.moe is None or not self.moe.gating_residual,
            "gating_residual (MoE++) chains router logits from one MoE layer to the next, which only the language "
            "model (MoELM) wires; set gating_residual=false here",
        )
        if self.image_size is not None:
            require(
                self.image_size % self.patch_size == 0,
                f"image_size={self.image_size} is not a multiple of patch_size={self.patch_size}",
            )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EncoderConfig:
        """As :meth:`Config.from_dict`; a partial ``moe`` is completed, and old runs' flat MoE fields are read."""
        return super().from_dict(complete_task_dict(data, cls.intermediate_size))

    @property
    def is_text(self) -> bool:
        return self.vocab_size is not None

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2 if self.image_size else 0


@dataclasses.dataclass
class EncoderOutput:
    """logits [B, num_labels]; aux_loss: sum of the MoE layers' balancing losses; moe_aux: per MoE layer."""

    logits: torch.Tensor
    aux_loss: torch.Tensor
    moe_aux: list[MoEAux]


class _SoftFFN(nn.Module):
    """Soft MoE in a :class:`Block`'s FFN slot: the block calls a dense FFN with one argument and wants a tensor;
    the padding mask is handed in by the encoder before each forward."""

    def __init__(self, layer: SoftMoE):
        super().__init__()
        self.soft = layer
        self.mask: torch.Tensor | None = None
        self.last_aux: MoEAux | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, self.last_aux = self.soft(x, mask=self.mask)
        return y


class EncoderClassifier(nn.Module):
    """Bidirectional transformer classifier whose FFNs are dense, MoE or Soft MoE (see module docstring)."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = c = config
        if c.vocab_size is not None:  # text
            self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        else:
            self.patch_embed = nn.Conv2d(c.channels, c.hidden_size, c.patch_size, stride=c.patch_size)
            self.pos_embed = nn.Parameter(torch.zeros(1, c.num_patches, c.hidden_size))
        head_dim = c.hidden_size // c.num_attention_heads
        self.rotary_emb = RotaryEmbedding(head_dim)
        self.layers = nn.ModuleList([self._build_block(i, head_dim) for i in range(c.num_hidden_layers)])
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.dropout = nn.Dropout(c.dropout)
        self.head = nn.Linear(c.hidden_size, c.num_labels)
        self.reset_parameters()

    def _build_block(self, i: int, head_dim: int) -> Block:
        c = self.config
        attn = Attention(c.hidden_size, c.num_attention_heads, c.num_attention_heads, head_dim, layer_idx=i)
        ffn: nn.Module
        if c.ffn == FFNKind.DENSE or not is_moe_layer(i, c.num_hidden_layers, every=c.moe_every, last_sparse=True):
            ffn = MLP(c.hidden_size, c.intermediate_size)
        elif c.moe is None:
            raise ConfigError(f"ffn={c.ffn.value!r} needs moe settings")
        elif c.ffn == FFNKind.SOFT:
            ffn = _SoftFFN(SoftMoE(c.hidden_size, c.moe.num_experts, c.slots_per_expert, c.intermediate_size))
        else:
            ffn = MoE(c.moe, hidden_size=c.hidden_size)
        return Block(attn, ffn, c.hidden_size, c.rms_norm_eps)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding, nn.Conv2d)):
                nn.init.normal_(module.weight, std=std)
                if isinstance(module, (nn.Linear, nn.Conv2d)) and module.bias is not None:
                    nn.init.zeros_(module.bias)
        for name, param in self.named_parameters():
            if name.endswith(("experts.w_in", "experts.w_out", "router.weight")):
                nn.init.normal_(param, std=std)
        if not self.config.is_text:
            nn.init.normal_(self.pos_embed, std=std)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def active_parameters(self) -> int:
        """Parameters one token passes through: all but the experts a token does not run."""
        total = self.num_parameters()
        for block in self.layers:
            if isinstance(block.mlp, _SoftFFN):  # a token's output mixes slots, each one expert-sized pass
                total -= block.mlp.soft.experts.inactive_parameters(1)
            elif isinstance(block.mlp, MoE):
                total -= block.mlp.experts.inactive_parameters(block.mlp.config.experts_per_token)
        return total

    def forward(self, inputs: torch.Tensor, mask: torch.Tensor | None = None, record_routing: bool = False):
        """Class scores of token ids [B, S] (``mask``: True = real token; None = all real) or of pixels
        [B, C, H, W] scaled to about [0, 1]; ``record_routing`` keeps each MoE layer's Routing in ``moe_aux``."""
        c = self.config
        token_ids = None
        if c.is_text:
            if inputs.dim() != 2 or inputs.dtype != torch.long:
                raise ShapeError(f"text input must be token ids [batch, seq] (long), got {tuple(inputs.shape)}")
            x = self.embed_tokens(inputs)  # [B, S, D]
            token_ids = inputs
            if self.training and c.token_dropout > 0:  # word dropout: the model must not lean on any one word
                x = x * (torch.rand(x.shape[:2], device=x.device) >= c.token_dropout).unsqueeze(-1).to(x.dtype)
        else:
            expected = (c.channels, c.image_size, c.image_size)
            if inputs.dim() != 4 or tuple(inputs.shape[1:]) != expected:
                raise ShapeError(f"images must be [batch, {', '.join(map(str, expected))}], got {tuple(inputs.shape)}")
            x = self.patch_embed(inputs).flatten(2).transpose(1, 2) + self.pos_embed  # [B, N, D]
        B, S, _ = x.shape
        x = self.dropout(x)
        valid = None if mask is None else mask.bool()
        attn_mask = None if valid is None else valid[:, None, None, :]  # every query sees the real keys
        positions = torch.arange(S, device=x.device).expand(B, S)
        cos, sin = self.rotary_emb(positions, x.dtype)
        moe_aux: list[MoEAux] = []
        for block in self.layers:
            if isinstance(block.mlp, _SoftFFN):
                block.mlp.mask = valid
            x, aux = block(x, cos, sin, attn_mask, False, None, valid, token_ids, record_routing)
            if isinstance(block.mlp, _SoftFFN):
                aux = block.mlp.last_aux
            if aux is not None:
                moe_aux.append(aux)
        pooled = pool_tokens(self.norm(x), valid, c.pooling)
        logits = self.head(self.dropout(pooled))
        aux_loss = torch.zeros((), dtype=torch.float32, device=logits.device)
        for aux in moe_aux:
            aux_loss = aux_loss + aux.loss.to(aux_loss.device, torch.float32)
        return EncoderOutput(logits=logits, aux_loss=aux_loss, moe_aux=moe_aux)


def pool_tokens(x: torch.Tensor, valid: torch.Tensor | None, pooling: Pooling = Pooling.MEAN) -> torch.Tensor:
    """[B, S, D] -> [B, D] over the real tokens (``valid`` [B, S] bool; None = all); an all-padding row gives 0."""
    if pooling == Pooling.MAX:
        if valid is None:
            return x.amax(dim=1)
        pooled = x.masked_fill(~valid.unsqueeze(-1), float("-inf")).amax(dim=1)
        return torch.where(valid.any(dim=1, keepdim=True), pooled, 0.0)
    if valid is None:
        return x.mean(dim=1)
    weights = valid.to(x.dtype).unsqueeze(-1)
    return (x * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)
