"""Batches of token windows for language modelling, deterministic and exactly resumable.

Training batches are nanoGPT-style: ``batch_size`` random window starts, ``x = tokens[i : i+block]`` and
``y = tokens[i+1 : i+1+block]``. Each step's starts come from a ``torch.Generator`` seeded from
``(seed, step)``, so the loader's whole state is two integers: resuming at step ``s`` yields exactly the
batches an uninterrupted run would, the state is JSON-friendly, and restoring it costs nothing
(no replaying of earlier steps, no opaque RNG byte blob in the checkpoint).

Evaluation uses fixed, non-overlapping windows (:func:`iter_eval_batches`) so every eval sees the same tokens.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

from moekit.errors import ConfigError, DataError

__all__ = ["TokenDataset", "TokenLoader", "as_token_tensor", "iter_eval_batches", "split_tokens"]

Batch = tuple[torch.Tensor, torch.Tensor]

_MASK64 = (1 << 64) - 1


def _step_seed(seed: int, step: int) -> int:
    """SplitMix64 of (seed, step): decorrelates the per-step streams even for adjacent seeds and steps."""
    z = (seed * 0x9E3779B97F4A7C15 + step + 1) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)  # torch seeds are int64


def as_token_tensor(tokens: torch.Tensor | Sequence[int]) -> torch.Tensor:
    """Tokens as a 1-D int64 CPU tensor (a list is converted; other integer dtypes are widened).

    Raises:
        DataError: not 1-D, or not integers.
    """
    t = tokens if isinstance(tokens, torch.Tensor) else torch.tensor(list(tokens), dtype=torch.long)
    if t.dim() != 1:
        raise DataError(f"tokens must be a 1-D tensor, got shape {tuple(t.shape)}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise DataError(f"tokens must be integers, got dtype {t.dtype}")
    return t.to(device="cpu", dtype=torch.long)


def _check_length(tokens: torch.Tensor, block_size: int) -> None:
    if block_size < 1:
        raise ConfigError(f"block_size={block_size} must be >= 1")
    if len(tokens) < block_size + 1:
        raise DataError(
            f"the corpus has {len(tokens)} tokens; block_size={block_size} needs at least {block_size + 1} "
            f"(one window plus the next-token target). Use more text or a smaller block_size."
        )


def split_tokens(tokens: torch.Tensor | Sequence[int], val_fraction: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Split into train (the first part) and validation (the last ``val_fraction``), nanoGPT's convention.

    Contiguous, not shuffled: validation text is unseen text, and the split never changes between runs.

    Args:
        tokens: 1-D token ids.
        val_fraction: share held out for validation, in [0, 1).

    Returns:
        ``(train, val)`` 1-D int64 tensors (views of one tensor).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction={val_fraction} must be in [0, 1)")
    t = as_token_tensor(tokens)
    n_train = int(len(t) * (1.0 - val_fraction))
    return t[:n_train], t[n_train:]


class TokenDataset(torch.utils.data.Dataset):
    """Fixed windows ``(x, y)`` at starts ``0, stride, 2*stride, ...`` (stride = block_size: non-overlapping).

    Args:
        tokens: 1-D token ids (at least ``block_size + 1``).
        block_size: window length.
        stride: distance between window starts (default ``block_size``).
    """

    def __init__(self, tokens: torch.Tensor | Sequence[int], block_size: int, stride: int | None = None):
        self.tokens = as_token_tensor(tokens)
        _check_length(self.tokens, block_size)
        self.block_size = block_size
        self.stride = stride or block_size
        if self.stride < 1:
            raise ConfigError(f"stride={stride} must be >= 1")

    def __len__(self) -> int:
        return (len(self.tokens) - self.block_size - 1) // self.stride + 1

    def __getitem__(self, index: int) -> Batch:
        if not -len(self) <= index < len(self):
            raise IndexError(f"window {index} out of range for {len(self)} windows")
        i = (index % len(self)) * self.stride
        chunk = self.tokens[i : i + self.block_size + 1]
        return chunk[:-1], chunk[1:]


def iter_eval_batches(
    tokens: torch.Tensor | Sequence[int],
    block_size: int,
    batch_size: int,
    max_batches: int | None = None,
) -> Iterator[Batch]:
    """Deterministic, non-overlapping evaluation windows, in order.

    Args:
        tokens: 1-D token ids.
        block_size: window length.
        batch_size: windows per batch (the last batch may be smaller).
        max_batches: stop after this many batches (None: cover the whole corpus).

    Yields:
        ``(x, y)``, each ``[b, block_size]`` int64 with ``b <= batch_size``.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} must be >= 1")
    ds = TokenDataset(tokens, block_size)
    n_windows = len(ds)
    if max_batches is not None:
        n_windows = min(n_windows, max_batches * batch_size)
    for start in range(0, n_windows, batch_size):
        pairs = [ds[i] for i in range(start, min(start + batch_size, n_windows))]
        yield torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


