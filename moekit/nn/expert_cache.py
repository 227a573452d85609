"""The expert cache of :mod:`moekit.nn.offload`: where each expert's matrices are in their files (:class:`Span`),
and at most ``capacity`` bytes of them held, keyed by (layer, expert), read with ``os.preadv`` on a miss (see
that module's docstring), evicted by recency or frequency, optionally prefetched on a background thread."""

from __future__ import annotations

import collections
import dataclasses
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from moekit.errors import CheckpointError, ConfigError
from moekit.io.mapped import mapped_source


@dataclasses.dataclass(frozen=True)
class Span:
    """Where one expert matrix's bytes are: ``pieces`` ((path, offset, nbytes), ...) read one after another fill
    one buffer, laid out as ``shape`` and ``stride``."""

    pieces: tuple[tuple[str, int, int], ...]
    dtype: torch.dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        """Bytes of the matrix."""
        return sum(piece[2] for piece in self.pieces)

    @staticmethod
    def of(view: torch.Tensor, what: str) -> Span:
        """The span of ``view``, a 2-d view of a mapped file that is contiguous or transposed-contiguous."""
        source = mapped_source(view)
        if source is None:
            raise CheckpointError(
                f"expert offload reads experts from their file, but {what} is not a view of one: weights cast to "
                f"another dtype are copies (load the checkpoint in its own dtype), and so are tensors stored "
                f"unaligned in their file (rewrite it with `moekit convert`)"
            )
        if not (view.is_contiguous() or view.t().is_contiguous()):
            raise CheckpointError(f"expert offload: {what} is not one contiguous span of its file")
        pieces = ((source[0], source[1], view.numel() * view.element_size()),)
        return Span(pieces, view.dtype, tuple(view.shape), tuple(view.stride()))

    @staticmethod
    def transposed_rows(blocks: list[torch.Tensor], what: str) -> Span:
        """The transpose [C, R] of ``blocks`` (contiguous [r, C] views of mapped files) stacked row-wise: HF's
        separate gate and up matrices [I, D] as one expert's moekit ``w_in`` [D, 2I], laid out as a resident
        model holds it (the transpose of a contiguous [2I, D])."""
        spans = [Span.of(block, what) for block in blocks]
        if any(not b.is_contiguous() or b.shape[1] != blocks[0].shape[1] or b.dtype != blocks[0].dtype for b in blocks):
            raise CheckpointError(
                f"expert offload: the parts of {what} differ in width or dtype, or are not contiguous"
            )
        rows, cols = sum(b.shape[0] for b in blocks), blocks[0].shape[1]
        return Span(tuple(p for s in spans for p in s.pieces), blocks[0].dtype, (cols, rows), (1, cols))


ExpertSpans = tuple[Span, Span]  # (w_in [D, X], w_out [H, D]) of one expert


@dataclasses.dataclass
class OffloadStats:
    """Counters of an :class:`ExpertCache` (``tokens``: tokens the model ran, counted at its first MoE layer)."""

    lookups: int = 0
    hits: int = 0
    bytes_read: int = 0
    tokens: int = 0
    prefetched: int = 0  # experts the prefetcher read
    prefetch_bytes: int = 0
    mapped_bytes: int = 0  # experts' bytes that batched layer calls read through the file's map

    @property
    def hit_rate(self) -> float:
        """Share of expert lookups served from memory (a prefetched expert counts as a hit)."""
        return self.hits / self.lookups if self.lookups else 0.0

    @property
    def bytes_per_token(self) -> float:
        """Bytes read from the file per token the model ran, prefetches and batched calls included."""
        read = self.bytes_read + self.prefetch_bytes + self.mapped_bytes
        return read / self.tokens if self.tokens else 0.0

    def summary(self) -> str:
        """One line for a command's output."""
        return (
            f"expert cache: hit rate {self.hit_rate:.1%} over {self.lookups} lookups, "
            f"{self.bytes_per_token / 2**20:.2f} MiB read per token ({self.tokens} tokens)"
        )


Expert = tuple[torch.Tensor, torch.Tensor]  # (w_in [D, X], w_out [H, D]) as the resident tensors lay them out


