"""The one training loop on a small task: steps, budget, records, the non-finite guard, EMA, resume and option
parsing."""

from __future__ import annotations

import json
import math
import re
import shutil

import pytest
import torch

from moekit.checkpoint import find_checkpoint, read_trainer_state
from moekit.errors import CheckpointError, ConfigError, NonFiniteError
from moekit.io.safe_io import load_tensors
from moekit.tasks.batches import Batches, length_bucketed_rows, shuffled_rows
from moekit.tasks.classify import ClassifyConfig
from moekit.tasks.translate import TranslateConfig
from moekit.train.config import TaskTrainConfig
from moekit.train.loop import Loop, StepLoss, open_run


def _inputs():
    generator = torch.Generator().manual_seed(0)
    while True:
        yield torch.randn(16, 1, generator=generator)


def _linear():
    torch.manual_seed(0)
    return torch.nn.Linear(1, 1)


class Regression:
    """A linear model learning y = 2x as a task of the loop; its loss turns bad at call ``poison_at``."""

    tokenizer = None

    def __init__(self, model, poison_at, poison, watch, saved):
        self.model, self.poison_at, self.poison, self.watch, self.saved = model, poison_at, poison, watch, saved
        self.batches, self.calls = Batches(_inputs()), 0
        self.state_dict, self.load_state_dict = self.batches.state_dict, self.batches.load_state_dict

    def next_batch(self):
        return self.batches.next()

    def loss(self, x) -> StepLoss:
        if self.watch is not None:
            self.watch.append([p.detach().clone() for p in self.model.parameters()])
        loss = torch.nn.functional.mse_loss(self.model(x), 2 * x)
        if self.calls == self.poison_at:
            loss = self.poison(self.model, loss)
        self.calls += 1
        return StepLoss(loss, 0.0, [], len(x))

    def evaluate(self, step: int) -> dict:
        with torch.no_grad():
            return {"error": float((self.model.weight - 2).abs())}

    def summary(self, record) -> str:
        return str(record)

    def describe(self) -> dict:
        return {"task": "regression"}

    def start(self, run_dir) -> None:
        pass

    def export(self, run_dir) -> None:
        self.saved.append(1)


def _regression(tmp_path, cfg, poison_at: int | None = None, poison=None, watch=None, model=None, resume=False):
    """Train a linear model on y = 2x with the loop; forward turns bad at step ``poison_at``."""
    model = model or _linear()
    source = open_run(tmp_path, resume)
    if source is not None:
        model.load_state_dict(load_tensors(source / "model.safetensors"))
    saved = []
    run = Loop(cfg, Regression(model, poison_at, poison, watch, saved), tmp_path, source).run()
    return run, model, saved


def test_loop_trains_logs_and_evaluates(tmp_path):
    cfg = TaskTrainConfig(
        max_steps=300, lr=0.05, warmup_steps=5, weight_decay=0.0, log_interval=2, eval_interval=100, progress=False
    )
    run, model, saved = _regression(tmp_path, cfg)
    assert len(saved) == 1  # the model files are written with the final checkpoint
    assert run.step == 300 and run.items == 300 * 16
    assert [r["step"] for r in run.history] == [100, 200, 300]
    assert run.history[-1]["error"] < 0.05 < run.history[0]["error"] + 1  # it learnt y = 2x
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "lr" in r]
    assert [r["step"] for r in train_records] == list(range(2, 301, 2))
    assert train_records[0]["lr"] < train_records[10]["lr"]  # warmup, then cosine decay
    assert train_records[-1]["lr"] < train_records[10]["lr"]
    assert [r["step"] for r in records if "error" in r] == [100, 200, 300]


def _plan(run_dir) -> dict:
    return read_trainer_state(find_checkpoint(run_dir))["plan"]


def test_time_budget_fixes_the_runs_length_and_evaluates_the_last_step(tmp_path):
    cfg = TaskTrainConfig(max_steps=10**9, time_budget=0.3, eval_interval=10**9, progress=False)
    run, _, _ = _regression(tmp_path, cfg)
    plan = _plan(tmp_path)
    assert plan["budget"] == 0.3 and run.step == plan["steps"] and 0 < run.step < 10**9
    assert 0.1 < run.seconds < 5  # the plan aims at 0.3 s; timing noise may move it either way
    assert len(run.history) == 1 and run.history[0]["step"] == run.step


