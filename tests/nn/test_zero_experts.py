"""MoE++ zero-computation experts (zero, copy, constant) and gating residuals: the fast layer equals the slow
reference, each kind adds what the paper says, the balance loss weighs them by tau, and an LM with them trains,
decodes with a KV cache, saves, and refuses Hugging Face export."""

from __future__ import annotations

import pytest
import torch

from moekit.analysis import RoutingRecorder, capture_routing
from moekit.analysis.plots import Plot
from moekit.analysis.readings import readings
from moekit.analysis.report import render_html
from moekit.analysis.stats import summarize
from moekit.checkpoint import load_model, model_tensors, write_model_folder
from moekit.data import ByteTokenizer
from moekit.errors import ConfigError, ShapeError
from moekit.inference import generate
from moekit.interop.hf.config_export import hf_config_from_lm
from moekit.models import LMConfig, MoELM
from moekit.nn import MoE, MoEConfig, reference_moe
from moekit.nn.replay import RouterReplay
from moekit.nn.zero_experts import candidate_kinds
from moekit.recipes.prune import prune_experts
from tests.nn.helpers import make_layer
from tests.nn.test_moe import assert_matches_reference

MOE_PP = dict(num_experts=4, zero_experts=1, copy_experts=1, constant_experts=2)


def pp_layer(router="softmax_topk", **overrides) -> MoE:
    fields = {**MOE_PP, "router_bias": True, **overrides}
    if router == "sigmoid_topk":
        fields.setdefault("n_group", 1)
        fields.setdefault("topk_group", 1)
    return make_layer(router, **fields)


def favour(layer: MoE, candidate: int) -> None:
    """Make every token pick ``candidate`` first (router bias +30 there, 0 elsewhere)."""
    with torch.no_grad():
        layer.router.bias.zero_()
        layer.router.bias[candidate] = 30.0


# -- fast path == reference -------------------------------------------------------------------------------
@pytest.mark.parametrize("router", ["softmax_topk", "sigmoid_topk"])
@pytest.mark.parametrize("capacity_factor", [None, 0.75])
@pytest.mark.parametrize("shape", [(1, 12), (2, 9, 12), (33, 12)], ids=["one-token", "batch", "flat"])
def test_fast_path_equals_reference(router, capacity_factor, shape):
    layer = pp_layer(router, capacity_factor=capacity_factor, num_shared_experts=1, top_k=3)
    x = torch.randn(shape)
    grads = assert_matches_reference(layer, x)
    assert grads["router.weight"].abs().sum() > 0
    if x.numel() > 12:  # enough tokens that some pick a constant expert
        for name in ("zero_computation.constant_vectors", "zero_computation.constant_gates"):
            assert grads[name].abs().sum() > 0, f"no gradient reached {name}"


def test_fast_path_equals_reference_with_padding():
    layer = pp_layer()
    x = torch.randn(3, 8, 12)
    mask = torch.ones(3, 8, dtype=torch.bool)
    mask[0, :3] = False
    mask[2] = False
    y, aux = layer(x, mask=mask)
    assert torch.all(y[~mask] == 0)
    assert int(aux.tokens_per_expert.sum() + aux.zero_computation_load.sum()) == 2 * int(mask.sum())
    assert_matches_reference(layer, x, mask=mask)


def test_fast_path_equals_reference_with_gating_residual():
    layer = pp_layer(gating_residual=True)
    with torch.no_grad():
        layer.gating_residual.weight.normal_()
    x = torch.randn(2, 5, 12)
    prev = torch.randn(10, layer.config.num_candidates)
    torch.manual_seed(1)
    up = torch.randn(x.shape)
    y = layer(x, prev_logits=prev)[0]
    assert (y - reference_moe(layer, x, prev_logits=prev)).abs().max() <= 1e-5
    g = torch.autograd.grad((y * up).sum(), layer.gating_residual.weight)[0]
    g_ref = torch.autograd.grad((reference_moe(layer, x, prev_logits=prev) * up).sum(), layer.gating_residual.weight)
    assert g.abs().sum() > 0 and (g - g_ref[0]).abs().max() <= 1e-5


