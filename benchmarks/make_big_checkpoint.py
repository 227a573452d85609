"""Write a random-weight Qwen3-MoE checkpoint the way transformers saves one, one layer at a time.

The big-model benchmarks need checkpoints far larger than RAM would allow to build as a model (the
Qwen3-30B-A3B shape is 61 GB in bf16), so this writes the safetensors shards directly, tensor by tensor, with
transformers' names and per-expert layout (``model.layers.N.mlp.experts.E.gate_proj.weight``, ...), plus
``config.json`` from ``transformers.Qwen3MoeConfig`` and a ``model.safetensors.index.json``. Weights are
N(0, 0.02) (transformers' init), norms 1. The tokenizer is a byte-level BPE of 2,000 tokens trained on
moekit's built-in corpus (the model's vocabulary is larger; llama.cpp's converter pads it). Never commit
the output.

Usage:
    python benchmarks/make_big_checkpoint.py --shape 1.7b --out /tmp/q3-1.7b
    python benchmarks/make_big_checkpoint.py --shape 30b --layers 20 --fused --out /tmp/q3-30b-20l
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

SHAPES = {
    # hidden, layers, heads, kv heads, experts, top-k, expert width, vocab
    "1.7b": dict(hidden=1024, layers=16, heads=16, kv_heads=4, experts=64, top_k=8, expert_hidden=512, vocab=32000),
    "30b": dict(hidden=2048, layers=48, heads=32, kv_heads=4, experts=128, top_k=8, expert_hidden=768, vocab=151936),
}


def layer_tensors(i: int, s: dict, dtype: torch.dtype, g: torch.Generator, fused: bool) -> dict[str, torch.Tensor]:
    D, hd, I = s["hidden"], 128 if s["hidden"] >= 2048 else 64, s["expert_hidden"]
    p = f"model.layers.{i}."

    def w(*shape):
        return torch.empty(shape, dtype=dtype).normal_(0, 0.02, generator=g)

    out = {
        p + "input_layernorm.weight": torch.ones(D, dtype=dtype),
        p + "post_attention_layernorm.weight": torch.ones(D, dtype=dtype),
        p + "self_attn.q_proj.weight": w(s["heads"] * hd, D),
        p + "self_attn.k_proj.weight": w(s["kv_heads"] * hd, D),
        p + "self_attn.v_proj.weight": w(s["kv_heads"] * hd, D),
        p + "self_attn.o_proj.weight": w(D, s["heads"] * hd),
        p + "self_attn.q_norm.weight": torch.ones(hd, dtype=dtype),
        p + "self_attn.k_norm.weight": torch.ones(hd, dtype=dtype),
        p + "mlp.gate.weight": w(s["experts"], D),
    }
    if fused:  # transformers 5's in-memory layout: experts.gate_up_proj [E, 2I, D], experts.down_proj [E, D, I]
        out[p + "mlp.experts.gate_up_proj"] = w(s["experts"], 2 * I, D)
        out[p + "mlp.experts.down_proj"] = w(s["experts"], D, I)
        return out
    for e in range(s["experts"]):
        q = f"{p}mlp.experts.{e}."
        out.update({q + "gate_proj.weight": w(I, D), q + "up_proj.weight": w(I, D), q + "down_proj.weight": w(D, I)})
    return out


def write_tokenizer(out: Path) -> None:
    """A byte-level BPE (GPT-2 style, what Qwen uses) trained on the built-in corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from moekit.data.corpus import builtin_corpus

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([builtin_corpus()], trainer)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="1.7b")
    ap.add_argument("--layers", type=int, help="override the shape's layer count")
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fused", action="store_true", help="fused expert stacks (what expert offload reads) instead")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    import transformers

    s = dict(SHAPES[args.shape])
    s["layers"] = args.layers or s["layers"]
    dtype = getattr(torch, args.dtype)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    hd = 128 if s["hidden"] >= 2048 else 64
    config = transformers.Qwen3MoeConfig(
        vocab_size=s["vocab"], hidden_size=s["hidden"], num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"], head_dim=hd,
        num_experts=s["experts"], num_experts_per_tok=s["top_k"], moe_intermediate_size=s["expert_hidden"],
        intermediate_size=4 * s["hidden"], norm_topk_prob=True, max_position_embeddings=4096,
        tie_word_embeddings=False, dtype=args.dtype, architectures=["Qwen3MoeForCausalLM"],
    )  # fmt: skip
    config.save_pretrained(out)
    write_tokenizer(out)
    g = torch.Generator().manual_seed(args.seed)
    weight_map: dict[str, str] = {}
    total = 0
    shards = [("embed", None)] + [("layer", i) for i in range(s["layers"])] + [("head", None)]
    names = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    for (kind, i), name in zip(shards, names):
        if kind == "embed":
            tensors = {
                "model.embed_tokens.weight": torch.empty(s["vocab"], s["hidden"], dtype=dtype).normal_(
                    0, 0.02, generator=g
                )
            }
        elif kind == "head":
            tensors = {
                "model.norm.weight": torch.ones(s["hidden"], dtype=dtype),
                "lm_head.weight": torch.empty(s["vocab"], s["hidden"], dtype=dtype).normal_(0, 0.02, generator=g),
            }
        else:
            tensors = layer_tensors(i, s, dtype, g, args.fused)
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        print(f"\r{name} ({total / 1e9:.2f} GB)", end="", flush=True)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    print(f"\n{out}: {sum(1 for _ in weight_map)} tensors, {total / 1e9:.2f} GB, {s}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
