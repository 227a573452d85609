"""GGUF files written in the tests with the ``gguf`` package's GGUFWriter, laid out as llama.cpp's converter does
(its tensor names, stacked experts, metadata keys, and the q/k row permutation for ``llama``), from tiny random
transformers models; and small byte-level BPE tokenizers trained with ``tokenizers``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

# Qwen2's pre-tokenizer regex (llama.cpp's tokenizer.ggml.pre = "qwen2").
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
TEXT = (
    "The quick brown fox jumps over the lazy dog. Mixture-of-Experts models route each token to a few experts; "
    "llama.cpp runs them from GGUF files. Numbers 12345 and 3.14, émigré café, naïve, 東京, don't, we'll.\n\n"
) * 20


def tiny_config(family: str, **overrides):
    """A transformers config of ``family`` (qwen3_moe, mixtral, qwen2_moe, olmoe) at hidden 64, 2 layers, 4 experts
    (``overrides`` replace any field)."""
    base = dict(
        vocab_size=300,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        initializer_range=0.1,
        num_experts_per_tok=2,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    if family == "qwen3_moe":
        fields = dict(base, head_dim=16, intermediate_size=96, moe_intermediate_size=32, num_experts=4)
        return transformers.Qwen3MoeConfig(**{**fields, "norm_topk_prob": True, **overrides})
    if family == "qwen2_moe":
        fields = dict(base, intermediate_size=96, moe_intermediate_size=32, shared_expert_intermediate_size=48)
        return transformers.Qwen2MoeConfig(**{**fields, "num_experts": 4, **overrides})
    if family == "olmoe":  # no GQA, as OLMoE (llama.cpp's olmoe sizes k_norm by the hidden size)
        fields = dict(base, num_key_value_heads=4, intermediate_size=32, num_experts=4)
        return transformers.OlmoeConfig(**{**fields, **overrides})
    fields = dict(base, intermediate_size=32, num_local_experts=4, rope_theta=10000.0)
    return transformers.MixtralConfig(**{**fields, **overrides})


def tiny_model(family: str, seed: int = 0):
    """A random transformers causal LM of ``family`` in fp32, eval mode."""
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(tiny_config(family)).float().eval()


ARCH = {"qwen3_moe": "qwen3moe", "qwen2_moe": "qwen2moe", "olmoe": "olmoe", "mixtral": "llama"}
_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate.weight": "ffn_gate_inp.weight",
    "mlp.shared_expert.gate_proj.weight": "ffn_gate_shexp.weight",
    "mlp.shared_expert.up_proj.weight": "ffn_up_shexp.weight",
    "mlp.shared_expert.down_proj.weight": "ffn_down_shexp.weight",
    "mlp.shared_expert_gate.weight": "ffn_gate_inp_shexp.weight",
    "mlp.experts.down_proj": "ffn_down_exps.weight",
}
for _hf, _gg in (("q", "q"), ("k", "k"), ("v", "v"), ("o", "output")):
    for _kind in ("weight", "bias"):
        _NAMES[f"self_attn.{_hf}_proj.{_kind}"] = f"attn_{_gg}.{_kind}"


def rope_permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's converter's q/k row order for ``llama``: per head, the two rotary halves interleaved."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_tensors(model) -> dict[str, torch.Tensor]:
    """The model's weights under llama.cpp's GGUF names, in PyTorch order (experts stacked [E, I, D] / [E, D, I])."""
    cfg = model.config
    arch = ARCH[cfg.model_type]
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        t = t.detach().float()
        if name == "model.embed_tokens.weight":
            out["token_embd.weight"] = t
        elif name == "model.norm.weight":
            out["output_norm.weight"] = t
        elif name == "lm_head.weight":
            out["output.weight"] = t
        else:
            _, _, layer, rest = name.split(".", 3)
            if rest == "mlp.experts.gate_up_proj":
                half = t.shape[1] // 2
                out[f"blk.{layer}.ffn_gate_exps.weight"] = t[:, :half]
                out[f"blk.{layer}.ffn_up_exps.weight"] = t[:, half:]
                continue
            if arch == "llama" and rest in ("self_attn.q_proj.weight", "self_attn.k_proj.weight"):
                heads = cfg.num_attention_heads if "q_proj" in rest else cfg.num_key_value_heads
                t = rope_permute(t, heads)
            if rest == "mlp.shared_expert_gate.weight":
                t = t.reshape(-1)
            out[f"blk.{layer}.{_NAMES[rest]}"] = t
    return out


def _metadata(w, cfg) -> None:
    arch = ARCH[cfg.model_type]
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_expert_count(getattr(cfg, "num_experts", None) or cfg.num_local_experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    if arch in ("qwen3moe", "qwen2moe"):
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    if arch == "qwen2moe":
        w.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w.add_rope_dimension_count(head_dim)
    if getattr(cfg, "head_dim", None):
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)


def add_byte_level_vocab(w, tokenizer_json: dict, pre: str = "qwen2") -> None:
    """A ``gpt2`` vocabulary (tokens by id, merges) from a byte-level BPE ``tokenizer.json`` dict."""
    vocab = tokenizer_json["model"]["vocab"]
    tokens = [tok for tok, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tokenizer_json["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([1] * len(tokens))
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)


def train_byte_level_bpe(vocab_size: int = 300, regex: str = QWEN2_REGEX):
    """A byte-level BPE (``tokenizers``) with Qwen2's pre-tokenizer, trained on :data:`TEXT`."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(regex), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<pad>", "<s>", "</s>"],
        show_progress=False,
    )
    tok.train_from_iterator([TEXT], trainer)
    return tok


