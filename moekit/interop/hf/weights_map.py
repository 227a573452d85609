"""Tensor names and layouts: Hugging Face checkpoints <-> moekit state dicts.

moekit's module names are HF's without the ``model.`` prefix (``layers.3.self_attn.q_proj.weight``), so
everything outside the MoE layers maps by renaming. An MoE layer differs:

============================================  ====================================================
moekit                                        hub layout (per expert; what ``save_pretrained``
                                              writes and hub checkpoints hold)
============================================  ====================================================
``mlp.router.weight [E, D]``                  ``{moe}.gate.weight``
``mlp.router.e_score_correction_bias [E]``    ``mlp.gate.e_score_correction_bias`` (DeepSeek-V3)
``mlp.experts.w_in [E, D, 2I]``               ``{moe}.experts.{e}.{gate,up}_proj.weight [I, D]``
``mlp.experts.w_out [E, I, D]``               ``{moe}.experts.{e}.down_proj.weight [D, I]``
``mlp.shared_experts.*``                      ``mlp.shared_expert.*`` (Qwen2-MoE), ``mlp.shared_experts.*``
``mlp.shared_expert_gate.weight``             ``mlp.shared_expert_gate.weight`` (Qwen2-MoE)
(no shared expert)                            zero-width ``mlp.shared_expert(s).*`` (Qwen2-MoE: and a
                                              zero ``mlp.shared_expert_gate.weight [1, D]``)
============================================  ====================================================

transformers 5 fuses the experts in memory (and writes them so with ``save_original_format=False``):
``{moe}.experts.gate_up_proj [E, 2I, D]`` and ``{moe}.experts.down_proj [E, D, I]``; import reads both.

``{moe}`` is ``block_sparse_moe`` for Mixtral's hub files (w1 = gate, w3 = up, w2 = down) and ``mlp``
otherwise (transformers 5 also calls Mixtral's ``mlp``; both are read). So ``w_in[e] = cat(gate.T, up.T, -1)``
and ``w_out[e] = down.T``; every conversion is a transpose or a concatenation, so HF -> moekit -> HF
gives back the same bits. Export writes the hub layout, which every transformers version loads.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping

import torch

from moekit.errors import CheckpointError
from moekit.io.mapped import copy_from_file, release_pages
from moekit.models.config import LMConfig
from moekit.nn.expert_cache import ExpertSpans, Span

logger = logging.getLogger(__name__)

_EXPERT_NAMES = {"mixtral": ("w1", "w3", "w2")}  # (gate, up, down) in hub files
_DEFAULT_EXPERT_NAMES = ("gate_proj", "up_proj", "down_proj")
_SHARED_NAME = {"qwen2_moe": "shared_expert", "deepseek_v3": "shared_experts", "glm4_moe": "shared_experts"}
_HUB_MOE_PREFIX = {"mixtral": "block_sparse_moe"}
_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")
_HF_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")
# Derived buffers some old checkpoints carry; transformers recomputes them too.
_SKIPPABLE_RE = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
# Per-step state of moekit's aux-free balancing, never saved (non-persistent), listed for clarity.
_ROUTER_BIAS = "router.e_score_correction_bias"


class HFTensors:
    """An HF checkpoint's tensors with the file each came from; remembers which ones were used. ``tensors`` is
    kept as given, not copied: a mapping that makes each tensor when looked up (GGUF's) stays lazy."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], files: Mapping[str, str]):
        self.tensors, self.files = tensors, dict(files)
        self.used: set[str] = set()

    def has(self, name: str) -> bool:
        return name in self.tensors

    def file_of(self, name: str) -> str:
        return self.files.get(name, "the checkpoint")

    def take(self, name: str, shape: tuple[int, ...], why: str) -> torch.Tensor:
        """The tensor ``name``, checked to have ``shape`` (``why`` says which config fields set it)."""
        if name not in self.tensors:
            files = sorted(set(self.files.values()))
            raise CheckpointError(
                f"tensor {name!r} is missing from the checkpoint ({', '.join(files) or 'no files'}); "
                f"the config needs it ({why})"
            )
        t = self.tensors[name]
        self.used.add(name)
        if tuple(t.shape) != tuple(shape):
            raise CheckpointError(
                f"{self.file_of(name)}: tensor {name!r} has shape {tuple(t.shape)} but the config needs "
                f"{tuple(shape)} ({why})"
            )
        if not t.is_floating_point():
            raise CheckpointError(f"{self.file_of(name)}: tensor {name!r} has dtype {t.dtype}; expected floating point")
        return t


def _split(name: str) -> tuple[int | None, str]:
    m = _LAYER_RE.match(name)
    return (int(m.group(1)), m.group(2)) if m else (None, name)


def _hf_name(name: str) -> str:
    return name if name == "lm_head.weight" else f"model.{name}"


def _family(config: LMConfig, family: str | None) -> str:
    family = family or (config.hf_config or {}).get("model_type")
    if not family:
        raise CheckpointError("the tensor mapping needs a family (model_type)")
    return family


# ------------------------------------------------------------------------------------------------------ import


def hf_to_moekit(
    source: HFTensors,
    config: LMConfig,
    expected: Mapping[str, torch.Size],
    family: str | None = None,
    moe_transform: Callable[[int, dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
    expert_spans: dict[int, list[ExpertSpans]] | None = None,
) -> dict[str, torch.Tensor]:
    """moekit state-dict tensors from an HF checkpoint.

    Args:
        source: the HF tensors (per-expert hub layout, transformers 5's fused layout, or a mix by layer).
        config: the model's LMConfig (from :func:`~moekit.interop.hf.config_map.lm_config_from_hf`).
        expected: moekit name -> shape of every persistent tensor of ``MoELM(config)``.
        family: the HF model_type (default: ``config.hf_config["model_type"]``).
        moe_transform: ``(layer, that layer's MoE tensors) -> tensors``, applied as each layer is read (e.g.
            quantising its experts, so the float stacks of only one layer exist at a time).
        expert_spans: for expert offload: the layers whose experts are stored one tensor per expert are not
            stacked; where each expert's matrices are in the files goes here instead (layer -> per expert), and
            the result lacks those layers' ``experts.w_in``/``w_out``.

    Raises:
        CheckpointError: a missing tensor, a shape that does not match the config, or tensors the model has
            no place for; each names the tensor and the file it is in.
    """
    family = _family(config, family)
    out: dict[str, torch.Tensor] = {}
    done_layers: set[int] = set()
    for name, shape in expected.items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        layer, rest = _split(name)
        if layer is not None and rest.startswith("mlp.") and layer in config.sparse_layers:
            if layer not in done_layers:
                moe = _moe_in(source, config, family, layer, expected, expert_spans)
                out.update(moe_transform(layer, moe) if moe_transform is not None else moe)
                done_layers.add(layer)
            continue
        t = source.take(_hf_name(name), tuple(shape), _why(config, name))
        out[name] = t
    if config.tie_word_embeddings and source.has("lm_head.weight"):
        source.used.add("lm_head.weight")  # transformers ties it to the embedding and ignores the copy
    _check_leftovers(source, config, family)
    missing = set(expected) - set(out) - ({"lm_head.weight"} if config.tie_word_embeddings else set())
    missing -= {f"layers.{layer}.mlp.experts.{w}" for layer in expert_spans or () for w in ("w_in", "w_out")}
    if missing:
        raise CheckpointError(f"no HF tensor maps to moekit tensors {sorted(missing)[:5]}")
    return out


def _why(config: LMConfig, name: str) -> str:
    c = config
    if "embed_tokens" in name or "lm_head" in name:
        return f"vocab_size={c.vocab_size}, hidden_size={c.hidden_size}"
    if "self_attn" in name:
        if c.attention_type.value == "mla":
            return (
                f"hidden_size={c.hidden_size}, heads={c.num_attention_heads}, q_lora_rank={c.q_lora_rank}, "
                f"kv_lora_rank={c.kv_lora_rank}, qk_nope_head_dim={c.qk_nope_head_dim}, "
                f"qk_rope_head_dim={c.qk_rope_head_dim}, v_head_dim={c.v_head_dim}"
            )
        return (
            f"hidden_size={c.hidden_size}, heads={c.num_attention_heads}, kv_heads={c.kv_heads}, head_dim={c.head_size}"
        )
    if ".mlp." in name:
        return f"hidden_size={c.hidden_size}, intermediate_size={c.intermediate_size}"
    return f"hidden_size={c.hidden_size}"


def _moe_prefix_in(source: HFTensors, family: str, layer: int) -> str:
    hub = _HUB_MOE_PREFIX.get(family)
    if hub and source.has(f"model.layers.{layer}.{hub}.gate.weight"):
        return f"model.layers.{layer}.{hub}"
    return f"model.layers.{layer}.mlp"


def _moe_in(
    source: HFTensors,
    config: LMConfig,
    family: str,
    layer: int,
    expected: Mapping[str, torch.Size],
    expert_spans: dict[int, list[ExpertSpans]] | None = None,
) -> dict[str, torch.Tensor]:
    m = config.moe_config(layer)
    assert m is not None  # callers pass sparse layers only
    E, D, I = m.num_experts, config.hidden_size, m.expert_hidden_size
    why = f"layer {layer}: num_experts={E}, hidden_size={D}, expert hidden size={I}"
    pre = _moe_prefix_in(source, family, layer)
    mine = f"layers.{layer}.mlp"
    out = {f"{mine}.router.weight": source.take(f"{pre}.gate.weight", (E, D), why)}
    if f"{mine}.{_ROUTER_BIAS}" in expected:
        bias = source.take(f"{pre}.gate.e_score_correction_bias", (E,), why)
        out[f"{mine}.{_ROUTER_BIAS}"] = bias.float()  # transformers keeps it in fp32 whatever the weights' dtype
    fused = f"{pre}.experts.gate_up_proj"
    if source.has(fused):
        out[f"{mine}.experts.w_in"] = source.take(fused, (E, 2 * I, D), why).transpose(1, 2)
        out[f"{mine}.experts.w_out"] = source.take(f"{pre}.experts.down_proj", (E, D, I), why).transpose(1, 2)
    elif expert_spans is not None:  # offload: each expert read from its tensors' places in the file
        g, u, d = expert_part_names(family)
        expert_spans[layer] = []
        for e in range(E):
            gate, up, down = (
                source.take(f"{pre}.experts.{e}.{name}.weight", shape, why)
                for name, shape in ((g, (I, D)), (u, (I, D)), (d, (D, I)))
            )
            what = f"expert {e} of layer {layer} ({source.file_of(f'{pre}.experts.{e}.{g}.weight')})"
            w_in = Span.transposed_rows([gate, up], f"the gate and up matrices of {what}")
            expert_spans[layer].append((w_in, Span.of(down.t(), f"the down matrix of {what}")))
    else:
        g, u, d = expert_part_names(family)
        # Stacked in the fused layout ([E, 2I, D] = gate rows then up rows; [E, D, I]); moekit's w_in / w_out
        # are transposed views of it. A mapped source is read from its file into place (no page faults on the
        # mapping, no pages to release); any other is copied and its pages released, so importing a mapped
        # checkpoint holds about one copy of the weights, not two.
        first = source.take(f"{pre}.experts.0.{g}.weight", (I, D), why)
        gate_up = first.new_empty(E, 2 * I, D)
        down = first.new_empty(E, D, I)
        for e in range(E):
            for part, (name, shape) in enumerate(((g, (I, D)), (u, (I, D)), (d, (D, I)))):
                t = source.take(f"{pre}.experts.{e}.{name}.weight", shape, why)
                target = down[e] if part == 2 else gate_up[e, part * I : (part + 1) * I]
                if not copy_from_file(target, t):
                    target.copy_(t)
                    release_pages(t)
        out[f"{mine}.experts.w_in"] = gate_up.transpose(1, 2)
        out[f"{mine}.experts.w_out"] = down.transpose(1, 2)
    shared = _SHARED_NAME.get(family)
    if family in _SHARED_NAME and not m.num_shared_experts:  # zero-width shared expert: adds 0, nothing to keep
        for hf_name, shape in _zero_width_shared(family, pre, D).items():
            if source.has(hf_name):
                source.take(hf_name, shape, why + ", no shared expert")
    for name, shape in expected.items():
        if name.startswith(f"{mine}.shared_experts."):
            out[name] = source.take(f"{pre}.{shared}.{name[len(mine) + 16 :]}", tuple(shape), why)
        elif name.startswith(f"{mine}.shared_expert_gate."):
            out[name] = source.take(f"{pre}.{name[len(mine) + 1 :]}", tuple(shape), why)
    return out


def expert_part_names(family: str) -> tuple[str, str, str]:
    """The (gate, up, down) names of one expert's matrices in a ``family``'s hub files (Mixtral: w1, w3, w2)."""
    return _EXPERT_NAMES.get(family, _DEFAULT_EXPERT_NAMES)


def _zero_width_shared(family: str, pre: str, hidden: int) -> dict[str, tuple[int, ...]]:
    """Name -> shape of the shared expert transformers builds with zero width when a model has none
    (Qwen2-MoE's ``shared_expert_intermediate_size=0``, DeepSeek-V3's and GLM-4-MoE's ``n_shared_experts=0``)."""
    shared = f"{pre}.{_SHARED_NAME[family]}"
    out: dict[str, tuple[int, ...]] = {
        f"{shared}.gate_proj.weight": (0, hidden),
        f"{shared}.up_proj.weight": (0, hidden),
    }
    out[f"{shared}.down_proj.weight"] = (hidden, 0)
    if family == "qwen2_moe":
        out[f"{pre}.shared_expert_gate.weight"] = (1, hidden)  # zero: its output multiplies the shared expert's 0
    return out


def _check_leftovers(source: HFTensors, config: LMConfig, family: str) -> None:
    left = sorted(set(source.tensors) - source.used)
    skipped_mtp, unexpected = [], []
    for name in left:
        m = _HF_LAYER_RE.match(name)
        if _SKIPPABLE_RE.search(name):
            continue
        if family == "deepseek_v3" and m and int(m.group(1)) >= config.num_hidden_layers:
            skipped_mtp.append(name)  # the multi-token-prediction module, not part of the causal LM
            continue
        unexpected.append(name)
    if skipped_mtp:
        logger.info("skipping %d tensors of DeepSeek's multi-token-prediction layers", len(skipped_mtp))
    if unexpected:
        shown = ", ".join(f"{n!r} ({source.file_of(n)})" for n in unexpected[:5])
        more = f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""
        raise CheckpointError(
            f"the checkpoint has tensors the {family} config has no place for: {shown}{more}; "
            "the config and the weights do not match"
        )


# ------------------------------------------------------------------------------------------------------ export


def moekit_to_hf(
    state: Mapping[str, torch.Tensor], config: LMConfig, family: str | None = None
) -> dict[str, torch.Tensor]:
    """HF hub-layout tensors (per-expert, ``model.`` prefix) from a moekit state dict.

    Args:
        state: the model's persistent tensors (``model.state_dict()``); a tied ``lm_head.weight`` is dropped.
        config: its LMConfig.
        family: the HF model_type to name tensors for (default: the imported one).

    Returns:
        HF name -> contiguous tensor, ``e_score_correction_bias`` in fp32 as transformers keeps it.
    """
    family = _family(config, family)
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        layer, rest = _split(name)
        if layer is not None and rest.startswith("mlp.") and layer in config.sparse_layers:
            out.update(_moe_out(name, rest[4:], t, config, family, layer))
        else:
            out[_hf_name(name)] = t.detach().contiguous()
    return out


def _own(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy: an imported expert stack's slices are already-contiguous views of one storage, which
    a safetensors file cannot hold as separate tensors."""
    return t.clone(memory_format=torch.contiguous_format)


def _moe_out(name: str, rest: str, t: torch.Tensor, config: LMConfig, family: str, layer: int):
    pre = f"model.layers.{layer}.{_HUB_MOE_PREFIX.get(family, 'mlp')}"
    t = t.detach()
    if rest == "router.weight":
        out = {f"{pre}.gate.weight": t.contiguous()}
        if family in _SHARED_NAME and not getattr(config.moe_config(layer), "num_shared_experts", 0):
            out.update(
                {name: t.new_zeros(shape) for name, shape in _zero_width_shared(family, pre, t.shape[1]).items()}
            )
        return out
    if rest == _ROUTER_BIAS:
        return {f"{pre}.gate.e_score_correction_bias": t.float().contiguous()}
    if rest == "experts.w_in":
        g, u, _ = _EXPERT_NAMES.get(family, _DEFAULT_EXPERT_NAMES)
        I = config.moe_config(layer).expert_hidden_size
        out = {}
        for e in range(t.shape[0]):
            out[f"{pre}.experts.{e}.{g}.weight"] = _own(t[e, :, :I].t())
            out[f"{pre}.experts.{e}.{u}.weight"] = _own(t[e, :, I:].t())
        return out
    if rest == "experts.w_out":
        _, _, d = _EXPERT_NAMES.get(family, _DEFAULT_EXPERT_NAMES)
        return {f"{pre}.experts.{e}.{d}.weight": _own(t[e].t()) for e in range(t.shape[0])}
    if rest.startswith("shared_experts.") and family in _SHARED_NAME:
        return {f"{pre}.{_SHARED_NAME[family]}.{rest[len('shared_experts.') :]}": t.contiguous()}
    if rest.startswith("shared_expert_gate.") and family == "qwen2_moe":
        return {f"{pre}.{rest}": t.contiguous()}
    raise CheckpointError(f"moekit tensor {name!r} has no counterpart in a {family} checkpoint")
