"""Distillation: the loss against a hand computation, the teacher untouched, caching, vocabulary checks."""

from __future__ import annotations

import json
import math

import pytest
import torch

import moekit
from moekit.checkpoint import load_model
from moekit.errors import CheckpointError, ConfigError
from moekit.recipes import DistillConfig, DistillTrainer, distill, distillation_loss, kd_loss
from moekit.train import TrainConfig

from .helpers import FAST, TINY, save_model, text_file, tiny_model


def _softmax(row, T):
    exps = [math.exp(v / T) for v in row]
    return [e / sum(exps) for e in exps]


def _hand_loss(student, teacher, labels, T, alpha, k=None):
    """Plain-python alpha * T^2 * KL + (1 - alpha) * CE, averaged over positions."""
    kl_sum, ce_sum, n = 0.0, 0.0, 0
    for s_row, t_row, y in zip(student, teacher, labels):
        p_s = _softmax(s_row, T)
        if k is None:
            ids = list(range(len(t_row)))
        else:
            ids = sorted(range(len(t_row)), key=lambda i: -t_row[i])[:k]
        p_t = _softmax([t_row[i] for i in ids], T)  # renormalised over the kept ids
        kl_sum += sum(p * (math.log(p) - math.log(p_s[i])) for p, i in zip(p_t, ids))
        ce_sum += -math.log(_softmax(s_row, 1.0)[y])
        n += 1
    return alpha * T * T * kl_sum / n + (1 - alpha) * ce_sum / n


@pytest.mark.parametrize("k", [None, 1, 3, 6])
@pytest.mark.parametrize("T, alpha", [(1.0, 0.5), (2.0, 0.25), (4.0, 1.0), (0.5, 0.0)])
def test_distillation_loss_matches_a_hand_computation(k, T, alpha):
    g = torch.Generator().manual_seed(0)
    student = torch.randn(2, 3, 6, generator=g, dtype=torch.float64) * 2
    teacher = torch.randn(2, 3, 6, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, 6, (2, 3), generator=g)
    topk = None if k is None else teacher.topk(k, dim=-1)
    got = distillation_loss(student, labels, None if k else teacher, T, alpha, None if k is None else tuple(topk))
    want = _hand_loss(student.view(-1, 6).tolist(), teacher.view(-1, 6).tolist(), labels.view(-1).tolist(), T, alpha, k)
    assert got.item() == pytest.approx(want, rel=1e-6, abs=1e-7)


def test_top_k_over_the_whole_vocabulary_is_the_full_kl():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    full = kd_loss(s, t, 2.0)
    assert kd_loss(s, temperature=2.0, teacher_topk=tuple(t.topk(7, dim=-1))).item() == pytest.approx(full.item())
    assert kd_loss(t, t, 2.0).abs().item() < 1e-6 and full.item() > 0


def _trainer(tmp_path, teacher_dir, name="s", distill_cfg=None, **overrides):
    teacher, tok = load_model(teacher_dir)
    cfg = TrainConfig(
        model="tiny", data=str(text_file(tmp_path / "d.txt")), out_dir=str(tmp_path / name), max_steps=3,
        **{**FAST, **overrides},
    )  # fmt: skip
    dcfg = distill_cfg or DistillConfig(teacher=str(teacher_dir), temperature=2.0, alpha=0.5, top_k_logits=5)
    return DistillTrainer(cfg, teacher, tok, dcfg), teacher


def test_teacher_gets_no_gradient_and_stays_in_eval(tmp_path):
    teacher_dir = save_model(tmp_path / "teacher", tiny_model(seed=1))
    trainer, teacher = _trainer(tmp_path, teacher_dir)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    result = trainer.run()
    assert not teacher.training and all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())
    assert any(not torch.equal(v, trainer.model.state_dict()[k]) for k, v in student_before.items())
    assert len(result.train_losses) == 3 and all(math.isfinite(v) for v in result.train_losses)


