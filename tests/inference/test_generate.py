"""Generation: cached decoding equals uncached decoding, padding-independent batches, seeded sampling, errors."""

from __future__ import annotations

import pytest
import torch

from moekit.errors import ConfigError, ShapeError
from moekit.inference import GenerationConfig, generate, stream_generate
from moekit.models import LMConfig, MoELM
from moekit.nn import MoEConfig

V = 53


def make_model(moe: dict | None = None, dense: bool = False, seed: int = 0, **overrides) -> MoELM:
    """A tiny untied LM with a large init, so greedy decoding does not just repeat its last token."""
    moe_fields = dict(num_experts=4, top_k=2, expert_hidden_size=16)
    moe_fields.update(moe or {})
    fields = dict(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=48,
        initializer_range=0.3,
        scaled_residual_init=False,
        moe=None if dense else MoEConfig(**moe_fields),
    )
    fields.update(overrides)
    torch.manual_seed(seed)
    return MoELM(LMConfig(**fields)).eval()


CONFIGS = {
    "moe": dict(),
    "dense": dict(dense=True),
    "gqa_qknorm_moe": dict(qk_norm="head", num_key_value_heads=1, head_dim=12),
    "full_qknorm_bias_tied": dict(qk_norm="full", attention_bias=True, tie_word_embeddings=True),
    "sigmoid_shared_first_dense": dict(
        moe=dict(router="sigmoid_topk", num_shared_experts=1, n_group=2, topk_group=1),
        num_hidden_layers=3,
        first_k_dense=1,
    ),
}


def build(name: str) -> MoELM:
    return make_model(**CONFIGS[name])


def uncached_greedy(model: MoELM, prompt: list[int], n: int) -> list[int]:
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(prompt) :]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_cached_greedy_equals_uncached(name):
    model = build(name)
    prompt = [5, 17, 3, 40, 8]
    got = generate(model, [prompt], max_new_tokens=20, temperature=0)[0]
    expected = uncached_greedy(model, prompt, 20)
    assert got == expected
    assert len(set(got)) > 3  # a real test: the model does not just repeat one token


@pytest.mark.parametrize("name", ["moe", "gqa_qknorm_moe"])
def test_batched_left_padded_equals_single_prompts(name):
    model = build(name)
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9], [30, 31, 32]]
    batched = generate(model, prompts, max_new_tokens=12, temperature=0)
    for prompt, out in zip(prompts, batched):
        assert out == generate(model, [prompt], max_new_tokens=12, temperature=0)[0]


def test_stream_equals_generate():
    model = build("moe")
    cfg = GenerationConfig(max_new_tokens=10, temperature=0.8, top_k=20, seed=3)
    assert list(stream_generate(model, [4, 5, 6], cfg)) == generate(model, [[4, 5, 6]], cfg)[0]
    assert list(stream_generate(model, torch.tensor([[4, 5, 6]]), cfg)) == generate(model, [[4, 5, 6]], cfg)[0]


def test_sampling_is_reproducible_with_a_seed():
    model = build("moe")
    prompts = [[1, 2, 3], [7, 8]]
    cfg = GenerationConfig(max_new_tokens=15, temperature=1.0, top_p=0.95, seed=123)
    first = generate(model, prompts, cfg)
    assert generate(model, prompts, cfg) == first
    assert generate(model, prompts, cfg, seed=124) != first
    assert all(len(row) == 15 for row in first)


def test_top_k_1_and_tiny_top_p_are_greedy():
    model = build("moe")
    greedy = generate(model, [[3, 4]], max_new_tokens=10, temperature=0)
    assert generate(model, [[3, 4]], max_new_tokens=10, temperature=1.5, top_k=1, seed=0) == greedy
    assert generate(model, [[3, 4]], max_new_tokens=10, temperature=1.5, top_p=1e-6, seed=0) == greedy


