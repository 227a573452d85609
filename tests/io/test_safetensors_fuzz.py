"""Fuzzing the safetensors reader: random bytes, and mutations of a real file (its 8-byte length, its JSON header,
each tensor's dtype, shape and offsets, its data). Every input either loads exactly what the file's header
describes (what was written, when the file is untouched) or raises a moekit error; nothing else escapes."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from moekit.errors import CheckpointError
from moekit.io import load_sharded, load_tensors, read_safetensors_header, save_tensors
from moekit.io.safetensors_header import SAFETENSORS_DTYPES
from tests.fuzzing import fuzz, loaded_or_refused

WRITTEN = {
    "w": torch.arange(12, dtype=torch.float32).reshape(3, 4),
    "ids": torch.tensor([-1, 0, 2**40], dtype=torch.int64),
    "half": torch.tensor([[1.5, -2.0]], dtype=torch.bfloat16),
    "mask": torch.tensor([True, False, True]),
    "scalar": torch.tensor(7, dtype=torch.uint8),
    "empty": torch.zeros(0, 5, dtype=torch.float16),
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("safetensors_fuzz")


@pytest.fixture(scope="module")
def original(folder) -> bytes:
    path = folder / "original.safetensors"
    save_tensors(WRITTEN, path, metadata={"format": "pt"})
    return path.read_bytes()


def _split(blob: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def _join(header: dict, data: bytes, length_delta: int = 0) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw) + length_delta) + raw + data


def _bytes_of(t: torch.Tensor) -> bytes:
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def _load_or_refuse(path: Path, blob: bytes) -> dict[str, torch.Tensor] | None:
    """Write ``blob`` to ``path`` and load it: a moekit error gives None; a load must match the file's header."""
    path.write_bytes(blob)
    loaded = loaded_or_refused(lambda: load_tensors(path))
    if loaded is None:
        return None
    header, _ = read_safetensors_header(path)
    (n,) = struct.unpack("<Q", blob[:8])
    data = blob[8 + n :]
    assert set(loaded) == set(header)
    for name, entry in header.items():
        t = loaded[name]
        assert list(t.shape) == entry["shape"], name
        assert t.element_size() == SAFETENSORS_DTYPES[entry["dtype"]], name
        begin, end = entry["data_offsets"]
        assert _bytes_of(t) == data[begin:end], name
    return loaded


def test_the_untouched_file_loads_what_was_written(folder, original):
    loaded = _load_or_refuse(folder / "untouched.safetensors", original)
    assert loaded is not None and set(loaded) == set(WRITTEN)
    for name, t in WRITTEN.items():
        assert loaded[name].dtype == t.dtype and torch.equal(loaded[name], t), name


@fuzz(150)
@given(blob=st.binary(max_size=300))
def test_random_bytes_are_refused_or_loaded(folder, blob):
    _load_or_refuse(folder / "random.safetensors", blob)


@fuzz(150)
@given(body=st.binary(max_size=200), delta=st.integers(-3, 3))
def test_random_bytes_behind_a_plausible_length_are_refused_or_loaded(folder, body, delta):
    _load_or_refuse(folder / "plausible.safetensors", struct.pack("<Q", max(0, len(body) + delta)) + body)


_BYTE_EDITS = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10_000), st.integers(1, 255)),
    st.tuples(st.just("insert"), st.integers(0, 10_000), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("delete"), st.integers(0, 10_000), st.integers(1, 16)),
    st.tuples(st.just("truncate"), st.integers(0, 10_000), st.just(0)),
    st.tuples(st.just("length"), st.integers(0, 2**64 - 1), st.just(0)),
)


def _edit_bytes(blob: bytes, edit: tuple) -> bytes:
    kind, at, arg = edit
    at = at % (len(blob) + 1)
    if kind == "flip" and blob:
        at = min(at, len(blob) - 1)
        return blob[:at] + bytes([blob[at] ^ arg]) + blob[at + 1 :]
    if kind == "insert":
        return blob[:at] + arg + blob[at:]
    if kind == "delete":
        return blob[:at] + blob[at + arg :]
    if kind == "truncate":
        return blob[:at]
    if kind == "length":
        return struct.pack("<Q", edit[1]) + blob[8:]
    return blob


@fuzz(200)
@given(edits=st.lists(_BYTE_EDITS, min_size=1, max_size=4), region=st.sampled_from(["header", "data", "anywhere"]))
def test_byte_mutations_of_a_real_file_are_refused_or_loaded(folder, original, edits, region):
    (n,) = struct.unpack("<Q", original[:8])
    if region == "header":  # the length and the JSON header, where most of the checks are
        edits = [(kind, at % (8 + n), arg) for kind, at, arg in edits]
    elif region == "data":  # flipped data bytes must load as they are
        edits = [("flip", 8 + n + at % (len(original) - 8 - n), arg) for _, at, arg in edits if isinstance(arg, int)]
    blob = original
    for edit in edits:
        blob = _edit_bytes(blob, edit)
    _load_or_refuse(folder / "mutated.safetensors", blob)