def test_a_time_budgeted_run_warms_up_holds_then_decays_over_its_plan_and_resumes_exactly(tmp_path):
    """Warmup, the peak learning rate until the plan (a tenth of the budget), then a cosine to min_lr at the plan's
    last step; a resume from any checkpoint after the plan ends with the same weights and records; a resume with
    a new budget re-plans from the recorded pace."""
    base = dict(lr=0.05, warmup_steps=20, log_interval=1, eval_interval=25, checkpoint_interval=7, progress=False)
    budgeted = TaskTrainConfig(max_steps=10**9, time_budget=0.5, keep_checkpoints=10**6, **base)
    timed, timed_model, _ = _regression(tmp_path / "timed", budgeted)
    plan = _plan(tmp_path / "timed")
    assert 20 <= plan["start"] < plan["steps"] == timed.step
    records = [json.loads(line) for line in (tmp_path / "timed" / "metrics.jsonl").read_text().splitlines()]
    lr = {r["step"]: r["lr"] for r in records if "lr" in r}  # the lr of the step that ended at r["step"]
    assert [lr[s] for s in range(1, 21)] == pytest.approx([0.05 * s / 20 for s in range(1, 21)])
    assert all(lr[s] == 0.05 for s in range(21, plan["start"] + 2))
    low, span = 0.05 * budgeted.min_lr_ratio, plan["steps"] - plan["start"]
    last = low + 0.5 * (0.05 - low) * (1 + math.cos(math.pi * (span - 1) / span))  # the cosine's last step
    assert lr[plan["steps"]] == pytest.approx(last) and lr[plan["steps"]] < lr[plan["start"] + 2]
    # stopped after the plan (at the first checkpoint past it): the resumed run ends where the first did
    killed = tmp_path / "killed"
    shutil.copytree(tmp_path / "timed", killed)
    after = next(s for s in range(7, plan["steps"], 7) if s > plan["start"])
    for late in (killed / "checkpoints").glob("step-*"):
        if int(late.name.split("-")[1]) > after:
            shutil.rmtree(late)
    (killed / "checkpoints" / "latest").write_text(f"step-{after:06d}\n")
    resumed, resumed_model, _ = _regression(killed, budgeted, model=_linear(), resume=True)
    assert resumed.step == plan["steps"]
    assert all(torch.equal(a, b) for a, b in zip(timed_model.parameters(), resumed_model.parameters()))
    assert (killed / "metrics.jsonl").read_text().count('"lr"') == plan["steps"]
    longer, _, _ = _regression(killed, budgeted.replace(time_budget=5.0), model=_linear(), resume=True)
    assert _plan(killed)["budget"] == 5.0 and longer.step == _plan(killed)["steps"] > plan["steps"]


@pytest.mark.parametrize(
    "poison, message",
    [
        (lambda model, loss: loss * float("nan"), r"non-finite loss \(nan\)"),
        # sqrt at 0: the loss is finite (0), its gradient is not
        (lambda model, loss: loss + torch.sqrt(model.bias - model.bias.detach()).sum(), "non-finite gradient"),
    ],
)
def test_non_finite_values_stop_before_a_weight_changes(tmp_path, poison, message):
    seen, model = [], _linear()
    cfg = TaskTrainConfig(max_steps=10, lr=0.05, warmup_steps=1, progress=False)
    with pytest.raises(NonFiniteError, match=f"{message} at step 3"):
        _regression(tmp_path, cfg, poison_at=3, poison=poison, watch=seen, model=model)
    assert len(seen) == 4
    assert all(torch.equal(a, b) for a, b in zip(seen[3], model.parameters()))


def test_options_move_model_keys_and_name_the_closest_unknown_key():
    cfg = ClassifyConfig.from_options({"model.moe.top_k": 2, "batch-size": 8}, "classification config")
    assert cfg.model_overrides == {"moe": {"top_k": 2}} and cfg.batch_size == 8
    with pytest.raises(ConfigError, match="unknown translation config key 'lr_min_ratio'; did you mean 'min_lr_ratio'"):
        TranslateConfig.from_options({"lr_min_ratio": 0.1}, "translation config")
    with pytest.raises(ConfigError, match="EncoderConfig"):
        ClassifyConfig.from_options({"model.num_expert": 4}, "classification config")


def test_task_defaults_differ_but_validation_is_shared():
    assert TranslateConfig().label_smoothing == 0.1 and ClassifyConfig().label_smoothing == 0.0
    assert TranslateConfig().lr == 2e-3 and ClassifyConfig().lr == 1e-3
    for config_class in (ClassifyConfig, TranslateConfig):
        with pytest.raises(ConfigError, match="lr must be > 0"):
            config_class(lr=0)
        with pytest.raises(ConfigError, match="eval_interval"):
            config_class(eval_interval=0)


