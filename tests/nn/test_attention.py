"""RMSNorm, RoPE and grouped-query attention (with KV cache and padding masks) against plain references."""

from __future__ import annotations

import math

import pytest
import torch

from moekit.errors import ShapeError
from moekit.nn.attention import Attention, KVCache, QKNorm, attention_mask
from moekit.nn.norm import RMSNorm
from moekit.nn.rope import RotaryEmbedding, apply_rotary, rotate_half


def naive_attention(attn: Attention, x, cos, sin, allowed_BSK):
    """Softmax(q k^T * scale + mask) v with every step spelled out (keys = the same positions)."""
    B, S, _ = x.shape
    H, G, hd = attn.num_heads, attn.num_kv_heads, attn.head_dim
    q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
    if attn.qk_norm == QKNorm.FULL:
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k, v = q.view(B, S, H, hd), k.view(B, S, G, hd), v.view(B, S, G, hd)
    if attn.qk_norm == QKNorm.HEAD:
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    q = q * cos[:, None] + rotate_half(q) * sin[:, None]
    k = k * cos[:, None] + rotate_half(k) * sin[:, None]
    out = torch.zeros(B, H, S, hd)
    for h in range(H):
        g = h // (H // G)
        scores = q[:, h] @ k[:, g].transpose(-1, -2) / math.sqrt(hd)  # [B, S, S]
        scores = scores.masked_fill(~allowed_BSK, float("-inf"))
        out[:, h] = scores.softmax(-1) @ v[:, g]
    return attn.o_proj(out.transpose(1, 2).reshape(B, S, H * hd))


def make_attention(qk_norm="none", bias=False, heads=4, kv_heads=2, head_dim=6, hidden=16, seed=0):
    torch.manual_seed(seed)
    attn = Attention(hidden, heads, kv_heads, head_dim, qk_norm=qk_norm, attention_bias=bias)
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0, 0.3)
    return attn


def test_rmsnorm_matches_formula_and_keeps_dtype():
    torch.manual_seed(0)
    norm = RMSNorm(8, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(3, 5, 8)
    expected = norm.weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
    torch.testing.assert_close(norm(x), expected)
    xb = x.bfloat16()
    # HF order: normalise in fp32, cast to the input dtype, then multiply by the (fp32) weight.
    xf = xb.float()
    expected_b = norm.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).bfloat16()
    torch.testing.assert_close(norm(xb), expected_b, rtol=0, atol=0)
    assert norm.bfloat16()(xb).dtype == torch.bfloat16


def test_rope_is_a_rotation_that_depends_on_relative_position():
    rope = RotaryEmbedding(8, theta=10000.0)
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def score(m, n):
        cos_m, sin_m = rope(torch.tensor([[m]]), torch.float32)
        cos_n, sin_n = rope(torch.tensor([[n]]), torch.float32)
        qm, _ = apply_rotary(q, q, cos_m, sin_m)
        _, kn = apply_rotary(k, k, cos_n, sin_n)
        return (qm * kn).sum()

    torch.testing.assert_close(score(3, 1), score(12, 10))
    torch.testing.assert_close(score(7, 7), (q * k).sum())
    cos, sin = rope(torch.tensor([[5]]), torch.float32)
    rotated, _ = apply_rotary(q, q, cos, sin)
    torch.testing.assert_close(rotated.norm(), q.norm())


def test_rope_frequencies_follow_the_hf_default():
    rope = RotaryEmbedding(8, theta=500.0)
    cos, sin = rope(torch.arange(4)[None], torch.float32)
    inv_freq = 1.0 / (500.0 ** (torch.arange(0, 8, 2).float() / 8))
    angles = torch.arange(4).float()[:, None] * inv_freq
    torch.testing.assert_close(cos[0], torch.cat([angles, angles], -1).cos())
    torch.testing.assert_close(sin[0], torch.cat([angles, angles], -1).sin())
    # Casting the model does not round the frequencies (they are not a buffer).
    rope.to(torch.bfloat16)
    torch.testing.assert_close(rope(torch.arange(4)[None], torch.float32)[0], cos)
    with pytest.raises(ValueError, match="even head_dim"):
        RotaryEmbedding(7)


@pytest.mark.parametrize(
    "qk_norm,bias,heads,kv_heads",
    [("none", False, 4, 4), ("none", True, 4, 2), ("head", False, 4, 2), ("full", False, 4, 1), ("head", True, 2, 1)],
)
def test_attention_matches_naive_reference(qk_norm, bias, heads, kv_heads):
    attn = make_attention(qk_norm, bias, heads, kv_heads)
    B, S = 2, 7
    x = torch.randn(B, S, 16)
    cos, sin = RotaryEmbedding(6)(torch.arange(S).expand(B, S), torch.float32)
    mask, is_causal = attention_mask(None, 0, S, x.device)
    assert mask is None and is_causal
    causal = torch.ones(S, S, dtype=torch.bool).tril().expand(B, S, S)
    torch.testing.assert_close(attn(x, cos, sin, mask, is_causal), naive_attention(attn, x, cos, sin, causal))


def test_padding_mask_matches_reference_and_never_gives_nan():
    attn = make_attention("head")
    B, S = 2, 6
    x = torch.randn(B, S, 16)
    valid = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    cos, sin = RotaryEmbedding(6)(torch.arange(S).expand(B, S), torch.float32)
    mask, is_causal = attention_mask(valid, 0, S, x.device)
    assert not is_causal and mask.shape == (B, 1, S, S)
    y = attn(x, cos, sin, mask, is_causal)
    assert torch.isfinite(y).all()
    allowed = torch.ones(S, S, dtype=torch.bool).tril() & valid[:, None, :]
    ref = naive_attention(attn, x, cos, sin, allowed | torch.eye(S, dtype=torch.bool))
    torch.testing.assert_close(y[valid], ref[valid])


@pytest.mark.parametrize("max_length", [None, 12])
@pytest.mark.parametrize("padded", [False, True])
def test_kv_cache_incremental_equals_full(max_length, padded):
    attn = make_attention("head", kv_heads=2)
    B, S = 2, 9
    x = torch.randn(B, S, 16)
    valid = torch.ones(B, S, dtype=torch.bool)
    if padded:
        valid[0, :3] = False
    pos = (valid.long().cumsum(-1) - 1).clamp(min=0)
    cos, sin = RotaryEmbedding(6)(pos, torch.float32)
    key_valid = valid if padded else None
    full = attn(x, cos, sin, *attention_mask(key_valid, 0, S, x.device))

    cache = KVCache(1, max_length)
    pieces = []
    for start, stop in [(0, 4), (4, 5), (5, 8), (8, 9)]:
        kv = None if key_valid is None else key_valid[:, :stop]
        mask, is_causal = attention_mask(kv, cache.length, stop - start, x.device)
        pieces.append(attn(x[:, start:stop], cos[:, start:stop], sin[:, start:stop], mask, is_causal, cache))
        cache.advance(stop - start, kv)
    assert cache.length == S
    torch.testing.assert_close(torch.cat(pieces, 1)[valid], full[valid])


def test_kv_cache_overflow_is_a_clear_error():
    cache = KVCache(1, max_length=4)
    k = torch.zeros(1, 2, 3, 6)
    cache.update(0, k, k)
    cache.advance(3)
    with pytest.raises(ShapeError, match="holds 4 positions; 3 cached \\+ 2 new"):
        cache.update(0, k[:, :, :2], k[:, :, :2])


def test_bad_head_counts():
    with pytest.raises(ShapeError, match="num_heads=4 is not a multiple of num_kv_heads=3"):
        Attention(16, 4, 3, 4)
