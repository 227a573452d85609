"""Expert pruning: unused experts go without changing outputs; pruned models save, load, train and analyse."""

from __future__ import annotations

import json

import pytest
import torch

import moekit
from moekit.analysis.load import expert_load
from moekit.errors import CheckpointError, ConfigError
from moekit.models import LMConfig, MoELM
from moekit.recipes import LayerStats, collect_expert_stats, prune, prune_checkpoint, prune_experts, select_experts
from moekit.train import train

from .helpers import FAST, TINY, random_ids, save_model, text_file, tiny_config, tiny_model

UNUSED = [1, 3]


def _silence(model: MoELM, experts, sigmoid=False) -> MoELM:
    """Make ``experts`` of every layer unchoosable: router bias (softmax) or selection bias (sigmoid) -1e4."""
    with torch.no_grad():
        for _, moe in model.moe_layers():
            if sigmoid:
                moe.router.e_score_correction_bias[experts] = -1e4
            else:
                moe.router.bias[experts] = -1e4
    return model


@pytest.mark.parametrize("criterion", ["frequency", "router-weighted-output"])
@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_pruning_experts_that_get_no_tokens_keeps_outputs(criterion, norm_topk_prob):
    model = _silence(tiny_model(config=tiny_config(router_bias=True, norm_topk_prob=norm_topk_prob)), UNUSED)
    ids = random_ids()
    stats = collect_expert_stats(model, [ids, random_ids(1)])
    for s in stats.values():
        assert s.frequency[UNUSED].sum() == 0 and s.frequency.sum() == 2 * 2 * 4 * 24  # top-2, two batches
    pruned, report = prune(model, stats, keep=2, criterion=criterion)
    assert all(info["kept"] == [0, 2] for info in report["layers"].values())
    assert [moe.config.num_experts for _, moe in pruned.moe_layers()] == [2, 2]
    torch.testing.assert_close(pruned(ids).logits, model(ids).logits, rtol=0, atol=1e-6)


def test_pruning_a_sigmoid_router_slices_its_balancing_bias():
    cfg = tiny_config(router="sigmoid_topk", aux_loss_coef=0.0)
    model = _silence(tiny_model(config=cfg), UNUSED, sigmoid=True)
    with torch.no_grad():
        for _, moe in model.moe_layers():
            moe.router.e_score_correction_bias[[0, 2]] = torch.tensor([0.25, -0.5])
    ids = random_ids()
    pruned, _ = prune(model, collect_expert_stats(model, [ids]), keep=2)
    for _, moe in pruned.moe_layers():
        assert moe.router.e_score_correction_bias.tolist() == [0.25, -0.5]
    torch.testing.assert_close(pruned(ids).logits, model(ids).logits, rtol=0, atol=1e-6)


def test_pruned_checkpoint_loads_runs_trains_and_analyses(tmp_path):
    source = save_model(tmp_path / "source", tiny_model(), step=7)
    cal = text_file(tmp_path / "cal.txt")
    report = prune_checkpoint(
        source, tmp_path / "pruned", keep_fraction=0.5, criterion="router-weighted-output", calibration_data=cal,
        block_size=32, batch_size=4, max_batches=2,
    )  # fmt: skip
    model = moekit.load(tmp_path / "pruned")
    # Every layer kept 2: the counts fold into the model's moe config (no per-layer overrides needed).
    assert model.config.moe_layer_overrides is None and model.config.moe.num_experts == 2
    assert [len(info["kept"]) for info in report["layers"].values()] == [2, 2]
    assert report["parameters"]["after"]["total"] < report["parameters"]["before"]["total"]
    saved = json.loads((tmp_path / "pruned" / "compression.json").read_text())
    assert saved["criterion"] == "router-weighted-output"
    assert saved["layers"]["0"]["kept"] == report["layers"]["0"]["kept"]
    # The loaded model is the pruned one: same output as pruning in memory.
    stats = {i: _stats_from(report, i) for i in (0, 1)}
    again, _ = prune(tiny_model(), stats, keep=2, criterion="router-weighted-output")
    ids = random_ids()
    torch.testing.assert_close(model(ids).logits, again(ids).logits, rtol=0, atol=0)
    layers, load = expert_load(model, [ids])
    assert layers == [0, 1] and load.shape == (2, 2) and int(load.sum()) == 2 * 2 * ids.numel()
    result = train(init_from=str(tmp_path / "pruned"), max_steps=2, out_dir=str(tmp_path / "ft"), data=str(cal), **FAST)
    assert moekit.load(result.checkpoint).config == model.config


