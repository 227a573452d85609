"""Text and image classification end to end: the CLI trains, predicts and reports routing by label."""

import io
import os
import shutil

import pytest
import torch

from moekit.cli import main
from moekit.errors import CheckpointError, ConfigError
from moekit.models.encoder import EncoderClassifier, EncoderConfig
from moekit.tasks.classify import encode, load_classifier, predict, train_classifier

TINY = {
    "model.hidden_size": 32,
    "model.num_hidden_layers": 2,
    "model.num_attention_heads": 2,
    "model.intermediate_size": 64,
    "model.moe.num_experts": 4,
    "threads": 1,
    "progress": False,
}


def _toy_text(path, n=120):
    words = {"good": "pos", "great": "pos", "bad": "neg", "awful": "neg"}
    rows = ["text\tlabel"]
    for i in range(n):
        word = list(words)[i % 4]
        rows.append(f"the {['film', 'plot', 'cast'][i % 3]} was {word}\t{words[word]}")
    path.write_text("\n".join(rows) + "\n")
    return path


def _tiny_encoder(**fields) -> EncoderClassifier:
    torch.manual_seed(0)
    config = EncoderConfig(
        num_labels=3,
        vocab_size=20,
        hidden_size=32,
        num_attention_heads=2,
        intermediate_size=64,
        moe={"num_experts": 4},
        **fields,
    )
    return EncoderClassifier(config)


@pytest.mark.parametrize("pooling", ["mean", "max"])
def test_encoder_is_bidirectional_and_ignores_padding(pooling):
    model = _tiny_encoder(dropout=0.0, pooling=pooling).eval()
    ids = torch.tensor([[3, 4, 5, 0, 0]])
    mask = torch.tensor([[True, True, True, False, False]])
    padded = model(ids, mask).logits
    assert torch.allclose(padded, model(ids[:, :3]).logits, atol=1e-5)
    changed = model(torch.tensor([[3, 4, 6]])).logits  # a later token changes the pooled output of earlier ones
    assert not torch.allclose(changed, padded, atol=1e-5)
    assert model.active_parameters() < model.num_parameters()


def test_token_dropout_acts_in_training_only():
    model = _tiny_encoder(dropout=0.0, token_dropout=0.5)
    ids = torch.tensor([[3, 4, 5, 6, 7, 8]])
    torch.manual_seed(1)
    first, second = model(ids).logits, model(ids).logits
    assert not torch.allclose(first, second)  # a different set of words dropped each time
    model.eval()
    assert torch.equal(model(ids).logits, model(ids).logits)
    assert torch.allclose(model(ids).logits, _tiny_encoder(dropout=0.0).eval()(ids).logits)  # same weights, no drop


def test_max_pooling_of_an_all_padding_row_is_finite():
    model = _tiny_encoder(pooling="max").eval()
    logits = model(torch.tensor([[3, 4], [0, 0]]), torch.tensor([[True, True], [False, False]])).logits
    assert torch.isfinite(logits).all()


def test_cli_trains_a_text_classifier_and_predicts(tmp_path, capsys):
    train = _toy_text(tmp_path / "train.tsv")
    dev = _toy_text(tmp_path / "dev.tsv", n=24)
    run = tmp_path / "run"
    argv = [
        "train",
        "--task",
        "classify",
        "--data",
        str(train),
        "--valid",
        str(dev),
        "--out",
        str(run),
        "--max-steps",
        "60",
        "--batch-size",
        "16",
        "--lr",
        "3e-3",
        "--warmup-steps",
        "5",
    ]
    for key, value in TINY.items():
        argv += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    assert main(argv) == 0
    assert (run / "model.safetensors").is_file()
    _, predictions, acc = predict(run, dev)
    assert acc >= 0.95 and set(predictions) <= {"pos", "neg"}
    out = tmp_path / "pred.tsv"
    assert main(["predict", "--checkpoint", str(run), "--data", str(dev), "--out", str(out)]) == 0
    assert out.read_text().splitlines()[1].split("\t")[1] in ("pos", "neg")
    assert "accuracy 1.0000" in capsys.readouterr().out or acc < 1


