"""moekit.inference: generation with a KV cache."""

from moekit.inference.generate import ContextOverflow, GenerationConfig, generate, stream_generate

__all__ = ["ContextOverflow", "GenerationConfig", "generate", "stream_generate"]
