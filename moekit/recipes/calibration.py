"""Per-layer expert statistics on calibration data: what expert pruning ranks by and merging clusters by.

One pass of the model over calibration windows (eval mode, no gradients), with a forward hook on every
MoE layer that reads the layer's input and its recorded :class:`~moekit.nn.routing.Routing`:

* ``frequency[e]``: assignments expert e processed (a token's k choices count once each; after
  capacity drops, as ``MoEAux.tokens_per_expert``).
* ``weight[e]``: the summed combine weights of e's assignments.
* ``weighted_output_norm[e]``: sum over e's assignments of ``w_te * ||f_e(x_t)||_2``, the L2 mass
  expert e adds to the layer output. Divided by the tokens it is the expected contribution per
  token, so it folds frequency and magnitude into one number (REAP, Lasby et al. 2025, ranks by the
  same product averaged over e's own tokens; the sum also penalises rarely used experts).
  Computed from the router's assignments before capacity drops (the default layer is dropless).
* ``gram[e, j]``: sum over a sample of calibration tokens of ``<f_e(x_t), f_j(x_t)>``, every expert
  run on every sampled token, routed or not; the cosine similarity of two experts' outputs is
  ``gram[e, j] / sqrt(gram[e, e] * gram[j, j])`` (merging clusters by it, like HC-SMoE, Chen et al. 2024).

Shape legend: T tokens, D hidden, E experts, A assignments, n sampled tokens.
"""

from __future__ import annotations

import dataclasses
import enum
import os
from collections.abc import Iterable
from typing import Any

import torch

from moekit.config import check_choice
from moekit.data.loader import iter_eval_batches
from moekit.data.text import load_text
from moekit.data.tokenizers import Tokenizer
from moekit.errors import ConfigError, DataError
from moekit.models import MoELM
from moekit.nn.moe import MoE


class Criterion(str, enum.Enum):
    """What expert pruning ranks experts by (higher = more important)."""

    FREQUENCY = "frequency"
    ROUTER_WEIGHTED_OUTPUT = "router-weighted-output"


