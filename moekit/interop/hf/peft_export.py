"""A moekit LoRA adapter as a PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``).

Linear layers map one to one (``lora_A.weight`` [r, in], ``lora_B.weight`` [out, r]). The experts map to
PEFT's ``target_parameters`` on transformers' fused stacks (PEFT >= 0.17): ``mlp.experts.gate_up_proj``
[E, 2I, D] and ``mlp.experts.down_proj`` [E, D, I], each adapted by one pair whose rank axis holds every
expert's r rows, expert-major in A ([E*r, in]) and rank-major in B ([out, r*E]): PEFT reshapes them to
[E, r, in] and [out, r, E] (``ParamWrapper.get_delta_weight``). moekit's A [E, r, in] and B [E, out, r] are
the same factors, so this is a reshape and a permute. When two parameters of one module are targeted PEFT
nests its wrappers, the first target innermost: ``experts.base_layer.lora_*`` adapts ``gate_up_proj``,
``experts.lora_*`` ``down_proj``. Experts without adapters (ESFT + LoRA) get zero pairs, which add nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from moekit.errors import ConfigError
from moekit.interop.hf.weights_map import moekit_to_hf
from moekit.io.safe_io import save_tensors
from moekit.models import MoELM
from moekit.nn.config import Activation
from moekit.nn.lora import LoRAConfig, LoRAExperts, LoRALinear

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# Families whose transformers 5 modules hold the experts as fused [E, out, in] stacks under ``mlp.experts``.
FUSED_EXPERT_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "glm4_moe")
_PREFIX = "base_model.model."


def _linear_path(model: MoELM, name: str, module: LoRALinear, family: str) -> str:
    """The HF module path of the moekit linear ``name`` (``model.layers.0.self_attn.q_proj``)."""
    hf = moekit_to_hf({f"{name}.weight": module.weight}, model.config, family)
    (weight_name,) = hf
    return weight_name[: -len(".weight")]


def _expert_pairs(module: LoRAExperts) -> dict[str, torch.Tensor]:
    """PEFT's (A, B) of gate_up_proj (inner wrapper) and down_proj (outer) for one layer's experts."""
    if module.activation != Activation.SWIGLU:
        raise ConfigError("PEFT export of expert adapters needs SwiGLU experts (transformers' fused gate_up_proj)")
    in_A, in_B, out_A, out_B = (t.detach() for t in module._stacks())
    E, r = in_A.shape[0], in_A.shape[1]

    def peft(a_ERI: torch.Tensor, b_EOR: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return a_ERI.reshape(E * r, -1).contiguous(), b_EOR.permute(1, 2, 0).reshape(b_EOR.shape[1], r * E).contiguous()

    a_in, b_in = peft(in_A, in_B)
    a_out, b_out = peft(out_A, out_B)
    return {"base_layer.lora_A": a_in, "base_layer.lora_B": b_in, "lora_A": a_out, "lora_B": b_out}


def write_peft_adapter(
    model: MoELM, config: LoRAConfig, out: str | Path, family: str, base_model: str | None = None
) -> Path:
    """Write the LoRA adapters attached to ``model`` as a PEFT adapter folder ``out`` for the HF ``family``
    export of its base; returns the folder.

    Raises:
        ConfigError: an adapter PEFT cannot express for this family (naming it).
    """
    tensors: dict[str, torch.Tensor] = {}
    modules: list[str] = []
    has_experts = False
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            path = _linear_path(model, name, module, family)
            modules.append(path)
            tensors[f"{_PREFIX}{path}.lora_A.weight"] = module.lora_A.detach().contiguous()
            tensors[f"{_PREFIX}{path}.lora_B.weight"] = module.lora_B.detach().contiguous()
        elif isinstance(module, LoRAExperts):
            if family not in FUSED_EXPERT_FAMILIES:
                raise ConfigError(
                    f"PEFT cannot express expert adapters for family {family!r}: it targets fused expert stacks, "
                    f"which transformers has for {', '.join(FUSED_EXPERT_FAMILIES)}"
                )
            has_experts = True
            layer = name.split(".")[1]
            for key, t in _expert_pairs(module).items():
                tensors[f"{_PREFIX}model.layers.{layer}.mlp.experts.{key}.weight"] = t
    if not tensors:
        raise ConfigError("the model has no LoRA adapter to export")
    _check_expert_layers(model, has_experts)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_tensors(tensors, out / ADAPTER_WEIGHTS)
    peft_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": config.rank,
        "lora_alpha": config.alpha,
        "lora_dropout": 0.0,  # a training-time setting; PEFT's parameter targets take none
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "target_modules": sorted(modules) if modules else None,
        "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"] if has_experts else None,
    }
    (out / ADAPTER_CONFIG).write_text(json.dumps(peft_config, indent=2) + "\n")
    return out


def _check_expert_layers(model: nn.Module, has_experts: bool) -> None:
    """PEFT's parameter targets adapt every MoE layer: each must then carry expert adapters."""
    if not has_experts or not isinstance(model, MoELM):
        return
    bare = [i for i, layer in model.moe_layers() if not isinstance(layer.experts, LoRAExperts)]
    if bare:
        raise ConfigError(f"PEFT export: MoE layers {bare} have no expert adapter while others do")
