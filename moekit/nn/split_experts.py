"""Stacked experts of which only some train (expert-specialised fine-tuning, ESFT: arXiv 2407.01906).

The chosen experts' weights are split out of the stacks into their own parameters ``train_w_in`` [S, D, X] and
``train_w_out`` [S, H, D]; the stacks become frozen buffers, and each forward puts the trainable rows back in
(one out-of-place ``index_put``) before the usual fused kernel runs. So the frozen experts cannot move (no
gradient, no optimizer state, no weight decay touches them: bit-identical after training), and the optimizer
holds state for the S chosen experts only. A gradient mask on the whole stack would instead keep optimizer
state for all E experts and leave them to decoupled weight decay.

The state dict keeps the plain layout (``w_in``/``w_out`` with the trained rows in place), so a checkpoint of
a split model loads as an ordinary one; :meth:`SplitExperts.merged` gives back plain :class:`Experts`.

Shape legend: E experts, S trainable experts, D hidden, H expert hidden, X = 2H (SwiGLU) or H.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from moekit.errors import ConfigError
from moekit.nn.experts import Experts


class SplitExperts(Experts):
    """:class:`Experts` whose ``trainable`` experts are parameters and the rest frozen buffers."""

    frozen_w_in: torch.Tensor  # buffers, registered in __init__
    frozen_w_out: torch.Tensor
    trainable_experts: torch.Tensor

    def __init__(self, base: Experts, trainable: list[int]):
        if type(base) is not Experts:
            raise ConfigError(f"ESFT needs plain stacked experts, not {type(base).__name__}")
        chosen = sorted(set(trainable))
        if not chosen or chosen[0] < 0 or chosen[-1] >= base.num_experts:
            raise ConfigError(f"trainable experts {trainable} must be a non-empty subset of 0..{base.num_experts - 1}")
        nn.Module.__init__(self)
        self.activation = base.activation
        self.num_experts, self.hidden_size = base.num_experts, base.hidden_size
        self.expert_hidden_size = base.expert_hidden_size
        idx = torch.tensor(chosen, dtype=torch.long, device=base.w_in.device)
        self.register_buffer("trainable_experts", idx, persistent=False)
        self.register_buffer("frozen_w_in", base.w_in.detach(), persistent=False)
        self.register_buffer("frozen_w_out", base.w_out.detach(), persistent=False)
        self.train_w_in = nn.Parameter(base.w_in.detach()[idx].clone())
        self.train_w_out = nn.Parameter(base.w_out.detach()[idx].clone())
        self._register_state_dict_hook(_plain_layout)

    @property
    def w_in(self) -> torch.Tensor:  # type: ignore[override]
        """[E, D, X]: the frozen stack with the trainable rows put in (differentiable in those rows)."""
        return self.frozen_w_in.index_put((self.trainable_experts,), self.train_w_in)

    @property
    def w_out(self) -> torch.Tensor:  # type: ignore[override]
        return self.frozen_w_out.index_put((self.trainable_experts,), self.train_w_out)

    def merged(self) -> Experts:
        """Plain :class:`Experts` holding the trained rows."""
        with torch.device("meta"):  # no init draw: the stacks are replaced
            out = Experts(self.num_experts, self.hidden_size, self.expert_hidden_size, self.activation)
        out.w_in = nn.Parameter(self.w_in.detach().clone())
        out.w_out = nn.Parameter(self.w_out.detach().clone())
        return out


def _plain_layout(module: SplitExperts, state: dict[str, Any], prefix: str, local_metadata: Any) -> dict[str, Any]:
    """State-dict hook: ``w_in``/``w_out`` (trained rows in place) instead of the split parameters."""
    state.pop(prefix + "train_w_in", None)
    state.pop(prefix + "train_w_out", None)
    state[prefix + "w_in"] = module.w_in.detach()
    state[prefix + "w_out"] = module.w_out.detach()
    return state


def split_experts(model: nn.Module, selection: dict[int, list[int]]) -> int:
    """Make the experts of MoE layer i (in :meth:`moe_layers` order of ``model``) trainable only for
    ``selection[i]``, in place; layers missing from ``selection`` keep plain experts. Returns the trainable count."""
    from moekit.nn.replay import moe_layers

    count = 0
    for i, layer in enumerate(moe_layers(model)):
        if selection.get(i):
            layer.experts = SplitExperts(layer.experts, selection[i]).train(layer.experts.training)
            count += len(set(selection[i]))
    return count


def merge_split_experts(model: nn.Module) -> int:
    """Put plain experts back in place of every :class:`SplitExperts`; returns how many."""
    from moekit.nn.replay import moe_layers

    merged = 0
    for layer in moe_layers(model):
        if isinstance(layer.experts, SplitExperts):
            layer.experts = layer.experts.merged()
            merged += 1
    return merged
