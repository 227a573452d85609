"""safe_io: round trips, atomicity, and hostile files refused before anything is trusted."""

from __future__ import annotations

import json
import os
import pickle
import struct
from pathlib import Path

import pytest
import torch

from moekit.errors import CheckpointError, ConfigError, UnsafeFileError
from moekit.io import atomic
from moekit.io.safe_io import (
    INDEX_NAME,
    atomic_write_json,
    atomic_write_text,
    load_sharded,
    load_tensors,
    load_weights,
    read_safetensors_header,
    save_sharded,
    save_tensors,
)


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "embed.weight": torch.randn(10, 4, generator=g),
        "layers.0.bias": torch.randn(4, generator=g).to(torch.bfloat16),
        "router.bias": torch.zeros(3, dtype=torch.float64),
        "counts": torch.arange(5, dtype=torch.int64),
        "flags": torch.tensor([True, False]),
        "empty": torch.zeros(0, 3),
    }


def _raw_file(path: Path, header: dict, data: bytes, header_len: int | None = None) -> Path:
    """Write a safetensors-shaped file by hand, so tests can make it lie."""
    raw = json.dumps(header).encode()
    n = len(raw) if header_len is None else header_len
    path.write_bytes(struct.pack("<Q", n) + raw + data)
    return path


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------------------------------------ round trips


def test_round_trip_with_metadata(tmp_path):
    t = _tensors()
    path = tmp_path / "m.safetensors"
    save_tensors(t, path, metadata={"format": "pt", "step": "7"})
    _assert_same(t, load_tensors(path))
    header, meta = read_safetensors_header(path)
    assert meta == {"format": "pt", "step": "7"}
    assert header["embed.weight"]["dtype"] == "F32" and header["embed.weight"]["shape"] == [10, 4]
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temporary file left behind


def test_non_contiguous_tensor_is_packed(tmp_path):
    t = {"w": torch.arange(12.0).reshape(3, 4).t()}
    save_tensors(t, tmp_path / "w.safetensors")
    assert torch.equal(load_tensors(tmp_path / "w.safetensors")["w"], t["w"])


def test_shared_memory_is_named(tmp_path):
    w = torch.randn(4, 4)
    with pytest.raises(CheckpointError, match="'a' and 'b' share memory"):
        save_tensors({"a": w, "b": w}, tmp_path / "x.safetensors")


def test_bad_arguments(tmp_path):
    with pytest.raises(ConfigError, match="not a torch.Tensor"):
        save_tensors({"a": [1, 2]}, tmp_path / "x.safetensors")
    with pytest.raises(ConfigError, match="metadata"):
        save_tensors({"a": torch.ones(1)}, tmp_path / "x.safetensors", metadata={"step": 3})


def test_sharded_round_trip_and_index(tmp_path):
    t = {f"layer{i}.w": torch.full((64,), float(i)) for i in range(5)}  # 256 bytes each
    paths = save_sharded(t, tmp_path, max_shard_bytes=600, metadata={"format": "pt"})
    assert [p.name for p in paths] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    assert index["metadata"]["total_size"] == 5 * 256
    assert index["weight_map"]["layer4.w"] == "model-00003-of-00003.safetensors"
    _assert_same(t, load_sharded(tmp_path))
    _assert_same(t, load_weights(tmp_path))
    _assert_same(t, load_sharded(tmp_path / INDEX_NAME))
    # Saving again with fewer shards removes the stale ones.
    save_sharded(t, tmp_path, max_shard_bytes=10_000)
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == ["model-00001-of-00001.safetensors"]
    _assert_same(t, load_weights(tmp_path))


def test_missing_shard_names_shard_and_tensor(tmp_path):
    t = {"a": torch.ones(64), "b": torch.ones(64)}
    save_sharded(t, tmp_path, max_shard_bytes=256)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"shard 'model-00002-of-00002.safetensors' is missing.*'b'"):
        load_sharded(tmp_path)


def test_index_cannot_point_outside_its_folder(tmp_path):
    save_tensors({"a": torch.ones(2)}, tmp_path / "secret.safetensors")
    sub = tmp_path / "ckpt"
    sub.mkdir()
    (sub / INDEX_NAME).write_text(json.dumps({"weight_map": {"a": "../secret.safetensors"}}))
    with pytest.raises(UnsafeFileError, match="not a plain file name"):
        load_sharded(sub)


