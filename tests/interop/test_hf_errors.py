"""Hostile or broken Hugging Face folders: clear errors naming the file, the tensor or the config field."""

from __future__ import annotations

import json
import os
import pickle
import struct

import pytest

import moekit
from moekit.errors import CheckpointError, ConfigError, UnsafeFileError
from moekit.interop.hf import lm_config_from_hf
from moekit.io.safe_io import INDEX_NAME, load_tensors, save_tensors
from tests.interop.hf_models import one_torch_thread, save_hf_model  # noqa: F401


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A valid qwen2_moe folder (single file) and a sharded mixtral one; tests copy what they break."""
    root = tmp_path_factory.mktemp("good")
    save_hf_model("qwen2_moe", root / "qwen2_moe")
    save_hf_model("mixtral", root / "sharded", max_shard_size="30KB")
    return root


def _copy(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _config(folder):
    return json.loads((folder / "config.json").read_text())


def _rewrite_config(folder, **changes):
    cfg = {**_config(folder), **changes}
    (folder / "config.json").write_text(json.dumps(cfg))


def test_a_missing_shard_is_named(good, tmp_path):
    folder = _copy(good / "sharded", tmp_path / "m")
    index = json.loads((folder / INDEX_NAME).read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    (folder / shard).unlink()
    with pytest.raises(CheckpointError, match=f"{shard}.*missing"):
        moekit.from_hf(folder)


def test_a_truncated_file_is_named_with_its_tensor(good, tmp_path):
    folder = _copy(good / "qwen2_moe", tmp_path / "m")
    file = folder / "model.safetensors"
    os.truncate(file, file.stat().st_size - 100)
    with pytest.raises(CheckpointError, match=r"model\.safetensors is truncated.*tensor '"):
        moekit.from_hf(folder)


def test_a_header_that_lies_about_sizes_is_refused(good, tmp_path):
    folder = _copy(good / "qwen2_moe", tmp_path / "m")
    file = folder / "model.safetensors"
    raw = file.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    name = "model.norm.weight"
    header[name]["shape"] = [header[name]["shape"][0] * 4]  # claims 4x the bytes its offsets span
    blob = json.dumps(header).encode()
    file.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n :])
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: tensor '{name}'.*needs .* bytes"):
        moekit.from_hf(folder)


class _Boom:
    def __reduce__(self):
        return (open, ("/tmp/moekit-pwned-by-pickle", "w"))


def test_a_pickle_checkpoint_is_refused_and_never_unpickled(good, tmp_path):
    folder = _copy(good / "qwen2_moe", tmp_path / "m")
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"weight": _Boom()}))
    marker = "/tmp/moekit-pwned-by-pickle"
    if os.path.exists(marker):
        os.unlink(marker)
    with pytest.raises(UnsafeFileError) as err:
        moekit.from_hf(folder)
    message = str(err.value)
    assert "pytorch_model.bin" in message and "arbitrary code" in message and "safetensors" in message
    assert "save_pretrained" in message  # says how to convert it
    assert not os.path.exists(marker)


def test_unknown_model_type_suggests_the_closest(good, tmp_path):
    folder = _copy(good / "qwen2_moe", tmp_path / "m")
    _rewrite_config(folder, model_type="qwen2moe")
    with pytest.raises(ConfigError, match=r"model_type='qwen2moe'.*did you mean 'qwen2_moe'"):
        moekit.from_hf(folder)
    with pytest.raises(ConfigError, match="gpt2"):
        lm_config_from_hf({**_config(folder), "model_type": "gpt2"})


@pytest.mark.parametrize(
    "family, changes, field",
    [
        ("deepseek_v3", dict(rope_scaling={"type": "yarn", "factor": 40.0, "mscale_all_dim": 1.0}), "rope_scaling"),
        ("llama", dict(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}), "rope_parameters"),
        ("mixtral", dict(hidden_act="gelu"), "hidden_act"),
        ("olmoe", dict(clip_qkv=8.0), "clip_qkv"),
        ("qwen2", dict(use_sliding_window=True, max_window_layers=1), "use_sliding_window"),
        ("qwen3_moe", dict(quantization_config={"quant_method": "fp8"}), "quantization_config"),
        ("deepseek_v3", dict(moe_layer_freq=2), "moe_layer_freq"),
        ("deepseek_v3", dict(scoring_func="softmax"), "scoring_func"),
        ("llama", dict(mlp_bias=True), "mlp_bias"),
        ("llama", dict(partial_rotary_factor=0.5), "partial_rotary_factor"),
    ],
)
def test_unsupported_options_are_named_with_their_value(tmp_path, family, changes, field):
    from tests.interop.hf_models import hf_config

    raw = {**hf_config(family).to_dict(), **changes}
    if field == "use_sliding_window":
        raw.pop("layer_types")  # as a config written before transformers 5 (the pattern is then derived)
    with pytest.raises(ConfigError, match=rf"{field}=.*not supported"):
        lm_config_from_hf(raw, where="m/config.json")


def test_mismatched_shapes_name_the_file_and_the_tensor(good, tmp_path):
    folder = _copy(good / "qwen2_moe", tmp_path / "m")
    _rewrite_config(folder, moe_intermediate_size=20)
    with pytest.raises(
        CheckpointError,
        match=r"model\.safetensors: tensor 'model\.layers\.0\.mlp\.gate\.weight'|"
        r"model\.safetensors: tensor 'model\.layers\.0\.mlp\.experts\.0\.gate_proj\.weight' has shape",
    ):
        moekit.from_hf(folder)


def test_missing_and_unexpected_tensors_are_named(good, tmp_path):
    folder = _copy(good / "qwen2_moe", tmp_path / "m")
    tensors = load_tensors(folder / "model.safetensors")
    del tensors["model.layers.2.mlp.shared_expert_gate.weight"]
    save_tensors(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"'model\.layers\.2\.mlp\.shared_expert_gate\.weight' is missing"):
        moekit.from_hf(folder)
    tensors = load_tensors(good / "qwen2_moe" / "model.safetensors")
    tensors["model.layers.0.mlp.experts.6.up_proj.weight"] = tensors[
        "model.layers.0.mlp.experts.5.up_proj.weight"
    ].clone()
    save_tensors(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"no place for: 'model\.layers\.0\.mlp\.experts\.6\.up_proj\.weight'"):
        moekit.from_hf(folder)


def test_folders_without_config_or_weights(tmp_path, good):
    with pytest.raises(CheckpointError, match="no config.json"):
        moekit.from_hf(tmp_path)
    folder = _copy(good / "qwen2_moe", tmp_path / "m")
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="holds no weights"):
        moekit.from_hf(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        moekit.from_hf(folder)


def test_the_command_line_reports_errors_without_a_traceback(good, tmp_path, capsys):
    from moekit.cli import main

    folder = _copy(good / "qwen2_moe", tmp_path / "m")
    _rewrite_config(folder, model_type="mixtrl")
    assert main(["convert", "--from-hf", str(folder), "--out", str(tmp_path / "out")]) == 2
    assert "did you mean 'mixtral'" in capsys.readouterr().err
