"""Statistics on hand-made counts and routings with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from moekit.analysis import stats, tokens
from moekit.analysis.recorder import RoutingRecorder
from moekit.data.tokenizers import ByteTokenizer
from tests.analysis.helpers import FakeMoEModel, make_aux


def test_imbalance_and_cv():
    assert stats.imbalance([10, 10, 10, 10]) == 1.0
    assert stats.coefficient_of_variation([10, 10, 10, 10]) == 0.0
    assert stats.imbalance([40, 0, 0, 0]) == 4.0  # one expert takes all: E
    assert stats.coefficient_of_variation([1, 3]) == pytest.approx(0.5)  # std 1, mean 2
    assert stats.coefficient_of_variation([40, 0, 0, 0]) == pytest.approx(math.sqrt(3))
    assert math.isnan(stats.imbalance([0, 0]))


def test_dead_experts():
    assert stats.dead_experts([10, 10, 0, 10]) == [2]
    assert stats.dead_experts([100, 100, 0.5, 100]) == [2]  # under 1% of the fair share
    assert stats.dead_experts([100, 100, 0.5, 100], dead_fraction=0.0) == []
    assert stats.dead_experts([100, 100, 0, 100], dead_fraction=0.0) == [2]
    assert stats.dead_experts([5, 5, 5]) == []


def test_total_variation():
    assert stats.total_variation([1, 0], [0, 1]) == 1.0
    assert stats.total_variation([3, 1], [1, 3]) == pytest.approx(0.5)
    assert stats.total_variation([2, 2], [5, 5]) == 0.0  # scale does not matter


def test_mutual_information_independent_is_zero():
    p_label, p_expert = np.array([0.5, 0.3, 0.2]), np.array([0.1, 0.2, 0.3, 0.4])
    joint = np.outer(p_label, p_expert) * 1000
    assert stats.mutual_information(joint) == pytest.approx(0.0, abs=1e-12)
    assert stats.normalised_mutual_information(joint) == pytest.approx(0.0, abs=1e-12)


def test_mutual_information_deterministic_is_label_entropy():
    counts = [50, 30, 20]
    h = -sum(c / 100 * math.log2(c / 100) for c in counts)
    joint = np.zeros((3, 5))
    for label, (c, expert) in enumerate(zip(counts, [4, 0, 2])):  # label -> its own expert
        joint[label, expert] = c
    assert stats.entropy_bits(counts) == pytest.approx(h)
    assert stats.mutual_information(joint) == pytest.approx(h)
    assert stats.normalised_mutual_information(joint) == pytest.approx(1.0)


def test_specialisation_lift_and_top_experts():
    joint = [[30, 10, 0], [10, 30, 20]]  # P(e) = [40, 40, 20] / 100
    spec = stats.specialisation(joint, ["a", "b"])
    assert spec["distribution"][0].tolist() == pytest.approx([0.75, 0.25, 0.0])
    assert spec["lift"][0].tolist() == pytest.approx([0.75 / 0.4, 0.25 / 0.4, 0.0])
    assert spec["top_experts"]["a"][0]["expert"] == 0
    assert spec["top_experts"]["b"][0]["expert"] == 2  # lift (20/60)/0.2 = 1.67 beats expert 1's 1.25
    assert spec["top_experts"]["b"][0]["lift"] == pytest.approx((20 / 60) / 0.2)


def test_coactivation_conditional():
    c = np.array([[3, 2, 1], [2, 2, 0], [1, 0, 1]])
    m = stats.coactivation_conditional(c)
    assert m[0].tolist() == pytest.approx([0.0, 2 / 3, 1 / 3])
    assert m[1].tolist() == pytest.approx([1.0, 0.0, 0.0])


def test_layer_agreement():
    E = 4
    perm = np.zeros((E, E))
    for i in range(E):
        perm[i, (i + 1) % E] = 10  # a deterministic, one-to-one path with no index in common
    a = stats.layer_agreement(perm)
    assert a["predictability"] == 1.0 and a["same_expert"] == 0.0
    assert a["nmi"] == pytest.approx(1.0) and a["mi_bits"] == pytest.approx(2.0)
    assert stats.layer_agreement(np.eye(E) * 7)["same_expert"] == 1.0
    independent = stats.layer_agreement(np.ones((E, E)))
    assert independent["nmi"] == pytest.approx(0.0, abs=1e-12)
    assert independent["predictability"] == pytest.approx(1 / E)


@pytest.mark.parametrize(
    "text, category",
    [("abc", "letters"), (" the", "letters"), ("é", "letters"), ("123", "digits"), (",", "punctuation"),
     ("$+", "punctuation"), ("\n", "whitespace"), ("  ", "whitespace"), ("a1", "other"), ("\ufffd", "other")],
)  # fmt: skip
def test_token_category(text, category):
    assert tokens.token_category(text) == category


def test_category_table_of_byte_tokenizer():
    table = tokens.category_table(ByteTokenizer())
    names = [tokens.CATEGORIES[i] for i in table.tolist()]
    assert names[ord("a")] == "letters" and names[ord("7")] == "digits"
    assert names[ord(" ")] == "whitespace" and names[ord(";")] == "punctuation"
    assert names[0xC3] == "other"  # a lone UTF-8 lead byte


def test_token_pieces_keep_multibyte_characters_whole():
    tok = ByteTokenizer()
    text = "héllo ✓ ok"
    pieces = tokens.token_pieces(tok, tok.encode(text))
    assert "".join(pieces) == text
    assert len(pieces) == len(tok.encode(text))
    assert "é" in pieces and "✓" in pieces


# -- recorder aggregates on hand-made routings ---------------------------------------------------
def _record(layers_experts, labels=None, num_experts=4, top_k=1, label_names=None, probs=None):
    model = FakeMoEModel(num_layers=len(layers_experts), num_experts=num_experts, top_k=top_k)
    rec = RoutingRecorder(model, label_names=label_names)
    auxes = [make_aux(e, num_experts=num_experts, probs_TE=probs) for e in layers_experts]
    rec.observe(auxes, labels=None if labels is None else torch.tensor(labels))
    return rec, stats.summarize(rec.aggregates())


def test_recorded_mi_is_label_entropy_for_a_deterministic_map():
    labels = [0] * 6 + [1] * 3 + [2] * 3
    experts = [[{0: 3, 1: 1, 2: 0}[lab]] for lab in labels]
    _, s = _record([experts], labels=labels, label_names=["x", "y", "z"])
    spec = s["layers"][0]["specialisation"]
    h = stats.entropy_bits([6, 3, 3])
    assert spec["mi_bits"] == pytest.approx(h, abs=1e-6)
    assert spec["mi_normalised"] == pytest.approx(1.0, abs=1e-6)
    assert spec["top_experts"]["x"][0]["expert"] == 3


def test_recorded_mi_is_zero_when_routing_ignores_the_label():
    labels = [0, 0, 0, 0, 1, 1, 1, 1]
    experts = [[0], [1], [2], [3], [0], [1], [2], [3]]
    _, s = _record([experts], labels=labels, label_names=["a", "b"])
    assert s["layers"][0]["specialisation"]["mi_bits"] == pytest.approx(0.0, abs=1e-9)


def test_recorded_balance_dead_and_coactivation():
    experts = [[0, 1], [0, 1], [2, 0], [1, 2]]  # expert 3 never chosen
    _, s = _record([experts], top_k=2)
    layer = s["layers"][0]
    assert layer["load"] == [3, 3, 2, 0]
    assert layer["imbalance"] == pytest.approx(3 / 2)
    assert layer["dead_experts"] == [3]
    assert layer["coactivation"][0][1] == 2 and layer["coactivation"][0][2] == 1 and layer["coactivation"][1][2] == 1
    assert [layer["coactivation"][i][i] for i in range(4)] == [3, 3, 2, 0]
    assert layer["coactivation_conditional"][0][1] == pytest.approx(2 / 3)
    assert layer["top1"] == [3, 1, 0, 0]  # equal weights: the lower index is top-1


def test_recorded_layer_agreement_and_transition():
    first = [[0], [1], [2], [3], [0], [1]]
    second = [[1], [2], [3], [0], [1], [2]]  # e -> e + 1
    _, s = _record([first, second])
    t = s["transitions"][0]
    assert t["predictability"] == 1.0 and t["same_expert"] == 0.0
    assert t["matrix"][0][1] == 2 and t["matrix"][3][0] == 1


def test_entropy_histogram_bins():
    probs = torch.tensor([[0.25] * 4, [1.0, 0.0, 0.0, 0.0], [0.25] * 4])
    _, s = _record([[[0], [0], [1]]], probs=probs)
    ent = s["layers"][0]["entropy"]
    assert ent["histogram"][-1] == 2 and ent["histogram"][0] == 1
    assert ent["mean_normalised"] == pytest.approx(2 / 3, abs=1e-6)
    assert ent["mean_nats"] == pytest.approx(2 * math.log(4) / 3, abs=1e-6)