@pytest.mark.parametrize("ema_decay", [0.0, 0.9])
def test_resume_continues_exactly_and_a_partial_checkpoint_is_ignored(tmp_path, ema_decay):
    cfg = TaskTrainConfig(
        max_steps=30,
        lr=0.05,
        warmup_steps=3,
        checkpoint_interval=10,
        eval_interval=10,
        progress=False,
        ema_decay=ema_decay,
    )
    full, full_model, _ = _regression(tmp_path / "full", cfg)
    assert sorted(p.name for p in (tmp_path / "full" / "checkpoints").glob("step-*")) == [
        "step-000020",
        "step-000030",
    ]
    # a run killed while writing step 30: its checkpoint never got its final name (nor did `latest` move)
    killed = tmp_path / "killed"
    shutil.copytree(tmp_path / "full", killed)
    (killed / "checkpoints" / "step-000030").rename(killed / "checkpoints" / ".tmp-step-000030-123")
    (killed / "checkpoints" / "latest").write_text("step-000020\n")
    resumed, resumed_model, saved = _regression(killed, cfg, model=_linear(), resume=True)
    assert resumed.step == 30 and len(saved) == 1
    assert all(torch.equal(a, b) for a, b in zip(full_model.parameters(), resumed_model.parameters()))
    assert resumed.history[:2] == full.history[:2] and len(resumed.history) == 3  # restored, then step 30
    assert resumed.history[-1]["error"] == full.history[-1]["error"]
    assert not any((killed / "checkpoints").glob(".tmp-*"))  # the partial one is cleaned up by the next save


def test_weight_average_is_what_evaluation_and_the_final_model_see(tmp_path):
    cfg = TaskTrainConfig(max_steps=12, lr=0.05, warmup_steps=2, eval_interval=4, progress=False)
    trained = []  # the weights each step starts from: the initial ones, then after steps 0..10
    _, plain, _ = _regression(tmp_path / "plain", cfg, watch=trained)
    path = [*trained[1:], [p.detach().clone() for p in plain.parameters()]]  # after steps 0..11
    expected = [p.detach().clone() for p in trained[0]]
    for step, weights in enumerate(path):
        decay = min(0.8, (1 + step) / (10 + step))
        expected = [decay * e + (1 - decay) * w for e, w in zip(expected, weights)]
    run, averaged, saved = _regression(tmp_path / "averaged", cfg.replace(ema_decay=0.8))
    for got, want, last in zip(averaged.parameters(), expected, path[-1]):
        torch.testing.assert_close(got.detach(), want)
        assert not torch.allclose(got.detach(), last)  # the average, not the last weights
    assert run.history[-1]["error"] == pytest.approx(float((expected[0] - 2).abs()))
    with pytest.raises(ConfigError, match="ema_decay must be in"):
        TaskTrainConfig(ema_decay=1.0)


def test_resume_refuses_changed_settings_and_missing_checkpoints(tmp_path):
    cfg = TaskTrainConfig(max_steps=5, progress=False)
    _regression(tmp_path, cfg)
    with pytest.raises(ConfigError, match=r"--resume: lr=0.5 differs .*\(lr=0.001\); only .*max_steps"):
        _regression(tmp_path, cfg.replace(lr=0.5), resume=True)
    longer, _, _ = _regression(tmp_path, cfg.replace(max_steps=8), resume=True)  # running longer is allowed
    assert longer.step == 8
    with pytest.raises(CheckpointError, match="no checkpoint to resume from"):
        _regression(tmp_path / "empty", cfg, resume=True)


def _padding(batches, lengths):
    return sum(len(b) * max(lengths[i] for i in b.tolist()) - sum(lengths[i] for i in b.tolist()) for b in batches)


def test_length_buckets_cover_each_row_once_per_epoch_with_less_padding():
    lengths = torch.randint(1, 60, (1000,), generator=torch.Generator().manual_seed(0)).tolist()
    stream = length_bucketed_rows(lengths, batch_size=16, seed=3, pool_batches=8)
    epoch = [next(stream) for _ in range(1000 // 16)]
    assert all(len(b) == 16 for b in epoch)
    rows = torch.cat(epoch)
    assert len(set(rows.tolist())) == len(rows) == 992  # every row at most once; the last partial batch left out
    plain = shuffled_rows(1000, 16, seed=3)
    assert _padding(epoch, lengths) * 4 < _padding([next(plain) for _ in range(62)], lengths)
    again = length_bucketed_rows(lengths, batch_size=16, seed=3, pool_batches=8)
    assert all(torch.equal(a, next(again)) for a in epoch)  # seeded: a resumed run replays the same batches
    assert not torch.equal(torch.cat(epoch), torch.cat([next(stream) for _ in range(62)]))  # reshuffled per epoch


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [("plan", "soon", "not a budget plan: 'soon'"), ("plan", {"budget": 1.0}, "not a budget plan"),
     ("threads", "2", "threads is not a positive integer: '2'"), ("threads", 0, "threads is not a positive")],
)  # fmt: skip
def test_a_damaged_plan_or_thread_count_in_the_trainer_state_is_refused(tmp_path, field, value, message):
    cfg = TaskTrainConfig(max_steps=10**9, time_budget=0.2, progress=False)
    _regression(tmp_path, cfg)
    state_file = find_checkpoint(tmp_path) / "trainer_state.json"
    state = json.loads(state_file.read_text())
    assert state["plan"] is not None and state["threads"] >= 1
    state_file.write_text(json.dumps({**state, field: value}))
    with pytest.raises(CheckpointError, match=re.escape(message)):
        _regression(tmp_path, cfg, model=_linear(), resume=True)
