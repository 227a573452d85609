"""A pre-norm transformer block: x + attn(norm(x)), then h + ffn(norm(h)), where ffn is an MLP or an MoE."""

from __future__ import annotations

import torch
from torch import nn

from moekit.nn.attention import KVCache
from moekit.nn.moe import MoE
from moekit.nn.norm import RMSNorm
from moekit.nn.routing import MoEAux


class Block(nn.Module):
    """RMSNorm -> attention -> residual, RMSNorm -> FFN (dense :class:`MLP` or sparse :class:`MoE`) -> residual.

    The attention is an :class:`Attention` or a :class:`moekit.nn.mla.MultiHeadLatentAttention` (same call).

    Names follow Hugging Face: ``input_layernorm``, ``self_attn``, ``post_attention_layernorm``, ``mlp``
    (the MoE sits at ``mlp`` too when the layer is sparse).
    """

    def __init__(
        self, self_attn: nn.Module, mlp: nn.Module, hidden_size: int, rms_norm_eps: float = 1e-6, dropout: float = 0.0
    ):
        super().__init__()
        self.input_layernorm = RMSNorm(hidden_size, rms_norm_eps)
        self.self_attn = self_attn
        self.post_attention_layernorm = RMSNorm(hidden_size, rms_norm_eps)
        self.mlp = mlp
        # residual dropout on each branch's output (training only); identity when 0
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def is_moe(self) -> bool:
        return isinstance(self.mlp, MoE)

    def forward(
        self,
        x_BSD: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = True,
        cache: KVCache | None = None,
        pad_mask: torch.Tensor | None = None,
        token_ids: torch.Tensor | None = None,
        record_routing: bool = False,
        prev_logits: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, MoEAux | None]:
        """One block over the S new positions of the residual stream ``x_BSD``: (x, the MoE's MoEAux or None for a
        dense block). The attention arguments are :meth:`Attention.forward`'s; the MoE gets ``pad_mask`` [B, S]
        (True = real token, not routed otherwise), ``token_ids`` (hash routing), ``record_routing`` and
        ``prev_logits`` (the previous MoE layer's router logits, for a gating residual)."""
        h = x_BSD + self.dropout(self.self_attn(self.input_layernorm(x_BSD), cos, sin, attn_mask, is_causal, cache))
        if self.is_moe:
            extra = {} if prev_logits is None else {"prev_logits": prev_logits}  # MoE++ gating residual
            y, aux = self.mlp(
                self.post_attention_layernorm(h),
                mask=pad_mask,
                token_ids=token_ids,
                record_routing=record_routing,
                **extra,
            )
            return h + self.dropout(y), aux
        return h + self.dropout(self.mlp(self.post_attention_layernorm(h))), None
