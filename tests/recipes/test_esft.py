"""ESFT's expert relevance is the paper's (arXiv 2407.01906, eqs. 5 and 6): per sequence the average over its
tokens, then the average over sequences; padding counts nowhere. Checked against a slow reference that runs
each sequence alone and loops over its tokens and their choices."""

from __future__ import annotations

import pytest
import torch

from moekit.analysis.capture import capture_routing, layer_routing
from moekit.data.tokenizers import ByteTokenizer
from moekit.errors import ConfigError
from moekit.recipes.esft import Relevance, document_sequences, expert_relevance, token_windows
from tests.recipes.helpers import tiny_model

LENGTHS = (3, 29, 1, 17, 8, 24, 2)  # very unequal: a per-token average would weigh the long ones far more


def sequences() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, 256, (n,), generator=g) for n in LENGTHS]


def reference(model, seqs, mode: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(per-sequence average, global token average) per layer, normalised, by loops over sequences and tokens."""
    E = model.config.moe.num_experts
    layers = len(model.moe_layers())
    per_seq = [[0.0] * E for _ in range(layers)]
    pooled = [[0.0] * E for _ in range(layers)]
    with torch.no_grad():
        for seq in seqs:  # each sequence alone: no padding anywhere
            with capture_routing(model) as seen:
                model(seq.unsqueeze(0))
            for layer, (_, aux) in enumerate(seen):
                r = layer_routing(aux, E)
                mine = [0.0] * E
                for t in range(seq.numel()):
                    for k in range(r.experts_TK.shape[1]):
                        e = int(r.experts_TK[t, k])
                        if e >= 0:
                            mine[e] += float(r.weights_TK[t, k]) if mode == "gate" else 1.0
                for e in range(E):
                    per_seq[layer][e] += mine[e] / seq.numel() / len(seqs)
                    pooled[layer][e] += mine[e]

    def normalised(rows):
        return [torch.tensor(row, dtype=torch.float64) / sum(row) for row in rows]

    return normalised(per_seq), normalised(pooled)


@pytest.mark.parametrize("mode", ["gate", "token"])
def test_relevance_averages_per_sequence_without_padding(mode):
    model = tiny_model(seed=1)
    seqs = sequences()
    want, pooled = reference(model, seqs, mode)
    got = expert_relevance(model, seqs, mode, batch_size=3)  # batches padded to their longest sequence
    for layer, (g, w, p) in enumerate(zip(got, want, pooled)):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-6)
        # The test tells the two apart: one global token average is a different answer here.
        assert (w - p).abs().max() > 1e-3, (layer, w, p)
    # The batch size (how much padding) changes nothing.
    for g, h in zip(got, expert_relevance(model, seqs, Relevance(mode), batch_size=len(seqs))):
        torch.testing.assert_close(g, h, rtol=0, atol=1e-6)


def test_calibration_sequences():
    tokens = torch.arange(10)
    assert [w.tolist() for w in token_windows(tokens, 4)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    docs = document_sequences(ByteTokenizer(), "ab\n\n\n\nabcdefg\n\n  ", 4)
    assert [bytes(d.tolist()).decode() for d in docs] == ["ab", "abcd", "efg"]
    with pytest.raises(ConfigError, match="no tokens"):
        expert_relevance(tiny_model(), [torch.zeros(0, dtype=torch.long)], "gate")
