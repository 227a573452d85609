"""moekit.models: the MoE causal language model, its config and named presets."""

from moekit.models.config import LMConfig
from moekit.models.lm import LMOutput, MoELM
from moekit.models.presets import PRESETS, dense_equivalent, get_preset

__all__ = ["LMConfig", "LMOutput", "MoELM", "PRESETS", "dense_equivalent", "get_preset"]
