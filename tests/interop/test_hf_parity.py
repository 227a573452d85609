"""moekit runs imported Hugging Face checkpoints with transformers' numbers: logits and greedy generation.

Every family, built by transformers itself with non-default options (tests/interop/hf_models.py), saved with
``save_pretrained`` and imported with :func:`moekit.from_hf`.
"""

from __future__ import annotations

import pytest
import torch

import moekit
from moekit.inference.generate import generate
from moekit.models import MoELM
from tests.interop.hf_models import CONFIGS, MOE, make_hf_model, one_torch_thread, padded_batch  # noqa: F401

FAMILIES = list(CONFIGS)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """family -> (HF model, folder it was saved to); built once per family."""
    root = tmp_path_factory.mktemp("hf")
    cache = {}

    def get(name):
        if name not in cache:
            hf = make_hf_model(name)
            hf.save_pretrained(root / name)
            cache[name] = (hf, root / name)
        return cache[name]

    return get


@pytest.mark.parametrize("name", FAMILIES)
def test_logits_match_transformers_on_a_left_padded_batch(exported, name):
    hf, folder = exported(name)
    model = moekit.from_hf(folder)
    assert isinstance(model, MoELM) and not model.training
    ids, mask, positions = padded_batch()
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        out = model(ids, attention_mask=mask).logits
    real = mask.bool()  # HF routes padding tokens too, moekit does not: compare real tokens only
    assert ref.abs()[real].max() > 0.1  # not a degenerate, near-zero model
    assert (out - ref).abs()[real].max().item() <= 1e-4


@pytest.mark.parametrize("name", FAMILIES)
def test_greedy_generation_matches_transformers_generate(exported, name):
    hf, folder = exported(name)
    model = moekit.from_hf(folder)
    prompts = [[5, 17, 9, 33, 41, 7, 60, 12], [88, 3, 14]]  # the second is left-padded in the batch
    L = max(map(len, prompts))
    ids = torch.tensor([[0] * (L - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        ref = hf.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=28, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    mine = generate(model, prompts, max_new_tokens=28, temperature=0)
    assert mine == ref[:, L:].tolist()


@pytest.mark.parametrize("name", MOE)
def test_fused_transformers_layout_imports_the_same_weights(exported, tmp_path, name):
    hf, folder = exported(name)
    hf.save_pretrained(tmp_path, save_original_format=False)  # experts.gate_up_proj / experts.down_proj
    from moekit.io.safe_io import load_weights

    assert any(k.endswith("experts.gate_up_proj") for k in load_weights(tmp_path))
    a, b = moekit.from_hf(folder).state_dict(), moekit.from_hf(tmp_path).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_mla_cache_holds_the_compressed_latent(exported):
    _, folder = exported("deepseek_v3")
    model = moekit.from_hf(folder)
    cache = model.new_cache(max_length=16)
    model(torch.tensor([[5, 6, 7, 8]]), cache=cache)
    c = model.config
    assert cache.keys[0].shape == (1, 1, 16, c.kv_lora_rank)
    assert cache.values[0].shape == (1, 1, 16, c.qk_rope_head_dim)
