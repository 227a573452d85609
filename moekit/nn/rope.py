"""Rotary position embeddings (Su et al. 2021, RoFormer), Hugging Face's "rotate_half" layout.

The head dim is split into two halves [x1 | x2] rotated as pairs (x1_i, x2_i), which is the
layout of HF Llama/Qwen/Mixtral checkpoints (not the interleaved pairs of the original paper).
Only the default (unscaled) rope is implemented.
"""

from __future__ import annotations

import torch
from torch import nn


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1 | x2] -> [-x2 | x1] over the last dim."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [B, H, S, hd] and k [B, KVH, S, hd] by cos/sin [B, S, hd] (broadcast over heads)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [B, 1, S, hd]
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


class RotaryEmbedding(nn.Module):
    """Maps position ids to (cos, sin) tables; frequencies theta^(-2i/d) (RoFormer eq. 15)."""

    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim}")
        self.head_dim, self.theta = head_dim, theta

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        """theta^(-2i/d) for i < d/2, fp32 [hd/2]. Recomputed each call (tiny), so ``model.to(bf16)``
        cannot round it the way a floating-point buffer would be."""
        exponent = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device).float() / self.head_dim
        return 1.0 / (self.theta**exponent)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, theta={self.theta}"

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [B, S, hd] in ``dtype``, computed in fp32 (bf16 angles lose whole turns)."""
        with torch.autocast(device_type=position_ids.device.type, enabled=False):
            freqs = position_ids[..., None].float() * self.inv_freq(position_ids.device)  # [B, S, hd/2]
            emb = torch.cat((freqs, freqs), dim=-1)  # [B, S, hd]
            return emb.cos().to(dtype), emb.sin().to(dtype)
