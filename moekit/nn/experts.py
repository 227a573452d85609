"""Stacked expert weights.

Shape legend: N rows sorted by expert, D hidden, H expert hidden, X = 2H (SwiGLU) or H (GELU).
``w_in`` is [E, D, 2H] for SwiGLU (gate columns first, then up, as in HF's fused ``gate_up_proj``) or
[E, D, H] for GELU; ``w_out`` is [E, H, D]. ``Experts(x_ND, counts)`` runs rows already gathered and
sorted by expert (two grouped GEMMs); the MoE layer's fused path is
:func:`moekit.nn.kernels.fused_experts.moe_experts`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moekit.nn.config import Activation
from moekit.nn.kernels import native
from moekit.nn.kernels.fused_experts import activate
from moekit.nn.kernels.grouped_mm import cast, grouped_mm, matmul


def expert_dropout_mask(
    num_rows: int, width: int, p: float, dtype: torch.dtype = torch.float32, device: torch.device | None = None
) -> torch.Tensor:
    """[num_rows, width] of 0 (probability p) or 1 / (1 - p): inverted dropout, as ``F.dropout``."""
    keep = torch.empty(num_rows, width, dtype=dtype, device=device).bernoulli_(1 - p)
    return keep.div_(1 - p)


def expert_row(w_in: torch.Tensor, w_out: torch.Tensor, activation: Activation, x_1D: torch.Tensor) -> torch.Tensor:
    """One expert (w_in [D, X], w_out [H, D]) on one token row [1, D], in the weights' dtype: two GEMVs."""
    return matmul(activate(matmul(cast(x_1D, w_in.dtype), w_in), activation), w_out)


class Experts(nn.Module):
    """E expert MLPs as two stacked tensors, run over expert-sorted contiguous row slices.

    Other storages (quantised, offloaded) subclass it, override :meth:`forward` and :meth:`run_one` and set
    ``fused_kernel = False``: the MoE layer then runs them through these two methods instead of the fused
    training kernel, which reads ``w_in``/``w_out`` directly.
    """

    fused_kernel = True  # whether moekit.nn.kernels.fused_experts may read w_in / w_out as dense stacks

    def __init__(
        self, num_experts: int, hidden_size: int, expert_hidden_size: int, activation: Activation | str = "swiglu"
    ):
        super().__init__()
        self.activation = Activation(activation)
        self.num_experts, self.hidden_size, self.expert_hidden_size = num_experts, hidden_size, expert_hidden_size
        width = 2 * expert_hidden_size if self.activation == Activation.SWIGLU else expert_hidden_size
        self.w_in = nn.Parameter(torch.empty(num_experts, hidden_size, width))
        self.w_out = nn.Parameter(torch.empty(num_experts, expert_hidden_size, hidden_size))
        if not self.w_in.is_meta:  # on the meta device (built to be given loaded tensors) there is nothing to draw
            nn.init.normal_(self.w_in, std=hidden_size**-0.5)
            nn.init.normal_(self.w_out, std=expert_hidden_size**-0.5)

    def forward(self, x_ND: torch.Tensor, counts: tuple[int, ...], dropout: float = 0.0) -> torch.Tensor:
        """Run expert e on rows [sum(counts[:e]), sum(counts[:e+1])) of x_ND (``dropout``: on the hidden
        activations, as :func:`moe_experts`' mask)."""
        if torch.is_autocast_enabled(x_ND.device.type):
            x_ND = x_ND.to(torch.get_autocast_dtype(x_ND.device.type))
        h_NX = grouped_mm(x_ND, self.w_in, counts)
        a_NH = activate(h_NX, self.activation)
        if dropout > 0:
            a_NH = F.dropout(a_NH, dropout)
        return grouped_mm(a_NH, self.w_out, counts)

    def inactive_parameters(self, runs: int) -> int:
        """Weights of the experts a token does not run when it runs ``runs`` of them (active-parameter counts)."""
        size = self.w_in.numel() + self.w_out.numel()
        return size - size * runs // self.num_experts

    def run_one(self, e: int, x_1D: torch.Tensor) -> torch.Tensor:
        """expert_e(x_1D) for one token row [1, D] at inference, in the weights' dtype: two GEMVs
        (:func:`~moekit.nn.kernels.grouped_mm.matmul`), bound by reading the weights. Decoding calls this
        k times per layer and token, so it is kept to the fewest ops (per-expert weight views made once)."""
        w_in, w_out = self._expert_views()[e]
        return expert_row(w_in, w_out, self.activation, x_1D)

    def run_chosen(self, x_1D: torch.Tensor, experts: list[int], weights: list[float], y_1D: torch.Tensor) -> None:
        """y_1D (fp32 for half weights) += sum_k weights[k] * expert_{experts[k]}(x_1D), in the given order: one
        decoding token's experts. bf16 SwiGLU experts stored [out, in] (as imported) take the native kernel, one
        call for all k; otherwise :meth:`run_one` per expert (which subclasses override)."""
        if (
            type(self).run_one is Experts.run_one
            and self.activation == Activation.SWIGLU
            and native.swiglu_experts_bf16(
                x_1D.reshape(-1), self.w_in.transpose(1, 2), self.w_out.transpose(1, 2), experts, weights, y_1D
            )
        ):
            return
        for e, w in zip(experts, weights):
            y_1D.add_(self.run_one(e, x_1D).view(y_1D.shape), alpha=w)

    def _expert_views(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """[(w_in[e], w_out[e])], remade when either stack is replaced (not when written in place: views)."""
        key = (self.w_in.data_ptr(), self.w_out.data_ptr(), self.w_in.shape, self.w_out.shape)
        if getattr(self, "_views_key", None) != key:
            self._views = [(self.w_in[e], self.w_out[e]) for e in range(self.num_experts)]
            self._views_key = key
        return self._views

    def expert_forward(self, e: int, x_nD: torch.Tensor) -> torch.Tensor:
        """One expert on its rows, with plain autograd (used by the reference and analysis)."""
        h = x_nD @ self.w_in[e].to(x_nD.dtype)
        return activate(h, self.activation) @ self.w_out[e].to(x_nD.dtype)