class TokenLoader:
    """Endless random training windows, reproducible from ``seed`` and resumable at any step.

    Args:
        tokens: 1-D token ids (at least ``block_size + 1``).
        block_size: window length (the model's context).
        batch_size: windows per batch.
        seed: base seed; use a different one per data-parallel rank.
        device: where batches go (None: stay on CPU).

    Example::

        loader = TokenLoader(train_ids, block_size=256, batch_size=32, seed=0)
        x, y = next(loader)                  # [32, 256] each
        state = loader.state_dict()          # {"seed": 0, "step": 1, ...}: JSON-friendly
    """

    def __init__(
        self,
        tokens: torch.Tensor | Sequence[int],
        block_size: int,
        batch_size: int,
        seed: int = 0,
        device: torch.device | str | None = None,
    ):
        if batch_size < 1:
            raise ConfigError(f"batch_size={batch_size} must be >= 1")
        self.tokens = as_token_tensor(tokens)
        _check_length(self.tokens, block_size)
        self.block_size = block_size
        self.batch_size = batch_size
        self.seed = int(seed)
        self.device = device
        self.step = 0
        self._generator = torch.Generator(device="cpu")
        # Window offsets 0..block_size, added to each start to gather a [B, block+1] chunk in one indexing op.
        self._arange = torch.arange(block_size + 1)

    def __iter__(self) -> TokenLoader:
        return self

    def __next__(self) -> Batch:
        return self.next_batch()

    def next_batch(self) -> Batch:
        """The batch for the current step; advances the step.

        Returns:
            ``(x, y)``: ``[batch_size, block_size]`` int64, ``y`` is ``x`` shifted by one token.
        """
        self._generator.manual_seed(_step_seed(self.seed, self.step))
        high = len(self.tokens) - self.block_size  # last valid start + 1 (y needs one token past x)
        starts = torch.randint(high, (self.batch_size,), generator=self._generator)
        chunk = self.tokens[starts[:, None] + self._arange]  # [B, block+1]
        self.step += 1
        x, y = chunk[:, :-1], chunk[:, 1:]
        if self.device is not None and torch.device(self.device).type == "cuda":
            # Pinned host memory lets the copy overlap with compute (nanoGPT does the same).
            x, y = x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        elif self.device is not None:
            x, y = x.to(self.device), y.to(self.device)
        return x, y

    def state_dict(self) -> dict[str, Any]:
        """The loader's position: plain ints (the per-step generator is re-seeded from seed and step)."""
        return {
            "seed": self.seed,
            "step": self.step,
            "block_size": self.block_size,
            "batch_size": self.batch_size,
            "num_tokens": len(self.tokens),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict` output.

        Raises:
            DataError: the state was saved for another corpus length, block size or batch size (resuming
                would silently produce different batches).
        """
        mine = {"block_size": self.block_size, "batch_size": self.batch_size, "num_tokens": len(self.tokens)}
        for key, value in mine.items():
            if key in state and int(state[key]) != value:
                raise DataError(
                    f"loader state has {key}={state[key]} but this loader has {key}={value}; "
                    f"resuming would change the batches"
                )
        if "step" not in state or int(state["step"]) < 0:
            raise DataError(f"loader state needs a non-negative 'step', got {state.get('step')!r}")
        self.seed = int(state.get("seed", self.seed))
        self.step = int(state["step"])
