"""The encoder-decoder: causality, padding, cached decoding against the full decoder, beam search against
exhaustive search, and the equal-active-parameter dense baseline."""

import itertools

import pytest
import torch

from moekit.errors import ConfigError, ShapeError
from moekit.models.seq2seq import Seq2SeqConfig, Seq2SeqTransformer
from moekit.tasks.decoding import beam_search, greedy_search, length_penalty


def _model(seed=0, **fields):
    torch.manual_seed(seed)
    config = {
        "vocab_size": 40,
        "hidden_size": 32,
        "encoder_layers": 2,
        "decoder_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "moe": {"num_experts": 4, "top_k": 2},
        "dropout": 0.0,
        "initializer_range": 0.3,  # large enough that a random model's greedy output varies
        **fields,
    }
    return Seq2SeqTransformer(Seq2SeqConfig(**config)).eval()


def _sources():
    src = torch.tensor([[5, 9, 12, 7, 2, 0, 0], [8, 8, 30, 11, 21, 13, 2], [17, 2, 0, 0, 0, 0, 0]])
    return src, src != 0


@pytest.mark.parametrize("ffn", ["moe", "dense"])
def test_cached_decoding_equals_the_full_decoder_token_for_token(ffn):
    model = _model(ffn=ffn)
    src, mask = _sources()
    cached = greedy_search(model, src, mask, 12)
    full = greedy_search(model, src, mask, 12, use_cache=False)
    assert cached == full and any(len(set(row)) > 2 for row in cached)  # not a degenerate repetition
    # The logits themselves, step by step against one teacher-forced pass over the same prefix.
    with torch.inference_mode():
        encoded = model.encode(src, mask)
        prefix = torch.tensor([[1, *row[:5]] for row in (r + [2] * 5 for r in cached)])
        hidden, _ = model.decode(prefix, encoded)
        full_logits = model.logits(hidden)
        state = model.start(encoded)
        for t in range(prefix.shape[1]):
            step_logits = model.step(prefix[:, t : t + 1], state)
            torch.testing.assert_close(step_logits, full_logits[:, t], atol=1e-5, rtol=1e-5)


def test_source_padding_and_later_target_tokens_change_nothing():
    model = _model()
    src, mask = _sources()
    alone = greedy_search(model, src[2:, :2], None, 10)
    assert [greedy_search(model, src, mask, 10)[2]] == alone  # padded in a batch = alone, unpadded
    tgt = torch.tensor([[1, 4, 5, 6, 7]])
    changed = tgt.clone()
    changed[0, 3] = 20
    with torch.no_grad():
        a = model(src[:1], tgt, mask[:1]).logits
        b = model(src[:1], changed, mask[:1]).logits
    torch.testing.assert_close(a[:, :3], b[:, :3])  # position t sees target tokens <= t only
    assert not torch.allclose(a[:, 3], b[:, 3])


@pytest.mark.parametrize("seed", [0, 3])
def test_beam_one_is_greedy(seed):
    model = _model(seed=seed)
    src, mask = _sources()
    assert beam_search(model, src, mask, 12, beam=1) == greedy_search(model, src, mask, 12)


def _sequence_logprob(model, src, mask, ids, eos):
    tgt = torch.tensor([[1, *ids]])
    labels = torch.tensor(ids + ([eos] if eos else []))
    with torch.no_grad():
        logp = torch.log_softmax(model(src, tgt, mask).logits[0].float(), dim=-1)
    return float(logp[torch.arange(len(labels)), labels].sum())


def test_a_beam_as_wide_as_the_search_space_finds_the_best_length_penalised_translation():
    model = _model(seed=1, vocab_size=6, hidden_size=16, num_attention_heads=1, intermediate_size=32)
    src, mask = torch.tensor([[4, 5, 4, 2]]), None
    T, alpha, eos = 3, 1.0, 2
    words = [w for w in range(6) if w != eos]
    candidates = []  # every sequence ending in EOS within T steps, and every T-token one without EOS
    for length in range(T):
        for ids in itertools.product(words, repeat=length):
            score = _sequence_logprob(model, src, mask, list(ids), eos)
            candidates.append((score / length_penalty(length + 1, alpha), list(ids)))
    for ids in itertools.product(words, repeat=T):
        candidates.append((_sequence_logprob(model, src, mask, list(ids), None) / length_penalty(T, alpha), list(ids)))
    best = max(candidates, key=lambda c: c[0])[1]
    assert beam_search(model, src, mask, T, beam=len(candidates), alpha=alpha) == [best]


def test_dense_baseline_has_the_moe_models_active_parameters():
    moe, dense = _model(moe={"num_experts": 4, "top_k": 1}), _model(ffn="dense")
    routers = sum(layer.router.weight.numel() for layer in moe.moe_layers())
    assert len(moe.moe_layers()) == 2  # the last layer of each stack
    assert moe.active_parameters() == dense.num_parameters() + routers
    assert moe.num_parameters() > moe.active_parameters()


def test_config_refuses_routers_that_would_see_later_target_tokens():
    with pytest.raises(ConfigError, match="Soft MoE"):
        Seq2SeqConfig(vocab_size=10, ffn="soft")
    with pytest.raises(ConfigError, match="expert_choice"):
        Seq2SeqConfig(vocab_size=10, moe={"router": "expert_choice"})
    with pytest.raises(ConfigError, match="bos_token_id=1 is outside"):
        Seq2SeqConfig(vocab_size=1)
    with pytest.raises(ShapeError, match="source ids must be"):
        _model().encode(torch.zeros(2, 3))


@pytest.mark.parametrize("top_k", [1, 2])
def test_top_k_routers_learn_from_the_task_loss(top_k):
    """With top-1 and renormalised weights the gate would always be 1 and the router would get no gradient;
    task models scale by the gate instead (Switch), so the router learns from the loss alone (no aux loss)."""
    from moekit.models.encoder import EncoderClassifier, EncoderConfig

    torch.manual_seed(0)
    common = dict(hidden_size=32, num_attention_heads=2, intermediate_size=64)
    moe = {"num_experts": 4, "top_k": top_k, "aux_loss_coef": 0.0}
    seq2seq = Seq2SeqTransformer(Seq2SeqConfig(vocab_size=50, moe=moe, **common))
    seq2seq(torch.randint(4, 50, (2, 6)), torch.randint(4, 50, (2, 5))).logits.sum().backward()
    encoder = EncoderClassifier(EncoderConfig(num_labels=2, vocab_size=50, moe=moe, **common))
    encoder(torch.randint(2, 50, (2, 6))).logits[:, 0].sum().backward()
    for model in (seq2seq, encoder):
        grads = [p.grad.abs().sum().item() for n, p in model.named_parameters() if n.endswith("router.weight")]
        assert grads and min(grads) > 1e-3, grads
    # the explicit setting still gives renormalised top-1 (the weight is then exactly 1: no router gradient)
    fixed = Seq2SeqTransformer(Seq2SeqConfig(vocab_size=50, moe={**moe, "norm_topk_prob": True}, **common))
    fixed(torch.randint(4, 50, (2, 6)), torch.randint(4, 50, (2, 5))).logits.sum().backward()
    grads = [p.grad.abs().sum().item() for n, p in fixed.named_parameters() if n.endswith("router.weight")]
    assert (max(grads) < 1e-4) == (top_k == 1), grads


def test_config_refuses_a_gating_residual_it_cannot_wire():
    with pytest.raises(ConfigError, match="gating_residual .*only the language model"):
        Seq2SeqConfig(vocab_size=10, moe={"gating_residual": True, "zero_experts": 1})
