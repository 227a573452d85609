"""moekit.inference: generation with a KV cache, the loss of a model on a text file, and the command-line options
that load a model for them (:mod:`.model_options`)."""

from moekit.inference.evaluate import evaluate_file
from moekit.inference.generate import ContextOverflow, GenerationConfig, generate, stream_generate, stream_text

__all__ = ["ContextOverflow", "GenerationConfig", "evaluate_file", "generate", "stream_generate", "stream_text"]