@dataclasses.dataclass
class LayerStats:
    """Statistics of one MoE layer over its ``tokens`` calibration tokens: float64 sums on the CPU, [E] per
    expert as the module docstring defines them; ``gram`` [E, E] covers ``gram_tokens`` tokens (None: not gathered)."""

    layer: int
    num_experts: int
    tokens: int = 0
    frequency: torch.Tensor = None
    weight: torch.Tensor = None
    weighted_output_norm: torch.Tensor = None
    gram: torch.Tensor | None = None
    gram_tokens: int = 0

    def __post_init__(self) -> None:
        E = self.num_experts
        for name in ("frequency", "weight", "weighted_output_norm"):
            if getattr(self, name) is None:
                setattr(self, name, torch.zeros(E, dtype=torch.float64))

    def score(self, criterion: Criterion | str) -> torch.Tensor:
        """[E] importance by ``criterion`` (higher = keep)."""
        criterion = check_choice("criterion", criterion, Criterion)
        if criterion == Criterion.FREQUENCY:
            return self.frequency.clone()
        return self.weighted_output_norm.clone()

    def similarity(self) -> torch.Tensor:
        """[E, E] cosine similarity of the experts' outputs on the sampled tokens (1 on the diagonal)."""
        if self.gram is None or self.gram_tokens == 0:
            raise ConfigError(
                f"layer {self.layer}: no expert-output similarity was gathered (collect_expert_stats(..., "
                "similarity_tokens > 0))"
            )
        norm_E = self.gram.diagonal().clamp(min=1e-30).sqrt()
        sim = self.gram / (norm_E[:, None] * norm_E[None, :])
        sim.fill_diagonal_(1.0)
        return sim.clamp(-1.0, 1.0)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly summary (no Gram matrix)."""
        return {
            "layer": self.layer,
            "num_experts": self.num_experts,
            "tokens": self.tokens,
            "frequency": [int(v) for v in self.frequency.tolist()],
            "weighted_output_norm": [round(v, 6) for v in self.weighted_output_norm.tolist()],
        }


def calibration_batches(
    tokenizer: Tokenizer,
    data: str | os.PathLike | torch.Tensor,
    block_size: int = 128,
    batch_size: int = 16,
    max_batches: int | None = 8,
    vocab_size: int | None = None,
) -> list[torch.Tensor]:
    """Input-id windows [b, block_size], in order, from a text file, folder or JSONL (read by
    :func:`moekit.data.text.load_text`, encoded by ``tokenizer``) or a 1-D tensor of token ids: at most
    ``max_batches`` batches (None: all of it); with ``vocab_size``, every id must be below it."""
    if isinstance(data, torch.Tensor):
        tokens = data.long().reshape(-1)
    else:
        tokens = torch.tensor(tokenizer.encode(load_text(data)), dtype=torch.long)
    if vocab_size is not None and tokens.numel() and int(tokens.max()) >= vocab_size:
        raise DataError(
            f"calibration data has token id {int(tokens.max())} outside the model's vocabulary ({vocab_size})"
        )
    return [x for x, _ in iter_eval_batches(tokens, block_size, batch_size, max_batches=max_batches)]


@torch.no_grad()
def collect_expert_stats(
    model: MoELM, batches: Iterable[torch.Tensor], similarity_tokens: int = 0
) -> dict[int, LayerStats]:
    """Layer index -> :class:`LayerStats` of every MoE layer over ``batches`` of input ids [B, S] (the model runs
    in eval mode; its mode is restored). ``similarity_tokens``: tokens per layer (the first ones seen) on which
    every expert runs to fill the output Gram matrix; 0 skips it (pruning does not need it, merging does)."""
    layers = model.moe_layers()
    if not layers:
        raise ConfigError("the model has no MoE layers: there are no expert statistics to collect")
    stats = {i: LayerStats(layer=i, num_experts=moe.config.num_experts) for i, moe in layers}
    if similarity_tokens > 0:
        for s in stats.values():
            s.gram = torch.zeros(s.num_experts, s.num_experts, dtype=torch.float64)

    def hook_for(layer_stats: LayerStats):
        def hook(module: MoE, args, kwargs, output):
            _accumulate(module, layer_stats, args[0], output[1], similarity_tokens)

        return hook

    handles = [moe.register_forward_hook(hook_for(stats[i]), with_kwargs=True) for i, moe in layers]
    was_training = model.training
    model.eval()
    try:
        seen = 0
        for input_ids in batches:
            model(input_ids, record_routing=True)
            seen += 1
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if seen == 0:
        raise DataError("no calibration batches: the calibration data is empty")
    return stats


def _accumulate(moe: MoE, s: LayerStats, x: torch.Tensor, aux, similarity_tokens: int) -> None:
    routing = aux.routing
    x_TD = x.reshape(-1, x.shape[-1]).float()  # statistics in fp32 whatever the model dtype
    s.tokens += routing.num_valid_tokens()
    s.frequency += aux.tokens_per_expert.detach().cpu().double()
    expert_A, token_A, weight_A = routing.expert_idx_A, routing.token_idx_A, routing.weight_A.float()
    s.weight += torch.zeros(s.num_experts, dtype=torch.float64).index_add_(
        0, expert_A.cpu(), weight_A.detach().cpu().double()
    )
    for e in range(s.num_experts):
        mine = expert_A == e
        if not bool(mine.any()):
            continue
        out_nD = moe.experts.expert_forward(e, x_TD[token_A[mine]])
        s.weighted_output_norm[e] += float((weight_A[mine] * out_nD.norm(dim=-1)).sum())
    if s.gram is not None and s.gram_tokens < similarity_tokens:
        valid = torch.arange(x_TD.shape[0], device=x_TD.device)
        if routing.valid_T is not None:
            valid = valid[routing.valid_T]
        take = valid[: similarity_tokens - s.gram_tokens]
        if take.numel():
            out_EnD = torch.stack([moe.experts.expert_forward(e, x_TD[take]) for e in range(s.num_experts)])
            flat = out_EnD.reshape(s.num_experts, -1).double().cpu()
            s.gram += flat @ flat.t()
            s.gram_tokens += int(take.numel())
