"""moekit: Mixture-of-Experts models on PyTorch, from first layer to served model."""

from __future__ import annotations

__version__ = "0.1.0"


def load(path, device="cpu"):
    """The model of a moekit checkpoint or run folder, in eval mode.

    Its forward on ``input_ids`` [batch, seq] returns an object whose ``.logits`` is
    [batch, seq, vocab]. Use :func:`moekit.train.load_model` to get the tokenizer too.
    """
    from moekit.train.checkpoint import load_model

    return load_model(path, device)[0]