def _stats_from(report, layer) -> LayerStats:
    info = report["layers"][str(layer)]
    s = LayerStats(layer=layer, num_experts=info["num_experts"])
    s.frequency = torch.tensor(info["frequency"], dtype=torch.float64)
    s.weighted_output_norm = torch.tensor(info["weighted_output_norm"], dtype=torch.float64)
    return s


def test_layers_may_keep_different_counts_and_top_k_is_capped(tmp_path):
    model = tiny_model()
    notes = []
    pruned = prune_experts(model, {0: [0, 1, 3], 1: [2]}, notes)
    assert [moe.config.num_experts for _, moe in pruned.moe_layers()] == [3, 1]
    assert pruned.config.moe_config(1).top_k == 1 and notes == ["layer 1: top_k 2 -> 1 (capped at the 1 experts left)"]
    assert torch.equal(pruned.layers[0].mlp.experts.w_out[2], model.layers[0].mlp.experts.w_out[3])
    assert torch.equal(pruned.layers[1].mlp.router.weight[0], model.layers[1].mlp.router.weight[2])
    assert LMConfig.from_dict(json.loads(json.dumps(pruned.config.to_dict()))) == pruned.config
    save_model(tmp_path / "p", pruned)
    ids = random_ids()
    torch.testing.assert_close(moekit.load(tmp_path / "p")(ids).logits, pruned(ids).logits, rtol=0, atol=0)
    # Pruning a pruned model again works layer by layer.
    twice = prune_experts(pruned, {0: [0, 2]})
    assert [moe.config.num_experts for _, moe in twice.moe_layers()] == [2, 1]


def test_ranking_breaks_ties_by_frequency_then_index():
    s = LayerStats(layer=0, num_experts=4)
    s.frequency = torch.tensor([5.0, 9.0, 9.0, 1.0], dtype=torch.float64)
    s.weighted_output_norm = torch.tensor([2.0, 1.0, 1.0, 3.0], dtype=torch.float64)
    assert select_experts({0: s}, keep=2, criterion="frequency") == {0: [1, 2]}
    assert select_experts({0: s}, keep=2, criterion="router-weighted-output") == {0: [0, 3]}
    assert select_experts({0: s}, keep_fraction=0.75, criterion="frequency") == {0: [0, 1, 2]}
    assert select_experts({0: s}, keep=1, criterion="frequency") == {0: [1]}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(keep=5), "keep=5 exceeds the 4 experts of layer 0"),
        (dict(keep=0), "keep=0 must be a positive number"),
        (dict(keep_fraction=0.1), "keep_fraction=0.1 keeps 0 of the 4 experts of layer 0"),
        (dict(keep_fraction=1.5), r"keep_fraction=1.5 must be in \(0, 1\]"),
        (dict(keep=2, keep_fraction=0.5), "exactly one of keep"),
        (dict(), "exactly one of keep"),
        (dict(keep=2, criterion="usage"), "criterion='usage' is not one of"),
    ],
)
def test_bad_prune_arguments_raise_clear_errors(tmp_path, kwargs, message):
    source = save_model(tmp_path / "source", tiny_model())
    with pytest.raises(ConfigError, match=message):
        prune_checkpoint(source, tmp_path / "out", calibration_data=text_file(tmp_path / "c.txt"), **kwargs)
    assert not (tmp_path / "out").exists()


def test_dense_and_hash_routed_checkpoints_are_refused(tmp_path):
    dense = save_model(tmp_path / "dense", tiny_model(config=TINY.replace(moe=None)))
    cal = text_file(tmp_path / "c.txt")
    with pytest.raises(ConfigError, match="dense model \\(no MoE layers\\): there are no experts to prune"):
        prune_checkpoint(dense, tmp_path / "out", keep=1, calibration_data=cal)
    hashed = tiny_model(config=tiny_config(router="hash"))
    with pytest.raises(ConfigError, match="router='hash'"):
        prune_experts(hashed, {0: [0]})


def test_a_uniformly_pruned_model_exports_to_hugging_face(tmp_path):
    hf = pytest.importorskip("moekit.interop.hf")
    model = tiny_model()
    pruned = prune_experts(model, {0: [1, 2, 3], 1: [0, 1, 3]})
    assert pruned.config.moe_layer_overrides is None and pruned.config.moe.num_experts == 3
    hf.to_hf(pruned, tmp_path / "hf")
    ids = random_ids()
    torch.testing.assert_close(hf.from_hf(tmp_path / "hf")(ids).logits, pruned(ids).logits, rtol=0, atol=1e-6)


def test_an_existing_checkpoint_is_never_overwritten(tmp_path):
    source = save_model(tmp_path / "source", tiny_model())
    with pytest.raises(CheckpointError, match="already holds a checkpoint"):
        prune_checkpoint(source, source, keep=2, calibration_data=text_file(tmp_path / "c.txt"))
