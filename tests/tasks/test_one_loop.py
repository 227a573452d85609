"""Every option of the one loop works for every task: gradient accumulation equals the larger batch, resume is
bit-exact, an EMA of the weights for language models, bf16 autocast for classification and translation."""

from __future__ import annotations

import shutil
from collections import defaultdict

import pytest
import torch

from moekit.data.labelled import label_names
from moekit.io.safe_io import load_tensors
from moekit.tasks.classify import ClassifyConfig, classify_loop, load_classifier, load_task_data, train_classifier
from moekit.tasks.translate import TranslateConfig, train_translator, translate_loop
from moekit.train import TrainConfig, Trainer, load_model, resolve_checkpoint, train

QUIET = dict(progress=False, tensorboard=False, aux_loss_scale=0.0, threads=1)  # aux loss: a batch statistic
LM = dict(model="tiny", block_size=16, eval_batches=2, eval_interval=1000, **QUIET)
ENCODER = {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 16,
           "moe": {"num_experts": 4}, "dropout": 0.0, "token_dropout": 0.0}  # fmt: skip
SEQ2SEQ = {"hidden_size": 16, "encoder_layers": 1, "decoder_layers": 1, "num_attention_heads": 2,
           "intermediate_size": 16, "moe": {"num_experts": 4}, "dropout": 0.0}  # fmt: skip


def _step(loop, batches):
    """One optimizer step of ``loop`` over exactly ``batches`` (its micro-batches): its record, the weights after."""
    stream = iter(batches)
    loop.task.next_batch = lambda: next(stream)
    record = loop.train_step(0.0)
    return record, {name: p.detach().clone() for name, p in loop.model.named_parameters()}


def _assert_same_step(whole, halves) -> None:
    (record, weights), (record_halves, weights_halves) = whole, halves
    # The gradient before clipping and the loss are the larger batch's (Adam alone would hide a scale error).
    assert record_halves["grad_norm"] == pytest.approx(record["grad_norm"], rel=1e-5)
    assert record_halves["loss"] == pytest.approx(record["loss"], rel=1e-6)
    assert weights.keys() == weights_halves.keys()
    for name in weights:
        torch.testing.assert_close(weights_halves[name], weights[name], rtol=1e-5, atol=1e-6, msg=name)


def _classify_loop(tmp_path, name, task, grad_accum):
    cfg = ClassifyConfig(task=task, batch_size=8, grad_accum=grad_accum, model_overrides=ENCODER, **QUIET)
    train_data, valid_data = load_task_data(cfg)
    return classify_loop(cfg, tmp_path / name, train_data, valid_data, label_names(train_data.labels))


def test_language_model_accumulation_equals_the_larger_batch(tmp_path):
    whole = Trainer(TrainConfig(batch_size=4, out_dir=str(tmp_path / "a"), **LM))
    halves = Trainer(TrainConfig(batch_size=2, grad_accum=2, out_dir=str(tmp_path / "b"), **LM))
    x, y = whole.task.next_batch()
    _assert_same_step(_step(whole, [(x, y)]), _step(halves, [(x[:2], y[:2]), (x[2:], y[2:])]))


@pytest.mark.parametrize("task", ["classify", "image-classify"])
def test_classifier_accumulation_equals_the_larger_batch(tmp_path, task):
    whole = _classify_loop(tmp_path, "a", task, 1)
    halves = _classify_loop(tmp_path, "b", task, 2)
    examples = whole.task.train_set
    rows = torch.arange(8)
    batches = [examples.batch(rows[:4]), examples.batch(rows[4:])]
    _assert_same_step(_step(whole, [examples.batch(rows)]), _step(halves, batches))


def test_translation_accumulation_equals_the_larger_batch(tmp_path):
    loops = [
        translate_loop(TranslateConfig(grad_accum=k, model_overrides=SEQ2SEQ, out_dir=str(tmp_path / f"{k}"), **QUIET))[
            0
        ]
        for k in (1, 2)
    ]
    pairs = loops[0].task.train_set
    by_length = defaultdict(list)  # the loss is a mean over target tokens: halves of equal target length
    for i, target in enumerate(pairs.tgt):
        by_length[len(target)].append(i)
    rows = next(r for r in by_length.values() if len(r) >= 4)[:4]
    whole = _step(loops[0], [pairs.batch(rows)])
    _assert_same_step(whole, _step(loops[1], [pairs.batch(rows[:2]), pairs.batch(rows[2:])]))


