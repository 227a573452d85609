"""Batch streams of the tasks: seeded, endless, and resumable by counting what they handed out."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from typing import Any

import torch


class Batches:
    """An endless seeded stream of batches that knows how many it has handed out: its resume state."""

    def __init__(self, stream: Iterator[Any]):
        self.stream, self.drawn = stream, 0

    def next(self) -> Any:
        self.drawn += 1
        return next(self.stream)

    def state_dict(self) -> dict[str, Any]:
        return {"drawn": self.drawn}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Fast-forward past the batches the run already trained on (the stream is the same for the same seed)."""
        skip = int(state["drawn"]) - self.drawn
        self.stream, self.drawn = itertools.islice(self.stream, skip, None), self.drawn + skip


def shuffled_rows(n: int, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless batches of row indices into ``n`` examples, reshuffled each epoch (a last partial batch is
    left out; a set smaller than one batch is taken whole each step)."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(n, generator=generator)
        if n < batch_size:
            yield order
            continue
        for cursor in range(0, n - batch_size + 1, batch_size):
            yield order[cursor : cursor + batch_size]


def length_bucketed_rows(
    lengths: Sequence[int], batch_size: int, seed: int, pool_batches: int = 32
) -> Iterator[torch.Tensor]:
    """Like :func:`shuffled_rows`, but each batch holds rows of similar length, so padding stays small.

    Each epoch shuffles the rows, sorts every pool of ``pool_batches`` batches by length, cuts the pools
    into batches and shuffles the batches: the order stays random, the padding per batch is small.
    """
    n = len(lengths)
    if n < batch_size:
        yield from shuffled_rows(n, batch_size, seed)
        return
    length = torch.as_tensor(lengths)
    generator = torch.Generator().manual_seed(seed)
    pool = batch_size * pool_batches
    while True:
        order = torch.randperm(n, generator=generator)[: n - n % batch_size]
        batches = []
        for start in range(0, len(order), pool):
            rows = order[start : start + pool]
            rows = rows[torch.argsort(length[rows], stable=True)]
            batches.extend(rows.split(batch_size))
        for i in torch.randperm(len(batches), generator=generator).tolist():
            yield batches[i]
