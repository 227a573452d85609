"""Expert-specialised fine-tuning (ESFT, Wang et al. 2024, arXiv 2407.01906): which experts to train.

Each expert's relevance to the task comes from the routing of task data, read from the analysis recorder's
per-layer totals (:class:`moekit.analysis.recorder.LayerAggregate`):

* ``gate``: average gate score, the expert's summed combine weights over the tokens (paper eq. 5);
* ``token``: token selection ratio, the share of the layer's assignments the expert got (paper eq. 6).

Per layer the scores are normalised to sum 1 and the fewest experts whose cumulative score reaches ``top_p``
are kept (the paper uses 0.1 to 0.2). The paper averages per sequence first; these totals weigh every token
the same, which differs only when the calibration sequences differ in length.
"""

from __future__ import annotations

import enum
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moekit.analysis.recorder import RoutingRecorder
from moekit.errors import ConfigError
from moekit.io.safe_io import atomic_write_json

SELECTION_FILE = "esft_selection.json"


class Relevance(str, enum.Enum):
    GATE = "gate"
    TOKEN = "token"


@torch.no_grad()
def expert_relevance(
    model: nn.Module, tokens: torch.Tensor, mode: Relevance | str, block_size: int, batch_size: int = 8
) -> list[torch.Tensor]:
    """Per MoE layer, each expert's share [E] of the task's routing (``mode``), from ``tokens`` (1-D ids)."""
    mode = Relevance(mode)
    windows = tokens.numel() // block_size
    if windows < 1:
        raise ConfigError(f"the calibration data has {tokens.numel()} tokens, fewer than one block of {block_size}")
    was_training = model.training
    model.eval()
    recorder = RoutingRecorder(model)
    try:
        ids_NS = tokens[: windows * block_size].view(windows, block_size)
        for batch in ids_NS.split(batch_size):
            recorder.update(batch.to(next(model.parameters()).device))
    finally:
        model.train(was_training)
    scores = []
    for agg in recorder.aggregates().layers:
        raw = agg.weight_sum if mode == Relevance.GATE else agg.routed.double()
        scores.append(raw / raw.sum().clamp_min(1e-30))
    return scores


def select_experts(scores: list[torch.Tensor], top_p: float) -> dict[int, list[int]]:
    """Per layer the fewest experts (highest score first) whose cumulative score reaches ``top_p``."""
    if not 0 < top_p <= 1:
        raise ConfigError(f"ESFT top_p must be in (0, 1], got {top_p}")
    selection = {}
    for layer, score_E in enumerate(scores):
        order = torch.sort(score_E, descending=True, stable=True).indices
        cumulative = score_E[order].cumsum(0)
        keep = int((cumulative < top_p - 1e-12).sum()) + 1  # the expert that crosses top_p is kept too
        selection[layer] = sorted(order[: min(keep, score_E.numel())].tolist())
    return selection


def write_selection(
    path: str | Path, selection: dict[int, list[int]], scores: list[torch.Tensor], mode: str, top_p: float
) -> Path:
    """The selection and the scores behind it as JSON (``esft_selection.json``)."""
    record: dict[str, Any] = {
        "method": "esft",
        "relevance": Relevance(mode).value,
        "top_p": top_p,
        "layers": [
            {"moe_layer": i, "experts": selection[i], "scores": [round(float(s), 6) for s in scores[i]]}
            for i in sorted(selection)
        ],
    }
    atomic_write_json(Path(path), record)
    return Path(path)


def read_selection_record(path: str | Path) -> dict[str, Any]:
    """A selection file written by :func:`write_selection`, checked: its layers' experts and scores."""
    try:
        record = json.loads(Path(path).read_text())
        for entry in record["layers"]:
            int(entry["moe_layer"])
            if not all(isinstance(e, int) for e in entry["experts"]):
                raise TypeError("expert ids must be integers")
            if not all(isinstance(x, (int, float)) for x in entry["scores"]):
                raise TypeError("scores must be numbers")
            if any(not 0 <= e < len(entry["scores"]) for e in entry["experts"]):
                raise ValueError("an expert id is out of range of its layer's scores")
        return record
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{path} is not an ESFT selection file: {e}") from None


def read_selection(path: str | Path) -> dict[int, list[int]]:
    """The per-layer expert lists of a selection file written by :func:`write_selection`."""
    record = read_selection_record(path)
    return {int(entry["moe_layer"]): [int(e) for e in entry["experts"]] for entry in record["layers"]}
