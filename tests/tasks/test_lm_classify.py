"""Classification by fine-tuning a pretrained language model (moekit or Hugging Face) with a head."""

import pytest
import torch

from moekit.checkpoint import load_model, resolve_checkpoint
from moekit.cli import main
from moekit.errors import ConfigError
from moekit.models.lm_classifier import LMClassifier
from moekit.tasks.classify import load_classifier, predict, train_classifier
from moekit.train import train
from tests.interop.hf_models import WORDS, save_hf_model, write_tokenizer

FAST = dict(threads=1, progress=False, batch_size=16, eval_interval=20, warmup_steps=5, lr=3e-3)


def _toy_text(path, words, n=96):
    """Label = whether the sentence holds the first or the second half of ``words``."""
    rows = ["text\tlabel"]
    half = len(words) // 2
    for i in range(n):
        pos = i % 2 == 0
        pool = words[:half] if pos else words[half:]
        sentence = " ".join(pool[(i * 7 + j) % len(pool)] for j in range(4))
        rows.append(f"{sentence}\t{'pos' if pos else 'neg'}")
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture(scope="module")
def moekit_lm(tmp_path_factory):
    out = tmp_path_factory.mktemp("lm") / "run"
    train(model="tiny", max_steps=3, out_dir=str(out), progress=False, tensorboard=False, batch_size=4, block_size=16)
    return out


def test_fine_tuning_a_moekit_lm_learns_and_round_trips(moekit_lm, tmp_path):
    data = _toy_text(tmp_path / "train.tsv", ["good", "great", "fine", "nice", "bad", "awful", "poor", "sad"])
    run = str(tmp_path / "c")
    result = train_classifier(init_from=str(moekit_lm), data=str(data), max_steps=60, out_dir=run, **FAST)
    assert result.accuracy >= 0.9  # the split-off tenth of this separable toy set
    losses = [r["train_loss"] for r in result.history]
    assert losses[-1] < losses[0]

    model, tokenizer_vocab, names, task = load_classifier(tmp_path / "c")
    assert isinstance(model, LMClassifier) and task == "classify" and sorted(names) == ["neg", "pos"]
    pretrained, _ = load_model(resolve_checkpoint(moekit_lm))
    name = "layers.0.self_attn.q_proj.weight"
    assert not torch.equal(model.lm.state_dict()[name], pretrained.state_dict()[name])  # the LM was fine-tuned
    rows, predictions, acc = predict(tmp_path / "c", data)
    assert acc is not None and acc >= 0.9 and len(predictions) == len(rows.texts)
    assert result.active_parameters < result.parameters  # the tiny preset is an MoE


def test_fine_tuning_a_hugging_face_moe_with_the_cli(tmp_path, capsys):
    hf_dir = save_hf_model("qwen2_moe", tmp_path / "hf")
    write_tokenizer(hf_dir)
    data = _toy_text(tmp_path / "train.tsv", WORDS)
    run = tmp_path / "c"
    argv = ["train", "--task", "classify", "--init-from", str(hf_dir), "--data", str(data), "--out", str(run)]
    argv += ["--max-steps", "40", "--batch-size", "16", "--threads", "1", "--progress", "false", "--lr", "3e-3"]
    assert main(argv) == 0
    assert "valid accuracy" in capsys.readouterr().out
    assert main(["predict", "--checkpoint", str(run), "--data", str(data)]) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out
    model, _, _, _ = load_classifier(run)
    ids = torch.tensor([[4, 5, 6, 7]])
    assert model(ids).logits.shape == (1, 2)


def test_init_from_is_refused_for_images_and_with_encoder_options(moekit_lm):
    with pytest.raises(ConfigError, match="task=classify"):
        train_classifier(task="image-classify", init_from=str(moekit_lm), max_steps=1, progress=False)
    with pytest.raises(ConfigError, match="--model"):
        train_classifier(init_from=str(moekit_lm), max_steps=1, progress=False, **{"model.moe.num_experts": 4})
