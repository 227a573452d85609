"""The MoE layer for a handful of tokens at inference (one decoding step), with as few ops as possible.

At decode time an MoE layer sees one token per sequence. The general path (Routing object, dispatch sort,
bincounts, the fused expert op, balancing losses, entropy) is then mostly fixed per-call overhead: on a
CPU each of its ~80 small ops costs more than the k expert GEMVs. Here the router math is done directly
on [T, E] and each chosen expert runs on its token with two GEMVs, in ascending expert order as the
general path sums them.

Same numbers as :meth:`moekit.nn.moe.MoE.forward` (tested against it for softmax and group-limited
sigmoid routers), with two differences in the returned :class:`MoEAux`: the balancing losses are not
computed (``loss`` is 0, ``losses`` empty: nothing can be trained under ``torch.inference_mode``) and
``routing`` is None. :meth:`MoE.forward` takes this path only under inference mode, for at most
:data:`MAX_TOKENS` unmasked tokens, token-choice routing without a capacity limit, no recorded routing
and no expert parallelism.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moekit.nn.config import Activation, RouterType
from moekit.nn.grouped_mm import compute_dtype, intra_op_threads
from moekit.nn.router import routing_dtype, sigmoid_topk_select, softmax_topk_select
from moekit.nn.routing import MoEAux

MAX_TOKENS = 2  # beyond this the general path's batched expert GEMMs win


def applies(layer, x: torch.Tensor, mask, record_routing: bool) -> bool:
    """Whether ``layer.forward(x, mask, record_routing=...)`` may take the few-token path."""
    cfg = layer.config
    return (
        torch.is_inference_mode_enabled()
        and not layer.training
        and not record_routing
        and getattr(layer, "expert_parallel", None) is None
        and cfg.router in (RouterType.SOFTMAX_TOPK, RouterType.SIGMOID_TOPK)
        and cfg.capacity_factor is None
        and x.dim() in (2, 3)
        and x.shape[-1] == cfg.hidden_size
        and x.numel() <= MAX_TOKENS * cfg.hidden_size
        and x.numel() > 0
        and (mask is None or bool(mask.all()))
        and not torch.is_autocast_enabled(x.device.type)
    )


def _choose(layer, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(expert ids [T, k], combine weights [T, k] fp32, normalised scores [T, E]) as the layer's router does."""
    cfg, router = layer.config, layer.router
    dtype = routing_dtype(x_TD.dtype)
    bias = None if router.bias is None else router.bias.to(dtype)
    logits_TE = F.linear(x_TD.to(dtype), router.weight.to(dtype), bias)
    if cfg.router == RouterType.SOFTMAX_TOPK:
        probs_TE = logits_TE.softmax(dim=-1)
        idx_TK, weight_TK = softmax_topk_select(probs_TE, cfg)
        return idx_TK, weight_TK, probs_TE
    # Sigmoid scores, balancing bias for selection only, group-limited top-k (SigmoidTopKRouter).
    scores_TE = logits_TE.sigmoid()
    idx_TK, weight_TK = sigmoid_topk_select(scores_TE, router.e_score_correction_bias, cfg)
    return idx_TK, weight_TK, scores_TE / scores_TE.sum(dim=-1, keepdim=True)


def forward(layer, x: torch.Tensor) -> tuple[torch.Tensor, MoEAux]:
    """``layer(x)`` for x of at most MAX_TOKENS tokens; see the module docstring."""
    # GEMVs are bound by memory, which one thread nearly saturates; one thread also spares every
    # small op an OpenMP fork/join (see moekit.nn.grouped_mm.intra_op_threads).
    with intra_op_threads(1):
        return _forward(layer, x)


def _forward(layer, x: torch.Tensor) -> tuple[torch.Tensor, MoEAux]:
    cfg = layer.config
    x_TD = x.reshape(-1, x.shape[-1])
    T = x_TD.shape[0]
    idx_TK, weight_TK, probs_TE = _choose(layer, x_TD)
    cdt = compute_dtype(x_TD.dtype, x_TD.device)
    acc = torch.float32 if x_TD.dtype in (torch.bfloat16, torch.float16) else x_TD.dtype
    w_in, w_out = layer.experts.w_in, layer.experts.w_out
    swiglu = layer.experts.activation == Activation.SWIGLU
    # A GEMV reads each weight once, so widening a half-precision expert to fp32 (what the batched
    # path does for speed) would cost more than the product: there, run the half-precision GEMV
    # (fp32 accumulation) on the transposed view, ATen's fast layout for it.
    gemv = cdt != x_TD.dtype
    cdt = x_TD.dtype if gemv else cdt
    # One host sync for the choices and weights: python ints/floats then index and scale without more ops.
    chosen, weights = idx_TK.tolist(), weight_TK.to(cdt).tolist()
    x_rows = [x_TD[t : t + 1].to(cdt) for t in range(T)] if T > 1 else [x_TD.to(cdt)]
    y_rows: list[torch.Tensor | None] = [None] * T

    def matmul(row: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return torch.mv(w.t(), row[0])[None] if gemv else torch.mm(row, w)

    # Ascending expert order per token, as the general path's scatter-add sums them.
    for e, t, j in sorted((e, t, j) for t, row in enumerate(chosen) for j, e in enumerate(row)):
        h = matmul(x_rows[t], w_in[e])
        if swiglu:
            gate, up = h.chunk(2, dim=-1)
            a = F.silu(gate).mul_(up)
        else:
            a = F.gelu(h)
        o = matmul(a.mul_(weights[t][j]), w_out[e]).to(acc)
        y_rows[t] = o if y_rows[t] is None else y_rows[t].add_(o)
    y_TD = y_rows[0] if T == 1 else torch.cat(y_rows)
    if layer.shared_experts is not None:
        y_TD = y_TD + layer._shared(x_TD).to(y_TD.dtype)
    zero = torch.zeros((), dtype=torch.long, device=x_TD.device)
    aux = MoEAux(
        loss=torch.zeros(()),
        losses={},
        tokens_per_expert=torch.bincount(idx_TK.view(-1), minlength=cfg.num_experts),
        dropped_assignments=zero,
        dropped_tokens=zero.clone(),
        router_entropy=-(probs_TE * probs_TE.clamp_min(1e-30).log()).sum(dim=-1).mean(),
        routing=None,
    )
    return y_TD.to(x.dtype).view(x.shape), aux
