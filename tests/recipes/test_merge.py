"""Expert merging: clustering, identical experts merge without changing outputs, merged models save and load."""

from __future__ import annotations

import json

import pytest
import torch

import moekit
from moekit.errors import ConfigError
from moekit.recipes import cluster_experts, collect_expert_stats, merge, merge_checkpoint

from .helpers import TINY, random_ids, save_model, text_file, tiny_config, tiny_model


def test_average_linkage_clusters_the_most_similar_experts():
    sim = torch.tensor(
        [
            [1.0, 0.9, 0.1, 0.0, 0.2],
            [0.9, 1.0, 0.2, 0.1, 0.1],
            [0.1, 0.2, 1.0, 0.8, 0.3],
            [0.0, 0.1, 0.8, 1.0, 0.5],
            [0.2, 0.1, 0.3, 0.5, 1.0],
        ]
    )
    assert cluster_experts(sim, 5) == [[0], [1], [2], [3], [4]]
    assert cluster_experts(sim, 3) == [[0, 1], [2, 3], [4]]
    # {2,3} vs 4: (0.3 + 0.5) / 2 = 0.4 beats {0,1} vs 4 (0.15) and {0,1} vs {2,3} (0.1).
    assert cluster_experts(sim, 2) == [[0, 1], [2, 3, 4]]
    assert cluster_experts(sim, 1) == [[0, 1, 2, 3, 4]]
    assert cluster_experts(torch.ones(3, 3), 2) == [[0, 1], [2]]  # ties: lowest indices first


def _duplicate_experts(model, pairs):
    """Make expert b an exact copy of expert a (weights and router row) in every layer."""
    with torch.no_grad():
        for _, moe in model.moe_layers():
            for a, b in pairs:
                moe.experts.w_in[b] = moe.experts.w_in[a]
                moe.experts.w_out[b] = moe.experts.w_out[a]
                moe.router.weight[b] = moe.router.weight[a]
    return model


@pytest.mark.parametrize("router", ["softmax_topk", "sigmoid_topk"])
def test_merging_identical_experts_keeps_outputs(router):
    # Top-1 with renormalised weights: a token whose best expert has an identical twin goes to the merged
    # expert with weight 1 (softmax) or its unchanged sigmoid score normalised to 1, as before.
    model = _duplicate_experts(tiny_model(config=tiny_config(top_k=1, router=router)), [(0, 1), (2, 3)])
    ids = random_ids()
    stats = collect_expert_stats(model, [ids, random_ids(1)], similarity_tokens=64)
    assert stats[0].gram_tokens == 64
    merged, report = merge(model, stats, target=2)
    assert all(info["clusters"] == [[0, 1], [2, 3]] for info in report["layers"].values())
    assert all(info["cluster_similarity"] == [1.0, 1.0] for info in report["layers"].values())
    assert [moe.config.num_experts for _, moe in merged.moe_layers()] == [2, 2]
    torch.testing.assert_close(merged(ids).logits, model(ids).logits, rtol=0, atol=1e-6)


def test_merged_weights_are_frequency_weighted_averages():
    model = tiny_model()
    stats = collect_expert_stats(model, [random_ids()], similarity_tokens=32)
    merged, report = merge(model, stats, target=1)
    assert report["notes"] == [f"layer {i}: top_k 2 -> 1 (capped at the 1 experts left)" for i in (0, 1)]
    for (i, moe), (_, new) in zip(model.moe_layers(), merged.moe_layers()):
        f = stats[i].frequency.double() + 1e-3
        w = (f / f.sum()).float()
        expect = (moe.experts.w_in * w[:, None, None]).sum(0)
        torch.testing.assert_close(new.experts.w_in[0], expect)
        torch.testing.assert_close(new.router.weight[0], (moe.router.weight * w[:, None]).sum(0))
        assert new.config.top_k == 1


def test_merged_checkpoint_saves_and_loads(tmp_path):
    source = save_model(tmp_path / "source", tiny_model())
    report = merge_checkpoint(
        source, tmp_path / "merged", 3, calibration_data=text_file(tmp_path / "c.txt"), block_size=32,
        batch_size=4, max_batches=2, similarity_tokens=128,
    )  # fmt: skip
    model = moekit.load(tmp_path / "merged")
    assert model.config.moe_layer_overrides is None and model.config.moe.num_experts == 3
    clusters = report["layers"]["0"]["clusters"]
    assert sorted(e for c in clusters for e in c) == [0, 1, 2, 3] and len(clusters) == 3
    assert json.loads((tmp_path / "merged" / "compression.json").read_text())["method"] == "merge"
    assert torch.isfinite(model(random_ids()).logits).all()


@pytest.mark.parametrize(
    "target, message",
    [(4, "target=4 must be below the 4 experts of layer 0"), (0, "target=0 must be a positive number")],
)
def test_bad_merge_targets_raise_clear_errors(tmp_path, target, message):
    source = save_model(tmp_path / "source", tiny_model())
    with pytest.raises(ConfigError, match=message):
        merge_checkpoint(source, tmp_path / "out", target, calibration_data=text_file(tmp_path / "c.txt"))


def test_merging_a_dense_model_or_without_similarity_is_refused(tmp_path):
    dense = save_model(tmp_path / "dense", tiny_model(config=TINY.replace(moe=None)))
    with pytest.raises(ConfigError, match="no experts to merge"):
        merge_checkpoint(dense, tmp_path / "out", 1, calibration_data=text_file(tmp_path / "c.txt"))
    model = tiny_model()
    with pytest.raises(ConfigError, match="no expert-output similarity was gathered"):
        merge(model, collect_expert_stats(model, [random_ids()]), target=2)