def test_vocab_limit_never_picks_ids_past_the_tokenizer():
    model = build("moe")

    def favour_last_id(module, inputs, logits):
        return logits + torch.nn.functional.one_hot(torch.tensor(V - 1), V) * 1e4

    model.lm_head.register_forward_hook(favour_last_id)  # the padded id would win every step
    limit = V - 1
    for kwargs in (dict(temperature=0), dict(temperature=1.0, seed=0)):
        free = generate(model, [[3, 4]], max_new_tokens=12, **kwargs)[0]
        limited = generate(model, [[3, 4]], max_new_tokens=12, vocab_limit=limit, **kwargs)[0]
        assert max(limited) < limit
        assert V - 1 in free  # without the limit the padded id is picked


def test_repetition_penalty_discourages_repeats():
    model = build("moe")
    out = generate(model, [[3, 4]], max_new_tokens=30, temperature=0, repetition_penalty=1e6)[0]
    assert len(set(out)) == len(out) and not {3, 4} & set(out)


def test_stop_tokens_end_a_row_and_are_not_returned():
    model = build("moe")
    full = generate(model, [[3, 4], [10, 11, 12]], max_new_tokens=12, temperature=0)
    stop = full[0][4]
    out = generate(model, [[3, 4], [10, 11, 12]], max_new_tokens=12, temperature=0, stop_token_ids=(stop,))
    assert out[0] == full[0][: full[0].index(stop)]
    assert out[1] == (full[1][: full[1].index(stop)] if stop in full[1] else full[1])
    assert list(stream_generate(model, [3, 4], max_new_tokens=12, temperature=0, stop_token_ids=[stop])) == out[0]


def test_training_mode_is_restored_and_no_grad_is_kept():
    model = build("moe").train()
    generate(model, [[1, 2]], max_new_tokens=3, temperature=0)
    assert model.training
    assert all(p.grad is None for p in model.parameters())


def test_context_limits():
    model = build("moe")  # max_position_embeddings = 48
    with pytest.raises(ShapeError, match="prompt 0 has 49 tokens but the model's context .* is 48"):
        generate(model, [[1] * 49], max_new_tokens=1)
    with pytest.raises(ShapeError, match="use max_new_tokens <= 8 or context_overflow='slide'"):
        generate(model, [[1] * 40], max_new_tokens=9, context_overflow="error")
    assert len(generate(model, [[1] * 40], max_new_tokens=8, temperature=0, context_overflow="error")[0]) == 8
    # Sliding (the default): keeps generating past the context by re-encoding the last 3/4 of it.
    slid = generate(model, [[1, 2, 3], [4]], max_new_tokens=70, temperature=0)
    assert [len(r) for r in slid] == [70, 70]
    assert slid[0][:45] == generate(model, [[1, 2, 3]], max_new_tokens=45, temperature=0)[0]


def test_bad_arguments():
    model = build("moe")
    assert generate(model, [[1, 2]], max_new_tokens=0) == [[]]
    with pytest.raises(ShapeError, match="prompt 1 is empty"):
        generate(model, [[1], []])
    with pytest.raises(ShapeError, match="not a list of token ids"):
        generate(model, [1, 2, 3])
    with pytest.raises(ShapeError, match="takes one prompt"):
        stream_generate(model, [[1], [2]])  # raised at the call, not at the first next()
    with pytest.raises(ShapeError, match="prompt 0 has 49 tokens"):
        stream_generate(model, [1] * 49)
    with pytest.raises(ShapeError, match="token id 53 outside the vocabulary 0..52"):
        generate(model, [[1, 53]])
    with pytest.raises(ShapeError, match="pad_token_id=99"):
        generate(model, [[1]], pad_token_id=99)
    with pytest.raises(ConfigError, match="temperature must be >= 0"):
        GenerationConfig(temperature=-1)
    with pytest.raises(ConfigError, match="top_p must be in"):
        GenerationConfig(top_p=1.5)
    with pytest.raises(ConfigError, match="unknown GenerationConfig key 'max_tokens'; did you mean 'max_new_tokens'"):
        GenerationConfig.from_dict({"max_tokens": 3})
    with pytest.raises(ConfigError, match="context_overflow='wrap'"):
        GenerationConfig(context_overflow="wrap")
    assert GenerationConfig(top_k=0).top_k is None
    assert GenerationConfig.from_dict(GenerationConfig(stop_token_ids=[1, 2]).to_dict()).stop_token_ids == (1, 2)
