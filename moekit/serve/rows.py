"""The running batch's KV cache as ragged rows: every row's tokens sit at the right end of one shared
:class:`~moekit.nn.attention.KVCache`, shorter rows left-padded (the layout :func:`moekit.generate` uses).

Rows join and leave between decode steps. :func:`combine` rebuilds the cache from the rows that stay and
the rows that join; it keeps only as many columns as the longest row needs (columns that are padding for
every remaining row are dropped), so the cache never grows past the longest live sequence.

Shape legend: B rows, G key/value heads, P cached columns, hd head width.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from moekit.nn.attention import KVCache


def combine(parts: Sequence[tuple[KVCache, Sequence[int], Sequence[int]]], capacity_extra: int) -> KVCache:
    """One cache holding ``rows`` of each ``(cache, rows, real_lengths)`` part, in order, right-aligned.

    ``real_lengths`` are those rows' numbers of real (non-padding) cached tokens; the new cache has room for
    ``capacity_extra`` more positions before it must be rebuilt.
    """
    parts = [p for p in parts if len(p[1])]
    length = max(max(lengths) for _, _, lengths in parts)
    first = parts[0][0]
    out = KVCache(first.num_layers, length + capacity_extra)
    for layer in range(first.num_layers):
        keys, values = [], []
        for cache, rows, _ in parts:
            index = torch.tensor(list(rows), dtype=torch.long, device=_device(cache))
            keys.append(_right_aligned(cache.keys[layer], cache.length, length, index))
            values.append(_right_aligned(cache.values[layer], cache.length, length, index))
        k_BGPd, v_BGPd = torch.cat(keys), torch.cat(values)
        B, G, _, hd = k_BGPd.shape
        k_buf = k_BGPd.new_zeros((B, G, out.max_length, hd))  # type: ignore[arg-type]  # set just above
        v_buf = v_BGPd.new_zeros((B, v_BGPd.shape[1], out.max_length, v_BGPd.shape[-1]))  # type: ignore[arg-type]
        k_buf[:, :, :length], v_buf[:, :, :length] = k_BGPd, v_BGPd
        out.keys[layer], out.values[layer] = k_buf, v_buf
    real = [n for _, _, lengths in parts for n in lengths]
    out.length = length
    out.mask = padding_mask(real, length, _device(first))
    return out


def padding_mask(real_lengths: Sequence[int], length: int, device: torch.device) -> torch.Tensor | None:
    """[B, length] bool, True on each row's last ``real_lengths[b]`` columns; None when no row is padded."""
    if all(n == length for n in real_lengths):
        return None
    column = torch.arange(length, device=device)
    starts = torch.tensor([length - n for n in real_lengths], device=device)
    return column[None, :] >= starts[:, None]


def _right_aligned(buf: torch.Tensor | None, cached: int, length: int, index: torch.Tensor) -> torch.Tensor:
    """The cached columns of ``buf`` [B, G, >=cached, hd] for rows ``index``, cut or left-padded to ``length``."""
    assert buf is not None, "every layer writes the cache in the forward that fills it"
    rows = buf.index_select(0, index)[:, :, :cached]
    if cached >= length:
        return rows[:, :, cached - length :]
    pad = rows.new_zeros((*rows.shape[:2], length - cached, rows.shape[-1]))
    return torch.cat([pad, rows], dim=2)


def _device(cache: KVCache) -> torch.device:
    first = cache.keys[0]
    return first.device if first is not None else torch.device("cpu")
