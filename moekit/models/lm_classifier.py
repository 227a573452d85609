"""A pretrained (MoE) language model with a classification head: fine-tuning for text classification.

The language model (a moekit checkpoint, or a Hugging Face Mixtral/Qwen-MoE/OLMoE/DeepSeek folder
imported by moekit.interop.hf) reads the text causally; the head reads the mean of its final hidden
states over the real tokens. Mean pooling rather than HF's last-token pooling: with byte or character
tokenizers the last token is often a full stop, whose state says little about the sentence.
"""

from __future__ import annotations

import torch
from torch import nn

from moekit.errors import ShapeError
from moekit.models.encoder import EncoderOutput, pool_tokens
from moekit.models.lm import MoELM


class LMClassifier(nn.Module):
    """``lm`` + a linear head over its mean-pooled hidden states; returns :class:`EncoderOutput` like the encoder."""

    def __init__(self, lm: MoELM, num_labels: int, max_length: int):
        super().__init__()
        if max_length > lm.config.max_position_embeddings:
            raise ShapeError(
                f"max_length={max_length} exceeds the language model's max_position_embeddings="
                f"{lm.config.max_position_embeddings}"
            )
        self.lm = lm
        self.max_length = max_length
        self.head = nn.Linear(lm.config.hidden_size, num_labels)
        nn.init.normal_(self.head.weight, std=lm.config.initializer_range)
        nn.init.zeros_(self.head.bias)

    def num_parameters(self) -> int:
        return self.lm.num_parameters()["total"] + sum(p.numel() for p in self.head.parameters())

    def active_parameters(self) -> int:
        return self.lm.num_parameters()["active"] + sum(p.numel() for p in self.head.parameters())

    def forward(self, inputs: torch.Tensor, mask: torch.Tensor | None = None, record_routing: bool = False):
        """Class scores of token ids ``inputs`` [B, S] (right-padded; ``mask`` True = real token)."""
        if inputs.dim() != 2 or inputs.dtype != torch.long:
            raise ShapeError(f"text input must be token ids [batch, seq] (long), got {tuple(inputs.shape)}")
        hidden, moe_aux = self.lm.hidden_states(inputs, mask, record_routing)  # [B, S, D]
        logits = self.head(pool_tokens(hidden, None if mask is None else mask.bool()))
        aux_loss = torch.zeros((), dtype=torch.float32, device=logits.device)
        for aux in moe_aux:
            aux_loss = aux_loss + aux.loss.to(aux_loss.device, torch.float32)
        return EncoderOutput(logits=logits, aux_loss=aux_loss, moe_aux=moe_aux)
