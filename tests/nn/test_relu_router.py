"""ReLU routing (ReMoE): routing against a loop over the paper's rule, the layer against reference_moe, the
adaptive L1 coefficient, sparsity held at the target in a small training run, checkpoints and export."""

from __future__ import annotations

import math

import pytest
import torch

import moekit
from moekit.checkpoint import load_model, model_tensors, write_model_folder
from moekit.data.tokenizers import ByteTokenizer
from moekit.errors import ConfigError, ShapeError
from moekit.models import LMConfig, MoELM
from moekit.nn import MoE, MoEConfig, reference_moe
from moekit.nn.relu_router import ReLURouter
from tests.nn.helpers import make_layer
from tests.nn.test_moe import assert_matches_reference


def relu_layer(**overrides) -> MoE:
    return make_layer("relu", **{"num_experts": 8, "top_k": 2, **overrides})


def loop_routing(layer: MoE, x_TD: torch.Tensor, valid_T=None) -> list[tuple[int, int, float]]:
    """(token, expert, weight) for every positive gate ReLU(W x) of a routed token, one dot product at a time."""
    W = layer.router.weight.detach().double()
    out = []
    for t in range(x_TD.shape[0]):
        if valid_T is not None and not valid_T[t]:
            continue
        for e in range(W.shape[0]):
            gate = max(0.0, float(W[e] @ x_TD[t].double()))
            if gate > 0:
                out.append((t, e, gate))
    return out


def assignments(routing) -> list[tuple[int, int, float]]:
    return list(zip(routing.token_idx_A.tolist(), routing.expert_idx_A.tolist(), routing.weight_A.tolist()))


def test_routing_equals_a_loop_over_the_gates():
    layer = relu_layer()
    x = torch.randn(11, 12)
    mine, ref = assignments(layer.route(x)), loop_routing(layer, x)
    assert [(t, e) for t, e, _ in mine] == [(t, e) for t, e, _ in ref]
    assert all(math.isclose(a[2], b[2], rel_tol=1e-5, abs_tol=1e-6) for a, b in zip(mine, ref))


def test_zero_gates_make_no_assignment_and_the_count_varies_per_token():
    layer = relu_layer()
    x = torch.randn(40, 12)
    routing = layer.route(x)
    gates = (x @ layer.router.weight.t()).relu()
    assert routing.num_assignments == int((gates > 0).sum())
    assert bool((routing.weight_A > 0).all())
    per_token = torch.bincount(routing.token_idx_A, minlength=40)
    assert per_token.unique().numel() > 1, "a relu router gives tokens different numbers of experts"
    # The dispatch computes only those: the experts process exactly the positive gates.
    _, aux = layer(x)
    assert torch.equal(aux.tokens_per_expert, (gates > 0).sum(0))


def test_a_token_without_positive_gates_skips_the_experts_and_is_not_dropped():
    layer = make_layer("relu", num_experts=2, top_k=1, num_shared_experts=0)
    x = torch.randn(50, 12)
    y, aux = layer(x)
    idle = (x @ layer.router.weight.t()).relu().sum(1) == 0
    assert idle.sum() > 0
    assert bool((y[idle] == 0).all()) and bool((y[~idle] != 0).any(-1).all())
    assert aux.dropped_tokens == 0


def test_choice_rank_orders_a_tokens_gates():
    routing = relu_layer().route(torch.randn(9, 12))
    for t in range(9):
        mine = routing.token_idx_A == t
        by_rank = routing.weight_A[mine][routing.choice_rank_A[mine].argsort()]
        assert torch.equal(by_rank, by_rank.sort(descending=True).values)
        assert sorted(routing.choice_rank_A[mine].tolist()) == list(range(int(mine.sum())))


@pytest.mark.parametrize("shape", [(1, 12), (2, 9, 12), (33, 12)], ids=["one-token", "batch", "flat"])
def test_layer_equals_reference_in_output_and_gradients(shape):
    layer = relu_layer(num_shared_experts=1, shared_expert_gate=True)
    grads = assert_matches_reference(layer, torch.randn(shape))
    assert grads["router.weight"].abs().sum() > 0, "no gradient reached the router"


def test_router_gradient_equals_a_dense_masked_computation():
    """The layer's router gradient equals autograd through sum_e ReLU(Wx)_e * expert_e(x) with every expert run."""
    layer = relu_layer(dtype=torch.float64, num_shared_experts=0)
    x = torch.randn(3, 5, 12, dtype=torch.float64)
    upstream = torch.randn_like(x)
    layer.zero_grad()
    (layer(x)[0] * upstream).sum().backward()
    fast = layer.router.weight.grad.clone()
    w = layer.router.weight.detach().clone().requires_grad_(True)
    x_TD = x.reshape(-1, 12)
    gates_TE = (x_TD @ w.t()).relu()
    out_TED = torch.stack([layer.experts.expert_forward(e, x_TD) for e in range(8)], dim=1).detach()
    dense_TD = (gates_TE.unsqueeze(-1) * out_TED).sum(1)
    (dense_TD * upstream.reshape(-1, 12)).sum().backward()
    assert torch.allclose(fast, w.grad, atol=1e-10)
    assert fast.abs().sum() > 0