def test_unknown_validation_label_is_reported_with_file_and_line(tmp_path, capsys):
    train = _toy_text(tmp_path / "train.tsv", n=8)
    dev = tmp_path / "dev.tsv"
    dev.write_text("text\tlabel\nthe film was good\tpos\nthe film was meh\tneutral\n")
    code = main(
        [
            "train",
            "--task",
            "classify",
            "--data",
            str(train),
            "--valid",
            str(dev),
            "--out",
            str(tmp_path / "r"),
            "--max-steps",
            "1",
        ]
    )
    assert code == 2
    assert "dev.tsv:3: label 'neutral' is not one of the training labels" in capsys.readouterr().err


@pytest.mark.parametrize(
    "variant", [{"model.moe.router": "expert_choice"}, {"model.ffn": "soft"}, {"model.ffn": "dense"}]
)
def test_image_classifier_learns_builtin_digits(tmp_path, variant):
    result = train_classifier(
        task="image-classify",
        out_dir=str(tmp_path / "run"),
        max_steps=80,
        batch_size=64,
        lr=3e-3,
        warmup_steps=5,
        eval_interval=1000,
        **{**TINY, "model.patch_size": 2, **variant},
    )
    assert result.accuracy > 0.6  # 10 classes: chance is 0.1
    model, vocab, names, task = load_classifier(tmp_path / "run")
    assert vocab is None and task == "image-classify" and names == [str(i) for i in range(10)]


def test_routing_report_counts_every_token_by_label(tmp_path):
    from moekit.data.images import builtin_digits
    from moekit.tasks.classify import encode
    from moekit.tasks.routing import routing_by_label, write_routing_report

    train_classifier(
        task="image-classify", out_dir=str(tmp_path / "run"), max_steps=5, **{**TINY, "model.patch_size": 2}
    )
    model, _, names, _ = load_classifier(tmp_path / "run")
    examples = encode(model, None, builtin_digits("test"), names)
    counts = routing_by_label(model, examples, len(names))
    ((layer, table),) = counts.items()
    assert int(table.sum()) == len(examples) * model.config.num_patches  # top-1 routing: one expert per token
    report = write_routing_report(model, examples, names, tmp_path / "routing.md")
    assert "| 7 |" in report.read_text()


def test_demo_classify_runs_offline_on_builtin_sentences(tmp_path):
    from rich.console import Console

    from moekit.commands.demo import task_demo

    result = task_demo("classify", time_budget="4s", out=str(tmp_path / "demo"), console=Console(file=io.StringIO()))
    assert 0.0 <= result["accuracy"] <= 1.0 and "| 1 |" in result["routing"]
    assert (tmp_path / "demo" / "routing_by_label.md").is_file()


def _kill_after(run_dir, tmp_path, last_kept: str):
    """A copy of a finished run as it stood when killed while writing its final checkpoint."""
    killed = tmp_path / "killed"
    shutil.copytree(run_dir, killed)
    for ckpt in (killed / "checkpoints").glob("step-*"):
        if ckpt.name != last_kept:
            shutil.rmtree(ckpt)
    return killed


def test_a_killed_run_resumes_to_the_uninterrupted_result(tmp_path):
    """Dropout on, so the restored RNG matters too; the resumed weights equal the uninterrupted ones exactly."""
    train = _toy_text(tmp_path / "train.tsv")
    args = dict(TINY, data=str(train), max_steps=30, checkpoint_interval=10, eval_interval=10)
    full = train_classifier(out_dir=str(tmp_path / "full"), **args)
    killed = _kill_after(full.run_dir, tmp_path, "step-000020")
    resumed = train_classifier(out_dir=str(killed), resume=True, **args)
    assert resumed.step == 30 and resumed.accuracy == full.accuracy
    a, b = load_classifier(full.run_dir)[0].state_dict(), load_classifier(killed)[0].state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(CheckpointError, match="already holds a run; pass --resume to continue it, or choose another"):
        train_classifier(out_dir=str(killed), **args)


