"""llama.cpp's GGUF architectures -> Hugging Face config dicts and tensor names, so the HF import does the rest.

Facts read off llama.cpp's converter (``convert_hf_to_gguf.py``) and its model graphs:

* ``general.architecture`` names the graph: ``qwen3moe``, ``qwen2moe``, ``olmoe``, ``llama`` (Mixtral is ``llama``
  with ``llama.expert_count``; without it, a dense Llama/Mistral), and the dense ``qwen2``/``qwen3``.
* Hyper-parameters live under ``{arch}.``: ``block_count``, ``embedding_length``, ``feed_forward_length``,
  ``expert_feed_forward_length``, ``attention.head_count[_kv]``, ``attention.key_length`` (head dim),
  ``rope.freq_base``, ``attention.layer_norm_rms_epsilon``, ``expert_count``, ``expert_used_count``...
* The converter stacks the per-expert matrices: ``blk.N.ffn_{gate,up}_exps`` [E, I, D], ``ffn_down_exps`` [E, D, I];
  that is transformers 5's fused layout once gate and up are concatenated.
* For ``llama`` it permutes the rows of q_proj/k_proj (per head: the two rotary halves interleaved, as ggml's
  ``rope`` pairs neighbours); :func:`unpermute_rope` undoes it. Qwen and OLMoE use NeoX RoPE and are not permuted.
* Routing: llama.cpp's ``qwen3moe`` and Mixtral renormalise the top-k weights, ``qwen2moe`` and ``olmoe`` do not
  (unless ``{arch}.expert_weights_norm`` says otherwise); ``qwen2moe``'s shared expert has a sigmoid gate.
* No ``output.weight`` means the output head is tied to ``token_embd``.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from moekit.errors import CheckpointError, ConfigError
from moekit.interop.gguf.reader import GGUFFile
from moekit.interop.hf.weights_map import expert_part_names

# GGUF architecture -> (HF model_type, routing renormalises top-k by default).
ARCHITECTURES: dict[str, tuple[str, bool]] = {
    "qwen3moe": ("qwen3_moe", True),
    "qwen2moe": ("qwen2_moe", False),
    "olmoe": ("olmoe", False),
    "llama": ("mixtral", True),  # dense "llama" when expert_count is absent or 0
    "qwen2": ("qwen2", False),
    "qwen3": ("qwen3", False),
}
_HF_ARCH_CLASS = {
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "olmoe": "OlmoeForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}

# blk.N.<gguf> -> model.layers.N.<hf> (all families; MoE experts are handled apart).
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
}
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight"}
_GLOBAL_NAMES["output.weight"] = "lm_head.weight"
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
_EXPERT_PARTS = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")
_FLOAT_TYPES = ("F32", "F16", "BF16")


def architecture(gg: GGUFFile) -> str:
    """``general.architecture``, checked to be one moekit maps."""
    arch = gg.meta("general.architecture")
    if arch not in ARCHITECTURES:
        raise ConfigError(
            f"{gg.path}: GGUF architecture {arch!r} is not supported; moekit imports {', '.join(ARCHITECTURES)}"
        )
    return arch


def hf_config_from_gguf(gg: GGUFFile) -> dict[str, Any]:
    """An HF ``config.json`` dict equivalent to the GGUF's metadata (for :func:`lm_config_from_hf`)."""
    arch = architecture(gg)
    family, renormalise = ARCHITECTURES[arch]
    if int(gg.meta("split.count", 1)) > 1:
        raise CheckpointError(f"{gg.path} is one part of a split GGUF; merge it first (llama-gguf-split --merge)")

    def key(name: str, default: Any = ...) -> Any:
        return gg.meta(f"{arch}.{name}", default)

    experts = int(key("expert_count", 0) or 0)
    if arch == "llama" and not experts:
        family = "llama"
    heads = int(key("attention.head_count"))
    hidden = int(key("embedding_length"))
    head_dim = int(key("attention.key_length", hidden // heads))
    if int(key("attention.value_length", head_dim)) != head_dim:
        raise ConfigError(f"{gg.path}: {arch}.attention.value_length differs from key_length; moekit needs them equal")
    if int(key("rope.dimension_count", head_dim)) != head_dim:
        raise ConfigError(f"{gg.path}: {arch}.rope.dimension_count is not the head dim (partial RoPE is not supported)")
    scaling = key("rope.scaling.type", "none")
    if scaling not in ("none", None):
        raise ConfigError(f"{gg.path}: {arch}.rope.scaling.type={scaling!r}; only unscaled RoPE is supported")
    if "rope_freqs.weight" in gg.tensor_names():
        raise ConfigError(f"{gg.path}: the file carries rope_freqs (scaled RoPE, e.g. Llama 3.1); not supported")
    kv = key("attention.head_count_kv", heads)
    if isinstance(kv, list):
        raise ConfigError(f"{gg.path}: per-layer {arch}.attention.head_count_kv is not supported")
    vocab = gg.shape("token_embd.weight")[0] if "token_embd.weight" in gg.tensor_names() else None
    if vocab is None:
        raise CheckpointError(f"{gg.path}: the GGUF has no token_embd.weight")
    layers = int(key("block_count"))
    cfg: dict[str, Any] = {
        "model_type": family,
        "architectures": [_HF_ARCH_CLASS[family]],
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": int(kv),
        "head_dim": head_dim,
        "max_position_embeddings": int(key("context_length", 4096)),
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(key("rope.freq_base", 10000.0)),
        "tie_word_embeddings": "output.weight" not in gg.tensor_names(),
        "hidden_act": "silu",
        "intermediate_size": int(key("feed_forward_length", 0)) or _dense_width(gg, layers),
    }
    for name, token in (("bos_token_id", "bos"), ("eos_token_id", "eos")):
        value = gg.meta(f"tokenizer.ggml.{token}_token_id", None)
        if value is not None:
            cfg[name] = int(value)
    has_bias = "blk.0.attn_q.bias" in gg.tensor_names()
    cfg.update(_family_fields(gg, arch, family, experts, renormalise, has_bias))
    return cfg


def _dense_width(gg: GGUFFile, layers: int) -> int:
    """The dense MLP width from a ``ffn_up`` tensor when the metadata does not give it (0 for pure MoEs)."""
    for i in range(layers):
        if f"blk.{i}.ffn_up.weight" in gg.tensor_names():
            return gg.shape(f"blk.{i}.ffn_up.weight")[0]
    return 1


def _family_fields(
    gg: GGUFFile, arch: str, family: str, experts: int, renormalise: bool, has_bias: bool
) -> dict[str, Any]:
    def key(name: str, default: Any = ...) -> Any:
        return gg.meta(f"{arch}.{name}", default)

    out: dict[str, Any] = {}
    if family in ("llama", "qwen3", "qwen3_moe", "olmoe"):
        out["attention_bias"] = has_bias
    if family == "qwen2_moe":
        out["qkv_bias"] = has_bias
    if family in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe"):
        out["use_sliding_window"] = False
    if family == "mixtral":
        out["sliding_window"] = None
    if family in ("llama", "qwen2", "qwen3"):
        return out
    used = int(key("expert_used_count"))
    norm = bool(key("expert_weights_norm", renormalise))
    expert_width = int(key("expert_feed_forward_length", 0)) or gg.shape("blk.0.ffn_down_exps.weight")[2]
    if family == "mixtral":
        if not norm:
            raise ConfigError(f"{gg.path}: llama.expert_weights_norm=false is not Mixtral's routing")
        out.update(num_local_experts=experts, num_experts_per_tok=used, intermediate_size=expert_width)
    elif family == "olmoe":
        out.update(num_experts=experts, num_experts_per_tok=used, norm_topk_prob=norm, intermediate_size=expert_width)
    else:  # qwen2_moe, qwen3_moe: every layer sparse in llama.cpp's graphs
        out.update(
            num_experts=experts,
            num_experts_per_tok=used,
            norm_topk_prob=norm,
            moe_intermediate_size=expert_width,
            decoder_sparse_step=1,
            mlp_only_layers=[],
        )
        if family == "qwen2_moe":
            shared = key("expert_shared_feed_forward_length", None)
            if shared is None:
                name = "blk.0.ffn_up_shexp.weight"
                shared = gg.shape(name)[0] if name in gg.tensor_names() else 0
            out["shared_expert_intermediate_size"] = int(shared)
    return out


# ---------------------------------------------------------------------------------------------------- tensors


def unpermute_rope(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation for ``llama``: per head, rows ``[0, h/2, 1, h/2+1, ...]`` back to
    the two rotary halves ``[0..h/2), [h/2..h)`` transformers' ``rotate_half`` expects."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


class GGUFTensors(Mapping[str, torch.Tensor]):
    """The GGUF's tensors under HF names (transformers 5's fused expert layout), each read when it is looked up
    (float types as views of the file, quantised ones dequantised into ``dtype``) and never kept: an import holds
    the tensors it has taken, not the file. The names, shapes and layers are checked here, before any data is read.

    With ``stream_experts`` the fused expert stacks are shape-only meta tensors (they pass the import's checks),
    and a quantising import reads the experts one at a time through :meth:`expert_stacks` instead. With
    ``per_expert`` (expert offload) the experts are named as in the hub layout, one tensor per expert and matrix,
    each a view of its rows of the file's stack, which the import then keeps in the file instead of stacking."""

    def __init__(
        self,
        gg: GGUFFile,
        hf_config: dict[str, Any],
        dtype: torch.dtype,
        stream_experts: bool = False,
        per_expert: bool = False,
    ):
        self.gg, self.dtype, self.stream_experts = gg, dtype, stream_experts
        arch = gg.meta("general.architecture")
        heads, kv_heads = hf_config["num_attention_heads"], hf_config["num_key_value_heads"]
        self._make: dict[str, Callable[[], torch.Tensor]] = {}
        self._experts: dict[int, dict[str, str]] = {}  # layer -> part -> GGUF name
        for name in gg.tensor_names():
            if name in _GLOBAL_NAMES:
                self._make[_GLOBAL_NAMES[name]] = functools.partial(self._read, name)
                continue
            m = _BLOCK_RE.match(name)
            if m is None:
                raise CheckpointError(f"{gg.path}: tensor {name!r} has no place in a moekit {arch} model")
            layer, part, kind = int(m.group(1)), m.group(2), m.group(3)
            if part in _EXPERT_PARTS and kind == "weight":
                self._experts.setdefault(layer, {})[part] = name
                continue
            if part not in _LAYER_NAMES:
                raise CheckpointError(f"{gg.path}: tensor {name!r} has no place in a moekit {arch} model")
            rope_heads = None
            if arch == "llama" and part in ("attn_q", "attn_k"):
                rope_heads = heads if part == "attn_q" else kv_heads
                rows = gg.shape(name)[0]
                if rows % (2 * rope_heads):
                    raise CheckpointError(
                        f"{gg.path}: tensor {name!r} has {rows} rows, not a multiple of 2 x {rope_heads} heads"
                    )
            as_row = part == "ffn_gate_inp_shexp"  # GGUF keeps the shared expert's gate as a vector
            make = functools.partial(self._read, name, rope_heads, as_row)
            self._make[f"model.layers.{layer}.{_LAYER_NAMES[part]}.{kind}"] = make
        for layer, parts in self._experts.items():
            missing = [p for p in _EXPERT_PARTS if p not in parts]
            if missing:
                raise CheckpointError(f"{gg.path}: layer {layer} lacks expert tensors {missing}")
            gate, up = (gg.shape(parts[p]) for p in ("ffn_gate_exps", "ffn_up_exps"))
            if gate != up:
                raise CheckpointError(f"{gg.path}: layer {layer}'s ffn_gate_exps {gate} and ffn_up_exps {up} differ")
            pre = f"model.layers.{layer}.mlp.experts."
            if per_expert:
                names = zip(_EXPERT_PARTS, expert_part_names(hf_config["model_type"]))
                for part, hf_name in names:
                    for e in range(gg.shape(parts[part])[0]):
                        self._make[f"{pre}{e}.{hf_name}.weight"] = functools.partial(gg.tensor, parts[part], None, e)
                continue
            self._make[pre + "gate_up_proj"] = functools.partial(self._gate_up, layer)
            self._make[pre + "down_proj"] = functools.partial(self._stack, parts["ffn_down_exps"])
        self.files = dict.fromkeys(self._make, str(gg.path))

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._make[name]()

    def __contains__(self, name: object) -> bool:  # Mapping's own would make the tensor to see if it exists
        return name in self._make

    def __iter__(self) -> Iterator[str]:
        return iter(self._make)

    def __len__(self) -> int:
        return len(self._make)

    def _read(self, name: str, rope_heads: int | None = None, as_row: bool = False) -> torch.Tensor:
        # Float tensors keep their stored dtype (views of the file); quantised ones dequantise straight into dtype.
        t = self.gg.tensor(name, None if self.gg.type_name(name) in _FLOAT_TYPES else self.dtype)
        if rope_heads is not None:
            t = unpermute_rope(t, rope_heads)
        return t.reshape(1, -1) if as_row else t

    def _stack(self, name: str) -> torch.Tensor:
        if self.stream_experts:
            return torch.empty(self.gg.shape(name), dtype=self.dtype, device="meta")
        return self._read(name)

    def _gate_up(self, layer: int) -> torch.Tensor:
        gate, up = (self._stack(self._experts[layer][p]) for p in ("ffn_gate_exps", "ffn_up_exps"))
        if gate.dtype != up.dtype:  # e.g. Q4_K gate beside a Q6_K or F16 up: meet in the target dtype
            gate, up = gate.to(self.dtype), up.to(self.dtype)
        return torch.cat([gate, up], dim=1)  # [E, 2I, D]

    def quantised_experts(self) -> list[str]:
        """The GGUF names of the expert stacks stored in a quantised type (not F32, F16, BF16)."""
        names = [name for parts in self._experts.values() for name in parts.values()]
        return [name for name in names if not self.gg.is_float(name)]

    def expert_stacks(self, layer: int) -> tuple[ExpertMatrices, ExpertMatrices]:
        """``layer``'s experts as moekit's w_in [E, D, 2I] and w_out [E, I, D], read one expert at a time."""
        parts = self._experts[layer]
        w_in = ExpertMatrices(self.gg, [parts["ffn_gate_exps"], parts["ffn_up_exps"]], self.dtype)
        return w_in, ExpertMatrices(self.gg, [parts["ffn_down_exps"]], self.dtype)


class ExpertMatrices:
    """One expert stack of a GGUF as a sequence: item ``e`` is expert e's matrix [in, out] (moekit's layout),
    read from the file and dequantised into ``dtype`` when asked for, alone (a few MB, not the stack)."""

    def __init__(self, gg: GGUFFile, names: list[str], dtype: torch.dtype):
        self.gg, self.names, self.dtype = gg, names, dtype

    def __len__(self) -> int:
        return self.gg.shape(self.names[0])[0]

    def __getitem__(self, e: int) -> torch.Tensor:
        rows = [self.gg.tensor(name, self.dtype, index=e) for name in self.names]  # [out, in] each
        return (rows[0] if len(rows) == 1 else torch.cat(rows)).t()
