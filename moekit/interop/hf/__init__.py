"""Hugging Face interop: import MoE (and dense) checkpoints, run them with transformers' numbers, export them back.

Families (``model_type``): mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v3, and the dense llama, mistral,
qwen2, qwen3. :func:`from_hf` reads a model folder (hub per-expert layout or transformers 5's fused one);
:func:`to_hf` writes one that ``transformers.AutoModelForCausalLM.from_pretrained`` loads with no missing or
unexpected keys. See :mod:`.config_map` / :mod:`.config_export` (config fields), :mod:`.families` (per-family
defaults) and :mod:`.weights_map` (tensor names and layouts).
"""

from moekit.interop.hf.api import (
    convert_from_hf,
    convert_to_hf,
    from_hf,
    is_hf_checkpoint,
    load_hf,
    save_moekit_checkpoint,
    to_hf,
)
from moekit.interop.hf.config_export import hf_config_from_lm, infer_family
from moekit.interop.hf.config_map import lm_config_from_hf
from moekit.interop.hf.families import FAMILIES

__all__ = [
    "FAMILIES",
    "convert_from_hf",
    "convert_to_hf",
    "from_hf",
    "hf_config_from_lm",
    "infer_family",
    "is_hf_checkpoint",
    "lm_config_from_hf",
    "load_hf",
    "save_moekit_checkpoint",
    "to_hf",
]