def test_inference_mode_takes_the_general_path_and_matches():
    layer = pp_layer().eval()
    x = torch.randn(1, 1, 12)
    with torch.inference_mode():
        y, aux = layer(x)
    assert aux.zero_computation_load is not None  # not the few-token path, which knows no zero experts
    assert (y - reference_moe(layer, x).detach()).abs().max() <= 1e-6


# -- what each kind adds ----------------------------------------------------------------------------------
def test_zero_expert_adds_exactly_nothing():
    layer = pp_layer(top_k=1, norm_topk_prob=False)
    favour(layer, 4)  # the zero expert
    x = torch.randn(2, 6, 12)
    y, aux = layer(x)
    assert torch.equal(y, torch.zeros_like(x))  # the block's output is exactly its residual
    assert int(aux.ffn_skipped_tokens) == 12 and int(aux.tokens_per_expert.sum()) == 0
    assert aux.zero_computation_load.tolist() == [12, 0, 0, 0]


def test_copy_expert_adds_weighted_input():
    layer = pp_layer(top_k=1, norm_topk_prob=False)
    favour(layer, 5)  # the copy expert
    x = torch.randn(7, 12)
    y, aux = layer(x, record_routing=True)
    assert torch.all(aux.routing.expert_idx_A == 5)
    assert torch.allclose(y, x * aux.routing.weight_A.unsqueeze(-1), atol=1e-7)
    assert int(aux.ffn_skipped_tokens) == 7


@pytest.mark.parametrize("j", [0, 1])
def test_constant_expert_follows_the_formula(j):
    layer = pp_layer(top_k=1, norm_topk_prob=False)
    favour(layer, 6 + j)  # constant expert j
    x = torch.randn(5, 12)
    y, aux = layer(x, record_routing=True)
    zc = layer.zero_computation
    a = torch.softmax(x @ zc.constant_gates[j].t(), dim=-1)  # [T, 2]: MoE++'s [a1, a2] = softmax(W_c x)
    expected = aux.routing.weight_A.unsqueeze(-1) * (a[:, :1] * x + a[:, 1:] * zc.constant_vectors[j])
    assert torch.allclose(y, expected, atol=1e-6)


def test_candidate_kinds_and_config_checks():
    assert (
        candidate_kinds(MoEConfig(expert_hidden_size=4, **MOE_PP)) == ["ffn"] * 4 + ["zero", "copy"] + ["constant"] * 2
    )
    assert MoEConfig(expert_hidden_size=4, num_experts=2, zero_experts=2, top_k=3).num_candidates == 4
    with pytest.raises(ConfigError, match="need router='softmax_topk' or 'sigmoid_topk'"):
        MoEConfig(expert_hidden_size=4, num_experts=4, zero_experts=1, router="expert_choice")
    with pytest.raises(ConfigError, match="gating_residual"):
        MoEConfig(expert_hidden_size=4, num_experts=4, gating_residual=True, router="hash")
    with pytest.raises(ConfigError, match="n_group"):
        MoEConfig(expert_hidden_size=4, num_experts=4, zero_experts=1, router="sigmoid_topk", n_group=2)
    with pytest.raises(ConfigError, match="copy_experts must be an integer >= 0"):
        MoEConfig(expert_hidden_size=4, num_experts=4, copy_experts=-1)
    with pytest.raises(ConfigError, match="top_k=7 exceeds num_experts=4 \\+ 2 zero-computation"):
        MoEConfig(expert_hidden_size=4, num_experts=4, zero_experts=2, top_k=7)


# -- balancing ---------------------------------------------------------------------------------------------
def test_balance_loss_weighs_zero_computation_experts_by_tau():
    layer = pp_layer(zero_expert_balance_weight=0.25, aux_loss_coef=1.0, z_loss_coef=0.0, seq_aux_loss_coef=0.0)
    x = torch.randn(40, 12)
    _, aux = layer(x, record_routing=True)
    r = aux.routing
    N, T = layer.config.num_candidates, 40
    f = torch.bincount(r.expert_idx_A, minlength=N).float() / T
    P = r.probs_TE.mean(dim=0)
    eta = torch.tensor([1.0] * 4 + [0.25] * 4)
    assert torch.allclose(aux.losses["aux"], N * (eta * f * P).sum(), rtol=1e-5)
    assert torch.equal(aux.zero_computation_load, torch.bincount(r.expert_idx_A, minlength=N)[4:])


