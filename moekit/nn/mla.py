"""Multi-head latent attention (MLA; DeepSeek-V2, arXiv:2405.04434 sec. 2.1; DeepSeek-V3, arXiv:2412.19437 sec. 2.1.1).

Keys and values are rebuilt from one small latent per token, so the KV cache holds that latent
(``kv_lora_rank`` wide) plus one shared rotary key (``qk_rope_head_dim``) instead of H full keys and values.
Each head's query and key are [nope part | rope part]; only the rope part is rotated.

    x -> q_a_proj -> q_a_layernorm -> q_b_proj -> q [H, nope + rope]      (q_proj directly when q_lora_rank is None)
    x -> kv_a_proj_with_mqa -> [latent (r) | k_rot (rope)]; latent -> kv_a_layernorm
         cache <- (latent, rotated k_rot); latent -> kv_b_proj -> [k_nope (nope) | v (v)] per head
    attention over k = [k_nope | k_rot shared by all heads], softmax scale (nope + rope)^-0.5 -> o_proj

Numerics follow Hugging Face's ``DeepseekV3Attention`` (transformers 5): the latent norms use eps 1e-6
whatever ``rms_norm_eps`` says (HF builds them with the default), and with ``rope_interleave`` the
rotary dims are read as pairs (x0, x1), (x2, x3), ... by gathering evens then odds before the usual
rotate-half rotation, which is bit-identical to HF's interleaved formula. Parameter names are HF's,
so checkpoints map by renaming.

Shape legend: B batch, S new tokens, K = cached + new keys, D hidden, H heads, r kv_lora_rank,
n qk_nope_head_dim, p qk_rope_head_dim, v v_head_dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moekit.nn.attention import KVCache
from moekit.nn.norm import RMSNorm
from moekit.nn.rope import apply_rotary

# HF's DeepseekV3RMSNorm default: the q/kv latent norms are built without the config's rms_norm_eps.
LATENT_NORM_EPS = 1e-6


def deinterleave(x: torch.Tensor) -> torch.Tensor:
    """[x0, x1, x2, x3, ...] -> [x0, x2, ... | x1, x3, ...] over the last dim (interleaved pairs to halves)."""
    return torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)


class MultiHeadLatentAttention(nn.Module):
    """DeepSeek-V3 attention with a compressed (latent) KV cache; sizes as in the module's shape legend.

    ``q_lora_rank`` is the width of the query's low-rank bottleneck (None: one q_proj); ``attention_bias`` puts
    biases on q_a_proj, kv_a_proj_with_mqa and o_proj (HF's); ``rope_interleave``: rotary dims come as
    interleaved pairs (DeepSeek's checkpoints); ``softmax_scale`` defaults to (n + p)^-0.5.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        kv_lora_rank: int,
        qk_rope_head_dim: int,
        qk_nope_head_dim: int,
        v_head_dim: int,
        q_lora_rank: int | None = None,
        attention_bias: bool = False,
        rope_interleave: bool = True,
        layer_idx: int = 0,
        softmax_scale: float | None = None,
    ):
        super().__init__()
        self.num_heads, self.kv_lora_rank = num_heads, kv_lora_rank
        self.qk_rope_head_dim, self.qk_nope_head_dim, self.v_head_dim = qk_rope_head_dim, qk_nope_head_dim, v_head_dim
        self.qk_head_dim = qk_nope_head_dim + qk_rope_head_dim
        self.q_lora_rank, self.rope_interleave, self.layer_idx = q_lora_rank, rope_interleave, layer_idx
        self.scale = softmax_scale if softmax_scale is not None else self.qk_head_dim**-0.5
        H = num_heads
        if q_lora_rank is None:
            self.q_proj = nn.Linear(hidden_size, H * self.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(hidden_size, q_lora_rank, bias=attention_bias)
            self.q_a_layernorm = RMSNorm(q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(q_lora_rank, H * self.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(hidden_size, kv_lora_rank + qk_rope_head_dim, bias=attention_bias)
        self.kv_a_layernorm = RMSNorm(kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(kv_lora_rank, H * (qk_nope_head_dim + v_head_dim), bias=False)
        self.o_proj = nn.Linear(H * v_head_dim, hidden_size, bias=attention_bias)

    def extra_repr(self) -> str:
        return (
            f"heads={self.num_heads}, q_lora_rank={self.q_lora_rank}, kv_lora_rank={self.kv_lora_rank}, "
            f"nope={self.qk_nope_head_dim}, rope={self.qk_rope_head_dim}, v={self.v_head_dim}"
        )

    def forward(
        self,
        x_BSD: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None = None,
        is_causal: bool = True,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Same contract as :meth:`moekit.nn.attention.Attention.forward` (cos/sin are [B, S, p]).

        The cache stores, per layer, the normalised latent [B, 1, K, r] as "keys" and the rotated
        shared key [B, 1, K, p] as "values".
        """
        B, S, _ = x_BSD.shape
        H, n, p, v = self.num_heads, self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim
        if self.q_lora_rank is None:
            q = self.q_proj(x_BSD)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BSD)))
        q_BHSq = q.view(B, S, H, n + p).transpose(1, 2)
        q_nope, q_rot = q_BHSq.split([n, p], dim=-1)

        latent_BSr, k_rot_BSp = self.kv_a_proj_with_mqa(x_BSD).split([self.kv_lora_rank, p], dim=-1)
        latent_B1Sr = self.kv_a_layernorm(latent_BSr).view(B, 1, S, self.kv_lora_rank)
        k_rot_B1Sp = k_rot_BSp.reshape(B, 1, S, p)
        if self.rope_interleave:
            q_rot, k_rot_B1Sp = deinterleave(q_rot), deinterleave(k_rot_B1Sp)
        q_rot, k_rot_B1Sp = apply_rotary(q_rot, k_rot_B1Sp, cos, sin)
        if cache is not None:
            latent_B1Sr, k_rot_B1Sp = cache.update(self.layer_idx, latent_B1Sr, k_rot_B1Sp)  # K positions now
        K = latent_B1Sr.shape[2]

        kv_BHKx = self.kv_b_proj(latent_B1Sr).view(B, K, H, n + v).transpose(1, 2)
        k_nope, value = kv_BHKx.split([n, v], dim=-1)
        key = torch.cat((k_nope, k_rot_B1Sp.expand(B, H, K, p)), dim=-1)  # [B, H, K, n + p]
        query = torch.cat((q_nope, q_rot), dim=-1)  # [B, H, S, n + p]
        y = F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, is_causal=is_causal and mask is None, scale=self.scale
        )
        return self.o_proj(y.transpose(1, 2).reshape(B, S, H * v))  # [B, S, D]
