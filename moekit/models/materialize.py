"""A model built on the meta device (no memory, no random init) given its real tensors by assignment.

Loading this way costs no second copy of the weights: the model's parameters *are* the loaded tensors
(mapped views of the file when they come from :func:`moekit.io.load_tensors` on the CPU).
"""

from __future__ import annotations

import torch
from torch import nn

from moekit.errors import CheckpointError


@torch.no_grad()
def materialize(model: nn.Module, tensors: dict[str, torch.Tensor], device: str | torch.device = "cpu") -> None:
    """Assign ``tensors`` (a state dict, tied weights once) to ``model``'s meta parameters, re-tie the output
    head, and create the still-meta non-persistent buffers (load accumulators) as zeros on ``device``."""
    model.load_state_dict(tensors, strict=False, assign=True)
    config = getattr(model, "config", None)
    if getattr(config, "tie_word_embeddings", False):
        model.lm_head.weight = model.embed_tokens.weight  # type: ignore[union-attr]
    for module in model.modules():
        for name, buf in list(module.named_buffers(recurse=False)):
            if buf is not None and buf.is_meta:
                module._buffers[name] = torch.zeros(buf.shape, dtype=buf.dtype, device=device)
    left = [name for name, p in model.named_parameters() if p.is_meta]
    if left:
        raise CheckpointError(f"no weights were loaded for {left[:5]}")