class ExpertCache:
    """Experts keyed by (layer, expert), at most ``capacity`` bytes of them, read from their files on a miss."""

    def __init__(self, capacity: int, policy: str = "lru", prefetch: bool = False):
        if policy not in ("lru", "lfu"):
            raise ConfigError(f"expert cache policy {policy!r} is not 'lru' or 'lfu'")
        self.capacity, self.policy, self.used = capacity, policy, 0
        self.stats = OffloadStats()
        self._spans: dict[tuple[int, int], tuple[Span, Span]] = {}
        self._entries: collections.OrderedDict[tuple[int, int], Expert] = collections.OrderedDict()  # oldest first
        self._uses: collections.Counter[tuple[int, int]] = collections.Counter()
        self._pending: dict[tuple[int, int], Future] = {}
        self._lock = threading.Lock()
        self._files: dict[str, int] = {}
        self._prefetcher = ThreadPoolExecutor(1, thread_name_prefix="moekit-prefetch") if prefetch else None

    def add_expert(self, key: tuple[int, int], spans: ExpertSpans) -> None:
        """Register where expert ``key``'s matrices are in their files; checks that one fits the budget."""
        size = spans[0].nbytes + spans[1].nbytes
        if size > self.capacity:
            raise ConfigError(
                f"expert memory of {self.capacity} bytes holds not even one expert: give at least {size} bytes "
                f"({size / 2**20:.2f} MiB)"
            )
        for path in {piece[0] for span in spans for piece in span.pieces} - set(self._files):
            self._files[path] = os.open(path, os.O_RDONLY)
        self._spans[key] = spans

    def get(self, key: tuple[int, int]) -> Expert:
        """Expert ``key``'s (w_in, w_out), read from the file on a miss."""
        with self._lock:
            self.stats.lookups += 1
            expert = self._entries.get(key)
            if expert is not None:
                self.stats.hits += 1
                self._touch(key)
                return expert
            pending = self._pending.get(key)
        if pending is not None:  # being prefetched: wait for it, a hit (nothing more is read)
            pending.result()
            with self._lock:
                self.stats.hits += 1
                expert = self._entries.get(key)
                if expert is not None:
                    self._touch(key)
                    return expert
                self.stats.hits -= 1  # evicted before we came back to it: read it after all
        expert = self._read(key)
        with self._lock:
            self.stats.bytes_read += self.expert_bytes(key)
            self._insert(key, expert)
        return expert

    def prefetch(self, keys: list[tuple[int, int]]) -> None:
        """Read these experts on the background thread unless resident or on their way (prefetch mode only)."""
        if self._prefetcher is None:
            return
        with self._lock:
            for key in keys:
                if key in self._entries or key in self._pending or key not in self._spans:
                    continue
                self._pending[key] = self._prefetcher.submit(self._prefetch_one, key)

    def resident(self) -> list[tuple[int, int]]:
        """The keys held now, least recently used first."""
        with self._lock:
            return list(self._entries)

    def held_bytes(self) -> int:
        """Bytes of the expert tensors held now (what :attr:`used` accounts for)."""
        with self._lock:
            return sum(t.untyped_storage().nbytes() for expert in self._entries.values() for t in expert)

    def close(self) -> None:
        """Stop the prefetcher and close the files (the cache is unusable after)."""
        if self._prefetcher is not None:
            self._prefetcher.shutdown(wait=True)
        for fd in self._files.values():
            os.close(fd)
        self._files.clear()

    def _prefetch_one(self, key: tuple[int, int]) -> None:
        try:
            expert = self._read(key)
            with self._lock:
                self.stats.prefetched += 1
                self.stats.prefetch_bytes += self.expert_bytes(key)
                self._insert(key, expert)
        finally:
            with self._lock:
                self._pending.pop(key, None)

    def expert_bytes(self, key: tuple[int, int]) -> int:
        """Bytes of expert ``key``'s two matrices."""
        return sum(span.nbytes for span in self._spans[key])

    def _read(self, key: tuple[int, int]) -> Expert:
        w_in, w_out = (self._read_span(span) for span in self._spans[key])
        if not (_finite(w_in) and _finite(w_out)):  # unchecked at loading
            path = self._spans[key][0].pieces[0][0]
            raise CheckpointError(f"{path}: (layer, expert) {key} holds NaN or infinite values")
        return w_in, w_out

    def _read_span(self, span: Span) -> torch.Tensor:
        raw = torch.empty(span.nbytes, dtype=torch.uint8)
        view, start = raw.numpy().data, 0
        for path, offset, nbytes in span.pieces:
            done = 0
            while done < nbytes:  # preadv may return less than asked
                n = os.preadv(self._files[path], [view[start + done : start + nbytes]], offset + done)
                if n <= 0:
                    raise CheckpointError(f"{path}: file ended while reading an expert (truncated since loading?)")
                done += n
            start += nbytes
        return raw.view(span.dtype).as_strided(span.shape, span.stride)

    def _touch(self, key: tuple[int, int]) -> None:
        self._entries.move_to_end(key)
        self._uses[key] += 1

    def _insert(self, key: tuple[int, int], expert: Expert) -> None:
        if key in self._entries:  # a prefetch and a read raced: keep the first
            self._touch(key)
            return
        size = self.expert_bytes(key)
        while self._entries and self.used + size > self.capacity:
            self._evict()
        self._entries[key] = expert
        self._uses[key] = 1
        self.used += size

    def _evict(self) -> None:
        if self.policy == "lru":
            victim = next(iter(self._entries))
        else:  # fewest uses; min() keeps the first, i.e. the least recently used, of equals
            victim = min(self._entries, key=self._uses.__getitem__)
        del self._entries[victim], self._uses[victim]
        self.used -= self.expert_bytes(victim)


def _finite(t: torch.Tensor) -> bool:
    """No NaN or infinity in ``t``: its min and max (which propagate NaN) are finite; one pass, several times faster
    than ``isfinite(t).all()`` on a bf16 expert (a prompt checks every expert it reads)."""
    return all(bool(torch.isfinite(v)) for v in torch.aminmax(t))
