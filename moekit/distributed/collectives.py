"""The collectives moekit uses, on ``torch.distributed`` (gloo on CPU, NCCL on CUDA).

Every call goes through :func:`collective`, which turns a failure of the transport (a peer that died,
a timeout) into :class:`PeerFailure`, so the training loop can tell "a peer is gone" from "this rank
raised" and name the rank that failed (see :mod:`moekit.distributed.mesh`).

Two of them are autograd functions:

* :func:`all_to_all` moves rows between the ranks of a group with uneven split sizes (zero allowed in
  either direction); its backward is the same exchange with the splits swapped.
* :func:`all_reduce_sum` sums a tensor over a group; its backward sums the incoming gradients over the
  group too. Every rank uses the reduced value in its own loss, so rank r's input receives the sum of
  all ranks' gradients; the trainer divides every gradient by the world size W (see
  :mod:`moekit.distributed.gradients`), which makes the result the single-process gradient.

``STATS`` counts the bytes each rank sends to *other* ranks through all-to-all (forward and backward),
for the benchmark's traffic figure.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from moekit.errors import MoekitError


class DistributedError(MoekitError, RuntimeError):
    """A distributed run failed; the message names the rank and step where it started."""


class PeerFailure(DistributedError):
    """A collective failed: a peer rank died, raised, or did not arrive within the timeout."""


# Bytes this process sent to other ranks through all_to_all, and how many exchanges it made.
STATS: collections.Counter = collections.Counter()


def collective(name: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run one torch.distributed call; a transport failure becomes :class:`PeerFailure`."""
    try:
        return fn(*args, **kwargs)
    except RuntimeError as e:  # DistBackendError, gloo's "Connection closed by peer", timeouts
        raise PeerFailure(f"{name} failed: {e}") from e


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        return _exchange(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        return _exchange(grad_out, ctx.in_splits, ctx.out_splits, ctx.group), None, None, None


def _exchange(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    x = x.contiguous()
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    me = dist.get_rank(group)
    row_bytes = x[0:1].numel() * x.element_size() if x.dim() > 1 else x.element_size()
    STATS["all_to_all_bytes"] += row_bytes * (sum(in_splits) - in_splits[me])
    STATS["all_to_all_calls"] += 1
    collective("all_to_all", dist.all_to_all_single, out, x, list(out_splits), list(in_splits), group=group)
    return out


def all_to_all(x: torch.Tensor, out_splits: Sequence[int], in_splits: Sequence[int], group) -> torch.Tensor:
    """Differentiable ``all_to_all_single`` along dim 0: ``x`` holds ``in_splits[j]`` rows for rank j of ``group``;
    returns ``sum(out_splits)`` rows, ``out_splits[j]`` from rank j (exchange the counts first)."""
    return _AllToAll.apply(x, [int(n) for n in out_splits], [int(n) for n in in_splits], group)


def exchange_counts(counts: torch.Tensor, group) -> torch.Tensor:
    """All-to-all of an equal-size int tensor [P, ...]: row j goes to rank j; returns row i from rank i."""
    out = torch.empty_like(counts)
    collective("all_to_all (counts)", dist.all_to_all_single, out, counts.contiguous(), group=group)
    return out


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        out = x.clone()
        collective("all_reduce", dist.all_reduce, out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad = grad_out.contiguous().clone()
        collective("all_reduce (backward)", dist.all_reduce, grad, group=ctx.group)
        return grad, None


def all_reduce_sum(x: torch.Tensor, group=None) -> torch.Tensor:
    """Differentiable sum over ``group`` (backward: the gradients are summed over the group too)."""
    if not x.requires_grad:
        out = x.clone()
        collective("all_reduce", dist.all_reduce, out, group=group)
        return out
    return _AllReduceSum.apply(x, group)


def all_reduce_(x: torch.Tensor, group=None) -> torch.Tensor:
    """In-place sum over ``group`` (no autograd)."""
    collective("all_reduce", dist.all_reduce, x, group=group)
    return x


def barrier(group=None) -> None:
    collective("barrier", dist.barrier, group=group)


def all_gather_bytes(payload: bytes, group=None, device: torch.device | str = "cpu") -> list[bytes]:
    """Every rank's ``payload`` (no pickle: lengths first, then padded uint8 tensors)."""
    world = dist.get_world_size(group)
    length = torch.tensor([len(payload)], dtype=torch.long, device=device)
    lengths = [torch.zeros_like(length) for _ in range(world)]
    collective("all_gather", dist.all_gather, lengths, length, group=group)
    size = max(int(n) for n in lengths)
    buf = torch.zeros(size, dtype=torch.uint8, device=device)
    if payload:
        buf[: len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(device)
    bufs = [torch.zeros_like(buf) for _ in range(world)]
    collective("all_gather", dist.all_gather, bufs, buf, group=group)
    return [bytes(b[: int(n)].cpu().tolist()) for b, n in zip(bufs, lengths)]
