"""The native batch-1 decode step (moekit.models.decode_step) against MoELM's PyTorch path.

The PyTorch path is forced by passing an all-ones ``attention_mask`` (the native step takes only unmasked
calls). Both run bf16 with fp32 statistics, so they differ by bf16 roundings where their fp32 sums are ordered
differently; the tests bound that against the fp32 model: the native step must be no further from it than
PyTorch's own bf16 path, and greedy decoding must pick the same tokens.
"""

from __future__ import annotations

import os

import pytest
import torch

from moekit.errors import ShapeError
from moekit.models import LMConfig, MoELM, decode_step
from moekit.models.quantization import quantize_model, uniform_spec
from moekit.nn import MoEConfig
from moekit.nn.kernels import native

pytestmark = pytest.mark.skipif(
    native.library() is None and not os.environ.get("CI"), reason="no AVX512-BF16 CPU or C compiler here"
)

PROMPT = 9
STEPS = 6

CONFIGS = {
    "qwen3_like": dict(qk_norm="head", num_key_value_heads=2, moe=dict(norm_topk_prob=True)),
    "mixtral_like_mha": dict(num_key_value_heads=4, moe=dict(top_k=2)),
    "sigmoid_bias_shared_dense_first": dict(
        num_hidden_layers=3,
        first_k_dense=1,
        moe=dict(router="sigmoid_topk", num_shared_experts=1, norm_topk_prob=True, routed_scaling_factor=2.5),
    ),
    "qkv_bias_shared_gate_tied": dict(
        attention_bias=True,
        attention_out_bias=True,
        tie_word_embeddings=True,
        moe=dict(num_shared_experts=1, shared_expert_gate=True, norm_topk_prob=False),
    ),
    "one_kv_head_odd_dims": dict(hidden_size=48, num_attention_heads=3, num_key_value_heads=1, head_dim=20),
}


def make_model(seed: int = 0, moe: dict | None = None, **fields) -> MoELM:
    """A small random MoE LM in fp32 (cast it for the bf16 runs)."""
    moe_fields = dict(num_experts=8, top_k=3, expert_hidden_size=40)
    moe_fields.update(moe or {})
    config = dict(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        initializer_range=0.2,
        moe=MoEConfig(**moe_fields),
    )
    config.update(fields)
    torch.manual_seed(seed)
    model = MoELM(LMConfig(**config)).eval()
    with torch.no_grad():  # norms away from 1, a selection bias: every weight the step reads matters
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.uniform_(0.5, 1.5)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.uniform_(-0.5, 0.5)
    return model