def quantisable(data: np.ndarray, qtype: str) -> bool:
    """Whether rows of ``data`` split into ``qtype``'s blocks (else llama.cpp keeps the tensor in a float type)."""
    block, _ = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
    return data.shape[-1] % block == 0


@torch.no_grad()
def round_weights(model, qtype: str) -> None:
    """Replace the model's matrices by what ``qtype`` stores for them (quantise, dequantise), where they split
    into blocks; quantising is per row along the last dim, which the GGUF layout keeps, so the file then holds
    exactly these values."""
    qt = gguf.GGMLQuantizationType[qtype]
    for t in model.state_dict().values():
        data = t.float().numpy()
        if data.ndim >= 2 and quantisable(data, qtype):
            back = gguf.quants.dequantize(gguf.quants.quantize(data, qt), qt).reshape(data.shape)
            t.copy_(torch.from_numpy(back.astype(np.float32)))


def write_gguf(
    model,
    path: Path,
    qtype: str | None = None,
    tokenizer_json: dict | None = None,
    stored: str = "F32",
    chat_template: str | None = None,
) -> dict[str, np.ndarray]:
    """Write ``model`` as llama.cpp would; matrices in ``qtype`` (Q8_0, Q4_0, Q4_K...) or ``stored`` (F32, F16,
    BF16), norms in F32; ``chat_template`` as ``tokenizer.chat_template``. Returns what each tensor reads back
    as (float32, PyTorch order)."""
    cfg = model.config
    w = gguf.GGUFWriter(str(path), ARCH[cfg.model_type])
    _metadata(w, cfg)
    if tokenizer_json is not None:
        add_byte_level_vocab(w, tokenizer_json)
    if chat_template is not None:
        w.add_chat_template(chat_template)
    expect: dict[str, np.ndarray] = {}
    for name, t in gguf_tensors(model).items():
        data = t.numpy().astype(np.float32)
        kind = qtype if qtype and data.ndim >= 2 and quantisable(data, qtype) else "F32"
        kind = stored if kind == "F32" and data.ndim >= 2 else kind
        qt = gguf.GGMLQuantizationType[kind]
        if kind == "F32":
            w.add_tensor(name, data)
            expect[name] = data
        elif kind == "F16":
            w.add_tensor(name, data.astype(np.float16))
            expect[name] = data.astype(np.float16).astype(np.float32)
        else:
            raw = gguf.quants.quantize(data, qt)
            w.add_tensor(name, raw, raw_dtype=qt)
            expect[name] = gguf.quants.dequantize(raw, qt).reshape(data.shape).astype(np.float32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expect
