"""MoELM: shapes, loss, causality, padding, KV cache, layer choice, parameter counts, errors, HF numerics."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moekit.errors import ConfigError, ShapeError
from moekit.models import LMConfig, MoELM, dense_equivalent, get_preset
from moekit.nn import MLP, MoE, MoEConfig

D = 32


def lm_config(moe: bool | dict = True, **overrides) -> LMConfig:
    """A tiny LM config; moe=True gives a 4-expert top-2 MoE in every layer, a dict sets MoE fields."""
    moe_cfg = None
    if moe:
        fields = dict(num_experts=4, top_k=2, expert_hidden_size=16)
        fields.update(moe if isinstance(moe, dict) else {})
        moe_cfg = MoEConfig(**fields)
    fields = dict(
        vocab_size=61,
        hidden_size=D,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=40,
        initializer_range=0.1,
        moe=moe_cfg,
    )
    fields.update(overrides)
    return LMConfig(**fields)


def make_model(seed=0, **kwargs) -> MoELM:
    torch.manual_seed(seed)
    return MoELM(lm_config(**kwargs)).eval()


CONFIGS = {
    "moe": {},
    "dense": dict(moe=False),
    "gqa_qknorm_moe": dict(qk_norm="head", num_attention_heads=4, num_key_value_heads=1, head_dim=12),
    "full_qknorm_bias": dict(qk_norm="full", attention_bias=True, tie_word_embeddings=True),
    "sigmoid_shared": dict(
        moe=dict(router="sigmoid_topk", num_shared_experts=1, shared_expert_gate=True, n_group=2, topk_group=1),
        num_hidden_layers=3,
        first_k_dense=1,
    ),
}


def test_forward_shapes_and_aux():
    model = make_model()
    ids = torch.randint(0, 61, (3, 7))
    out = model(ids)
    assert out.logits.shape == (3, 7, 61)
    assert out.loss is None and out.cache is None
    assert len(out.moe_aux) == 2
    assert out.aux_loss.dtype == torch.float32 and out.aux_loss.dim() == 0
    torch.testing.assert_close(out.aux_loss, out.moe_aux[0].loss + out.moe_aux[1].loss)
    assert all(a.routing is None for a in out.moe_aux)
    assert all(a.routing is not None for a in model(ids, record_routing=True).moe_aux)
    assert model(ids, logits_to_keep=1).logits.shape == (3, 1, 61)


def test_dense_model_has_no_moe_layers():
    model = make_model(moe=False)
    assert model.moe_layers() == []
    assert all(isinstance(b.mlp, MLP) for b in model.layers)
    out = model(torch.randint(0, 61, (2, 5)))
    assert out.moe_aux == [] and float(out.aux_loss) == 0.0
    n = model.num_parameters()
    assert n["active"] == n["total"]


def test_loss_is_shifted_mean_cross_entropy():
    model = make_model()
    ids = torch.randint(0, 61, (2, 9))
    labels = ids.clone()
    labels[0, 4] = -100
    out = model(ids, labels=labels)
    manual = F.cross_entropy(out.logits[:, :-1].reshape(-1, 61), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, manual)
    # No target at all: 0, not NaN.
    assert model(ids, labels=torch.full_like(ids, -100)).loss.item() == 0.0
    # Padding positions are never targets.
    mask = torch.ones_like(ids)
    mask[:, :3] = 0
    padded = model(ids, attention_mask=mask, labels=ids)
    keep = labels[:, 1:].clone().fill_(0) + ids[:, 1:]
    keep[:, :2] = -100
    manual = F.cross_entropy(padded.logits[:, :-1].reshape(-1, 61), keep.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(padded.loss, manual)


def test_backward_reaches_every_parameter():
    torch.manual_seed(0)
    model = MoELM(lm_config(moe=dict(num_experts=2, top_k=2), tie_word_embeddings=True)).train()
    ids = torch.randint(0, 61, (2, 12))
    out = model(ids, labels=ids)
    (out.loss + out.aux_loss).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing


@pytest.mark.parametrize("name", list(CONFIGS))
def test_causal_future_tokens_do_not_change_past_logits(name):
    model = make_model(**CONFIGS[name])
    ids = torch.randint(0, 61, (2, 10))
    changed = ids.clone()
    changed[:, 6:] = (changed[:, 6:] + 1) % 61
    torch.testing.assert_close(model(ids).logits[:, :6], model(changed).logits[:, :6], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_left_padded_batch_equals_unpadded_sequences(name):
    model = make_model(**CONFIGS[name])
    torch.manual_seed(1)
    lengths = [9, 4, 6]
    seqs = [torch.randint(0, 61, (n,)) for n in lengths]
    L = max(lengths)
    ids = torch.zeros(len(seqs), L, dtype=torch.long)
    mask = torch.zeros(len(seqs), L, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, L - len(s) :], mask[i, L - len(s) :] = s, 1
    out = model(ids, attention_mask=mask)
    assert torch.isfinite(out.logits).all()
    for i, s in enumerate(seqs):
        single = model(s[None]).logits[0]
        torch.testing.assert_close(out.logits[i, L - len(s) :], single, rtol=1e-5, atol=1e-5)
    # Padding is not routed: every MoE layer processed k assignments per real token only.
    for aux in out.moe_aux:
        k = model.config.moe.experts_per_token
        assert int(aux.tokens_per_expert.sum()) == k * sum(lengths)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("preallocate", [False, True])
def test_cached_chunks_equal_full_forward(name, preallocate):
    model = make_model(**CONFIGS[name])
    ids = torch.randint(0, 61, (2, 11))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    full = model(ids, attention_mask=mask).logits
    cache = model.new_cache(max_length=11 if preallocate else None)
    pieces = []
    for start, stop in [(0, 5), (5, 6), (6, 9), (9, 10), (10, 11)]:
        out = model(ids[:, start:stop], attention_mask=mask[:, start:stop], cache=cache)
        assert out.cache is cache and cache.length == stop
        pieces.append(out.logits)
    valid = mask.bool()
    torch.testing.assert_close(torch.cat(pieces, 1)[valid], full[valid], rtol=1e-5, atol=1e-5)
    # HF style: a mask over cached + new positions is accepted too.
    cache = model.new_cache()
    model(ids[:, :8], attention_mask=mask[:, :8], cache=cache)
    step = model(ids[:, 8:], attention_mask=mask, cache=cache).logits
    torch.testing.assert_close(step, full[:, 8:], rtol=1e-5, atol=1e-5)


def test_explicit_position_ids():
    model = make_model()
    ids = torch.randint(0, 61, (1, 6))
    torch.testing.assert_close(model(ids).logits, model(ids, position_ids=torch.arange(6)).logits)
    shifted = model(ids, position_ids=torch.arange(3, 9)).logits
    assert not torch.allclose(shifted, model(ids).logits)


@pytest.mark.parametrize(
    "fields,expected",
    [
        (dict(), (0, 1, 2, 3, 4, 5)),
        (dict(first_k_dense=2), (2, 3, 4, 5)),
        (dict(moe_layer_freq=2), (0, 2, 4)),
        (dict(first_k_dense=1, moe_layer_freq=2), (2, 4)),
        (dict(first_k_dense=3, moe_layers=(5, 1)), (1, 5)),
    ],
)
def test_layer_choice(fields, expected):
    cfg = lm_config(num_hidden_layers=6, **fields)
    assert cfg.sparse_layers == expected
    with torch.device("meta"):
        model = MoELM(cfg)
    assert [i for i, _ in model.moe_layers()] == list(expected)
    for i, block in enumerate(model.layers):
        assert isinstance(block.mlp, MoE if i in expected else MLP)


def test_num_parameters():
    model = make_model(tie_word_embeddings=True)
    n = model.num_parameters()
    assert n["total"] == sum(p.numel() for p in model.parameters())
    assert model.lm_head.weight is model.embed_tokens.weight
    assert "lm_head.weight" in model.state_dict()  # tied, but saved under both names like HF
    moe = model.config.moe
    per_expert = 3 * D * moe.expert_hidden_size
    assert n["total"] - n["active"] == 2 * (moe.num_experts - moe.top_k) * per_expert
    untied = make_model(tie_word_embeddings=False).num_parameters()
    assert untied["total"] - n["total"] == 61 * D


@pytest.mark.parametrize(
    "moe",
    [{}, dict(num_shared_experts=2, shared_expert_hidden_size=8), dict(activation="gelu", top_k=1)],
)
def test_dense_equivalent_has_the_same_active_parameters(moe):
    cfg = lm_config(moe=moe)
    dense_cfg = dense_equivalent(cfg)
    assert dense_cfg.moe is None
    with torch.device("meta"):
        sparse, dense = MoELM(cfg), MoELM(dense_cfg)
    n_sparse, n_dense = sparse.num_parameters(), dense.num_parameters()
    assert n_dense["active"] == n_dense["total"]
    routers = sum(p.numel() for _, m in sparse.moe_layers() for p in m.router.parameters())
    assert n_sparse["active"] - n_dense["active"] == routers
    assert dense_equivalent(dense_cfg) is dense_cfg


def test_hf_parameter_names():
    names = set(make_model(qk_norm="head", num_hidden_layers=2, first_k_dense=1).state_dict())
    for expected in [
        "embed_tokens.weight",
        "layers.0.self_attn.q_proj.weight",
        "layers.0.self_attn.o_proj.weight",
        "layers.0.self_attn.q_norm.weight",
        "layers.0.self_attn.k_norm.weight",
        "layers.0.input_layernorm.weight",
        "layers.0.post_attention_layernorm.weight",
        "layers.0.mlp.gate_proj.weight",
        "layers.1.mlp.router.weight",
        "layers.1.mlp.experts.w_in",
        "norm.weight",
        "lm_head.weight",
    ]:
        assert expected in names, expected


def test_init_scales_residual_projections():
    model = MoELM(lm_config(num_hidden_layers=8, initializer_range=0.02, hidden_size=64))
    q = model.layers[0].self_attn.q_proj.weight.std().item()
    o = model.layers[0].self_attn.o_proj.weight.std().item()
    assert 0.015 < q < 0.025 and 0.015 / 4 < o < 0.025 / 4
    assert model.layers[0].mlp.experts.w_out.std().item() < 0.025 / 4
    plain = MoELM(lm_config(num_hidden_layers=8, scaled_residual_init=False))
    assert plain.layers[0].self_attn.o_proj.weight.std().item() > 0.08


def test_update_router_biases():
    model = make_model(**CONFIGS["sigmoid_shared"]).train()
    (i0, moe0), (i1, moe1) = model.moe_layers()
    assert (i0, i1) == (1, 2)
    model(torch.randint(0, 61, (2, 8)))
    load = moe0.router.load_since_update.clone()
    assert float(load.sum()) > 0
    model.update_router_biases()
    expected = moe0.config.bias_update_rate * torch.sign(load.mean() - load)
    torch.testing.assert_close(moe0.router.e_score_correction_bias, expected)
    assert float(moe0.router.load_since_update.sum()) == 0
    load = torch.tensor([10.0, 0.0, 0.0, 0.0])
    before = moe1.router.e_score_correction_bias.clone()
    model.update_router_biases({2: load})
    assert moe1.router.e_score_correction_bias[0] < before[0]
    with pytest.raises(ShapeError, match="got 1 loads for 2 MoE layers"):
        model.update_router_biases([load])
    with pytest.raises(ShapeError, match="not MoE layers"):
        model.update_router_biases({0: load})
    make_model().update_router_biases()  # softmax routers: a no-op


def test_bad_inputs_give_clear_errors():
    model = make_model()
    with pytest.raises(ShapeError, match="token id 61 .*vocab_size=61"):
        model(torch.tensor([[1, 61]]))
    with pytest.raises(ShapeError, match="token id -1"):
        model(torch.tensor([[-1, 3]]))
    with pytest.raises(ShapeError, match="exceeds max_position_embeddings=40"):
        model(torch.zeros(1, 41, dtype=torch.long))
    with pytest.raises(ShapeError, match="add a batch dimension"):
        model(torch.tensor([1, 2, 3]))
    with pytest.raises(ShapeError, match="integer token ids"):
        model(torch.zeros(1, 3))
    with pytest.raises(ShapeError, match="attention_mask has 2 positions"):
        model(torch.zeros(1, 3, dtype=torch.long), attention_mask=torch.ones(1, 2))
    with pytest.raises(ShapeError, match="labels must have"):
        model(torch.zeros(1, 3, dtype=torch.long), labels=torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ShapeError, match="logits_to_keep"):
        model(torch.zeros(1, 3, dtype=torch.long), labels=torch.zeros(1, 3, dtype=torch.long), logits_to_keep=1)
    cache = model.new_cache()
    model(torch.zeros(1, 38, dtype=torch.long), cache=cache)
    with pytest.raises(ShapeError, match="38 cached \\+ 3 new"):
        model(torch.zeros(1, 3, dtype=torch.long), cache=cache)


def test_config_validation():
    saved = lm_config().to_dict()  # as older moekit saved it: moe.hidden_size repeated the model's
    with pytest.raises(ConfigError, match="moe.hidden_size=16 differs from the model's hidden_size=32"):
        LMConfig.from_dict({**saved, "moe": {**saved["moe"], "hidden_size": 16}})
    assert LMConfig.from_dict({**saved, "moe": {**saved["moe"], "hidden_size": 32}}) == lm_config()
    with pytest.raises(ConfigError, match="moe_layers=.*needs an moe config"):
        lm_config(moe=False, moe_layers=(0,))
    with pytest.raises(ConfigError, match="num_attention_heads=4 must be a multiple of num_key_value_heads=3"):
        lm_config(num_key_value_heads=3)
    with pytest.raises(ConfigError, match="head_dim=5 must be even"):
        lm_config(head_dim=5)
    with pytest.raises(ConfigError, match="moe_layers=.*more than once"):
        lm_config(moe_layers=(1, 1))
    with pytest.raises(ConfigError, match="rms_norm_eps must be > 0"):
        lm_config(rms_norm_eps=0)
    with pytest.raises(ConfigError, match="unknown LMConfig key 'hidden_sizes'; did you mean 'hidden_size'"):
        LMConfig.from_dict({**lm_config().to_dict(), "hidden_sizes": 3})
    cfg = lm_config(qk_norm=True, moe_layers=[1])
    assert cfg.qk_norm.value == "head" and cfg.moe_layers == (1,)
    assert LMConfig.from_dict(cfg.to_dict()) == cfg
    # head_dim / kv heads stay derived, so replace() re-derives them.
    assert lm_config(num_key_value_heads=None).replace(hidden_size=64, moe=None).head_size == 16


@pytest.mark.parametrize("moe", [True, False])
def test_dropout_acts_in_training_only(moe):
    ids = torch.randint(0, 61, (2, 12))
    plain = make_model(moe=moe)
    dropped = make_model(moe=moe, dropout=0.5)  # same seed: the same weights
    assert torch.equal(dropped(ids).logits, plain(ids).logits)  # eval mode: no dropout
    dropped.train()
    torch.manual_seed(1)
    first, second = dropped(ids).logits, dropped(ids).logits
    assert not torch.allclose(first, second)
    assert "dropout" not in lm_config().to_dict() and lm_config(dropout=0.1).to_dict()["dropout"] == 0.1
    with pytest.raises(ConfigError, match="dropout must be in"):
        lm_config(dropout=1.0)


def test_bf16_forward_runs():
    model = make_model(qk_norm="head").to(torch.bfloat16)
    out = model(torch.randint(0, 61, (2, 6)), labels=torch.randint(0, 61, (2, 6)))
    assert out.logits.dtype == torch.bfloat16 and out.loss.dtype == torch.float32
    assert torch.isfinite(out.loss)


def test_tiny_preset_builds_and_runs():
    model = MoELM(get_preset("tiny"))
    out = model(torch.randint(0, 256, (2, 16)), labels=torch.randint(0, 256, (2, 16)))
    assert out.logits.shape == (2, 16, 256) and torch.isfinite(out.loss)


# -- numerics against Hugging Face ------------------------------------------------------------------
HF_ARCHS = {
    "llama": dict(),
    "qwen2": dict(attention_bias=True),
    "qwen3": dict(qk_norm="head", head_dim=12),
}


@pytest.mark.parametrize("arch", list(HF_ARCHS))
def test_logits_match_hugging_face(arch):
    transformers = pytest.importorskip("transformers")
    cfg = lm_config(moe=False, rope_theta=1000.0, rms_norm_eps=1e-5, **HF_ARCHS[arch])
    hf_fields = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.kv_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        tie_word_embeddings=False,
    )
    if arch == "llama":
        hf_cfg = transformers.LlamaConfig(**hf_fields, attention_bias=False)
        hf_cls = transformers.LlamaForCausalLM
    elif arch == "qwen2":
        hf_cfg, hf_cls = transformers.Qwen2Config(**hf_fields), transformers.Qwen2ForCausalLM
    else:
        hf_cfg, hf_cls = transformers.Qwen3Config(**hf_fields, head_dim=12), transformers.Qwen3ForCausalLM
    hf_cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    hf = hf_cls(hf_cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.2)
    ours = MoELM(cfg).eval()
    state = {k.removeprefix("model."): v for k, v in hf.state_dict().items()}
    ours.load_state_dict(state, strict=True)

    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask).logits
    valid = mask.bool()
    torch.testing.assert_close(got[valid], expected[valid], rtol=1e-5, atol=1e-5)


def test_causal_lm_refuses_expert_choice_and_names_the_causal_alternative():
    """Expert choice compares a batch's tokens, later ones included: training would see the future."""
    tiny = get_preset("tiny")
    with pytest.raises(ConfigError, match="router='expert_choice' \\(layer 0\\).*later tokens.*expert_threshold"):
        tiny.replace(moe=tiny.moe.replace(router="expert_choice"))
    with pytest.raises(ConfigError, match="layer 1"):  # a per-layer override is caught too
        tiny.replace(moe_layer_overrides={1: {"router": "expert_choice"}})
    tiny.replace(moe=tiny.moe.replace(router="expert_threshold"))  # the causal form is accepted
