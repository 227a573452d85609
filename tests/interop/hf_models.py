"""Tiny random Hugging Face models of every family moekit imports, built with transformers' own classes.

Non-default options on purpose: GQA, explicit head_dim, attention biases, dense layers among sparse ones,
shared experts, group-limited sigmoid routing with a non-zero balancing bias, no q-LoRA, a sliding window
shorter than the test sequences, tied embeddings. Initialised wider than transformers' default (0.02) so
router logits are spread out and top-k choices are not near-ties.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

VOCAB = 120
_BASE = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
    initializer_range=0.1,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
_MLA = dict(_BASE, num_key_value_heads=4)

CONFIGS = {
    "mixtral": ("MixtralConfig", dict(_BASE, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        dict(
            _BASE,
            intermediate_size=48,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=24,
            num_experts=6,
            num_experts_per_tok=2,
            mlp_only_layers=[1],
            norm_topk_prob=True,
        ),
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        dict(
            _BASE,
            intermediate_size=48,
            moe_intermediate_size=16,
            head_dim=16,
            num_experts=6,
            num_experts_per_tok=3,
            decoder_sparse_step=2,
            attention_bias=True,
            rope_theta=5000.0,
        ),
    ),
    "olmoe": ("OlmoeConfig", dict(_BASE, intermediate_size=16, num_experts=6, num_experts_per_tok=2)),
    "deepseek_v3": (
        "DeepseekV3Config",
        dict(
            _MLA,
            intermediate_size=48,
            moe_intermediate_size=16,
            n_routed_experts=8,
            n_shared_experts=2,
            num_experts_per_tok=3,
            n_group=4,
            topk_group=2,
            first_k_dense_replace=1,
            q_lora_rank=24,
            kv_lora_rank=16,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=12,
            routed_scaling_factor=1.7,
        ),
    ),
    "deepseek_v3_plain": (  # no q-LoRA, rotate-half layout, no renormalisation, no dense layer
        "DeepseekV3Config",
        dict(
            _MLA,
            intermediate_size=48,
            moe_intermediate_size=16,
            n_routed_experts=8,
            n_shared_experts=1,
            num_experts_per_tok=2,
            n_group=2,
            topk_group=1,
            first_k_dense_replace=0,
            q_lora_rank=None,
            kv_lora_rank=16,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
            rope_interleave=False,
            norm_topk_prob=False,
        ),
    ),
    "glm4_moe": (  # GQA with sigmoid group-limited routing; the whole head rotated (moekit has no partial RoPE)
        "Glm4MoeConfig",
        dict(
            _BASE,
            intermediate_size=48,
            moe_intermediate_size=16,
            n_routed_experts=8,
            n_shared_experts=1,
            num_experts_per_tok=3,
            n_group=4,
            topk_group=2,
            first_k_dense_replace=1,
            routed_scaling_factor=1.5,
            attention_bias=True,
            use_qk_norm=True,
            head_dim=12,
            rope_parameters={"rope_type": "default", "rope_theta": 5000.0, "partial_rotary_factor": 1.0},
        ),
    ),
    "llama": ("LlamaConfig", dict(_BASE, intermediate_size=48, attention_bias=True, tie_word_embeddings=True)),
    "mistral": ("MistralConfig", dict(_BASE, intermediate_size=48, sliding_window=6)),
    "qwen2": ("Qwen2Config", dict(_BASE, intermediate_size=48)),
    "qwen3": ("Qwen3Config", dict(_BASE, intermediate_size=48, head_dim=12)),
}
MOE = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "deepseek_v3_plain", "glm4_moe")


def hf_config(name: str, **overrides):
    cls, fields = CONFIGS[name]
    return getattr(transformers, cls)(**{**fields, **overrides})


@torch.no_grad()
def make_hf_model(name: str, seed: int = 0, **overrides):
    """A random HF causal LM of family ``name`` (eval mode), with norms and the balancing bias perturbed."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(name, **overrides)).eval()
    for pname, p in model.named_parameters():
        if "norm" in pname:
            p.add_(torch.randn_like(p) * 0.2)
    for bname, b in model.named_buffers():
        if "e_score_correction_bias" in bname:
            b.copy_(torch.randn_like(b) * 0.1)
    return model


def save_hf_model(name: str, folder: Path, seed: int = 0, **save_kwargs) -> Path:
    make_hf_model(name, seed).save_pretrained(folder, **save_kwargs)
    return folder


def padded_batch(seed: int = 0, batch: int = 3, length: int = 11):
    """input_ids [B, S], attention_mask (rows 1, 2 left-padded) and HF's position ids for them."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, :4] = 0
    mask[2, :7] = 0
    ids = ids.masked_fill(mask == 0, 0)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, position_ids


WORDS = "the cat sat on a mat and dog ran to big red house with small green tree in old town".split()


def write_tokenizer(folder: Path) -> None:
    """A word-level tokenizer.json over the model's VOCAB ids (WORDS from id 4) plus tokenizer_config.json and
    special_tokens_map.json."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    vocab.update({f"w{i}": i for i in range(len(vocab), VOCAB)})  # fill the model's vocabulary
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    special = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    (folder / "tokenizer_config.json").write_text(json.dumps({**special, "model_max_length": 128}))
    (folder / "special_tokens_map.json").write_text(json.dumps(special))


def corpus(words: int = 3000, seed: int = 0) -> str:
    g = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, len(WORDS), (words,), generator=g).tolist()
    return " ".join(WORDS[i] for i in picks)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny models on a shared 2-core box: OpenMP barriers between 2 threads cost more than the math
    (a forward takes 100x longer when another process holds a core), so these tests run on one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