def test_resume_refuses_data_that_changed(tmp_path):
    train = _toy_text(tmp_path / "train.tsv")
    args = dict(TINY, data=str(train), max_steps=4)
    train_classifier(out_dir=str(tmp_path / "run"), **args)
    train.write_text(train.read_text().replace("awful", "dreadful"))
    with pytest.raises(CheckpointError, match=r"differs from the run .*\(in vocab\)"):
        train_classifier(out_dir=str(tmp_path / "run"), resume=True, **args)


def test_max_epochs_caps_the_steps_at_whole_passes(tmp_path):
    data = _toy_text(tmp_path / "train.tsv", n=120)  # 12 rows held out for validation: 108 train rows
    common = dict(data=str(data), max_steps=1000, batch_size=16, eval_interval=1000, **TINY)
    result = train_classifier(out_dir=str(tmp_path / "run"), max_epochs=2, **common)
    assert result.step == 2 * (108 // 16)
    with pytest.raises(ConfigError, match="max_epochs must be > 0"):
        train_classifier(out_dir=str(tmp_path / "bad"), max_epochs=0, **common)


def test_an_ensemble_predicts_the_mean_of_its_members_probabilities(tmp_path):
    train, dev = _toy_text(tmp_path / "train.tsv"), _toy_text(tmp_path / "dev.tsv", n=24)
    args = dict(TINY, data=str(train), valid=str(dev), max_steps=8, eval_interval=1000)
    result = train_classifier(out_dir=str(tmp_path / "ens"), ensemble=3, seed=5, **args)
    run = result.run_dir
    ensemble, vocab, names, _ = load_classifier(run)
    members = [load_classifier(run / f"member-{k}")[0] for k in range(3)]
    # Member k is the single run with seed 5 + k: same weights as training it alone.
    alone = load_classifier(train_classifier(out_dir=str(tmp_path / "alone"), seed=6, **args).run_dir)[0]
    assert all(torch.equal(a, b) for a, b in zip(members[1].state_dict().values(), alone.state_dict().values()))
    assert not torch.equal(members[0].embed_tokens.weight, members[1].embed_tokens.weight)
    rows, predictions, acc = predict(run, dev)
    examples = encode(members[0], vocab, rows, names)
    x, mask, y = next(examples.batches(256))
    mean = torch.stack([m(x, mask).logits.softmax(-1) for m in members]).mean(0)
    assert torch.allclose(ensemble(x, mask).logits.exp(), mean, atol=1e-6)
    assert predictions == [names[i] for i in mean.argmax(-1).tolist()]
    assert result.accuracy == acc and result.step == 3 * 8
    assert result.parameters == 3 * members[0].num_parameters()
    with pytest.raises(CheckpointError, match="already holds a run"):
        train_classifier(out_dir=str(run), ensemble=3, **args)


def test_a_killed_ensemble_resumes_keeping_its_finished_members(tmp_path):
    train = _toy_text(tmp_path / "train.tsv")
    args = dict(TINY, data=str(train), max_steps=20, checkpoint_interval=10, eval_interval=10, ensemble=2)
    full = train_classifier(out_dir=str(tmp_path / "full"), **args)
    killed = tmp_path / "killed"
    shutil.copytree(full.run_dir, killed)
    gone = ("model.safetensors", "model.json", "run.json", "member-1/run.json", "member-1/checkpoints/step-000020")
    for path in gone:
        (shutil.rmtree if (killed / path).is_dir() else os.remove)(killed / path)
    finished = (killed / "member-0" / "model.safetensors").stat().st_mtime_ns
    resumed = train_classifier(out_dir=str(killed), resume=True, **args)
    assert (killed / "member-0" / "model.safetensors").stat().st_mtime_ns == finished  # not retrained
    assert resumed.accuracy == full.accuracy
    a, b = load_classifier(full.run_dir)[0].state_dict(), load_classifier(killed)[0].state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ensemble_bad_settings():
    with pytest.raises(ConfigError, match="ensemble must be a positive integer, got 0"):
        train_classifier(ensemble=0)
    with pytest.raises(ConfigError, match="ensemble trains models from scratch"):
        train_classifier(ensemble=2, init_from="somewhere")
