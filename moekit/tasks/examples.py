"""Classification examples: what the encoder takes (word ids or pixels) and label ids, batched with padding."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import torch

from moekit.data.images import LabelledImages
from moekit.data.labelled import LabelledText, WordVocab, label_ids
from moekit.errors import DataError


@dataclasses.dataclass
class Examples:
    """Model inputs and label ids: text as a list of id lists (padded per batch), images as uint8 [N, C, H, W]."""

    inputs: list[list[int]] | torch.Tensor
    labels: torch.Tensor  # [N] long, -1 = unlabelled

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(inputs, padding mask or None, labels) of the rows ``idx``."""
        y = self.labels[idx]
        if isinstance(self.inputs, torch.Tensor):
            return self.inputs[idx].float() / 255.0, None, y
        rows = [self.inputs[i] for i in idx.tolist()]
        width = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.bool)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, : len(r)] = True
        return ids, mask, y

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]]:
        """The rows in order, ``batch_size`` at a time (for evaluation)."""
        for start in range(0, len(self), batch_size):
            yield self.batch(torch.arange(start, min(start + batch_size, len(self))))


def text_examples(data: LabelledText, vocab: WordVocab, names: list[str] | None, max_length: int) -> Examples:
    """Word ids (cut to ``max_length``) and label ids (-1 for every row when ``names`` is None)."""
    ids = [vocab.encode(t, max_length) for t in data.texts]
    labels = label_ids(data, names) if names is not None else [-1] * len(ids)
    return Examples(ids, torch.tensor(labels, dtype=torch.long))


def image_examples(data: LabelledImages, names: list[str]) -> Examples:
    """Pixels and label ids; a label outside ``names`` is a DataError naming its file."""
    index = {n: i for i, n in enumerate(names)}
    for label, source in zip(data.labels, data.sources):
        if label not in index:
            raise DataError(f"{source}: label {label!r} is not one of the training labels {names}")
    return Examples(data.pixels, torch.tensor([index[label] for label in data.labels], dtype=torch.long))


def split_rows(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A seeded split of ``n`` rows: (training rows, the held-out ``fraction``, at least one row)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    cut = max(1, int(round(n * fraction)))
    return order[cut:], order[:cut]


def subset(data: LabelledImages | LabelledText, rows: list[int]) -> LabelledImages | LabelledText:
    """The rows ``rows`` of a labelled image or text set."""
    if isinstance(data, LabelledImages):
        return LabelledImages(
            data.path, data.pixels[rows], [data.labels[i] for i in rows], [data.sources[i] for i in rows]
        )
    return dataclasses.replace(
        data,
        texts=[data.texts[i] for i in rows],
        labels=[data.labels[i] for i in rows],
        lines=[data.lines[i] for i in rows],
    )
