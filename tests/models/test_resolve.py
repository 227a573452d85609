"""One spelling of the MoE knobs (``model.moe.X``) for every model, and old saved spellings still load."""

import json
import shutil
from pathlib import Path

import pytest

from moekit.checkpoint import load_model
from moekit.cli import main
from moekit.data.labelled import BUILTIN_SENTIMENT, read_labelled
from moekit.errors import CheckpointError, ConfigError
from moekit.models.encoder import EncoderConfig
from moekit.models.seq2seq import Seq2SeqConfig
from moekit.nn.moe import MoE
from moekit.tasks.classify import ClassifyConfig, build_model
from moekit.tasks.translate import TranslateConfig

OLD_LM = Path(__file__).parents[1] / "fixtures" / "old-runs" / "lm-run" / "checkpoints" / "step-000004"


def test_old_config_json_with_moe_hidden_size_loads(tmp_path):
    saved = json.loads((OLD_LM / "config.json").read_text())
    assert saved["model"]["moe"]["hidden_size"] == saved["model"]["hidden_size"] == 16  # the old spelling
    model, _ = load_model(OLD_LM)
    assert "hidden_size" not in model.config.moe.to_dict()
    assert all(moe.hidden_size == 16 for _, moe in model.moe_layers())


def test_old_config_json_with_a_different_moe_hidden_size_is_a_clear_error(tmp_path):
    bad = shutil.copytree(OLD_LM, tmp_path / "bad")
    saved = json.loads((bad / "config.json").read_text())
    saved["model"]["moe"]["hidden_size"] = 24
    (bad / "config.json").write_text(json.dumps(saved))
    with pytest.raises((ConfigError, CheckpointError), match="moe.hidden_size=24 differs .* hidden_size=16"):
        load_model(bad)


def test_moe_layer_is_built_with_the_parents_hidden_size():
    layer = MoE(hidden_size=24, num_experts=4, top_k=2, expert_hidden_size=8)
    assert layer.router.weight.shape == (4, 24) and MoE(layer.config, hidden_size=12).router.weight.shape == (4, 12)


def test_task_moe_knobs_are_nested_and_keep_equal_active_experts():
    cfg = ClassifyConfig.from_options({"model.moe.num_experts": 4, "model.moe.top_k": 2, "model.hidden_size": 32})
    model, _, _ = build_model(cfg, read_labelled(BUILTIN_SENTIMENT), ["0", "1"])
    assert model.config.moe.num_experts == 4 and model.config.moe.expert_hidden_size == 256 // 2
    layers = [block.mlp for block in model.layers if isinstance(block.mlp, MoE)]
    assert layers and all(m.config.num_experts == 4 and m.hidden_size == 32 for m in layers)
    fixed = EncoderConfig(num_labels=2, vocab_size=10, moe={"top_k": 2, "expert_hidden_size": 16})
    assert fixed.moe.expert_hidden_size == 16
    translate = TranslateConfig.from_options({"model.moe.num_experts": 4})
    assert Seq2SeqConfig.from_dict({"vocab_size": 30, **translate.model_overrides}).moe.num_experts == 4


@pytest.mark.parametrize("config_class", [ClassifyConfig, TranslateConfig])
def test_the_old_flat_spelling_suggests_model_moe(config_class):
    with pytest.raises(ConfigError, match=r"use model\.moe\.num_experts"):
        config_class.from_options({"model.num_experts": 4})
    with pytest.raises(ConfigError, match=r"MoEConfig .*'num_expert'; did you mean 'num_experts'"):
        config_class.from_options({"model.moe.num_expert": 4})


def test_the_old_flat_spelling_on_the_command_line(tmp_path, capsys):
    for task in ("classify", "translate"):
        assert main(["train", "--task", task, "--model.num_experts", "4", "--out", str(tmp_path / task)]) == 2
        assert "model.moe.num_experts" in capsys.readouterr().err


def test_old_flat_task_model_configs_load_as_nested():
    flat = {"vocab_size": 30, "num_experts": 4, "top_k": 2, "router": "softmax_topk", "aux_loss_coef": 0.0}
    old = Seq2SeqConfig.from_dict(flat)
    assert old == Seq2SeqConfig(vocab_size=30, moe={"num_experts": 4, "top_k": 2, "aux_loss_coef": 0.0})
    assert Seq2SeqConfig.from_dict(old.to_dict()) == old
    enc = EncoderConfig.from_dict({"num_labels": 2, "image_size": 8, "patch_size": 4, "num_experts": 2})
    assert enc.moe.num_experts == 2 and enc.moe.top_k == 1 and enc.moe.expert_hidden_size == 256


def test_encoder_refuses_a_gating_residual_it_cannot_wire():
    with pytest.raises(ConfigError, match="gating_residual .*only the language model"):
        EncoderConfig(
            num_labels=2, vocab_size=10, moe={"expert_hidden_size": 16, "zero_experts": 1, "gating_residual": True}
        )
