"""What an analysis reads: labelled text sources, cut into windows of token ids with a label per token.

Labels: ``file`` = one label per data file or per entry of a data folder (its sub-folder or file name;
``NAME=PATH`` chooses the name); ``category`` = the token's category (letters, digits, punctuation,
whitespace, other); ``none``; ``auto`` = ``file`` when there are several sources, else ``category``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from moekit.analysis.tokens import CATEGORIES, category_table
from moekit.data.text import load_labeled_files, load_text
from moekit.data.tokenizers import Tokenizer
from moekit.errors import DataError

log = logging.getLogger(__name__)

LABEL_MODES = ("auto", "file", "category", "none")
Window = tuple[torch.Tensor, torch.Tensor]  # (token ids [S], label ids [S]; -1 = no label)


@dataclasses.dataclass
class AnalysisInputs:
    """The tokens an analysis routes, and what they are labelled with."""

    mode: str  # the label mode in effect: file, category or none (never auto)
    label_names: list[str]  # the names of the label ids in ``windows``
    block: int  # window length in tokens
    sources: list[dict[str, Any]]  # {"label", "path", "tokens"} per source, as stats.json records them
    texts: list[tuple[str, str]]  # (label, text) per source, for the coloured token view
    windows: list[Window]  # what to route, in source order


def _split_entry(entry: str) -> tuple[str | None, Path]:
    name, eq, rest = entry.partition("=")
    if eq and name and "/" not in name and not Path(entry).exists():
        return name, Path(rest)
    return None, Path(entry)


def _read_folder_child(child: Path) -> str:
    try:
        return load_text(child)
    except DataError as e:
        txt = sorted(p for p in child.rglob("*.txt") if not p.name.startswith("."))
        if not child.is_dir() or not txt:
            raise
        log.warning("%s: %s; reading its .txt files only", child, e)
        return "\n\n".join(load_text(p) for p in txt)


def _folder_entries(folder: Path) -> list[tuple[str, str, str]]:
    """``[(label, path, text)]`` for each readable entry of ``folder`` (sub-folders and files, sorted); [] for one."""
    children = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    out = []
    for child in children if len(children) > 1 else []:
        try:
            out.append((child.stem if child.is_file() else child.name, str(child), _read_folder_child(child)))
        except DataError as e:
            log.warning("skipping %s: %s", child, e)
    return out


def read_sources(data: Sequence[str | Path], by_file: bool) -> list[tuple[str, str, str]]:
    """``[(label, path, text)]`` from data entries (files, folders, ``NAME=PATH``).

    With ``by_file``, one folder is split into its entries (sub-folders and files, sorted), one label each.
    """
    entries = [_split_entry(str(d)) for d in data]
    for _, path in entries:
        if not path.exists():
            raise DataError(f"data path {path} does not exist")
    if by_file and len(entries) == 1 and entries[0][1].is_dir():
        out = _folder_entries(entries[0][1])
        if len(out) > 1:
            return out
    labelled = [(name or (p.name if p.is_dir() else p.stem), p) for name, p in entries]
    seen: dict[str, Path] = {}
    for label, p in labelled:
        if label in seen:
            raise DataError(f"label {label!r} is used by both {seen[label]} and {p}; name them: NAME=PATH")
        seen[label] = p
    pairs = load_labeled_files(dict(labelled))
    return [(label, str(p), text) for (label, p), (_, text) in zip(labelled, pairs)]


def _label_mode(labels: str, num_sources: int) -> str:
    if labels == "auto":
        return "file" if num_sources > 1 else "category"
    if labels == "file" and num_sources < 2:
        log.warning("--labels file needs several files or a folder of several entries; analysing without labels")
        return "none"
    return labels


def _source_ids(tokenizer: Tokenizer, text: str, tokens: int) -> torch.Tensor:
    """The first ``tokens`` token ids of ``text``, encoding only as much text as that needs."""
    ids = tokenizer.encode(text[: tokens * 8])
    if len(ids) < tokens and len(text) > tokens * 8:
        ids = tokenizer.encode(text)
    return torch.tensor(ids[:tokens], dtype=torch.long)


def prepare_inputs(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    data: Sequence[str | Path],
    labels: str,
    max_tokens: int,
    block_size: int | None,
) -> AnalysisInputs:
    """Read ``data``, pick the label mode and cut ``max_tokens`` tokens (split evenly over the sources) into windows.

    The window is ``block_size`` (default 256) capped by the model's context.
    """
    found = read_sources(data, by_file=labels in ("auto", "file"))
    mode = _label_mode(labels, len(found))
    config = getattr(model, "config", None)
    block = min(block_size or 256, getattr(config, "max_position_embeddings", None) or 256)
    vocab = getattr(config, "vocab_size", tokenizer.vocab_size)
    categories = category_table(tokenizer, vocab) if mode == "category" else None
    names = [label for label, _, _ in found] if mode == "file" else list(CATEGORIES) if mode == "category" else []
    per_source = max(1, max_tokens // len(found))
    inputs = AnalysisInputs(mode, names, block, [], [], [])
    for n, (label, path, text) in enumerate(found):
        ids = _source_ids(tokenizer, text, per_source)
        if ids.numel() and int(ids.max()) >= vocab:
            raise DataError(f"{path}: token id {int(ids.max())} is outside the model's vocabulary ({vocab})")
        inputs.sources.append({"label": label, "path": path, "tokens": int(ids.numel())})
        inputs.texts.append((label, text))
        for w in ids.split(block) if ids.numel() else ():  # split() gives one empty window for none
            lab = categories[w] if categories is not None else torch.full_like(w, n if mode == "file" else -1)
            inputs.windows.append((w, lab))
    if not inputs.windows:
        raise DataError("the data gave no tokens to analyse")
    return inputs


def batches(windows: Sequence[Window], batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Group (ids, labels) windows of equal length into batches of at most ``batch_size``."""
    by_len: dict[int, list[Window]] = {}
    for w in windows:
        by_len.setdefault(w[0].numel(), []).append(w)
    for group in by_len.values():
        for i in range(0, len(group), batch_size):
            chunk = group[i : i + batch_size]
            yield torch.stack([c[0] for c in chunk]), torch.stack([c[1] for c in chunk])
