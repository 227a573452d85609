"""moekit.io: the bottom of the house. The one choke point for weights (safetensors only, headers checked
before any data is trusted) and atomic writes of files and folders. Imports nothing from moekit but errors."""

from moekit.io.safe_io import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    load_sharded,
    load_tensors,
    load_weights,
    read_safetensors_header,
    save_sharded,
    save_tensors,
)

__all__ = [
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "load_sharded",
    "load_tensors",
    "load_weights",
    "read_safetensors_header",
    "save_sharded",
    "save_tensors",
]
