"""``moekit quantize``: a model's experts to int8 / int4 (weight-only), written as a moekit checkpoint folder
that :func:`moekit.load`, ``generate``, ``eval`` and ``analyze`` read (``config.json`` carries the spec).

A Hugging Face folder is quantised while it is read, one layer at a time (the float experts of one layer
exist at once: a checkpoint larger than memory can be quantised); a moekit checkpoint's experts are mapped
views of its file, quantised layer by layer. With calibration text, precision is routing-aware: in each
layer the most-routed experts keep 8 bits and the rest get 4 (:func:`~moekit.models.quantization.mixed_spec`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from moekit.analysis.load import expert_load
from moekit.checkpoint import CONFIG_FILE, load_model, model_tensors, write_model_folder
from moekit.data.tokenizers import TOKENIZER_FILE, HFTokenizer
from moekit.errors import CheckpointError, ConfigError, DataError
from moekit.interop.hf.api import from_hf, load_for_inference, read_hf_config
from moekit.interop.hf.config_map import lm_config_from_hf
from moekit.models.dtypes import as_dtype, cast_weights
from moekit.models.quantization import expert_bytes, mixed_spec, quantize_model, uniform_spec
from moekit.recipes.calibration import calibration_batches


def quantize(
    out: str | os.PathLike,
    checkpoint: str | os.PathLike | None = None,
    hf_dir: str | os.PathLike | None = None,
    bits: int = 8,
    group_size: int = 32,
    calibration_data: str | os.PathLike | None = None,
    fraction_8bit: float = 0.25,
    dtype: str | None = None,
    max_batches: int = 8,
    linear_bits: int | None = None,
) -> dict[str, Any]:
    """Quantise ``checkpoint`` (moekit) or ``hf_dir`` (Hugging Face) into ``out``; returns a report (spec, bytes).

    ``bits``/``group_size``: the uniform width (int4 groups of 32/64/128 columns). ``calibration_data``: a text
    file; then each layer keeps ``fraction_8bit`` of its experts (the most routed) at 8 bits, the rest at 4.
    ``dtype``: of the weights that stay float (default: the checkpoint's). ``linear_bits``: also quantise the
    attention projections and the output head (:func:`~moekit.models.quantization.quantized_linears`)."""
    if (checkpoint is None) == (hf_dir is None):
        raise ConfigError("give exactly one of a moekit checkpoint or a Hugging Face model folder")
    target = as_dtype(dtype)
    out = Path(out)
    if (out / CONFIG_FILE).exists():
        raise CheckpointError(f"{out} already holds a checkpoint; choose another --out")
    if calibration_data is not None:
        float_model, tokenizer = load_for_inference(checkpoint, hf_dir)
        block = min(128, float_model.config.max_position_embeddings)
        batches = calibration_batches(tokenizer, calibration_data, block, 8, max_batches, float_model.config.vocab_size)
        layers, load = expert_load(float_model, batches)
        spec = mixed_spec({i: load[row] for row, i in enumerate(layers)}, fraction_8bit, group_size, linear_bits)
        del float_model
    if hf_dir is not None:
        file = Path(hf_dir) / TOKENIZER_FILE
        if not file.is_file():
            raise DataError(f"{hf_dir} has no {TOKENIZER_FILE}; the quantised model needs the model's tokenizer")
        config = lm_config_from_hf(read_hf_config(hf_dir))
        spec = spec if calibration_data is not None else uniform_spec(config, bits, group_size, linear_bits)
        model, tokenizer = from_hf(hf_dir, dtype=dtype, quantization=spec), HFTokenizer(file)
    else:
        model, tokenizer = load_model(checkpoint)  # type: ignore[arg-type]
        spec = spec if calibration_data is not None else uniform_spec(model.config, bits, group_size, linear_bits)
        float_bytes = expert_bytes(model)
        quantize_model(model, spec)
    tensors = model_tensors(model)
    if target is not None:  # cast once quantised: the experts were quantised from the stored floats, not a cast copy
        tensors = cast_weights(tensors, target)
    write_model_folder(out, tensors, {"model": model.config.to_dict(), "quantization": spec}, tokenizer)
    report = {"checkpoint": str(out), "spec": spec, "expert_bytes": expert_bytes(model)}
    if checkpoint is not None:
        report["float_expert_bytes"] = float_bytes
    return report
