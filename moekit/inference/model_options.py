"""The command-line options of every command that runs a model (where it comes from, its dtype, expert offload),
and loading the model they name."""

from __future__ import annotations

import argparse

from moekit.interop.hf.api import load_for_inference
from moekit.models.dtypes import DTYPE_HELP
from moekit.nn.offload import EXPERT_MEMORY_HELP


def add_dtype_option(p: argparse.ArgumentParser) -> None:
    """``--dtype NAME`` (checked where the model is loaded: a bad name is a one-line error)."""
    p.add_argument("--dtype", metavar="DTYPE", help=DTYPE_HELP)


def add_model_options(p: argparse.ArgumentParser) -> None:
    """``--checkpoint RUN | --model HF_DIR|FILE.gguf`` (one required), ``--dtype`` and ``--expert-memory``."""
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="checkpoint or run folder")
    source.add_argument("--model", metavar="HF_DIR", help="Hugging Face model folder or .gguf file (not --checkpoint)")
    add_dtype_option(p)
    p.add_argument("--expert-memory", metavar="SIZE", help=EXPERT_MEMORY_HELP)


def load_model_of(args: argparse.Namespace):
    """(model, tokenizer) as :func:`add_model_options`' options say."""
    return load_for_inference(args.checkpoint, args.model, args.expert_memory, args.dtype)
