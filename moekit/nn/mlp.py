"""Dense feed-forward blocks: SwiGLU (gate, up, down) and GELU (up, down).

Projection names match Hugging Face (``gate_proj``, ``up_proj``, ``down_proj``) so checkpoint
mapping is a rename. Also the shared experts of an MoE layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moekit.nn.config import Activation


class MLP(nn.Module):
    """x -> down(act(gate(x)) * up(x)) for SwiGLU, x -> down(gelu(up(x))) for GELU."""

    def __init__(self, hidden_size: int, intermediate_size: int, activation: Activation | str = "swiglu"):
        super().__init__()
        self.activation = Activation(activation)
        if self.activation == Activation.SWIGLU:
            self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation == Activation.SWIGLU:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(F.gelu(self.up_proj(x)))
