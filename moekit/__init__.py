"""moekit: Mixture-of-Experts models on PyTorch, from first layer to served model."""

from __future__ import annotations

import os

# An OpenMP thread that finishes a parallel op spin-waits for the next one (libgomp: 300,000 spins). Beside
# another busy process the spinning holds the core that a descheduled sibling thread needs: training slowed
# 5-16x there. A short spin keeps the idle speed and a fair share when busy (benchmarks/results/contention.md).
# libgomp reads this once, when torch loads it, so it takes effect when moekit is imported before torch; a
# value the user set wins.
os.environ.setdefault("GOMP_SPINCOUNT", "3000")

__version__ = "0.1.0"


def load(path, device="cpu", expert_memory=None, dtype=None):
    """The model of a moekit checkpoint or run folder, in eval mode (``expert_memory="4GiB"``: at most that
    many bytes of expert weights resident, the rest read from the file when used; ``dtype="float32"``: cast the
    float weights, default as stored).

    Its forward on ``input_ids`` [batch, seq] returns an object whose ``.logits`` is
    [batch, seq, vocab]. Use :func:`moekit.train.load_model` to get the tokenizer too.
    """
    from moekit.checkpoint import load_model

    return load_model(path, device, expert_memory, dtype)[0]


def from_hf(path, device="cpu", dtype=None, expert_memory=None):
    """A moekit model from a Hugging Face model folder (see :func:`moekit.interop.hf.from_hf`).

    Its forward on ``input_ids`` returns an object whose ``.logits`` is [batch, seq, vocab].
    """
    from moekit.interop.hf import from_hf as _from_hf

    return _from_hf(path, device=device, dtype=dtype, expert_memory=expert_memory)


def to_hf(model, path, tokenizer=None, dtype=None, family=None):
    """Write ``model`` as a folder transformers loads (see :func:`moekit.interop.hf.to_hf`); returns the folder."""
    from moekit.interop.hf import to_hf as _to_hf

    return _to_hf(model, path, tokenizer=tokenizer, dtype=dtype, family=family)
