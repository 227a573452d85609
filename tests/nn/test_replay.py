"""Router replay: a replayed forward reproduces the recorded one bit for bit, the router keeps its gradient,
forced choices are used, generation's record replays in a training forward, and bad records are clear errors."""

from __future__ import annotations

import pytest
import torch

from moekit.errors import ShapeError
from moekit.inference import generate
from moekit.models import LMConfig, MoELM
from moekit.nn import MoEConfig
from moekit.nn.replay import RouterReplay

V = 41
ROUTERS = {
    "softmax_topk": dict(router="softmax_topk", top_k=2),
    "softmax_norm_scaled": dict(router="softmax_topk", top_k=2, norm_topk_prob=True, routed_scaling_factor=2.5),
    "sigmoid_grouped": dict(router="sigmoid_topk", top_k=2, n_group=2, topk_group=1, num_shared_experts=1),
    "expert_threshold": dict(router="expert_threshold"),  # (expert choice: refused in a causal LM)
    "hash": dict(router="hash", top_k=1),
    "dense": dict(router="dense"),
    "relu": dict(router="relu"),
    "capacity": dict(router="softmax_topk", top_k=2, capacity_factor=1.0),
}


def make_lm(moe: dict, seed: int = 0, layers: int = 2) -> MoELM:
    torch.manual_seed(seed)
    config = LMConfig(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=40,
        initializer_range=0.3,
        moe=MoEConfig(num_experts=4, expert_hidden_size=16, **moe),
    )
    return MoELM(config)


@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_replay_of_a_recorded_forward_is_bit_identical(name):
    model = make_lm(ROUTERS[name]).train()
    ids = torch.randint(0, V, (3, 11), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, 11, dtype=torch.bool)
    mask[1, :4] = False  # left padding: unrouted tokens
    with RouterReplay(model) as rec:
        torch.manual_seed(5)  # expert dropout etc. draw the same numbers in both forwards
        logits = model(ids, attention_mask=mask).logits
    record = rec.experts()
    assert record.shape[:3] == (3, 11, 2) and record.dtype == torch.long
    assert bool((record[1, :4] == -1).all())
    with RouterReplay(model, experts=record):
        torch.manual_seed(5)
        replayed = model(ids, attention_mask=mask).logits
    assert torch.equal(logits, replayed)


@pytest.mark.parametrize("name", ["softmax_topk", "sigmoid_grouped", "expert_threshold", "dense"])
def test_router_keeps_a_gradient_under_replay(name):
    model = make_lm(ROUTERS[name])
    ids = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(2))
    with RouterReplay(model) as rec:
        model(ids)
    with RouterReplay(model, experts=rec.experts()):
        model(ids, labels=ids).loss.backward()
    for _, layer in model.moe_layers():
        assert layer.router.weight.grad is not None and layer.router.weight.grad.abs().sum() > 0


def test_replay_forces_the_recorded_choices():
    model = make_lm(ROUTERS["softmax_topk"]).eval()
    ids = torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(3))
    with RouterReplay(model) as rec:
        free = model(ids).logits
    forced = (rec.experts() + 1) % 4  # every token gets other experts
    with RouterReplay(model, experts=forced):
        out = model(ids, record_routing=True)
    assert not torch.allclose(out.logits, free)
    for layer, aux in enumerate(out.moe_aux):
        r = aux.routing
        got = torch.full((14, 2), -1, dtype=torch.long)
        got[r.token_idx_A, r.choice_rank_A] = r.expert_idx_A
        assert torch.equal(got, forced[:, :, layer].reshape(14, 2))


@pytest.mark.parametrize("name", ["softmax_topk", "sigmoid_grouped", "hash"])
def test_generation_record_replays_in_a_training_forward(name):
    model = make_lm(ROUTERS[name]).eval()
    prompts = [[3, 5, 7, 9, 2], [4, 8]]
    tokens, routed = generate(model, prompts, max_new_tokens=6, temperature=0, return_routed_experts=True)
    assert tokens == generate(model, prompts, max_new_tokens=6, temperature=0)  # recording changes nothing
    for prompt, new, record in zip(prompts, tokens, routed):
        seq = torch.tensor([prompt + new])
        assert record.shape == (len(prompt) + len(new), 2, record.shape[-1])
        with RouterReplay(model) as rec:
            free = model(seq).logits
        # Without a sliding window and in fp32, the uncached forward picks the generation's experts ...
        assert torch.equal(rec.experts()[0], record)
        # ... and replaying the generation's record reproduces the forward bit for bit.
        with RouterReplay(model, experts=record):
            assert torch.equal(model(seq).logits, free)


def test_generation_record_drives_a_forward_whose_own_choices_differ():
    """The R3 case: the training forward would choose other experts; replay makes it use the rollout's."""
    model = make_lm(ROUTERS["softmax_topk"]).eval()
    prompt = [1, 2, 3, 4]
    tokens, routed = generate(model, [prompt], max_new_tokens=5, temperature=0, return_routed_experts=True)
    seq = torch.tensor([prompt + tokens[0]])
    with torch.no_grad():  # perturb the router, as training steps between rollout and update do
        for _, layer in model.moe_layers():
            layer.router.weight.add_(torch.randn_like(layer.router.weight))
    with RouterReplay(model) as rec:
        model(seq)
    assert not torch.equal(rec.experts()[0], routed[0])
    with RouterReplay(model, experts=routed[0]) as rep:
        out = model(seq, record_routing=True)
    assert rep.replaying
    chosen = torch.stack(
        [a.routing.expert_idx_A.view(-1, 2) for a in out.moe_aux], dim=1
    )  # [S, L, K], token-major without padding
    assert torch.equal(chosen, routed[0])


def test_bad_records_are_clear_errors():
    model = make_lm(ROUTERS["softmax_topk"])
    ids = torch.randint(0, V, (2, 6), generator=torch.Generator().manual_seed(4))
    with RouterReplay(model) as rec:
        model(ids)
    record = rec.experts()
    with pytest.raises(ShapeError, match="covers only 4 positions"), RouterReplay(model, experts=record[:, :4]):
        model(ids)
    with pytest.raises(ShapeError, match="record has 2 rows but the forward has batch 1"):
        with RouterReplay(model, experts=record):
            model(ids[:1])
    with pytest.raises(ShapeError, match="record has 1 MoE layers but the model has 2"):
        RouterReplay(model, experts=record[:, :, :1])
    with pytest.raises(ShapeError, match="1 slots per token"):
        RouterReplay(model, experts=record[..., :1])
    with pytest.raises(ShapeError, match="names expert 9"), RouterReplay(model, experts=record.clamp(max=0) + 9):
        model(ids)
    with pytest.raises(ShapeError, match="no expert choice"), RouterReplay(model, experts=torch.full_like(record, -1)):
        model(ids)
    with pytest.raises(ShapeError, match="integer ids"):
        RouterReplay(model, experts=record.float())
    with pytest.raises(ShapeError, match="already inside"), RouterReplay(model), RouterReplay(model):
        pass
    with pytest.raises(ShapeError, match="max_new_tokens >= 1"):
        generate(model, [[1, 2]], max_new_tokens=0, return_routed_experts=True)
    with pytest.raises(ShapeError, match="within the model's context"):
        generate(model, [[1, 2]], max_new_tokens=60, return_routed_experts=True)