def test_padding_is_not_routed_and_not_counted():
    layer = relu_layer(num_shared_experts=0)
    x = torch.randn(2, 5, 12)
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1]])
    layer.train()
    y, aux = layer(x, mask=mask, record_routing=True)
    assert torch.all(y[mask == 0] == 0)
    valid = mask.reshape(-1).bool()
    mine, ref = assignments(aux.routing), loop_routing(layer, x.reshape(-1, 12), valid)
    assert [(t, e) for t, e, _ in mine] == [(t, e) for t, e, _ in ref]
    assert {t for t, _, _ in mine} <= set(valid.nonzero().flatten().tolist())
    assert float(layer.router.tokens_since_update) == 7
    gates = (x.reshape(-1, 12)[valid] @ layer.router.weight.t()).relu()
    assert torch.equal(layer.router.load_since_update, (gates > 0).sum(0).float())
    assert_matches_reference(layer, x, mask=mask)


def test_l1_loss_and_its_balanced_form():
    x = torch.randn(30, 12)
    for balanced in (False, True):
        layer = relu_layer(relu_l1_balanced=balanced, relu_l1_init=0.5, z_loss_coef=0.0)
        _, aux = layer(x)
        gates = (x @ layer.router.weight.t()).relu()
        weight_E = (gates > 0).sum(0) * 8 / (2 * 30) if balanced else torch.ones(8)
        expected = (gates * weight_E).sum() / 30
        assert torch.allclose(aux.losses["l1"], expected, atol=1e-5)
        assert torch.allclose(aux.loss, 0.5 * expected, atol=1e-5)
        assert set(aux.losses) == {"l1"}  # the Switch and sequence losses (on in make_layer) are not relu's


def _observe(layer: MoE, active: int) -> None:
    """Feed the layer one training batch in which every token has ``active`` positive gates."""
    E = layer.config.num_experts
    with torch.no_grad():
        layer.router.weight.copy_(torch.cat([torch.eye(E, 12)[:active], -torch.eye(E, 12)[active:]]))
    layer.train()
    layer(torch.ones(10, 12).index_fill_(1, torch.arange(E, 12), 0.0))


def test_l1_coefficient_rises_with_too_many_experts_and_falls_with_too_few():
    layer = relu_layer(relu_l1_init=1e-3, relu_l1_alpha=1.5)
    _observe(layer, active=5)  # target is top_k=2 of 8
    assert layer.router.sparsity() == pytest.approx(1 - 5 / 8)
    layer.update_bias()
    assert float(layer.router.l1_coef) == pytest.approx(1.5e-3)
    assert float(layer.router.tokens_since_update) == 0 and float(layer.router.load_since_update.sum()) == 0
    _observe(layer, active=1)
    layer.update_bias()
    assert float(layer.router.l1_coef) == pytest.approx(1e-3)
    _observe(layer, active=2)  # on target: unchanged
    layer.update_bias()
    assert float(layer.router.l1_coef) == pytest.approx(1e-3)
    layer.update_bias()  # nothing observed: unchanged
    assert float(layer.router.l1_coef) == pytest.approx(1e-3)
    with pytest.raises(ShapeError, match="relu"):
        layer.update_bias(torch.ones(8))


def test_eval_forward_observes_nothing():
    layer = relu_layer().eval()
    layer(torch.randn(6, 12))
    assert float(layer.router.tokens_since_update) == 0


def _train(alpha: float, seed: int, steps: int = 400) -> tuple[list[float], MoE]:
    """Active experts per token at each step of a tiny relu MoE (target 2 of 8) regressing a random MLP."""
    torch.manual_seed(seed)
    layer = MoE(hidden_size=16, num_experts=8, top_k=2, expert_hidden_size=16, router="relu", relu_l1_alpha=alpha)
    teacher = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 16))
    # Hidden states with a mean (as a normed LM's have): on zero-mean inputs a bias-free ReLU gate is positive
    # for half the tokens whatever its weights, and no penalty can change that.
    shift = torch.zeros(16)
    shift[0] = 1.0
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    active = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model only loses time to more
    try:
        for _ in range(steps):
            x = torch.randn(64, 16) + shift
            y, aux = layer.train()(x)
            ((y - teacher(x).detach()).square().mean() + aux.loss).backward()
            opt.step()
            opt.zero_grad()
            active.append(8 * (1 - layer.router.sparsity()))
            layer.update_bias()
    finally:
        torch.set_num_threads(threads)
    return active, layer


