"""Expert parallelism for the MoE layer: each rank of an ep group of P holds E / P experts.

:class:`ExpertParallel` is the layer's expert executor (:mod:`moekit.nn.executor`) on rank
(dp_rank, ep_rank); the layer's own forward routes and dispatches this rank's slice of the global batch
as on one process, then hands the experts to it:

    rows sorted by expert ─► exchange counts  (all_to_all of [P, E/P] ints: who sends how many rows where)
                         ─► all_to_all rows  (uneven splits; rows for experts j*E/P..(j+1)*E/P go to rank j)
                         ─► regroup by local expert, grouped GEMMs, back to source order
                         ─► all_to_all back  (the same splits swapped) ─► combine onto the tokens

The layer's balancing sums pass through :meth:`ExpertParallel.reduce`, one all-reduce over the whole
world per layer, so the Switch loss (f_e and P_e), the sequence-level loss, the z-loss, the entropy,
``tokens_per_expert``, the dropped counts and the router's ``load_since_update`` (aux-loss-free bias) are
those of the global batch, exactly as one process computes them.

Exactness needs the routing decision of a token to depend on that token only: true for dropless
token-choice routers (softmax/sigmoid top-k, hash, dense). With ``capacity_factor`` the capacity is
applied per rank (GShard's local groups) and expert-choice routing picks among a rank's tokens; both
run but differ from one process, and a warning says so.

Shape legend: T local tokens, D hidden, E experts, El = E / P local experts, N kept assignments,
R rows received, P ep group size.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from moekit.distributed.collectives import all_reduce_, all_reduce_sum, all_to_all, exchange_counts
from moekit.distributed.mesh import DistContext
from moekit.errors import ConfigError
from moekit.nn.config import RouterType
from moekit.nn.executor import ExpertExecutor
from moekit.nn.moe import MoE

log = logging.getLogger(__name__)


class ExpertParallel(ExpertExecutor):
    """The expert executor (``moe.executor``) of a MoE layer of ``num_experts`` experts in all, sharded over the
    mesh ``ctx`` by :func:`shard_model`."""

    def __init__(self, ctx: DistContext, num_experts: int):
        if num_experts % ctx.ep_size:
            raise ConfigError(
                f"num_experts={num_experts} is not divisible by the expert-parallel degree ep={ctx.ep_size}"
            )
        self.ctx = ctx
        self.num_experts = num_experts
        self.local_experts = num_experts // ctx.ep_size
        self.first_expert = ctx.ep_rank * self.local_experts

    def __deepcopy__(self, memo):  # process groups are not copyable; a copied model shares the mesh
        return self

    def __repr__(self) -> str:
        c = self.ctx
        return (
            f"ExpertParallel(experts {self.first_expert}..{self.first_expert + self.local_experts - 1} of "
            f"{self.num_experts}, ep {c.ep_rank}/{c.ep_size}, dp {c.dp_rank}/{c.dp_size})"
        )

    def run_rows(self, experts: nn.Module, x_ND: torch.Tensor, counts: tuple[int, ...], dropout: float = 0.0):
        """Expert outputs for rows sorted by (global) expert, computed by the ranks that own the experts."""
        P, El = self.ctx.ep_size, self.local_experts
        if P == 1:
            return experts(x_ND, counts, dropout)
        group = self.ctx.ep_group
        send_PE = torch.tensor(counts, dtype=torch.long, device=x_ND.device).view(P, El)
        recv_PE = exchange_counts(send_PE, group).cpu()  # row i: rows rank i sends to each of my experts
        send_splits = send_PE.sum(1).tolist()
        recv_splits = recv_PE.sum(1).tolist()
        x_RD = all_to_all(x_ND, recv_splits, send_splits, group)  # grouped by source rank, then expert
        # Regroup source-major rows expert-major (a stable sort keeps the sources in order) so each local
        # expert's rows are contiguous; then back.
        expert_R = torch.arange(El).repeat(P).repeat_interleave(recv_PE.view(-1))
        order_R = torch.sort(expert_R, stable=True).indices.to(x_RD.device)
        y_RD = experts(x_RD.index_select(0, order_R), tuple(recv_PE.sum(0).tolist()), dropout)
        y_RD = y_RD.index_select(0, torch.argsort(order_R))  # source-major again
        return all_to_all(y_RD, send_splits, recv_splits, group)

    def reduce(self, sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The sums of the global batch: one all-reduce over the world, in fp64, with autograd (a rank's router
        gets the gradient of the global loss; see :mod:`moekit.distributed.collectives`)."""
        names = list(sums)
        total = all_reduce_sum(torch.cat([sums[k].to(torch.float64).reshape(-1) for k in names]))
        out = {}
        for k, piece in zip(names, total.split([sums[k].numel() for k in names])):
            t, piece = sums[k], piece.view(sums[k].shape)
            out[k] = piece.to(t.dtype) if t.is_floating_point() else piece.detach().round().to(t.dtype)
        return out

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` of every rank, stacked [world, ...]: each rank fills its slot of zeros, then one all-reduce."""
        out = x.new_zeros((self.ctx.world_size, *x.shape))
        out[self.ctx.rank] = x.detach()
        return all_reduce_(out)


def shard_model(model: nn.Module, ctx: DistContext) -> nn.Module:
    """Keep this rank's E / P experts of every MoE layer and route tokens to the others by all-to-all.

    The model must be identical on every rank when this is called (same seed or same checkpoint).
    Expert weights ``experts.w_in`` / ``w_out`` become [E / P, ...] slices (experts ep_rank * E/P ...);
    everything else stays replicated. Works for any module with :class:`MoE` layers; a layer whose E P does not
    divide is a ConfigError.
    """
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, MoE)]
    for name, moe in layers:
        c = moe.config
        if c.num_experts % ctx.ep_size:
            raise ConfigError(
                f"{name}: num_experts={c.num_experts} is not divisible by the expert-parallel degree ep={ctx.ep_size}"
            )
        if ctx.world_size > 1 and (c.capacity_factor is not None or c.router == RouterType.EXPERT_CHOICE):
            log.warning(
                "%s routing is decided per rank under data/expert parallelism, so results differ from one "
                "process (use dropless token-choice routing for exact equivalence)",
                "capacity_factor" if c.capacity_factor is not None else "expert-choice",
            )
    for _, moe in layers:
        ep = ExpertParallel(ctx, moe.config.num_experts)
        if ctx.ep_size > 1:
            experts = moe.experts
            lo, hi = ep.first_expert, ep.first_expert + ep.local_experts
            with torch.no_grad():
                experts.w_in = nn.Parameter(experts.w_in.detach()[lo:hi].clone())
                experts.w_out = nn.Parameter(experts.w_out.detach()[lo:hi].clone())
            experts.num_experts = ep.local_experts
        moe.executor = ep
    return model


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The sharded expert weights of a sharded model (their gradients are summed over the dp group)."""
    moes = [m for m in model.modules() if isinstance(m, MoE) and isinstance(m.executor, ExpertParallel)]
    return [w for moe in moes for w in (moe.experts.w_in, moe.experts.w_out)]
