"""Expert-threshold routing: per-expert running thresholds, causal choices, top_k experts per token on average."""

from __future__ import annotations

import pytest
import torch

import moekit
from moekit.errors import ConfigError
from moekit.models import MoELM
from moekit.models.presets import TINY
from moekit.nn import MoE
from moekit.nn.threshold_router import reference_threshold_choices


def make(top_k=2, experts=8, hidden=16, decay=0.9, seed=0) -> MoE:
    torch.manual_seed(seed)
    return MoE(
        hidden_size=hidden,
        num_experts=experts,
        top_k=top_k,
        expert_hidden_size=8,
        router="expert_threshold",
        threshold_decay=decay,
    )


def choices(routing) -> list[list[int]]:
    out: list[list[int]] = [[] for _ in range(routing.num_tokens)]
    for t, e in zip(routing.token_idx_A.tolist(), routing.expert_idx_A.tolist()):
        out[t].append(e)
    return [sorted(row) for row in out]


def test_routing_equals_the_reference_loop_before_and_after_calibration():
    layer = make().train()
    x = torch.randn(30, 16, generator=torch.Generator().manual_seed(1))
    assert choices(layer.route(x)) == reference_threshold_choices(layer.router, x)  # top-k before any batch
    for _ in range(5):
        layer(torch.randn(50, 16))
    assert bool(layer.router.calibrated)
    got = choices(layer.route(x))
    assert got == reference_threshold_choices(layer.router, x)
    assert len({len(row) for row in got}) > 1  # a variable number of experts per token
    routing = layer.route(x)
    probs = routing.probs_TE
    torch.testing.assert_close(routing.weight_A, probs[routing.token_idx_A, routing.expert_idx_A])


def test_first_batch_sets_each_threshold_to_its_expert_choice_cutoff():
    layer = make(top_k=2, experts=8).train()
    x = torch.randn(40, 16, generator=torch.Generator().manual_seed(2))
    layer(x)
    probs = layer.router.logits(x).softmax(-1)
    capacity = round(2 * 40 / 8)
    torch.testing.assert_close(layer.router.threshold_E, probs.topk(capacity, dim=0).values[-1].detach())
    # A second batch moves it by (1 - decay) toward that batch's cutoff.
    before = layer.router.threshold_E.clone()
    x2 = torch.randn(40, 16, generator=torch.Generator().manual_seed(3))
    layer(x2)
    cutoff = layer.router.logits(x2).softmax(-1).topk(capacity, dim=0).values[-1].detach()
    torch.testing.assert_close(layer.router.threshold_E, 0.9 * before + 0.1 * cutoff)


def test_choices_are_causal_a_token_ignores_the_rest_of_the_batch():
    layer = make().train()
    layer(torch.randn(64, 16))
    layer.eval()
    x = torch.randn(20, 16)
    whole = choices(layer.route(x))
    assert whole[:7] == choices(layer.route(x[:7]))
    assert whole[7:] == choices(layer.route(x[7:]))


def test_thresholds_settle_at_top_k_experts_per_token_and_balance_the_load():
    layer = make(top_k=2, experts=8, decay=0.95).train()
    g = torch.Generator().manual_seed(4)
    skew = torch.randn(16, generator=g) * 2  # a data distribution off-centre, so balance is not free
    with torch.no_grad():
        for _ in range(150):
            layer(torch.randn(128, 16, generator=g) + skew)
        layer.eval()
        _, aux = layer(torch.randn(4096, 16, generator=g) + skew)
    load = aux.tokens_per_expert.float()
    assert abs(load.sum().item() / 4096 - 2.0) < 0.2  # top_k experts per token on average
    assert load.max() / load.mean() < 1.3 and load.min() / load.mean() > 0.7


def test_masked_tokens_are_not_routed_and_do_not_move_the_thresholds():
    layer = make().train()
    x = torch.randn(2, 10, 16)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, 4:] = False
    layer(x[:1])
    before = layer.router.threshold_E.clone()
    _, aux = layer(x, mask=mask, record_routing=True)
    assert not set(aux.routing.token_idx_A.tolist()) & set(range(14, 20))
    other = make().train()
    other(x[:1])
    other(torch.cat([x[0], x[1, :4]]))
    torch.testing.assert_close(layer.router.threshold_E, other.router.threshold_E)
    assert not torch.equal(before, layer.router.threshold_E)


def tiny_lm() -> MoELM:
    torch.manual_seed(0)
    config = TINY.replace(moe=TINY.moe.replace(router="expert_threshold", aux_loss_coef=0.0))
    model = MoELM(config).train()
    for _ in range(3):
        model(torch.randint(0, config.vocab_size, (4, 16)))
    return model.eval()


def test_lm_checkpoint_keeps_thresholds_and_generation_with_cache_equals_recompute(tmp_path):
    from moekit.checkpoint import load_model, save_checkpoint
    from moekit.data.tokenizers import ByteTokenizer
    from moekit.inference import generate

    model = tiny_lm()
    save_checkpoint(tmp_path / "run", 0, model, tokenizer=ByteTokenizer())
    loaded, _ = load_model(tmp_path / "run")
    for (_, a), (_, b) in zip(model.moe_layers(), loaded.moe_layers()):
        assert torch.equal(a.router.threshold_E, b.router.threshold_E) and bool(b.router.calibrated)
    # Token by token with the KV cache (as generation runs) equals the whole sequence at once: causal routing.
    seq = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(5))
    full = loaded(seq).logits
    cache = loaded.new_cache(max_length=12)
    steps = [loaded(seq[:, :4], cache=cache).logits]
    steps += [loaded(seq[:, t : t + 1], cache=cache).logits for t in range(4, 12)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-5)
    assert len(generate(loaded, seq[:1, :5], max_new_tokens=4, temperature=0.0)[0]) == 4


def test_export_to_hugging_face_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="router='expert_threshold'|router"):
        moekit.to_hf(tiny_lm(), tmp_path / "hf", family="mixtral")


def test_bad_decay_and_capacity_are_config_errors():
    with pytest.raises(ConfigError, match="threshold_decay"):
        make(decay=1.0)
    with pytest.raises(ConfigError, match="capacity_factor"):
        MoE(hidden_size=8, num_experts=4, expert_hidden_size=8, router="expert_threshold", capacity_factor=1.0)