def test_sigmoid_bias_update_covers_every_candidate():
    layer = pp_layer("sigmoid_topk").train()
    layer(torch.randn(30, 12))
    assert layer.router.load_since_update.shape == (8,) and layer.router.load_since_update.sum() == 60
    layer.update_bias()
    assert layer.router.e_score_correction_bias.abs().sum() > 0


# -- gating residual ---------------------------------------------------------------------------------------
def test_gating_residual_adds_the_projected_previous_logits():
    layer = pp_layer(gating_residual=True)
    with torch.no_grad():
        layer.gating_residual.weight.normal_()
    x, prev = torch.randn(6, 12), torch.randn(6, 8)
    _, aux = layer(x, prev_logits=prev, record_routing=True)
    expected = x @ layer.router.weight.t() + layer.router.bias + prev @ layer.gating_residual.weight.t()
    assert torch.allclose(aux.routing.logits_TE, expected, atol=1e-5)
    assert aux.gate_logits is aux.routing.logits_TE
    with pytest.raises(ShapeError, match="needs prev_logits"):
        layer(x)
    with pytest.raises(ShapeError, match="scores 3 candidates"):
        layer(x, prev_logits=torch.randn(6, 3))


def tiny_lm(seed=0, layers=3, first_k_dense=1, moe_layer_overrides=None, **moe) -> MoELM:
    fields = {**MOE_PP, "expert_hidden_size": 16, "gating_residual": True, **moe}
    torch.manual_seed(seed)
    config = LMConfig(
        vocab_size=256,  # the byte tokenizer's, so a checkpoint loads
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        initializer_range=0.3,
        scaled_residual_init=False,
        first_k_dense=first_k_dense,
        moe=MoEConfig(**fields),
        moe_layer_overrides=moe_layer_overrides,
    )
    return MoELM(config)


def test_lm_chains_router_logits_and_the_first_moe_layer_has_no_residual():
    model = tiny_lm(layers=4).eval()
    (i0, first), (_, second), (_, third) = model.moe_layers()
    assert i0 == 1 and first.gating_residual is None and not first.config.gating_residual
    assert second.gating_residual is not None and third.gating_residual is not None
    with torch.no_grad():
        for moe in (second, third):
            moe.gating_residual.weight.normal_()
    inputs = []
    second.register_forward_pre_hook(lambda m, args, kwargs: inputs.append(args[0]), with_kwargs=True)
    x = torch.randint(0, 40, (2, 7))
    with torch.no_grad():
        out = model(x, record_routing=True)
    a0, a1, _ = out.moe_aux
    expected = second.router.logits(inputs[0].reshape(-1, 32)) + a0.gate_logits @ second.gating_residual.weight.t()
    assert torch.allclose(a1.routing.logits_TE, expected, atol=1e-5)


def test_gating_residual_needs_layers_with_the_same_candidates():
    with pytest.raises(ConfigError, match="gating_residual: MoE layer 2 scores 9 candidates"):
        tiny_lm(moe_layer_overrides={2: {"zero_experts": 2}})


@pytest.mark.parametrize("moe", [MOE_PP, dict(num_experts=4, gating_residual=True)], ids=["zero+residual", "residual"])
def test_cached_greedy_generation_equals_full_recompute(moe):
    model = tiny_lm(**moe).eval()
    prompt = [5, 17, 3, 30, 8]
    got = generate(model, [prompt], max_new_tokens=16, temperature=0)[0]
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(16):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    assert got == seq[len(prompt) :]
    assert len(set(got)) > 2


def test_tiny_lm_trains_and_uses_every_kind():
    model = tiny_lm(seed=1, aux_loss_coef=0.01).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    # A learnable stream: each sequence counts up from a random start (mod vocab).
    starts = torch.randint(0, 40, (8, 1), generator=g)
    batch = (starts + torch.arange(16)) % 40
    losses = []
    for _ in range(50):
        out = model(batch, labels=batch)
        (out.loss + out.aux_loss).backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    load = sum(aux.zero_computation_load for aux in out.moe_aux)
    assert load.shape == (4,) and int(load.sum()) > 0


