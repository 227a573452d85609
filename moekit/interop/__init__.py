"""moekit.interop: the safe weights I/O choke point (safetensors only) and adapters to other libraries."""

from moekit.interop.safe_io import (
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
