"""LoRA: the grouped expert path equals the per-expert loop (values and gradients), merged weights equal the
adapters applied, a fresh adapter changes nothing, dropout acts in training only, and bad configs are errors."""

from __future__ import annotations

import pytest
import torch

from moekit.errors import ConfigError
from moekit.models import LMConfig, MoELM
from moekit.nn import MoE, MoEConfig, reference_moe
from moekit.nn.lora import LoRAConfig, LoRAExperts, LoRALinear, apply_lora, lora_state_dict, merge_lora

V = 37


def make_lm(seed: int = 0, **moe) -> MoELM:
    torch.manual_seed(seed)
    fields = dict(num_experts=4, top_k=2, expert_hidden_size=16, num_shared_experts=1, shared_expert_gate=True)
    fields.update(moe)
    config = LMConfig(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        first_k_dense=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        moe=MoEConfig(**fields),
    )
    return MoELM(config)


def randomise_adapters(model: torch.nn.Module, seed: int = 1) -> None:
    """Non-zero B matrices, as after training, so the update is visible."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_grouped_lora_experts_equal_the_per_expert_loop(activation):
    torch.manual_seed(0)
    layer = MoE(hidden_size=24, num_experts=5, top_k=2, expert_hidden_size=12, activation=activation)
    apply_lora(layer, LoRAConfig(rank=3, alpha=6, targets=("experts",)))
    assert isinstance(layer.experts, LoRAExperts)
    randomise_adapters(layer)
    x = torch.randn(2, 9, 24, dtype=torch.float64)
    layer.double()
    fast, _ = layer(x)
    slow = reference_moe(layer, x)
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-10)
    params = [layer.experts.lora_in_A, layer.experts.lora_in_B, layer.experts.lora_out_A, layer.experts.lora_out_B]
    g_fast = torch.autograd.grad(fast.square().sum(), params)
    g_slow = torch.autograd.grad(slow.square().sum(), params)
    for a, b in zip(g_fast, g_slow):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_fresh_adapters_leave_the_model_unchanged_and_merge_equals_applied():
    model = make_lm().eval()
    ids = torch.randint(0, V, (2, 10), generator=torch.Generator().manual_seed(3))
    base = model(ids).logits
    adapted = apply_lora(model, LoRAConfig(rank=4, targets=("attention", "experts", "shared_experts", "dense_mlp")))
    assert "layers.0.self_attn.q_proj" in adapted and "layers.1.mlp.experts" in adapted
    assert "layers.1.mlp.shared_experts.down_proj" in adapted and "layers.0.mlp.up_proj" in adapted
    torch.testing.assert_close(model(ids).logits, base, rtol=1e-5, atol=1e-5)  # B = 0: no update yet
    randomise_adapters(model)
    applied = model(ids).logits
    assert not torch.allclose(applied, base, atol=1e-3)
    keys_before = {k for k in model.state_dict() if "lora_" not in k}
    assert merge_lora(model) == len(adapted)
    assert not any(isinstance(m, (LoRALinear, LoRAExperts)) for m in model.modules())
    assert set(model.state_dict()) == keys_before  # base keys never moved
    torch.testing.assert_close(model(ids).logits, applied, rtol=1e-4, atol=1e-4)


def test_adapter_state_holds_only_the_adapters_with_their_layout():
    model = make_lm()
    apply_lora(model, LoRAConfig(rank=2, targets=("experts",)))
    state = lora_state_dict(model)
    pairs = {f"layers.{i}.mlp.experts.lora_{p}_{m}" for i in (1, 2) for p in ("in", "out") for m in "AB"}
    assert set(state) == pairs | {f"layers.{i}.mlp.experts.lora_experts" for i in (1, 2)}
    assert state["layers.1.mlp.experts.lora_in_A"].shape == (4, 2, 32)  # [E, r, in]
    assert state["layers.1.mlp.experts.lora_in_B"].shape == (4, 32, 2)  # [E, out = 2H, r]
    assert state["layers.1.mlp.experts.lora_out_A"].shape == (4, 2, 16)
    assert state["layers.1.mlp.experts.lora_out_B"].shape == (4, 32, 2)


def test_adapter_dropout_acts_in_training_only():
    torch.manual_seed(0)
    layer = MoE(hidden_size=16, num_experts=4, top_k=2, expert_hidden_size=8)
    apply_lora(layer, LoRAConfig(rank=2, dropout=0.5, targets=("experts",)))
    randomise_adapters(layer)
    x = torch.randn(12, 16)
    layer.eval()
    assert torch.equal(layer(x)[0], layer(x)[0])
    layer.train()
    assert not torch.equal(layer(x)[0], layer(x)[0])


def test_lora_training_step_moves_only_adapters():
    model = make_lm()
    apply_lora(model, LoRAConfig(rank=2))
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    ids = torch.randint(0, V, (2, 8), generator=torch.Generator().manual_seed(5))
    model(ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    assert any(g.abs().sum() > 0 for n, g in grads.items() if n.endswith("lora_B"))  # B gets a gradient at zero


def test_bad_lora_configs_are_errors():
    with pytest.raises(ConfigError, match="rank"):
        LoRAConfig(rank=0)
    with pytest.raises(ConfigError, match="dropout"):
        LoRAConfig(dropout=1.0)
    with pytest.raises(ConfigError, match="targets"):
        LoRAConfig(targets=("experts", "mlps"))
    model = make_lm(num_shared_experts=0)
    with pytest.raises(ConfigError, match="match no module"):
        apply_lora(model, LoRAConfig(targets=("shared_experts",)))
    apply_lora(model, LoRAConfig())
    with pytest.raises(ConfigError, match="already has LoRA"):
        apply_lora(model, LoRAConfig())


def test_adapters_on_some_experts_leave_the_others_exactly_unchanged():
    torch.manual_seed(0)
    layer = MoE(hidden_size=16, num_experts=4, top_k=2, expert_hidden_size=8).double()
    x = torch.randn(20, 16, dtype=torch.float64)
    base = [layer.experts.expert_forward(e, x) for e in range(4)]
    layer.experts = LoRAExperts(layer.experts, LoRAConfig(rank=2), experts=[2, 0])
    assert layer.experts.lora_in_A.shape[0] == 2 and layer.experts.lora_experts.tolist() == [0, 2]
    randomise_adapters(layer)
    for e in range(4):
        changed = not torch.equal(layer.experts.expert_forward(e, x), base[e])
        assert changed == (e in (0, 2))
    fast, _ = layer(x)
    torch.testing.assert_close(fast, reference_moe(layer, x), rtol=1e-10, atol=1e-10)
    d_in, d_out = layer.experts.deltas()
    assert d_in[[1, 3]].abs().sum() == 0 and d_in[[0, 2]].abs().sum() > 0
