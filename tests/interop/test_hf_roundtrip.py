"""Export: HF -> moekit -> HF gives the same bits, transformers loads the result cleanly, dtype and the
balancing bias survive, sharded checkpoints load and export, tokenizer files travel with the weights."""

from __future__ import annotations

import json

import pytest
import torch

import moekit
from moekit.errors import ConfigError
from moekit.io.safe_io import INDEX_NAME, load_sharded, load_tensors, load_weights
from moekit.models import LMConfig, MoELM
from moekit.nn.config import MoEConfig
from tests.interop.hf_models import (  # noqa: F401
    CONFIGS,
    make_hf_model,
    one_torch_thread,
    padded_batch,
    save_hf_model,
    transformers,
    write_tokenizer,
)


def _load_hf(folder):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert all(not v for v in info.values()), info  # no missing / unexpected / mismatched keys
    return model.eval()


def _same_tensors(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("name", list(CONFIGS))
def test_hf_to_moekit_to_hf_is_bit_identical_and_loads_cleanly(tmp_path, name):
    src = save_hf_model(name, tmp_path / "src")
    out = moekit.to_hf(moekit.from_hf(src), tmp_path / "out")
    _same_tensors(load_weights(src), load_weights(out))
    # The config comes back as it was (transformers 5 spellings kept; nothing added or lost).
    assert json.loads((out / "config.json").read_text()) == json.loads((src / "config.json").read_text())
    ids, mask, positions = padded_batch()
    with torch.no_grad():
        ref = _load_hf(src)(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        back = _load_hf(out)(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    assert torch.equal(ref, back)


def test_balancing_bias_round_trips_after_fine_tuning_updates(tmp_path):
    src = save_hf_model("deepseek_v3", tmp_path / "src")
    model = moekit.from_hf(src)
    router = model.layers[1].mlp.router
    assert router.e_score_correction_bias.dtype == torch.float32
    assert torch.equal(
        router.e_score_correction_bias, load_weights(src)["model.layers.1.mlp.gate.e_score_correction_bias"]
    )
    model.update_router_biases([torch.arange(8.0), torch.arange(8.0).flip(0)])  # one aux-free balancing step
    out = moekit.to_hf(model, tmp_path / "out")
    hf = _load_hf(out)
    for i in (1, 2):
        mine = model.layers[i].mlp.router.e_score_correction_bias
        assert torch.equal(hf.model.layers[i].mlp.gate.e_score_correction_bias, mine)
    assert not torch.equal(
        load_weights(out)["model.layers.1.mlp.gate.e_score_correction_bias"],
        load_weights(src)["model.layers.1.mlp.gate.e_score_correction_bias"],
    )


@pytest.mark.parametrize("name", ["qwen2_moe", "deepseek_v3"])
def test_bf16_stays_bf16(tmp_path, name):
    hf = make_hf_model(name).to(torch.bfloat16)
    for module in hf.modules():  # transformers keeps the balancing bias in fp32 (_keep_in_fp32_modules_strict)
        if hasattr(module, "e_score_correction_bias"):
            module.e_score_correction_bias = module.e_score_correction_bias.float()
    hf.save_pretrained(tmp_path / "src")
    model = moekit.from_hf(tmp_path / "src")
    dtypes = {n: p.dtype for n, p in model.state_dict().items()}
    assert {d for n, d in dtypes.items() if "e_score" not in n} == {torch.bfloat16}
    out = moekit.to_hf(model, tmp_path / "out")
    _same_tensors(load_weights(tmp_path / "src"), load_weights(out))
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    ids, mask, positions = padded_batch()
    with torch.no_grad():  # runs, and stays close to transformers in bf16
        logits = model(ids, attention_mask=mask).logits
        ref = _load_hf(out)(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    assert logits.dtype == torch.bfloat16
    assert (logits.float() - ref.float()).abs()[mask.bool()].max() < 0.1


def test_sharded_checkpoints_load_and_export(tmp_path):
    hf = make_hf_model("qwen3_moe")
    hf.save_pretrained(tmp_path / "src", max_shard_size="40KB")
    assert (tmp_path / "src" / INDEX_NAME).is_file()
    model = moekit.from_hf(tmp_path / "src")
    out = moekit.to_hf(model, tmp_path / "out", dtype=None)  # small: one file
    assert (out / "model.safetensors").is_file()
    from moekit.interop.hf import api

    sharded = api.to_hf(model, tmp_path / "sharded", max_shard_bytes=30_000)
    assert (sharded / INDEX_NAME).is_file() and not (sharded / "model.safetensors").exists()
    assert len(list(sharded.glob("model-*-of-*.safetensors"))) > 2
    _same_tensors(load_sharded(tmp_path / "src"), load_sharded(sharded))
    ids, mask, positions = padded_batch()
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        back = _load_hf(sharded)(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    assert torch.equal(ref, back)


def test_tokenizer_files_travel_with_the_weights(tmp_path):
    src = save_hf_model("mixtral", tmp_path / "src")
    write_tokenizer(src)
    out = moekit.to_hf(moekit.from_hf(src), tmp_path / "out")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        assert (out / name).read_bytes() == (src / name).read_bytes(), name
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok("the cat sat")["input_ids"] == [4, 5, 6]


def test_a_native_moekit_model_exports_to_the_family_that_expresses_it(tmp_path):
    config = LMConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        qk_norm="head",
        moe=MoEConfig(num_experts=4, top_k=2, expert_hidden_size=16, norm_topk_prob=False),
        initializer_range=0.1,
    )
    torch.manual_seed(0)
    model = MoELM(config).eval()
    out = moekit.to_hf(model, tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["model_type"] == "qwen3_moe"
    ids, mask, positions = padded_batch()
    ids = ids.clamp(max=99)
    with torch.no_grad():
        ref = _load_hf(out)(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        mine = model(ids, attention_mask=mask).logits
    assert (mine - ref).abs()[mask.bool()].max() <= 1e-4
    # And back: moekit -> HF -> moekit keeps every tensor.
    again = moekit.from_hf(out).state_dict()
    assert all(torch.equal(again[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    "change, field",
    [
        (dict(capacity_factor=1.25), "capacity_factor"),
        (dict(router="hash"), "router"),
        (dict(activation="gelu"), "activation"),
        (dict(router_bias=True), "router_bias"),
        (dict(routed_scaling_factor=2.0), "routed_scaling_factor"),
    ],
)
def test_export_refuses_what_the_family_cannot_express(tmp_path, change, field):
    moe = MoEConfig(num_experts=4, top_k=2, expert_hidden_size=16, **change)
    config = LMConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, moe=moe
    )
    with pytest.raises(ConfigError, match=field):
        moekit.to_hf(MoELM(config), tmp_path / "out", family="mixtral")
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_export_of_per_layer_expert_counts_is_refused(tmp_path):
    moe = MoEConfig(num_experts=4, top_k=2, expert_hidden_size=16)
    config = LMConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        moe=moe,
        moe_layer_overrides={1: {"num_experts": 3}},
    )
    with pytest.raises(ConfigError, match="layers.1.mlp.num_experts"):
        moekit.to_hf(MoELM(config), tmp_path / "out")


def test_moekit_checkpoint_of_an_import_keeps_the_hf_config(tmp_path):
    src = save_hf_model("olmoe", tmp_path / "src")
    model = moekit.from_hf(src)
    assert model.config.hf_config["model_type"] == "olmoe"
    assert LMConfig.from_dict(model.config.to_dict()) == model.config
    assert load_tensors(src / "model.safetensors").keys()  # sanity