_JSON_LEAF = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
)
_ANY_JSON = st.recursive(
    _JSON_LEAF,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=8,
)
_SHAPES = st.lists(st.one_of(st.integers(0, 6), st.integers(-(2**66), 2**66)), max_size=4)
_OFFSETS = st.lists(st.one_of(st.integers(0, 200), st.integers(-(2**66), 2**66)), min_size=0, max_size=3)
_FIELD_EDITS = st.one_of(
    st.tuples(st.just("dtype"), st.one_of(st.sampled_from(sorted(SAFETENSORS_DTYPES) + ["F4", "f32"]), _ANY_JSON)),
    st.tuples(st.just("shape"), st.one_of(_SHAPES, _ANY_JSON)),
    st.tuples(st.just("data_offsets"), st.one_of(_OFFSETS, _ANY_JSON)),
    st.tuples(st.just("drop"), st.sampled_from(["dtype", "shape", "data_offsets"])),
    st.tuples(st.just("extra"), _ANY_JSON),
    st.tuples(st.just("entry"), _ANY_JSON),
    st.tuples(st.just("__metadata__"), _ANY_JSON),
    st.tuples(st.just("overlap"), st.integers(0, 5)),
)


def _edit_header(header: dict, names: list[str], edit: tuple, which: int) -> None:
    kind, value = edit
    name = names[which % len(names)]
    entry = header[name]
    if kind in ("dtype", "shape", "data_offsets", "drop", "extra") and not isinstance(entry, dict):
        return  # an earlier edit replaced the whole entry
    if kind in ("dtype", "shape", "data_offsets"):
        entry[kind] = value
    elif kind == "drop":
        entry.pop(value, None)
    elif kind == "extra":
        entry["extra"] = value
    elif kind == "entry":
        header[name] = value
    elif kind == "__metadata__":
        header["__metadata__"] = value
    elif kind == "overlap":  # point this tensor's span into another tensor's
        other = header[names[value % len(names)]]
        if isinstance(other, dict) and isinstance(entry, dict):
            entry["data_offsets"] = other.get("data_offsets")


@fuzz(200)
@given(
    edits=st.lists(st.tuples(_FIELD_EDITS, st.integers(0, 5)), min_size=1, max_size=3),
    length_delta=st.sampled_from([0, 0, 0, -1, 1, -8]),
    data_edit=st.sampled_from(["keep", "drop_last", "extra_byte", "empty"]),
)
def test_header_field_mutations_are_refused_or_loaded(folder, original, edits, length_delta, data_edit):
    header, data = _split(original)
    names = sorted(k for k in header if k != "__metadata__")
    for edit, which in edits:
        _edit_header(header, names, edit, which)
    data = {"keep": data, "drop_last": data[:-1], "extra_byte": data + b"\0", "empty": b""}[data_edit]
    _load_or_refuse(folder / "fields.safetensors", _join(header, data, length_delta))


@st.composite
def _headers(draw) -> tuple[dict, bytes]:
    """A header built from scratch: consistent offsets (mostly), any dtype, and data of about the right size."""
    header: dict = {}
    cursor = 0
    for name in draw(st.lists(st.text(min_size=1, max_size=5), max_size=4, unique=True)):
        dtype = draw(st.sampled_from(sorted(SAFETENSORS_DTYPES)))
        shape = draw(st.lists(st.integers(0, 3), max_size=3))
        size = SAFETENSORS_DTYPES[dtype]
        for d in shape:
            size *= d
        size += draw(st.sampled_from([0, 0, 0, -1, 1]))
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [cursor, cursor + size]}
        cursor += size
    data = draw(st.binary(min_size=max(0, cursor - 1), max_size=max(0, cursor + 1)))
    return header, data


@fuzz(150)
@given(built=_headers())
def test_headers_built_from_scratch_are_refused_or_loaded(folder, built):
    header, data = built
    _load_or_refuse(folder / "built.safetensors", _join(header, data))


@fuzz(60)
@given(index=_ANY_JSON, shard_blob=st.binary(max_size=64))
def test_a_random_shard_index_is_refused_or_loaded(folder, original, index, shard_blob):
    sharded = folder / "sharded"
    sharded.mkdir(exist_ok=True)
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    (sharded / "model-00001-of-00001.safetensors").write_bytes(shard_blob or original)
    loaded = loaded_or_refused(lambda: load_sharded(sharded))
    if loaded is None:
        return
    assert isinstance(index, dict) and set(loaded) == set(index["weight_map"])


# -- regressions the fuzzing found ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [["F32"], {"F32": 1}])
def test_a_dtype_that_is_not_a_string_is_refused(folder, original, dtype):
    header, data = _split(original)
    header["w"]["dtype"] = dtype
    path = folder / "dtype.safetensors"
    path.write_bytes(_join(header, data))
    with pytest.raises(CheckpointError, match=r"tensor 'w': unknown or unsupported dtype"):
        load_tensors(path)


@pytest.mark.parametrize("raw", [b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 100_000 + b"1" + b"}" * 100_000])
def test_a_deeply_nested_header_is_refused(folder, raw):
    path = folder / "deep.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    with pytest.raises(CheckpointError, match="nested too deeply"):
        read_safetensors_header(path)


@pytest.mark.parametrize("metadata", [[], "", 0, False])
def test_metadata_that_is_empty_but_not_a_mapping_is_refused(folder, metadata):
    path = folder / "metadata.safetensors"
    path.write_bytes(_join({"__metadata__": metadata}, b""))
    with pytest.raises(CheckpointError, match=r"__metadata__ must map str -> str"):
        read_safetensors_header(path)


def test_null_metadata_still_reads_as_no_metadata(folder):
    path = folder / "null_metadata.safetensors"
    path.write_bytes(_join({"__metadata__": None}, b""))
    assert read_safetensors_header(path) == ({}, {})
