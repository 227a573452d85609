"""The decoder side of :class:`moekit.models.seq2seq.Seq2SeqTransformer`: cross-attention over the encoder's
memory, the decoder block, and the state incremental decoding carries from step to step.

Shape legend: B batch, S target positions, M memory (source) positions, H heads, hd head dim, D hidden.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from moekit.nn.attention import Attention, KVCache
from moekit.nn.moe import MoE
from moekit.nn.norm import RMSNorm


@dataclasses.dataclass
class DecoderState:
    """Incremental decoding: the self-attention KVCache, each layer's cross-attention keys/values
    ([B, H, M, hd] each) and the source mask as SDPA wants it ([B, 1, 1, M] or None)."""

    cache: KVCache
    memory_kv: list[tuple[torch.Tensor, torch.Tensor]]
    memory_mask: torch.Tensor | None

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows ``index`` (beam search: each surviving hypothesis continues from its parent's row)."""
        c = self.cache
        for i in range(c.num_layers):
            keys, values = c.keys[i], c.values[i]
            if keys is not None and values is not None:
                c.keys[i], c.values[i] = keys.index_select(0, index), values.index_select(0, index)
        if c.mask is not None:
            c.mask = c.mask.index_select(0, index)
        self.memory_kv = [(k.index_select(0, index), v.index_select(0, index)) for k, v in self.memory_kv]
        if self.memory_mask is not None:
            self.memory_mask = self.memory_mask.index_select(0, index)


class CrossAttention(nn.Module):
    """Multi-head attention of decoder queries over the encoder's memory (no rotary positions)."""

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=False)

    def project_memory(self, memory_BMD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the memory [B, H, M, hd] each (computed once per source when decoding)."""
        B, M, _ = memory_BMD.shape
        k = self.k_proj(memory_BMD).view(B, M, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(memory_BMD).view(B, M, self.num_heads, self.head_dim).transpose(1, 2)
        return k, v

    def forward(self, x_BSD, k_BHMd, v_BHMd, mask_B11M) -> torch.Tensor:
        B, S, _ = x_BSD.shape
        q = self.q_proj(x_BSD).view(B, S, self.num_heads, self.head_dim).transpose(1, 2)  # [B, H, S, hd]
        y = F.scaled_dot_product_attention(q, k_BHMd, v_BHMd, attn_mask=mask_B11M)
        return self.o_proj(y.transpose(1, 2).reshape(B, S, -1))


class DecoderBlock(nn.Module):
    """RMSNorm -> causal self-attention -> residual, RMSNorm -> cross-attention -> residual,
    RMSNorm -> FFN (:class:`MLP` or :class:`MoE`) -> residual."""

    def __init__(self, self_attn: Attention, cross_attn: CrossAttention, mlp: nn.Module, hidden_size: int, eps: float):
        super().__init__()
        self.input_layernorm = RMSNorm(hidden_size, eps)
        self.self_attn = self_attn
        self.cross_attn_layernorm = RMSNorm(hidden_size, eps)
        self.cross_attn = cross_attn
        self.post_attention_layernorm = RMSNorm(hidden_size, eps)
        self.mlp = mlp

    @property
    def is_moe(self) -> bool:
        return isinstance(self.mlp, MoE)

    def forward(
        self, x_BSD, cos, sin, self_mask, is_causal, cache, memory_kv, memory_mask, pad_mask, token_ids, record
    ):
        h = x_BSD + self.self_attn(self.input_layernorm(x_BSD), cos, sin, self_mask, is_causal, cache)
        h = h + self.cross_attn(self.cross_attn_layernorm(h), *memory_kv, memory_mask)
        if self.is_moe:
            y, aux = self.mlp(
                self.post_attention_layernorm(h), mask=pad_mask, token_ids=token_ids, record_routing=record
            )
            return h + y, aux
        return h + self.mlp(self.post_attention_layernorm(h)), None