def test_load_weights_folder_without_weights(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(CheckpointError, match="notes.txt"):
        load_weights(tmp_path)


# ---------------------------------------------------------------------------------------------------- pickles


class _Marker:
    """Unpickling this creates a file: proof that something ran code while loading."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


@pytest.mark.parametrize("name", ["model.bin", "model.pt", "weights.safetensors"])
def test_pickle_refused_and_never_unpickled(tmp_path, name):
    marker = tmp_path / "PWNED"
    path = tmp_path / name
    path.write_bytes(pickle.dumps({"w": _Marker(str(marker))}, protocol=4))
    with pytest.raises(UnsafeFileError, match="pickle") as e:
        load_tensors(path)
    assert "save_pretrained" in str(e.value) and str(path) in str(e.value)
    assert not marker.exists()


def test_torch_save_zip_refused(tmp_path):
    marker = tmp_path / "PWNED"
    path = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.ones(2), "evil": _Marker(str(marker))}, path)
    with pytest.raises(UnsafeFileError, match="zip archive"):
        load_tensors(path)
    renamed = path.rename(tmp_path / "model.safetensors")  # content is checked, not just the name
    with pytest.raises(UnsafeFileError, match="zip archive"):
        load_weights(tmp_path)
    assert renamed.exists() and not marker.exists()


def test_pickle_suffix_refused_even_when_content_unknown(tmp_path):
    path = tmp_path / "model.pth"
    path.write_bytes(b"\x00" * 64)
    with pytest.raises(UnsafeFileError, match="'.pth'"):
        load_tensors(path)


# ------------------------------------------------------------------------------------------------- hostile files


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_tensors(tmp_path / "nope.safetensors")


def test_truncated_file_names_first_tensor_past_end(tmp_path):
    path = tmp_path / "m.safetensors"
    save_tensors({"a": torch.ones(16), "b": torch.ones(16), "c": torch.ones(16)}, path)
    data = path.read_bytes()
    path.write_bytes(data[:-70])  # cuts all of c (64 bytes) and the end of b
    with pytest.raises(CheckpointError, match=r"truncated.*tensor 'b'") as e:
        load_tensors(path)
    assert str(path) in str(e.value)


def test_tiny_file(tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"\x01\x02")
    with pytest.raises(CheckpointError, match="only 2 bytes"):
        load_tensors(path)


def test_header_lies_about_size(tmp_path):
    header = {"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 16]}}  # 4x4 F32 needs 64
    path = _raw_file(tmp_path / "m.safetensors", header, b"\x00" * 16)
    with pytest.raises(CheckpointError, match=r"'w'.*needs 64 bytes but data_offsets span 16"):
        load_tensors(path)


def test_overlapping_offsets(tmp_path):
    header = {
        "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
        "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]},
    }
    path = _raw_file(tmp_path / "m.safetensors", header, b"\x00" * 24)
    with pytest.raises(CheckpointError, match="'b' overlaps tensor 'a'"):
        load_tensors(path)


def test_gap_and_trailing_bytes(tmp_path):
    header = {"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}
    with pytest.raises(CheckpointError, match="unexplained bytes before tensor 'a'"):
        load_tensors(_raw_file(tmp_path / "gap.safetensors", header, b"\x00" * 8))
    header = {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
    with pytest.raises(CheckpointError, match="4 unexplained bytes after"):
        load_tensors(_raw_file(tmp_path / "tail.safetensors", header, b"\x00" * 8))


def test_huge_header_length(tmp_path):
    path = _raw_file(tmp_path / "m.safetensors", {}, b"", header_len=2**62)
    with pytest.raises(CheckpointError, match="header length 4611686018427387904 is impossible"):
        load_tensors(path)


def test_non_json_header(tmp_path):
    path = tmp_path / "m.safetensors"
    raw = b"this is not json!"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_tensors(path)


def test_duplicate_keys_unknown_dtype_bad_shape(tmp_path):
    path = tmp_path / "dup.safetensors"
    raw = b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a": {}}'
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\x00" * 4)
    with pytest.raises(CheckpointError, match="duplicate key 'a'"):
        load_tensors(path)
    header = {"a": {"dtype": "PY_OBJECT", "shape": [1], "data_offsets": [0, 4]}}
    with pytest.raises(CheckpointError, match="'a'.*unknown or unsupported dtype 'PY_OBJECT'"):
        load_tensors(_raw_file(tmp_path / "dt.safetensors", header, b"\x00" * 4))
    header = {"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}
    with pytest.raises(CheckpointError, match="shape"):
        load_tensors(_raw_file(tmp_path / "sh.safetensors", header, b"\x00" * 4))


# ------------------------------------------------------------------------------------------------- atomicity


def test_kill_before_rename_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    old = {"w": torch.ones(8)}
    save_tensors(old, path)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("simulated kill between write and rename")

    monkeypatch.setattr(atomic.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        save_tensors({"w": torch.zeros(8), "extra": torch.ones(3)}, path)
    monkeypatch.undo()
    _assert_same(old, load_tensors(path))
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # temporary file cleaned up


def test_kill_mid_write_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    save_tensors({"w": torch.ones(8)}, path)
    import safetensors.torch as st

    def half_written(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\x10\x00\x00\x00")  # a partial file, then the process "dies"
        raise SystemExit(1)

    monkeypatch.setattr(st, "save_file", half_written)
    with pytest.raises(SystemExit):
        save_tensors({"w": torch.zeros(8)}, path)
    monkeypatch.undo()
    assert torch.equal(load_tensors(path)["w"], torch.ones(8))
    assert len(list(tmp_path.iterdir())) == 1


def test_leftover_partial_temp_file_is_harmless(tmp_path):
    # A temporary file left by a process killed with SIGKILL (no cleanup ran) never shadows the real one.
    path = tmp_path / "m.safetensors"
    save_tensors({"w": torch.ones(2)}, path)
    (tmp_path / ".m.safetensors.abc123.tmp").write_bytes(b"\x00\x01")
    assert torch.equal(load_weights(path)["w"], torch.ones(2))
    save_tensors({"w": torch.zeros(2)}, path)
    assert torch.equal(load_tensors(path)["w"], torch.zeros(2))


def test_atomic_text_and_json(tmp_path, monkeypatch):
    p = tmp_path / "sub" / "config.json"
    atomic_write_json(p, {"b": 1, "a": "é"}, sort_keys=True)
    assert p.read_text(encoding="utf-8") == '{\n  "a": "é",\n  "b": 1\n}\n'
    monkeypatch.setattr(atomic.os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        atomic_write_text(p, "half")
    monkeypatch.undo()
    assert json.loads(p.read_text(encoding="utf-8")) == {"a": "é", "b": 1}
    assert os.listdir(p.parent) == ["config.json"]
