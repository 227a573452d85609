"""Expert parallelism for the MoE layer: each rank of an ep group of P holds E / P experts.

Forward of one MoE layer on rank (dp_rank, ep_rank), on its own slice of the global batch:

    x_TD ─► router ─► dispatch (assignments sorted by expert, counts per expert, as on one process)
         ─► exchange counts  (all_to_all of [P, E/P] ints: who sends how many rows to which expert)
         ─► all_to_all rows  (uneven splits; rows for experts j*E/P..(j+1)*E/P go to ep rank j)
         ─► regroup by local expert, grouped GEMMs, back to source order
         ─► all_to_all back  (the same splits swapped): out_ND in the original sorted order
         ─► combine (weights applied here, index_add onto the tokens) + shared experts (replicated)

The balancing statistics are summed over the whole world in one all-reduce per layer, so the Switch
loss (f_e and P_e), the sequence-level loss, the z-loss, the entropy, ``tokens_per_expert`` and the
dropped counts are those of the global batch, exactly as one process computes them. The router's
``load_since_update`` (aux-loss-free bias) is corrected to the global load in the same step.

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

from moekit.distributed.collectives import all_reduce_sum, all_to_all, exchange_counts
from moekit.distributed.mesh import DistContext
from moekit.errors import ConfigError
from moekit.nn.config import RouterType
from moekit.nn.dispatch import dispatch
from moekit.nn.losses import router_entropy, router_z_loss, sequence_aux_loss
from moekit.nn.moe import _BALANCED_BY_LOSS, MoE
from moekit.nn.routing import MoEAux, Routing

log = logging.getLogger(__name__)


class ExpertParallel:
    """Set as ``moe.expert_parallel``; the MoE layer's forward then calls :meth:`forward`.

    Args:
        ctx: the mesh.
        num_experts: E of the layer (all experts, not just this rank's).
    """

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

    # -- experts ----------------------------------------------------------------------------------------
    def run_experts(
        self, experts: nn.Module, x_ND: torch.Tensor, counts: tuple[int, ...], dropout: float = 0.0
    ) -> torch.Tensor:
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
        # Regroup source-major rows expert-major so each local expert's rows are contiguous.
        starts_PE = (recv_PE.view(-1).cumsum(0) - recv_PE.view(-1)).view(P, El).tolist()
        recv = recv_PE.tolist()
        pieces = [torch.arange(starts_PE[i][e], starts_PE[i][e] + recv[i][e]) for e in range(El) for i in range(P)]
        order_R = torch.cat(pieces).to(x_RD.device) if pieces else torch.zeros(0, dtype=torch.long)
        local_counts = tuple(int(n) for n in recv_PE.sum(0).tolist())
        y_RD = experts(x_RD.index_select(0, order_R), local_counts, dropout)
        back_R = torch.empty_like(order_R)
        back_R[order_R] = torch.arange(order_R.numel(), device=order_R.device)
        y_RD = y_RD.index_select(0, back_R)  # source-major again
        return all_to_all(y_RD, send_splits, recv_splits, group)

    # -- the layer's forward ----------------------------------------------------------------------------
    def forward(self, layer: MoE, x: torch.Tensor, mask=None, token_ids=None, record_routing: bool = False):
        """What ``layer(x, mask, token_ids, record_routing)`` returns on one process, for this rank's tokens."""
        cfg = layer.config
        x_TD, valid_T, ids_T, seq_len = layer._flatten_inputs(x, mask, token_ids)
        routing = layer.route(x_TD, valid_T, ids_T)
        plan = dispatch(routing, cfg.num_experts, cfg.capacity_factor, cfg.drop_policy)

        dropout = cfg.expert_dropout if layer.training else 0.0
        out_ND = self.run_experts(layer.experts, x_TD[plan.token_idx_N], plan.counts, dropout)
        out_ND = out_ND * plan.weight_N.unsqueeze(-1).to(out_ND.dtype)  # only combine weights are cast
        y_TD = out_ND.new_zeros(x_TD.shape).index_add_(0, plan.token_idx_N, out_ND)
        if layer.shared_experts is not None:
            y_TD = y_TD + layer._shared(x_TD).to(y_TD.dtype)
        y_TD = y_TD.to(x.dtype)

        stats = self.global_stats(layer, routing, plan, seq_len)
        losses = stats.pop("losses")
        total = sum((coef * losses[name] for name, coef in layer._loss_coefs() if name in losses), torch.zeros(()))
        aux = MoEAux(
            loss=total,
            losses=losses,
            tokens_per_expert=stats["tokens_per_expert"],
            dropped_assignments=stats["dropped_assignments"],
            dropped_tokens=stats["dropped_tokens"],
            router_entropy=stats["router_entropy"],
            routing=routing if record_routing else None,
        )
        return y_TD.view(x.shape), aux

    def global_stats(self, layer: MoE, routing: Routing, plan, seq_len: int) -> dict:
        """Losses and statistics of the global batch: local sums, one all-reduce over the world, then ratios.

        Each loss is a ratio of sums over tokens (or sequences); the sums are reduced with autograd, so a
        rank's router gets the gradient of the global loss (see :mod:`moekit.distributed.collectives`).
        """
        c = layer.config
        E = c.num_experts
        dev = routing.expert_idx_A.device
        f64 = torch.float64
        has_probs = routing.logits_TE is not None
        want_aux = has_probs and c.router in _BALANCED_BY_LOSS and c.aux_loss_coef > 0
        want_seq = has_probs and c.router in _BALANCED_BY_LOSS and c.seq_aux_loss_coef > 0
        want_z = has_probs and c.z_loss_coef > 0

        n_valid = float(routing.num_valid_tokens())
        routed_E = torch.bincount(routing.expert_idx_A, minlength=E).to(f64)
        kept_E = plan.tokens_per_expert_E.to(device=dev, dtype=f64)
        zero = torch.zeros(1, dtype=f64, device=dev)
        if want_aux:
            probs = routing.probs_TE if routing.valid_T is None else routing.probs_TE[routing.valid_T]
            probs_sum_E = probs.sum(dim=0).to(f64)
        else:
            probs_sum_E = torch.zeros(E, dtype=f64, device=dev)
        if want_seq:
            B = routing.num_tokens // seq_len
            if routing.valid_T is None:
                n_seq = float(B)
            else:
                n_seq = float(routing.valid_T.view(B, seq_len).any(dim=1).sum())
            seq_sum = (sequence_aux_loss(routing, E, seq_len) * n_seq).to(f64).view(1)
        else:
            n_seq, seq_sum = 0.0, zero
        z_sum = (router_z_loss(routing) * n_valid).to(f64).view(1) if want_z else zero
        entropy_sum = (router_entropy(routing).to(dev, f64) * n_valid).view(1)
        scalars = torch.tensor(
            [n_valid, n_seq, float(plan.dropped_assignments), float(plan.dropped_tokens)], dtype=f64, device=dev
        )
        local = torch.cat([probs_sum_E, routed_E, kept_E, seq_sum, z_sum, entropy_sum, scalars])
        total = all_reduce_sum(local)  # over the whole world: the global batch
        g_probs_E, g_routed_E, g_kept_E = total[:E], total[E : 2 * E], total[2 * E : 3 * E]
        g_seq_sum, g_z_sum, g_entropy_sum, g_n_valid, g_n_seq, g_dropped_a, g_dropped_t = total[3 * E :].unbind()

        dtype = routing.probs_TE.dtype if has_probs else torch.float32
        n = g_n_valid.clamp(min=1)
        losses: dict[str, torch.Tensor] = {}
        if want_aux:
            # Switch / GShard: E * sum_e f_e * P_e over the global batch (moekit.nn.losses.switch_aux_loss).
            losses["aux"] = (E * ((g_routed_E / n) * (g_probs_E / n)).sum()).to(dtype)
        if want_seq:
            losses["seq_aux"] = (g_seq_sum / g_n_seq.clamp(min=1)).to(dtype)
        if want_z:
            losses["z"] = (g_z_sum / n).to(dtype)
        router = layer.router
        if router.training and hasattr(router, "load_since_update"):
            # The router added this rank's load; make it the global load the bias update must see.
            with torch.no_grad():
                router.load_since_update += (g_routed_E - routed_E).to(router.load_since_update.dtype)
        return {
            "losses": losses,
            "tokens_per_expert": g_kept_E.detach().round().long(),
            "dropped_assignments": g_dropped_a.detach().round().long(),
            "dropped_tokens": g_dropped_t.detach().round().long(),
            "router_entropy": (g_entropy_sum.detach() / n).to(torch.float32) if has_probs else torch.zeros(()),
        }


def shard_model(model: nn.Module, ctx: DistContext) -> nn.Module:
    """Keep this rank's E / P experts of every MoE layer and route tokens to the others by all-to-all.

    The model must be identical on every rank when this is called (same seed or same checkpoint).
    Expert weights ``experts.w_in`` / ``w_out`` become [E / P, ...] slices (experts ep_rank * E/P ...);
    everything else stays replicated. Works for any module with MoE layers (``moe_layers()`` of a
    :class:`moekit.models.MoELM`, else every :class:`MoE` submodule).

    Raises:
        ConfigError: a layer's E is not divisible by P.
    """
    layers = [m for m in model.modules() if isinstance(m, MoE)]
    for moe in layers:
        c = moe.config
        if c.num_experts % ctx.ep_size:
            name = next(n for n, m in model.named_modules() if m is moe)
            raise ConfigError(
                f"{name}: num_experts={c.num_experts} is not divisible by the expert-parallel degree ep={ctx.ep_size}"
            )
        if ctx.world_size > 1 and (c.capacity_factor is not None or c.router == RouterType.EXPERT_CHOICE):
            log.warning(
                "%s routing is decided per rank under data/expert parallelism, so results differ from one "
                "process (use dropless token-choice routing for exact equivalence)",
                "capacity_factor" if c.capacity_factor is not None else "expert-choice",
            )
    for moe in layers:
        ep = ExpertParallel(ctx, moe.config.num_experts)
        if ctx.ep_size > 1:
            experts = moe.experts
            lo, hi = ep.first_expert, ep.first_expert + ep.local_experts
            with torch.no_grad():
                experts.w_in = nn.Parameter(experts.w_in.detach()[lo:hi].clone())
                experts.w_out = nn.Parameter(experts.w_out.detach()[lo:hi].clone())
            experts.num_experts = ep.local_experts
        moe.expert_parallel = ep
    return model


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The sharded expert weights of a sharded model (their gradients are summed over the dp group)."""
    out = []
    for moe in model.modules():
        if isinstance(moe, MoE) and getattr(moe, "expert_parallel", None) is not None:
            out += [moe.experts.w_in, moe.experts.w_out]
    return out


def expert_tensor_names(model: nn.Module) -> list[str]:
    """State-dict names of the sharded expert tensors (split along dim 0 in an EP checkpoint)."""
    ids = {id(p) for p in expert_parameters(model)}
    return [name for name, p in model.named_parameters() if id(p) in ids]
