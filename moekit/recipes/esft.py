"""Expert-specialised fine-tuning (ESFT, Wang et al. 2024, arXiv 2407.01906): which experts to train.

Each expert's relevance to the task comes from the routing of task data, read from the analysis recorder's
per-layer totals (:class:`moekit.analysis.recorder.LayerAggregate`):

* ``gate``: average gate score, the expert's summed combine weights over the tokens (paper eq. 5);
* ``token``: token selection ratio, the share of the layer's assignments the expert got (paper eq. 6).

Both are averaged as the paper does (eqs. 5 and 6): per sequence over its tokens, then over the sequences, so a
long sequence counts as much as a short one; padding is left out. The calibration sequences are the task's
documents (blank-line separated, as :func:`moekit.data.text.load_text` joins them), or windows of the training
data, each cut to at most ``block_size`` tokens.

Per layer the scores are normalised to sum 1 and the fewest experts whose cumulative score reaches ``top_p``
are kept (the paper uses 0.1 to 0.2).
"""

from __future__ import annotations

import enum
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moekit.analysis.capture import capture_routing, find_moe_layers, layer_routing
from moekit.data.text import DEFAULT_SEPARATOR
from moekit.errors import ConfigError
from moekit.io.safe_io import atomic_write_json

SELECTION_FILE = "esft_selection.json"


class Relevance(str, enum.Enum):
    GATE = "gate"
    TOKEN = "token"


def token_windows(tokens: torch.Tensor, block_size: int) -> list[torch.Tensor]:
    """A 1-D token stream cut into sequences of ``block_size`` tokens (the last may be shorter)."""
    return [w for w in tokens.split(block_size) if w.numel()]


def document_sequences(tokenizer: Any, text: str, block_size: int) -> list[torch.Tensor]:
    """Each blank-line-separated document of ``text`` tokenised on its own, cut into :func:`token_windows`."""
    out = []
    for document in text.split(DEFAULT_SEPARATOR):
        if document.strip():
            out += token_windows(torch.tensor(tokenizer.encode(document), dtype=torch.long), block_size)
    return out


@torch.no_grad()
def expert_relevance(
    model: nn.Module, sequences: list[torch.Tensor], mode: Relevance | str, batch_size: int = 8
) -> list[torch.Tensor]:
    """Per MoE layer, each expert's share [E] of the task's routing (``mode``): its per-sequence average gate
    score or token selection ratio, averaged over ``sequences`` (1-D ids each), normalised to sum 1."""
    mode = Relevance(mode)
    sequences = [s for s in sequences if s.numel()]
    if not sequences:
        raise ConfigError("the calibration data has no tokens to score the experts on")
    device = next(model.parameters()).device
    experts = [moe.config.num_candidates for _, _, moe in find_moe_layers(model)]
    totals = [torch.zeros(e, dtype=torch.float64) for e in experts]
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(sequences), batch_size):
            batch = sequences[start : start + batch_size]
            ids_BS = torch.nn.utils.rnn.pad_sequence(batch, batch_first=True)  # pad with id 0, masked below
            mask_BS = torch.nn.utils.rnn.pad_sequence([torch.ones_like(s) for s in batch], batch_first=True)
            with capture_routing(model) as seen:
                model(ids_BS.to(device), attention_mask=mask_BS.to(device))
            for position, aux in seen:
                totals[position] += _sequence_means(aux, experts[position], mask_BS.bool(), mode)
    finally:
        model.train(was_training)
    return [total / total.sum().clamp_min(1e-30) for total in totals]


def _sequence_means(aux: Any, num_experts: int, mask_BS: torch.Tensor, mode: Relevance) -> torch.Tensor:
    """[E]: the sum over the batch's sequences of each one's mean over its real tokens (fp64)."""
    routing = layer_routing(aux, num_experts)
    B, S = mask_BS.shape
    E = num_experts
    chosen_TK = routing.experts_TK >= 0
    value_TK = routing.weights_TK.double() if mode == Relevance.GATE else chosen_TK.double()
    slot_TK = routing.experts_TK.masked_fill(~chosen_TK, E)  # one extra column for "no expert"
    per_token_TE = torch.zeros(B * S, E + 1, dtype=torch.float64).scatter_add_(1, slot_TK, value_TK)[:, :E]
    real_BS = mask_BS & routing.valid_T.view(B, S)
    sums_BE = (per_token_TE.view(B, S, E) * real_BS.unsqueeze(-1)).sum(1)
    counts_B = real_BS.sum(1, keepdim=True)
    return (sums_BE / counts_B.clamp_min(1))[counts_B.squeeze(1) > 0].sum(0)


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