@pytest.mark.parametrize("seed", [0, 2])
def test_training_holds_the_sparsity_at_the_target(seed):
    """Starting about half dense, the adaptive L1 brings the active experts per token to the target k=2 of 8;
    with the coefficient frozen (alpha=1, lambda stays at 1e-8) they stay far above it."""
    active, layer = _train(alpha=1.2, seed=seed)
    frozen, _ = _train(alpha=1.0, seed=seed)
    assert active[0] > 3, "starts far from the target"
    late, late_frozen = sum(active[-100:]) / 100, sum(frozen[-100:]) / 100
    assert abs(late - 2) < 0.5, f"mean active experts per token over the last 100 steps: {late:.2f}"
    assert late_frozen > 3, f"without the adaptive L1: {late_frozen:.2f}"
    assert float(layer.router.l1_coef) != 1e-8


def test_lm_checkpoint_keeps_the_l1_coefficient(tmp_path):
    config = LMConfig(
        vocab_size=256,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        moe=MoEConfig(num_experts=4, top_k=1, expert_hidden_size=16, router="relu"),
    )
    model = MoELM(config).train()
    x = torch.randint(0, 64, (2, 8))
    model(x)
    model.update_router_biases()
    coefs = [float(moe.router.l1_coef) for _, moe in model.moe_layers()]
    assert coefs != [1e-8, 1e-8], "the step moved the coefficients"
    write_model_folder(tmp_path / "ckpt", model_tensors(model), {"model": config.to_dict()}, ByteTokenizer())
    loaded, _ = load_model(tmp_path / "ckpt")
    assert [float(moe.router.l1_coef) for _, moe in loaded.moe_layers()] == coefs
    assert isinstance(loaded.moe_layers()[0][1].router, ReLURouter)
    assert torch.equal(loaded(x).logits, model.eval()(x).logits)


def test_hugging_face_export_is_refused(tmp_path):
    moe = MoEConfig(num_experts=4, top_k=2, expert_hidden_size=16, router="relu")
    config = LMConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, moe=moe
    )
    with pytest.raises(ConfigError, match="router='relu'"):
        moekit.to_hf(MoELM(config), tmp_path / "out")
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_bf16_input_routes_in_fp32():
    layer = relu_layer().to(torch.bfloat16)
    x = torch.randn(2, 6, 12, dtype=torch.bfloat16)
    y, aux = layer(x, record_routing=True)
    assert y.dtype == torch.bfloat16 and aux.loss.dtype == torch.float32
    assert aux.routing.logits_TE.dtype == torch.float32 and aux.routing.weight_A.dtype == torch.float32
    assert (y.float() - reference_moe(layer, x).float()).abs().max() < 0.05


def test_config_checks():
    with pytest.raises(ConfigError, match="capacity_factor"):
        MoEConfig(num_experts=4, expert_hidden_size=8, router="relu", capacity_factor=1.0)
    with pytest.raises(ConfigError, match="relu_l1_alpha"):
        MoEConfig(num_experts=4, expert_hidden_size=8, router="relu", relu_l1_alpha=0.5)
    with pytest.raises(ConfigError, match="relu_l1_init"):
        MoEConfig(num_experts=4, expert_hidden_size=8, router="relu", relu_l1_init=0.0)
    with pytest.raises(ConfigError, match="top_k"):
        MoEConfig(num_experts=4, top_k=5, expert_hidden_size=8, router="relu")
    assert MoEConfig(num_experts=8, top_k=3, expert_hidden_size=8, router="relu").experts_per_token == 3


def test_routing_report_counts_the_measured_experts_per_token(tmp_path):
    """The analysis of a relu model reports the experts tokens really took (varying per token), not top_k."""
    from moekit.analysis import plots, report, stats
    from moekit.analysis.recorder import RoutingRecorder
    from tests.analysis.helpers import tiny_model

    model = tiny_model(router="relu", top_k=1)
    x = torch.randint(0, 256, (3, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        auxes = model(x, record_routing=True).moe_aux
    rec = RoutingRecorder(model)
    rec.update(x)
    summary = stats.summarize(rec.aggregates())
    measured = [aux.routing.num_assignments / 60 for aux in auxes]
    assert [layer["experts_per_token"] for layer in summary["layers"]] == pytest.approx(measured, abs=1e-6)
    assert min(measured) > 1.5, "an untrained relu router is far denser than its target"
    per_token = torch.bincount(auxes[0].routing.token_idx_A, minlength=60)
    assert rec.aggregates().layers[0].routed.sum() == per_token.sum() and per_token.unique().numel() > 1
    page = report.write_report(tmp_path, summary, plots.make_plots(summary))["report"].read_text()
    cards = "/".join(sorted({f"{m:.3g}" for m in measured}, key=float))
    assert f'<div class="v">{cards}</div><div class="k">experts per token</div>' in page
