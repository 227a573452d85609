"""moekit: Mixture-of-Experts models on PyTorch, from first layer to served model."""

__version__ = "0.1.0"
