"""Data-parallel gradient reduction and the global gradient norm.

Why the gradients come out equal to one process on the global batch
---------------------------------------------------------------------
The global batch of B sequences is cut into W equal slices, one per rank. One process minimises

    L = CE(global batch) + aux(global batch) = (1/W) * sum_r CE_r + aux_global

where CE_r is the mean cross-entropy over rank r's slice. Rank r backpropagates its own
``loss_r = CE_r + aux_global`` (what the trainer computes), and then:

* non-expert parameters (replicated on every rank): grad = (1/W) * sum over all W ranks.
  The CE part is then exactly dL/dθ. The aux part: every rank's aux_global reads the statistics
  through a differentiable all-reduce whose backward sums over the world, so each rank's router
  already holds sum_r d(aux_r)/dθ_local = W * d(aux_global)/dθ_local; averaging over ranks gives
  d(aux_global)/dθ.
* expert parameters (rank (i, j) holds E/P experts, replicated over the dp group i = 0..W/P-1):
  all-to-all's backward already brought back the gradient from every rank of the ep group, so
  grad = (1/W) * sum over the dp group.

In both cases: sum over the ranks that hold a copy, divide by W. With gradient accumulation the
trainer divides each micro-batch loss by grad_accum as on one process, and the reduction runs once
per optimizer step. This is DDP's averaging done by hand, so that the expert parameters (not
replicated everywhere) can use their own group; one flat buffer per group keeps it to two
all-reduces per step.

The gradient norm for clipping is that of the full model: the non-expert part (identical on every
rank after the reduction) plus the expert part summed over the ep group.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from moekit.distributed.collectives import all_reduce_
from moekit.distributed.mesh import DistContext


def _reduce_flat(grads: list[torch.Tensor], group, scale: float) -> None:
    """All-reduce (sum) then scale, one flat buffer per dtype."""
    for dtype in sorted({g.dtype for g in grads}, key=str):
        same = [g for g in grads if g.dtype == dtype]
        flat = torch.cat([g.reshape(-1) for g in same])
        all_reduce_(flat, group=group)
        flat.mul_(scale)
        offset = 0
        for g in same:
            n = g.numel()
            g.copy_(flat[offset : offset + n].view_as(g))
            offset += n


def reduce_gradients(params: Iterable[nn.Parameter], expert_params: Iterable[nn.Parameter], ctx: DistContext) -> None:
    """Sum each gradient of ``params`` (the same list, in the same order, on every rank) over the ranks that hold
    its parameter and divide by the world size; ``expert_params`` are the sharded expert weights among them."""
    expert_ids = {id(p) for p in expert_params}
    params = [p for p in params if p.grad is not None]
    dense = [p.grad for p in params if id(p) not in expert_ids]
    experts = [p.grad for p in params if id(p) in expert_ids]
    scale = 1.0 / ctx.world_size
    _reduce_flat(dense, None, scale)
    if ctx.dp_size > 1:
        _reduce_flat(experts, ctx.dp_group, scale)
    else:
        for g in experts:
            g.mul_(scale)


def global_grad_norm(params: Iterable[nn.Parameter], expert_params: Iterable[nn.Parameter], ctx: DistContext):
    """L2 norm of the whole model's gradient (after :func:`reduce_gradients`), as a 0-dim fp32 tensor."""
    expert_ids = {id(p) for p in expert_params}
    dense_sq = torch.zeros((), dtype=torch.float64, device=ctx.device)
    expert_sq = torch.zeros((), dtype=torch.float64, device=ctx.device)
    for p in params:
        if p.grad is None:
            continue
        sq = p.grad.detach().double().pow(2).sum()
        if id(p) in expert_ids:
            expert_sq += sq
        else:
            dense_sq += sq
    if ctx.ep_size > 1:
        all_reduce_(expert_sq.view(1), group=ctx.ep_group)
    return (dense_sq + expert_sq).sqrt().float()


def clip_grad_norm_(
    params: Iterable[nn.Parameter], max_norm: float, expert_params: Iterable[nn.Parameter], ctx: DistContext
) -> torch.Tensor:
    """Reduce the gradients over their groups, then clip them to the global norm ``max_norm`` by
    ``torch.nn.utils.clip_grad_norm_``'s rule (scale by min(1, max_norm / (norm + 1e-6))); returns the norm before."""
    params = [p for p in params if p.grad is not None]
    expert_params = list(expert_params)
    reduce_gradients(params, expert_params, ctx)
    total = global_grad_norm(params, expert_params, ctx)
    if math.isfinite(max_norm):
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for p in params:
            p.grad.detach().mul_(coef.to(p.grad.dtype))
    return total
