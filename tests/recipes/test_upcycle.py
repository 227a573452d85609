"""Upcycling keeps the dense function at step 0; BTX mixes domain FFNs; bad inputs are named."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import moekit
from moekit.cli import main
from moekit.errors import ConfigError
from moekit.models import MoELM
from moekit.models.presets import dense_equivalent, get_preset
from moekit.recipes.btx import branch_train_mix
from moekit.recipes.upcycle import mix_experts, upcycle
from moekit.train import train

TINY_DENSE = dense_equivalent(get_preset("tiny")).replace(intermediate_size=96)


@pytest.fixture
def dense():
    torch.manual_seed(0)
    return MoELM(TINY_DENSE).eval()


@pytest.mark.parametrize(
    ("experts", "top_k", "granularity", "shared"),
    [(4, 2, 1, 0), (8, 1, 1, 0), (8, 4, 2, 0), (12, 6, 3, 1), (6, 2, 1, 2)],
)
def test_upcycled_model_computes_the_dense_function(dense, experts, top_k, granularity, shared):
    moe = upcycle(dense, experts, top_k, granularity=granularity, shared_experts=shared).eval()
    x = torch.randint(0, 256, (3, 20))
    assert len(moe.moe_layers()) == TINY_DENSE.num_hidden_layers
    assert (moe(x).logits - dense(x).logits).abs().max() <= 1e-5
    assert moe.num_parameters()["total"] > dense.num_parameters()["total"]


def test_noise_and_drop_upcycling_break_symmetry(dense):
    moe = upcycle(dense, 4, 2, noise=0.1, reinit_fraction=0.25, seed=1)
    w = moe.layers[0].mlp.experts.w_in
    assert not torch.allclose(w[0], w[1])
    x = torch.randint(0, 256, (2, 10))
    assert not torch.allclose(moe(x).logits, dense(x).logits, atol=1e-5)


def test_upcycle_bad_arguments(dense):
    with pytest.raises(ConfigError, match=r"num_experts=6 is not divisible by granularity=4"):
        upcycle(dense, 6, 4, granularity=4)
    with pytest.raises(ConfigError, match=r"top_k=9 exceeds num_experts=8"):
        upcycle(dense, 8, 9)
    with pytest.raises(ConfigError, match=r"top_k=3 must be a multiple of granularity=2"):
        upcycle(dense, 8, 3, granularity=2)
    with pytest.raises(ConfigError, match=r"intermediate_size=96 is not divisible by granularity=5"):
        upcycle(dense, 10, 5, granularity=5)
    with pytest.raises(ConfigError, match=r"already has MoE layers"):
        upcycle(MoELM(get_preset("tiny")), 4, 2)


def test_mix_identical_models_equals_the_model(dense):
    mixed = mix_experts([dense, dense, dense], top_k=2).eval()
    x = torch.randint(0, 256, (2, 16))
    assert (mixed(x).logits - dense(x).logits).abs().max() <= 1e-5


def test_mix_averages_non_ffn_weights_and_keeps_each_ffn(dense):
    torch.manual_seed(1)
    other = MoELM(TINY_DENSE)
    mixed = mix_experts([dense, other])
    q = mixed.layers[0].self_attn.q_proj.weight
    assert torch.allclose(q, (dense.layers[0].self_attn.q_proj.weight + other.layers[0].self_attn.q_proj.weight) / 2)
    assert torch.equal(mixed.layers[1].mlp.experts.w_out[1], other.layers[1].mlp.down_proj.weight.t())


def test_mix_refuses_different_architectures(dense):
    wider = MoELM(TINY_DENSE.replace(hidden_size=48, num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(ConfigError, match=r"models 1 and 2 cannot be mixed: hidden_size is 32 vs 48"):
        mix_experts([dense, wider])
    deeper = MoELM(TINY_DENSE.replace(num_hidden_layers=3))
    with pytest.raises(ConfigError, match=r"num_hidden_layers is 2 vs 3"):
        mix_experts([dense, deeper])
    with pytest.raises(ConfigError, match=r"at least 2 dense models"):
        mix_experts([dense])


def test_btx_pipeline_router_stage_trains_only_routers(tmp_path):
    opts = dict(batch_size=4, block_size=16, eval_interval=1000, progress=False, tensorboard=False)
    seed = train(model="tiny", model_overrides={"moe": None}, max_steps=2, out_dir=str(tmp_path / "seed"), **opts)
    domains = {}
    for name, text in (("a", "alpha beta gamma delta " * 40), ("b", "1 + 2 = 3; 4 * 5 = 20. " * 40)):
        domains[name] = str(tmp_path / f"{name}.txt")
        (tmp_path / f"{name}.txt").write_text(text)
    out = tmp_path / "btx"
    results = branch_train_mix(
        out, seed=str(seed.run_dir), domains=domains, branch_steps=2, router_steps=2, finetune_steps=1, **opts
    )
    assert set(results) == {"branch-a", "branch-b", "mix", "router", "finetune"}
    mixed, routed = moekit.load(results["mix"]), moekit.load(results["router"])
    for (name, before), (_, after) in zip(mixed.named_parameters(), routed.named_parameters()):
        changed = not torch.equal(before, after)
        assert changed == (".mlp.router." in name), name
    assert moekit.load(results["finetune"])(torch.arange(8)[None]).logits.shape == (1, 8, 256)


def test_upcycle_command(tmp_path):
    opts = dict(batch_size=4, block_size=16, eval_interval=1000, progress=False, tensorboard=False)
    dense = train(model="tiny", model_overrides={"moe": None}, max_steps=1, out_dir=str(tmp_path / "d"), **opts)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "moekit",
            "upcycle",
            "--from",
            str(dense.run_dir),
            "--num-experts",
            "4",
            "--top-k",
            "2",
            "--out",
            str(tmp_path / "moe"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    x = torch.randint(0, 256, (1, 12))
    assert (moekit.load(tmp_path / "moe")(x).logits - moekit.load(dense.run_dir)(x).logits).abs().max() <= 1e-5


@pytest.mark.parametrize(
    ("dense_family", "moe_family", "granularity", "shared"),
    [("mistral", "mixtral", 1, 0), ("qwen2", "qwen2_moe", 1, 1), ("qwen3", "qwen3_moe", 2, 0)],
)
def test_upcycle_hf_dense_and_export_as_hf_moe(tmp_path, dense_family, moe_family, granularity, shared):
    """HF dense folder -> moekit upcycle -> HF MoE folder: transformers computes the dense model's function."""
    from tests.interop.hf_models import save_hf_model, transformers, write_tokenizer

    hf_dense = save_hf_model(dense_family, tmp_path / "dense")
    write_tokenizer(hf_dense)
    moe_dir, exported = tmp_path / "moe", tmp_path / "hf_moe"
    argv = ["upcycle", "--from", hf_dense, "--num-experts", 4, "--top-k", 2, "--granularity", granularity]
    argv += ["--shared-experts", shared, "--shared-expert-gate"] if shared else []
    assert main([str(a) for a in [*argv, "--out", moe_dir]]) == 0
    assert main(["convert", "--to-hf", str(moe_dir), "--out", str(exported), "--family", moe_family]) == 0
    ids = torch.tensor([[4, 5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        want = transformers.AutoModelForCausalLM.from_pretrained(hf_dense).eval()(ids).logits
        got = transformers.AutoModelForCausalLM.from_pretrained(exported).eval()(ids).logits
    assert transformers.AutoConfig.from_pretrained(exported).model_type == moe_family
    assert (got - want).abs().max() < 1e-5
