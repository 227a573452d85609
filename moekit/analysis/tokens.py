"""Tokens as the report shows them: a category per token id, the text each token adds, and which
experts each token of a text went to."""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from moekit.analysis.capture import capture_routing, find_moe_layers, layer_routing, stack_layers
from moekit.data.tokenizers import Tokenizer

CATEGORIES = ("letters", "digits", "punctuation", "whitespace", "other")


def token_category(text: str) -> str:
    """letters / digits / punctuation / whitespace / other for a decoded token.

    Surrounding whitespace is ignored (``" the"`` is letters); a token that is only whitespace is
    whitespace; punctuation includes symbols (``+``, ``$``); mixtures and undecodable bytes are other.
    """
    core = text.strip()
    if not core:
        return "whitespace" if text else "other"
    if "\ufffd" in core:
        return "other"
    if all(c.isalpha() for c in core):
        return "letters"
    if all(c.isdigit() for c in core):
        return "digits"
    if all(unicodedata.category(c)[0] in "PS" for c in core):
        return "punctuation"
    return "other"


def category_table(tokenizer: Tokenizer, vocab_size: int | None = None) -> torch.Tensor:
    """Category index (into :data:`CATEGORIES`) of every token id [V] (long), from each decoded token."""
    V = vocab_size or tokenizer.vocab_size
    index = {name: i for i, name in enumerate(CATEGORIES)}
    out = torch.full((V,), index["other"], dtype=torch.long)
    for i in range(min(V, tokenizer.vocab_size)):
        try:
            out[i] = index[token_category(tokenizer.decode([i]))]
        except Exception:  # special or unused ids some tokenizers refuse to decode
            continue
    return out


def token_pieces(tokenizer: Tokenizer, ids: Sequence[int]) -> list[str]:
    """The text each token adds, by incremental decoding.

    A multi-byte character split over byte tokens shows on the token that completes it; a few
    preceding tokens are decoded along, so tokenizers that drop a leading space when a token is
    decoded alone (SentencePiece) still give ``" word"``.
    """
    ids = list(ids)
    pieces, start = [], 0  # start: first token whose text is not shown yet
    for i in range(len(ids)):
        text_ctx = max(0, start - 4)
        before = tokenizer.decode(ids[text_ctx:start]) if start > text_ctx else ""
        text = tokenizer.decode(ids[text_ctx : i + 1])
        if text.endswith("\ufffd") and i + 1 < len(ids) and i - start < 3:
            pieces.append("")  # an incomplete character
            continue
        pieces.append(text[len(before) :] if text.startswith(before) else tokenizer.decode(ids[start : i + 1]))
        start = i + 1
    return pieces


@torch.no_grad()
def token_routes(
    model: nn.Module, tokenizer: Tokenizer, text: str, max_tokens: int = 256, device: str | torch.device | None = None
) -> dict[str, Any]:
    """Which experts each token of ``text`` went to, in every MoE layer.

    The first ``max_tokens`` tokens are routed in consecutive windows as long as the model's context
    (``config.max_position_embeddings``; one window when it has none).

    Returns:
        ``{"tokens": [str], "ids": [int], "layers": [layer index], "experts": [T][L][K] (-1 = none),
        "weights": [T][L][K], "window": int}``.
    """
    layers = find_moe_layers(model)
    ids = tokenizer.encode(text)[:max_tokens]
    window = getattr(getattr(model, "config", None), "max_position_embeddings", None) or max(len(ids), 1)
    out: dict[str, Any] = {"tokens": [], "ids": ids, "layers": [i for i, _, _ in layers], "experts": []}
    out.update(weights=[], window=window)
    if not ids:
        return out
    was_training = model.training
    model.eval()
    experts, weights = [], []
    for start in range(0, len(ids), window):
        x = torch.tensor([ids[start : start + window]], dtype=torch.long, device=device)
        with capture_routing(model) as seen:
            model(x)
        records = [layer_routing(aux, moe.config.num_experts) for (_, aux), (_, _, moe) in zip(seen, layers)]
        e_TLK, w_TLK = stack_layers(records)
        experts.extend(e_TLK.tolist())
        weights.extend([[[round(w, 4) for w in k] for k in layer] for layer in w_TLK.tolist()])
    model.train(was_training)
    out.update(tokens=token_pieces(tokenizer, ids), experts=experts, weights=weights)
    return out