def _kill_and_resume(full_dir, tmp_path, last_kept: str):
    """A copy of a finished run as it stood when killed after checkpoint ``last_kept``."""
    killed = shutil.copytree(full_dir, tmp_path / "killed")
    for step in (killed / "checkpoints").glob("step-*"):
        if step.name != last_kept:
            shutil.rmtree(step)
    (killed / "checkpoints" / "latest").write_text(last_kept + "\n")
    return killed


def test_image_classifier_resume_is_bit_exact(tmp_path):
    args = dict(task="image-classify", batch_size=16, max_steps=6, checkpoint_interval=3, eval_interval=3,
                grad_accum=2, model_overrides=ENCODER, **QUIET)  # fmt: skip
    full = train_classifier(out_dir=str(tmp_path / "full"), **args)
    killed = _kill_and_resume(full.run_dir, tmp_path, "step-000003")
    resumed = train_classifier(out_dir=str(killed), resume=True, **args)
    assert resumed.step == 6 and resumed.history == full.history[:1] + resumed.history[1:]
    assert [r["accuracy"] for r in resumed.history] == [r["accuracy"] for r in full.history]
    a, b = load_classifier(full.run_dir)[0].state_dict(), load_classifier(killed)[0].state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_language_model_ema_is_evaluated_saved_and_resumed_exactly(tmp_path):
    args = dict(LM, batch_size=2, ema_decay=0.9, checkpoint_interval=3, eval_interval=3)
    whole = train(max_steps=6, out_dir=str(tmp_path / "whole"), **args)
    train(max_steps=3, out_dir=str(tmp_path / "part"), **args)
    rest = train(max_steps=6, out_dir=str(tmp_path / "part"), resume=True, **args)
    assert whole.train_losses[3:] == rest.train_losses and whole.val_losses == rest.val_losses
    folder = resolve_checkpoint(tmp_path / "whole")
    average, trained = load_tensors(folder / "model.safetensors"), load_tensors(folder / "trained.safetensors")
    assert any(not torch.equal(average[k], trained[k]) for k in trained)  # the checkpoint's model is the average
    resumed = load_tensors(resolve_checkpoint(tmp_path / "part") / "model.safetensors")
    assert all(torch.equal(average[k], resumed[k]) for k in average)
    # The validation loss was the average's: a run that starts from the saved model measures the same.
    check = Trainer(TrainConfig(init_from=str(folder), batch_size=2, out_dir=str(tmp_path / "check"), **LM))
    assert check.evaluate()["val_loss"] == whole.val_losses[-1][1]
    plain = train(max_steps=6, out_dir=str(tmp_path / "plain"), **{**args, "ema_decay": 0.0})
    assert plain.val_losses[-1][1] != whole.val_losses[-1][1] and plain.train_losses == whole.train_losses
    assert load_model(tmp_path / "whole")[0] is not None


@pytest.mark.parametrize("task", ["classify", "translate"])
def test_bf16_autocast_trains_classification_and_translation(tmp_path, task):
    def run(precision):
        out = str(tmp_path / precision)
        if task == "translate":
            common = dict(model_overrides=SEQ2SEQ, bleu_sentences=0, max_steps=3, eval_interval=3, **QUIET)
            result = train_translator(out_dir=out, precision=precision, **common)
            return [r["train_loss"] for r in result.history] + [result.valid_loss]
        common = dict(model_overrides=ENCODER, batch_size=8, max_steps=3, eval_interval=3, **QUIET)
        return [r["train_loss"] for r in train_classifier(out_dir=out, precision=precision, **common).history]

    fp32, bf16 = run("float32"), run("bfloat16")
    assert all(torch.isfinite(torch.tensor(bf16)))
    assert bf16 != fp32 and bf16 == pytest.approx(fp32, rel=0.05)  # autocast was on, and the result close
