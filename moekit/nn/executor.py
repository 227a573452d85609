"""Expert executors: the MoE layer's one forward (:class:`moekit.nn.moe.MoE`) hands its experts to
``layer.executor``, which returns their combined output and sums the batch statistics behind the losses
over the processes of a global batch (:meth:`ExpertExecutor.reduce`). :class:`LocalExperts`, the default,
runs every expert here in the fused kernel; :class:`moekit.distributed.ExpertParallel` runs each row on
the rank that owns its expert and sums the statistics over all ranks.

Shape legend: T tokens, D hidden, N kept assignments sorted by expert.
"""

from __future__ import annotations

import torch

from moekit.nn.dispatch import Dispatch
from moekit.nn.experts import Experts, expert_dropout_mask
from moekit.nn.kernels.fused_experts import moe_experts
from moekit.nn.kernels.schedule import intra_op_threads

# The shared experts as the fused kernel takes them: (w_in [D, X_s], w_out [S, D], gate weight [T] or None).
SharedWeights = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]


class ExpertExecutor:
    """Runs a MoE layer's experts; subclass and set ``layer.executor`` to run them elsewhere.

    This base gathers each kept assignment's row, runs :meth:`run_rows` and adds the weighted outputs onto
    the tokens; expert parallelism overrides :meth:`run_rows` to run the rows on the ranks of their experts.
    """

    fuses_shared = False  # whether __call__ takes the shared experts (else the layer runs and adds them)

    def __call__(
        self,
        x_TD: torch.Tensor,
        plan: Dispatch,
        experts: Experts,
        *,
        dropout: float = 0.0,
        shared: SharedWeights | None = None,
        threads: int = 1,
    ) -> torch.Tensor:
        """y_TD[t] = sum over t's kept assignments n of plan.weight_N[n] * expert_e(n)(x_TD[t]) (+ shared(x_TD[t])),
        in x's dtype or (half precision) wider. ``dropout`` is expert dropout on the hidden activations;
        ``shared`` comes only when ``fuses_shared``; ``threads``: intra-op threads the experts may use."""
        with intra_op_threads(threads):
            out_ND = self.run_rows(experts, x_TD[plan.token_idx_N], plan.counts, dropout)
        out_ND = out_ND * plan.weight_N.unsqueeze(-1).to(out_ND.dtype)  # only combine weights are cast
        return out_ND.new_zeros(x_TD.shape).index_add_(0, plan.token_idx_N, out_ND)

    def run_rows(self, experts: Experts, x_ND: torch.Tensor, counts: tuple[int, ...], dropout: float) -> torch.Tensor:
        """Expert outputs [N, D] of rows sorted by expert (``counts`` rows each): here, by grouped GEMMs."""
        return experts(x_ND, counts, dropout)

    def reduce(self, sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The layer's batch sums (losses, counts) added over the processes of a global batch: here, one."""
        return sums

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` of every process of a global batch, stacked [P, ...] (same shape on each; no autograd): here, one."""
        return x.unsqueeze(0)


class LocalExperts(ExpertExecutor):
    """All experts on this process, in one fused op (gather, GEMMs, combine, shared experts)."""

    fuses_shared = True

    def __call__(
        self,
        x_TD: torch.Tensor,
        plan: Dispatch,
        experts: Experts,
        *,
        dropout: float = 0.0,
        shared: SharedWeights | None = None,
        threads: int = 1,
    ) -> torch.Tensor:
        if not experts.fused_kernel:  # quantised or offloaded experts run through their own forward
            return super().__call__(x_TD, plan, experts, dropout=dropout, threads=threads)
        N, H = plan.token_idx_N.shape[0], experts.expert_hidden_size
        mask_NH = expert_dropout_mask(N, H, dropout, device=x_TD.device) if dropout > 0 else None
        args = (plan.token_idx_N, plan.weight_N, plan.counts, experts.w_in, experts.w_out, experts.activation)
        sw_in, sw_out, sweight_T = shared if shared is not None else (None, None, None)
        return moe_experts(x_TD, *args, sw_in, sw_out, sweight_T, threads=threads, dropout_mask_NH=mask_NH)
