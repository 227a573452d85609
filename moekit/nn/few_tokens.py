"""The MoE layer for a handful of tokens at inference (one decoding step), with as few ops as possible.

At decode time an MoE layer sees one token per sequence. The general path (Routing object, dispatch sort,
bincounts, the fused expert op, balancing losses, entropy) is then mostly fixed per-call overhead: on a
CPU each of its ~80 small ops costs more than the k expert GEMVs. Here the router's own ``logits`` and
``choose`` run on [T, E] without building a Routing, and each chosen expert runs on its token with two
GEMVs, in ascending expert order as the general path sums them.

Same numbers as :meth:`moekit.nn.moe.MoE.forward` (tested against it), except that :class:`MoEAux` has
no balancing losses (``loss`` 0, ``losses`` empty: nothing trains under ``torch.inference_mode``) and no
``routing``. :meth:`MoE.forward` takes this path only under inference mode, for at most :data:`MAX_TOKENS`
unmasked tokens, token-choice routing without a capacity limit, no recorded routing and local experts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from moekit.nn.config import RouterType
from moekit.nn.executor import LocalExperts
from moekit.nn.kernels.grouped_mm import accumulate_dtype
from moekit.nn.kernels.schedule import intra_op_threads
from moekit.nn.router import TopKRouter
from moekit.nn.routing import MoEAux

if TYPE_CHECKING:  # moe imports this module
    from moekit.nn.moe import MoE

MAX_TOKENS = 2  # beyond this the general path's batched expert GEMMs win


def applies(layer: MoE, x: torch.Tensor, mask: torch.Tensor | None, record_routing: bool) -> bool:
    """Whether ``layer.forward(x, mask, record_routing=...)`` may take the few-token path."""
    cfg = layer.config
    return (
        torch.is_inference_mode_enabled()
        and not layer.training
        and not record_routing
        and layer.replay is None  # router replay records or forces the choices on the general path
        and type(layer.executor) is LocalExperts  # every expert is here
        and cfg.router in (RouterType.SOFTMAX_TOPK, RouterType.SIGMOID_TOPK)
        and cfg.capacity_factor is None
        and x.dim() in (2, 3)
        and x.shape[-1] == layer.hidden_size
        and 0 < x.numel() <= MAX_TOKENS * layer.hidden_size
        and (mask is None or bool(mask.all()))
        and not torch.is_autocast_enabled(x.device.type)
    )


def forward(layer: MoE, x: torch.Tensor) -> tuple[torch.Tensor, MoEAux]:
    """``layer(x)`` for x of at most MAX_TOKENS tokens; see the module docstring."""
    # The small ops (routing, the sums) run on one thread, sparing each an OpenMP fork/join (see
    # moekit.nn.kernels.schedule.intra_op_threads); the expert GEMVs, bound by memory bandwidth, which one
    # core does not saturate (measured: bf16 10 GB/s on one thread, 16-18 on two), take them all.
    threads = torch.get_num_threads()
    with intra_op_threads(1):
        cfg = layer.config
        x_TD = x.reshape(-1, x.shape[-1])
        T = x_TD.shape[0]
        router = layer.router
        assert isinstance(router, TopKRouter), "applies() admits top-k routers only"
        logits_TE = router.logits(x_TD)
        idx_TK, weight_TK, probs_TE = router.choose(logits_TE)
        # One host sync for the choices and weights: python ints/floats then index and scale without more ops.
        chosen, weights = idx_TK.tolist(), weight_TK.to(x_TD.dtype).tolist()  # rounded as the general path's
        x_rows = [x_TD[t : t + 1] for t in range(T)] if T > 1 else [x_TD]
        # The sums are kept in fp32 for half precision; weight-and-add is one op (add_ with alpha).
        y_TD = torch.zeros(T, x_TD.shape[1], dtype=accumulate_dtype(x_TD.dtype), device=x_TD.device)
        with intra_op_threads(threads):
            for t, row in enumerate(chosen):
                run_token(layer, x_rows[t], row, weights[t], y_TD[t])
        if layer.shared_experts is not None:
            y_TD = y_TD + layer.shared_output(x_TD).to(y_TD.dtype)
        zero = torch.zeros((), dtype=torch.long, device=x_TD.device)
        aux = MoEAux(
            loss=torch.zeros(()),
            losses={},
            tokens_per_expert=torch.bincount(idx_TK.view(-1), minlength=cfg.num_experts),
            dropped_assignments=zero,
            dropped_tokens=zero.clone(),
            router_entropy=-(probs_TE * probs_TE.clamp_min(1e-30).log()).sum(dim=-1).mean(),
            routing=None,
            gate_logits=logits_TE,
        )
        return y_TD.to(x.dtype).view(x.shape), aux


def run_token(layer: MoE, x_1D: torch.Tensor, chosen: list[int], weights: list[float], y_1D: torch.Tensor) -> None:
    """y_1D += one token's routed experts' weighted outputs (not the shared experts'), summed in ascending
    expert order as the general path's scatter-add sums them."""
    order = sorted(range(len(chosen)), key=chosen.__getitem__)
    layer.experts.run_chosen(x_1D, [chosen[j] for j in order], [weights[j] for j in order], y_1D)
