"""Tiny models for the serve tests (built from configs, random weights: nothing downloads)."""

from __future__ import annotations

import pytest
import torch

from moekit.models import LMConfig, MoELM
from moekit.nn import MoEConfig

VOCAB = 256  # the byte tokenizer's


def tiny_model(seed: int = 0, context: int = 96, **overrides) -> MoELM:
    """A 2-layer MoE LM with a large init, so greedy answers vary from token to token."""
    torch.manual_seed(seed)
    fields = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=context,
        initializer_range=0.3,
        scaled_residual_init=False,
        moe=MoEConfig(num_experts=4, top_k=2, expert_hidden_size=16),
    )
    return MoELM(LMConfig(**{**fields, **overrides})).eval()


@pytest.fixture(scope="module")
def model() -> MoELM:
    return tiny_model()


@pytest.fixture(scope="module")
def server(model):
    """A live server on the tiny model (byte tokenizer, plain chat template)."""
    from .server import live_server

    with live_server(model, max_tokens_limit=64) as url:
        yield url