def test_cached_teacher_logits_give_the_same_losses(tmp_path):
    teacher_dir = save_model(tmp_path / "teacher", tiny_model(seed=1))
    live = _trainer(tmp_path, teacher_dir, "live")[0].run().train_losses
    dcfg = DistillConfig(teacher=str(teacher_dir), temperature=2.0, top_k_logits=5, cache_teacher=str(tmp_path / "c"))
    first = _trainer(tmp_path, teacher_dir, "first", dcfg)[0]
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["cache.json", "chunk-00000.safetensors"]
    first.teacher = None  # the cache alone must carry the teacher
    cached = first.run().train_losses
    assert cached == pytest.approx(live, rel=1e-3)  # fp16 cached values
    meta = json.loads((tmp_path / "c" / "cache.json").read_text())
    assert meta["steps"] == 3 and meta["top_k"] == 5
    again = _trainer(tmp_path, teacher_dir, "again", dcfg)[0]
    again.teacher = None
    assert again.run().train_losses == cached
    with pytest.raises(CheckpointError, match="was made with batch_size=4, this run has 2"):
        _trainer(tmp_path, teacher_dir, "other", dcfg, batch_size=2)
    other_teacher = save_model(tmp_path / "other-teacher", tiny_model(seed=2))
    with pytest.raises(CheckpointError, match="was made by another teacher"):
        _trainer(tmp_path, other_teacher, "third", dcfg)
    (tmp_path / "c" / "cache.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="cache.json is not valid JSON"):
        _trainer(tmp_path, teacher_dir, "fourth", dcfg)


def test_distill_makes_a_dense_student_from_a_preset_and_can_copy_non_expert_weights(tmp_path):
    teacher_dir = save_model(tmp_path / "teacher", tiny_model(seed=1))
    dense = tmp_path / "dense.json"
    dense.write_text(json.dumps(TINY.replace(moe=None).to_dict()))
    result = distill(
        teacher_dir, dense, alpha=0.25, init_from_teacher=True, max_steps=2, out_dir=str(tmp_path / "s"), lr=1e-9,
        warmup_steps=0, data=str(text_file(tmp_path / "d.txt")), **FAST,
    )  # fmt: skip
    student, teacher = moekit.load(result.checkpoint), moekit.load(teacher_dir)
    assert student.config.moe is None and student.layers[0].mlp.__class__.__name__ == "MLP"
    torch.testing.assert_close(student.embed_tokens.weight, teacher.embed_tokens.weight, rtol=0, atol=1e-6)
    torch.testing.assert_close(
        student.layers[1].self_attn.q_proj.weight, teacher.layers[1].self_attn.q_proj.weight, rtol=0, atol=1e-6
    )
    assert json.loads((tmp_path / "s" / "distill.json").read_text())["alpha"] == 0.25


def test_teacher_and_student_with_different_vocabularies_are_refused(tmp_path):
    teacher_dir = save_model(tmp_path / "teacher", tiny_model(seed=1))
    wide = tmp_path / "wide.json"
    wide.write_text(json.dumps(TINY.replace(vocab_size=300).to_dict()))
    with pytest.raises(ConfigError, match="different vocabularies: teacher vocab_size=256, student vocab_size=300"):
        distill(teacher_dir, wide, max_steps=1, out_dir=str(tmp_path / "s"), data=str(text_file(tmp_path / "d.txt")))
    assert not (tmp_path / "s").exists()  # refused before anything is built or written
    with pytest.raises(ConfigError, match="neither a preset"):
        distill(teacher_dir, "no-such-student", max_steps=1, out_dir=str(tmp_path / "s2"))


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(temperature=0), "temperature must be > 0"),
        (dict(alpha=1.5), r"alpha must be in \[0, 1\]"),
        (dict(top_k_logits=0), "top_k_logits must be a positive integer"),
    ],
)
def test_bad_distill_settings(fields, message):
    with pytest.raises(ConfigError, match=message):
        DistillConfig(teacher="t", **fields)


def test_a_hugging_face_teacher_folder_works(tmp_path):
    hf = pytest.importorskip("moekit.interop.hf")
    from moekit.data.tokenizers import ByteTokenizer

    teacher = tiny_model(seed=1)
    hf.to_hf(teacher, tmp_path / "hf")
    ByteTokenizer().save(tmp_path / "hf")
    result = distill(
        tmp_path / "hf", "tiny", top_k_logits=8, max_steps=1, out_dir=str(tmp_path / "s"),
        data=str(text_file(tmp_path / "d.txt")), **FAST,
    )  # fmt: skip
    assert result.step == 1 and math.isfinite(result.val_losses[-1][1])