def decode(model: MoELM, prompt: torch.Tensor, steps: int, native_step: bool) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens and each step's last logits (fp32), on the native step or PyTorch's path."""
    tokens, logits = [], []
    with torch.inference_mode():
        cache = model.new_cache(max_length=prompt.shape[1] + steps)
        out = model(prompt, cache=cache)
        for _ in range(steps):
            last = out.logits[0, -1].float()
            logits.append(last)
            tokens.append(int(last.argmax()))
            mask = None if native_step else torch.ones(1, 1, dtype=torch.bool)
            out = model(torch.tensor([[tokens[-1]]]), cache=cache, attention_mask=mask)
    return tokens, logits


def identical(a: tuple[list[int], list[torch.Tensor]], b: tuple[list[int], list[torch.Tensor]]) -> bool:
    return a[0] == b[0] and torch.equal(torch.stack(a[1]), torch.stack(b[1]))


def prompt_ids(model: MoELM) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_native_step_decodes_as_the_pytorch_path(name):
    model = make_model(**CONFIGS[name])
    reference_tokens, reference_logits = decode(model, prompt_ids(model), STEPS, native_step=False)  # fp32
    model = model.to(torch.bfloat16)
    assert decode_step.unsupported_reason(model) is None
    ids = prompt_ids(model)
    fast_tokens, fast_logits = decode(model, ids, STEPS, native_step=True)
    slow_tokens, slow_logits = decode(model, ids, STEPS, native_step=False)
    assert fast_tokens == slow_tokens
    for fast, slow, ref in zip(fast_logits, slow_logits, reference_logits):
        scale = ref.abs().max()
        # no further from fp32 than PyTorch's bf16 path, up to a few bf16 steps
        assert (fast - ref).abs().max() <= 1.5 * (slow - ref).abs().max() + 2**-7 * scale
        torch.testing.assert_close(fast, slow, rtol=0, atol=0.05 * scale.item())


def test_native_step_writes_the_cache_and_the_routing_statistics_as_the_pytorch_path():
    model = make_model(**CONFIGS["qwen3_like"]).to(torch.bfloat16)
    ids = prompt_ids(model)
    outs, caches = [], []
    with torch.inference_mode():
        for mask in (None, torch.ones(1, 1, dtype=torch.bool)):
            cache = model.new_cache(max_length=PROMPT + 2)
            model(ids, cache=cache)
            outs.append(model(torch.tensor([[5]]), cache=cache, attention_mask=mask))
            caches.append(cache)
    fast, slow = outs
    assert caches[0].length == caches[1].length == PROMPT + 1
    for k_fast, k_slow in zip(caches[0].keys + caches[0].values, caches[1].keys + caches[1].values):
        written = slice(0, PROMPT + 1)
        torch.testing.assert_close(k_fast[:, :, written].float(), k_slow[:, :, written].float(), rtol=2**-6, atol=2**-6)
    assert len(fast.moe_aux) == len(slow.moe_aux) == 2
    with torch.inference_mode():  # the call above took the native step (it answers None where it does not)
        assert decode_step.forward(model, torch.tensor([[5]]), caches[0], 1) is not None
    for a, b in zip(fast.moe_aux, slow.moe_aux):
        assert torch.equal(a.tokens_per_expert, b.tokens_per_expert)
        torch.testing.assert_close(a.router_entropy, b.router_entropy, rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(a.gate_logits, b.gate_logits, rtol=0.02, atol=0.02)
        assert float(a.loss) == 0.0


@pytest.mark.parametrize("linear_bits,group", [(8, 32), (4, 32), (4, 64)])
def test_quantised_attention_and_experts_take_the_native_step(linear_bits, group):
    # int4 matrices take the native kernels at widths of whole 128-column blocks
    model = make_model(vocab_size=128, hidden_size=128, qk_norm="head", moe=dict(expert_hidden_size=128))
    model = model.to(torch.bfloat16)
    quantize_model(model, uniform_spec(model.config, bits=4, group_size=group, linear_bits=linear_bits))
    assert decode_step.unsupported_reason(model) is None
    ids = prompt_ids(model)
    fast_tokens, fast_logits = decode(model, ids, STEPS, native_step=True)
    slow_tokens, slow_logits = decode(model, ids, STEPS, native_step=False)
    assert fast_tokens == slow_tokens
    for fast, slow in zip(fast_logits, slow_logits):
        torch.testing.assert_close(fast, slow, rtol=0, atol=0.05 * slow.abs().max().item())


@pytest.mark.parametrize(
    "change,reason",
    [
        (dict(qk_norm="full"), "attention other than"),
        (
            dict(attention_type="mla", kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8),
            "attention other than",
        ),
        (dict(moe=dict(router="hash")), "a router other than"),
        (dict(moe=dict(capacity_factor=1.5)), "capacity"),
        (dict(moe=dict(router="sigmoid_topk", n_group=2, topk_group=1)), "a router other than"),
        (dict(moe_layer_overrides={1: dict(top_k=2)}), "blocks of different shapes"),
    ],
)
def test_blocks_it_does_not_cover_run_the_pytorch_path(change, reason):
    model = make_model(**change).to(torch.bfloat16)
    assert reason in decode_step.unsupported_reason(model)
    ids = prompt_ids(model)
    assert identical(decode(model, ids, 3, native_step=True), decode(model, ids, 3, native_step=False))


def test_an_fp32_model_a_hook_or_a_batch_of_two_runs_the_pytorch_path():
    model = make_model()
    assert "bf16" in decode_step.unsupported_reason(model)
    model = model.to(torch.bfloat16)
    assert decode_step.unsupported_reason(model) is None
    handle = model.layers[1].self_attn.register_forward_hook(lambda *a: None)
    assert "hooks" in decode_step.unsupported_reason(model)
    handle.remove()
    assert decode_step.unsupported_reason(model) is None
    with torch.inference_mode():
        cache = model.new_cache(max_length=PROMPT + 1)
        model(prompt_ids(model).expand(2, -1), cache=cache)
        assert not decode_step.applies(model, torch.tensor([[1], [2]]), cache)
        padded = model.new_cache(max_length=PROMPT + 1)  # a left-padded prompt leaves a mask in the cache
        model(prompt_ids(model), attention_mask=torch.arange(PROMPT)[None] > 1, cache=padded)
        assert padded.mask is not None and not decode_step.applies(model, torch.tensor([[1]]), padded)


def test_the_plan_follows_replaced_weights():
    model = make_model(**CONFIGS["qwen3_like"]).to(torch.bfloat16)
    ids = prompt_ids(model)
    before = decode(model, ids, 3, native_step=True)
    other = make_model(seed=5, **CONFIGS["qwen3_like"]).to(torch.bfloat16)
    model.load_state_dict(other.state_dict(), assign=True)  # new tensors: the old plan's pointers are stale
    after = decode(model, ids, 3, native_step=True)
    assert identical(after, decode(other, ids, 3, native_step=True))
    assert not identical(after, before)


def test_a_bad_token_id_is_a_clear_error_on_the_native_step():
    model = make_model(**CONFIGS["qwen3_like"]).to(torch.bfloat16)
    with torch.inference_mode():
        cache = model.new_cache(max_length=PROMPT + 2)
        model(prompt_ids(model), cache=cache)
        with pytest.raises(ShapeError, match="97"):
            model(torch.tensor([[97]]), cache=cache)
        assert cache.length == PROMPT  # nothing written
