"""One is_moe_layer rule reproduces the LM's, the encoder's and the seq2seq's old placements."""

import pytest

from moekit.models.placement import is_moe_layer


def _sparse(n, **kw):
    return [i for i in range(n) if is_moe_layer(i, n, **kw)]


# (num_layers, settings, placement the old per-model rules gave)
@pytest.mark.parametrize(
    "n, kw, expected",
    [
        # LM: i >= first_k_dense and i % moe_layer_freq == 0, or the explicit list
        (4, {}, [0, 1, 2, 3]),
        (6, {"first_k_dense": 1}, [1, 2, 3, 4, 5]),
        (6, {"every": 2}, [0, 2, 4]),
        (8, {"first_k_dense": 3, "every": 2}, [4, 6]),
        (5, {"moe_layers": (1, 4)}, [1, 4]),
        (5, {"moe_layers": (1, 4), "first_k_dense": 2, "every": 3}, [1, 4]),
        # V-MoE (encoder, seq2seq stacks): every moe_every-th layer counted so that the last is sparse
        (4, {"every": 1, "last_sparse": True}, [0, 1, 2, 3]),
        (4, {"every": 2, "last_sparse": True}, [1, 3]),
        (5, {"every": 2, "last_sparse": True}, [0, 2, 4]),
        (6, {"every": 3, "last_sparse": True}, [2, 5]),
        (1, {"every": 2, "last_sparse": True}, [0]),
    ],
)
def test_one_rule_reproduces_old_placements(n, kw, expected):
    assert _sparse(n, **kw) == expected


def test_models_use_the_rule():
    from moekit.models.encoder import EncoderClassifier, EncoderConfig

    cfg = EncoderConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=5, num_attention_heads=2, num_labels=2,
        ffn="moe", moe={"num_experts": 4, "top_k": 2}, moe_every=2,
    )  # fmt: skip
    model = EncoderClassifier(cfg)
    kinds = [type(block.mlp).__name__ for block in model.layers]
    assert kinds == ["MoE", "MLP", "MoE", "MLP", "MoE"]