def test_checkpoint_round_trip(tmp_path):
    model = tiny_lm().eval()
    with torch.no_grad():
        for _, moe in model.moe_layers()[1:]:
            moe.gating_residual.weight.normal_()
    write_model_folder(tmp_path / "m", model_tensors(model), {"model": model.config.to_dict()}, ByteTokenizer())
    loaded, _ = load_model(tmp_path / "m")
    assert loaded.config == model.config
    x = torch.randint(0, 40, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)


@pytest.mark.parametrize(
    ("moe", "named"),
    [(dict(zero_experts=1), "zero_computation_experts"), (dict(copy_experts=2), "zero_computation_experts")]
    + [(dict(gating_residual=True), "gating_residual=True in the model")],
)
def test_hugging_face_export_refuses_moe_pp(moe, named):
    model = tiny_lm(**{"zero_experts": 0, "copy_experts": 0, "constant_experts": 0, "gating_residual": False, **moe})
    with pytest.raises(ConfigError, match=f"cannot export this model as qwen2_moe: layers.1.mlp.{named}"):
        hf_config_from_lm(model.config)


# -- statistics and the routing report ----------------------------------------------------------------------
def test_routing_report_counts_tokens_that_skip_the_ffn():
    model = tiny_lm(router_bias=True, top_k=1).eval()
    (i0, first), (i1, second) = model.moe_layers()
    with torch.no_grad():
        first.router.bias[4] = 3.0  # the zero expert: many (not all) tokens of layer 1 skip the FFN
    rec = RoutingRecorder(model)
    x = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    with capture_routing(model) as seen:
        model(x)
    skipped = []
    for _, aux in seen:
        r = aux.routing
        ffn_T = torch.zeros(r.num_tokens, dtype=torch.bool)
        ffn_T[r.token_idx_A[r.expert_idx_A < 4]] = True
        skipped.append(int((~ffn_T).sum()))
        assert int(aux.ffn_skipped_tokens) == skipped[-1]
    assert 0 < skipped[0] < 64
    rec.update(x)
    summary = summarize(rec.aggregates())
    layer = summary["layers"][0]
    zc = layer["zero_computation"]
    assert zc["kinds"] == candidate_kinds(first.config) and zc["ffn_skipped_tokens"] == skipped[0]
    assert sum(zc["assignment_share"].values()) == pytest.approx(1.0)
    assert layer["num_experts"] == 8 and len(layer["load"]) == 8 and sum(layer["processed"]) == 64
    assert layer["dead_experts"] == [e for e in layer["dead_experts"] if e < 4]  # balance: FFN experts only
    lines = readings(summary)
    expected = f"{skipped[0] / 64:.0%} of tokens skipped the FFN in layer {i0}"
    assert any(line.startswith(expected) for line in lines["overview"])
    assert any(
        line.startswith(f"{skipped[1] / 64:.0%} of tokens skipped the FFN in layer {i1}") for line in lines["load"]
    )
    assert expected in render_html(summary, [Plot("load_heatmap", "load", "caption", b"", "layers")])


@pytest.mark.parametrize("moe", [dict(zero_experts=1), dict(zero_experts=0, copy_experts=0, constant_experts=0)])
def test_pruning_and_merging_refuse_moe_pp(moe):
    model = tiny_lm(**moe)
    with pytest.raises(ConfigError, match="layer [12] has MoE\\+\\+ zero-computation experts or a gating residual"):
        prune_experts(model, {1: [0, 1], 2: [0, 1]})


@pytest.mark.parametrize("moe", [dict(zero_experts=1), dict(zero_experts=0, copy_experts=0, constant_experts=0)])
def test_router_replay_refuses_moe_pp(moe):
    model = tiny_lm(**moe)
    with pytest.raises(ConfigError, match="router replay does not support MoE\\+\\+ layers"):
        with RouterReplay(model):
            model(torch.randint(0, 256, (1, 5)))
