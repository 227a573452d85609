"""Grouped-query causal self-attention with rotary embeddings, optional QK-norm, and a KV cache.

Shape legend: B batch, S new tokens, P cached (past) tokens, K = P + S keys, D hidden,
H query heads, G key/value heads (GQA, Ainslie et al. 2023), hd head dim.

Parameter names follow Hugging Face (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``, ``q_norm``,
``k_norm``) so checkpoints of Llama, Mistral, Qwen2/3, Mixtral and OLMoE map by renaming.
"""

from __future__ import annotations

import enum

import torch
import torch.nn.functional as F
from torch import nn

from moekit.errors import ShapeError
from moekit.nn.gemv import linear
from moekit.nn.norm import RMSNorm
from moekit.nn.rope import apply_rotary

# SDPA broadcasts key/value heads itself since torch 2.5 (``enable_gqa``).
_SDPA_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)


class QKNorm(str, enum.Enum):
    """Where queries and keys are RMS-normalised before RoPE (stabilises attention logits)."""

    NONE = "none"
    HEAD = "head"  # Qwen3: RMSNorm over head_dim, one weight shared by all heads
    FULL = "full"  # OLMoE: RMSNorm over all heads' projections at once (H*hd and G*hd)


class KVCache:
    """Keys and values of every layer for incremental decoding, plus the padding mask of the cached tokens.

    With ``max_length`` the buffers are allocated once ([B, G, max_length, hd] per layer) and
    written in place; without it each step concatenates. The model calls :meth:`update` from every
    layer, then :meth:`advance` once per forward.
    """

    def __init__(self, num_layers: int, max_length: int | None = None):
        self.num_layers = num_layers
        self.max_length = max_length
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.length = 0  # P cached positions, the same for every row (padding is on the left)
        self.mask: torch.Tensor | None = None  # [B, P] bool, True = real token; None while there was no padding

    def __repr__(self) -> str:
        return f"KVCache(layers={self.num_layers}, length={self.length}, max_length={self.max_length})"

    def update(self, layer_idx: int, k_BGSd: torch.Tensor, v_BGSd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's keys/values of one layer; return all of that layer's keys/values [B, G, K, hd]."""
        P, S = self.length, k_BGSd.shape[2]
        k_old, v_old = self.keys[layer_idx], self.values[layer_idx]
        if self.max_length is None:
            if k_old is not None and v_old is not None:
                k_BGSd = torch.cat([k_old, k_BGSd], dim=2)
                v_BGSd = torch.cat([v_old, v_BGSd], dim=2)
            self.keys[layer_idx], self.values[layer_idx] = k_BGSd, v_BGSd
            return k_BGSd, v_BGSd
        if P + S > self.max_length:
            raise ShapeError(f"KV cache holds {self.max_length} positions; {P} cached + {S} new do not fit")
        k_buf, v_buf = k_old, v_old
        if k_buf is None or v_buf is None:
            # Keys and values may differ in width (MLA caches a latent and a rotary key).
            B, G, _, hd = k_BGSd.shape
            k_buf = self.keys[layer_idx] = k_BGSd.new_empty((B, G, self.max_length, hd))
            v_buf = self.values[layer_idx] = v_BGSd.new_empty((*v_BGSd.shape[:2], self.max_length, v_BGSd.shape[-1]))
        k_buf[:, :, P : P + S] = k_BGSd
        v_buf[:, :, P : P + S] = v_BGSd
        return k_buf[:, :, : P + S], v_buf[:, :, : P + S]

    def advance(self, num_new: int, mask: torch.Tensor | None = None) -> None:
        """Count ``num_new`` positions as cached; ``mask`` is the [B, P + num_new] padding mask (or None)."""
        self.length += num_new
        self.mask = mask


def attention_mask(
    key_valid_BK: torch.Tensor | None,
    num_past: int,
    num_new: int,
    device: torch.device,
    sliding_window: int | None = None,
) -> tuple[torch.Tensor | None, bool]:
    """The SDPA mask for S new queries over P + S keys: (bool mask [B|1, 1, S, K] with True = attend, is_causal).

    Returns (None, True) when SDPA's own causal flag is exact (no cache, no padding), and
    (None, False) for one new token without padding (it sees every key). Otherwise the mask is
    explicit: SDPA's ``is_causal`` aligns the triangle top-left, which is wrong once P > 0.
    A padding query would see no key at all, and an all-masked row makes SDPA return NaN, so
    every query may always see its own position (padding outputs are never read).
    With ``sliding_window`` W a query at slot q sees keys at slots q - W < k <= q (slots count padding,
    as in Hugging Face's Mistral); the mask is only explicit once P + S > W.
    """
    windowed = sliding_window is not None and num_past + num_new > sliding_window
    if key_valid_BK is None and not windowed:
        if num_past == 0:
            return None, num_new > 1
        if num_new == 1:
            return None, False
    q_pos = torch.arange(num_past, num_past + num_new, device=device)
    k_pos = torch.arange(num_past + num_new, device=device)
    allowed_SK = k_pos[None, :] <= q_pos[:, None]
    if windowed and sliding_window is not None:  # (windowed implies a window; this tells mypy)
        allowed_SK = allowed_SK & (k_pos[None, :] > q_pos[:, None] - sliding_window)
    if key_valid_BK is None:
        return allowed_SK[None, None], False
    allowed_BSK = (allowed_SK[None] & key_valid_BK[:, None, :].bool()) | (k_pos[None, :] == q_pos[:, None])[None]
    return allowed_BSK[:, None], False


class Attention(nn.Module):
    """Causal grouped-query self-attention: q/k/v projections, optional QK-norm, RoPE, SDPA, output projection.

    ``num_heads`` (H) must be a multiple of ``num_kv_heads`` (G = H is multi-head, G = 1 multi-query); ``head_dim``
    need not be D / H (Qwen3, Gemma). ``attention_bias`` puts biases on q/k/v (Qwen2), ``output_bias`` on o_proj
    too (Llama/Qwen3/OLMoE with ``attention_bias=True``); ``layer_idx`` is this layer's slot in a :class:`KVCache`.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        qk_norm: QKNorm | str = QKNorm.NONE,
        attention_bias: bool = False,
        rms_norm_eps: float = 1e-6,
        layer_idx: int = 0,
        output_bias: bool = False,
    ):
        super().__init__()
        if num_heads % num_kv_heads:
            raise ShapeError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.qk_norm = QKNorm(qk_norm)
        self.layer_idx = layer_idx
        self.scale = head_dim**-0.5
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=attention_bias)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=attention_bias)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=attention_bias)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=output_bias)
        if self.qk_norm == QKNorm.HEAD:
            self.q_norm = RMSNorm(head_dim, rms_norm_eps)
            self.k_norm = RMSNorm(head_dim, rms_norm_eps)
        elif self.qk_norm == QKNorm.FULL:
            self.q_norm = RMSNorm(num_heads * head_dim, rms_norm_eps)
            self.k_norm = RMSNorm(num_kv_heads * head_dim, rms_norm_eps)

    def extra_repr(self) -> str:
        h, g, hd = self.num_heads, self.num_kv_heads, self.head_dim
        return f"heads={h}, kv_heads={g}, head_dim={hd}, qk_norm={self.qk_norm.value}"

    def forward(
        self,
        x_BSD: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None = None,
        is_causal: bool = True,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Attend the S new positions of the normalised ``x_BSD`` over themselves and those in ``cache`` (read and
        extended): [B, S, D]. ``cos``/``sin`` [B, S, hd] are the new positions' rotary tables; ``mask`` and
        ``is_causal`` come from :func:`attention_mask` (SDPA applies the causal triangle only without a mask)."""
        B, S, _ = x_BSD.shape
        H, G, hd = self.num_heads, self.num_kv_heads, self.head_dim
        q, k, v = (
            linear(self.q_proj, x_BSD),
            linear(self.k_proj, x_BSD),
            linear(self.v_proj, x_BSD),
        )  # [B, S, H*hd], [B, S, G*hd] x2
        if self.qk_norm == QKNorm.FULL:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.view(B, S, H, hd), k.view(B, S, G, hd), v.view(B, S, G, hd)
        if self.qk_norm == QKNorm.HEAD:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H|G, S, hd]
        q, k = apply_rotary(q, k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # [B, G, K, hd]
        gqa = {}
        if G != H:  # every group of H/G query heads shares one key/value head
            if _SDPA_GQA and not torch.is_grad_enabled():
                gqa = {"enable_gqa": True}  # same result, without copying the whole cache H/G times per step
            else:
                k = k.repeat_interleave(H // G, dim=1)
                v = v.repeat_interleave(H // G, dim=1)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal and mask is None, scale=self.scale, **gqa
        )
        return linear(self.o_proj, y.transpose(1, 2).reshape(B, S, H * hd))  # [B, S, D]
