"""Raw routing traces: per-token experts and weights in safetensors shards with a JSON sidecar.

Written by a :class:`~moekit.analysis.recorder.RoutingRecorder` given ``trace_dir=`` (only when asked:
they grow with the data), one row per routed token (padding is left out)::

    traces.json                 {"format": "moekit-routing-trace", "version": 1, "layers": [...],
                                 "layer_names": [...], "num_experts": [...], "k": K, "label_names": [...],
                                 "shards": [{"file": "traces-00000.safetensors", "tokens": N}, ...]}
    traces-00000.safetensors    token_ids [N] int32, sequence [N] int32 (window index over the whole run),
                                position [N] int32, experts [N, L, K] int16 (by weight, -1 = none),
                                weights [N, L, K] float16, labels [N] int16 (only with labels; -1 = none)

L = MoE layers, K = the most experts any token had (top_k for token-choice routers).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from moekit.analysis.capture import LayerRouting, stack_layers
from moekit.errors import ConfigError
from moekit.io.safe_io import atomic_write_json, load_tensors, save_tensors

if TYPE_CHECKING:
    from moekit.analysis.recorder import RoutingRecorder

TRACE_FORMAT = "moekit-routing-trace"
TRACE_VERSION = 1
TRACE_INDEX = "traces.json"


class TraceWriter:
    """Writes per-token routing to safetensors shards + ``traces.json`` (format in the module docstring)."""

    def __init__(self, directory: str | os.PathLike, recorder: RoutingRecorder, shard_tokens: int):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.recorder = recorder
        self.shard_tokens = max(1, shard_tokens)
        self.k = max(agg.top_k if agg.top_k else 1 for agg in recorder.layers)
        self.k = max(self.k, 1)
        self.buffer: list[dict[str, torch.Tensor]] = []
        self.buffered = 0
        self.shards: list[dict[str, Any]] = []
        self.total = 0

    def add(self, records: Sequence[LayerRouting], input_ids, labels_T, first_sequence: int) -> None:
        valid_T = records[0].valid_T
        T = valid_T.numel()
        experts, weights = stack_layers(records, self.k)
        self.k = experts.shape[2]  # expert choice / dense can give more choices than top_k: widen (older rows padded)
        if input_ids is not None and input_ids.dim() == 2:
            S = input_ids.shape[1]
            ids = input_ids.reshape(-1).cpu().to(torch.int32)
        else:
            S = T
            ids = (input_ids.reshape(-1).cpu() if input_ids is not None else torch.full((T,), -1)).to(torch.int32)
        rows = {
            "token_ids": ids,
            "sequence": (torch.arange(T) // S + first_sequence).to(torch.int32),
            "position": (torch.arange(T) % S).to(torch.int32),
            "experts": experts.to(torch.int16),
            "weights": weights.to(torch.float16),
        }
        if labels_T is not None:
            rows["labels"] = labels_T.to(torch.int16)
        rows = {k: v[valid_T] for k, v in rows.items()}
        self.buffer.append(rows)
        self.buffered += int(valid_T.sum())
        if self.buffered >= self.shard_tokens:
            self._flush()

    def _flush(self) -> None:
        if not self.buffer:
            return
        K = self.k
        tensors = _concat_padded(self.buffer, K)
        name = f"traces-{len(self.shards):05d}.safetensors"
        save_tensors(tensors, self.dir / name, metadata={"format": TRACE_FORMAT})
        self.shards.append({"file": name, "tokens": int(tensors["token_ids"].numel()), "k": K})
        self.total += int(tensors["token_ids"].numel())
        self.buffer, self.buffered = [], 0

    def close(self) -> Path:
        self._flush()
        rec = self.recorder
        index = {
            "format": TRACE_FORMAT,
            "version": TRACE_VERSION,
            "layers": [agg.layer for agg in rec.layers],
            "layer_names": [agg.name for agg in rec.layers],
            "num_experts": [agg.num_experts for agg in rec.layers],
            "k": self.k,
            "label_names": rec.label_names,
            "tokens": self.total,
            "shards": self.shards,
            "columns": {
                "token_ids": "int32 [N] input token id",
                "sequence": "int32 [N] index of the input sequence (window) over the whole run",
                "position": "int32 [N] position inside its sequence",
                "experts": "int16 [N, L, K] experts of each MoE layer, by combine weight, -1 = none",
                "weights": "float16 [N, L, K] combine weights, 0 where experts is -1",
                "labels": "int16 [N] label id into label_names, -1 = none (only with labels)",
            },
        }
        path = self.dir / TRACE_INDEX
        atomic_write_json(path, index)
        return path


def read_traces(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read a trace folder back: (index, tensors concatenated over shards)."""
    d = Path(directory)
    index = json.loads((d / TRACE_INDEX).read_text())
    if index.get("format") != TRACE_FORMAT:
        raise ConfigError(f"{d / TRACE_INDEX} is not a {TRACE_FORMAT} index")
    return index, _concat_padded([load_tensors(d / shard["file"]) for shard in index["shards"]], index["k"])


def _concat_padded(parts: Sequence[dict[str, torch.Tensor]], K: int) -> dict[str, torch.Tensor]:
    """Concatenate trace columns, widening narrower experts/weights to K choices (-1 / 0)."""
    columns: dict[str, list[torch.Tensor]] = {}
    for rows in parts:
        for key, v in rows.items():
            if key in ("experts", "weights") and v.shape[2] < K:
                pad = torch.full((*v.shape[:2], K - v.shape[2]), -1 if key == "experts" else 0, dtype=v.dtype)
                v = torch.cat([v, pad], dim=2)
            columns.setdefault(key, []).append(v)
    return {key: torch.cat(vs) for key, vs in columns.items()}
