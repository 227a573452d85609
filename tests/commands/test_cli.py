"""The command line, run as a real process: train, eval, generate, and its error messages."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys

import pytest

TINY = [
    "--model",
    "tiny",
    "--batch-size",
    "4",
    "--block-size",
    "16",
    "--eval-interval",
    "5",
    "--progress",
    "false",
    "--tensorboard",
    "false",
]


def moekit(*args, check=True, cwd=None):
    proc = subprocess.run(
        [sys.executable, "-m", "moekit", *map(str, args)], capture_output=True, text=True, timeout=300, cwd=cwd
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"moekit {args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("cli") / "run"
    moekit("train", *TINY, "--max-steps", "10", "--out", run)
    return run


def test_train_then_eval_prints_val_loss(run_dir, tmp_path):
    text = tmp_path / "eval.txt"
    text.write_text("Now is the winter of our discontent made glorious summer by this sun of York. " * 20)
    out = moekit("eval", "--checkpoint", run_dir, "--data", text).stdout
    match = re.search(r"val_loss=([0-9.]+)", out)
    assert match and 0 < float(match.group(1)) < 10


def test_generate_streams_text_reproducibly(run_dir):
    args = ["generate", "--checkpoint", run_dir, "--prompt", "ROMEO:", "--max-new-tokens", "20", "--seed", "3"]
    first, second = moekit(*args).stdout, moekit(*args).stdout
    assert first.startswith("ROMEO:") and first == second


def test_generate_refuses_a_prompt_longer_than_the_context(run_dir):
    proc = moekit("generate", "--checkpoint", run_dir, "--prompt", "x" * 100, "--max-new-tokens", "5", check=False)
    assert proc.returncode == 2 and "64" in proc.stderr and proc.stdout == ""  # the tiny preset's context; no echo


def test_resume_continues_the_run(run_dir):
    out = moekit("train", *TINY, "--max-steps", "12", "--out", run_dir, "--resume").stdout
    assert "step 12:" in out


def test_config_file_with_overrides(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("model: tiny\nbatch_size: 4\nblock_size: 16\nmax_steps: 3\nprogress: false\ntensorboard: false\n")
    out = moekit("train", config, "--max-steps", "4", "--out", tmp_path / "r").stdout
    assert "step 4:" in out


def test_unknown_key_is_an_error_naming_the_closest(tmp_path):
    proc = moekit("train", "--model", "tiny", "--max-stepz", "3", "--out", tmp_path / "r", check=False)
    assert proc.returncode == 2
    assert "unknown train config key 'max_stepz'; did you mean 'max_steps'?" in proc.stderr
    proc = moekit("train", "--model", "tiny", "--model.moe.num_expertz", "3", "--out", tmp_path / "r", check=False)
    assert proc.returncode == 2 and "num_experts" in proc.stderr


def test_eval_with_a_mismatched_tokenizer_is_clear(tmp_path):
    run = tmp_path / "char"
    moekit("train", *TINY, "--tokenizer", "char", "--max-steps", "2", "--out", run)
    text = tmp_path / "other.txt"
    text.write_text("\u00e9\u00e8\u00ea plain ascii and accents " * 10)
    proc = moekit("eval", "--checkpoint", run, "--data", text, check=False)
    assert proc.returncode == 2 and "other" not in proc.stdout and "error" in proc.stderr


@pytest.mark.parametrize(
    ("task", "args", "message"),
    [
        ("lm", ["--batch-size", "true"], "batch_size=True is not valid: batch_size takes an integer"),
        ("lm", ["--lr", "abc"], "lr='abc' is not valid: lr takes a number"),
        ("lm", ["--max-steps"], "--max-steps needs a value"),
        ("lm", ["--threads", "-2"], "threads must be a positive integer or null, got -2"),
        ("lm", ["--lerning-rate", "1e-3"], "did you mean 'lr'?"),
        ("classify", ["--batch-size", "true"], "batch_size=True is not valid"),
        ("translate", ["--max-steps", "1.5"], "max_steps takes an integer"),
    ],
)
def test_bad_option_values_get_one_line_and_leave_no_run_folder(tmp_path, task, args, message):
    out = tmp_path / "run"
    proc = moekit("train", "--task", task, "--progress", "false", *args, "--out", out, check=False, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr + proc.stdout
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_help_texts_show_no_raw_markup():
    from moekit.cli import build_parser

    verbs = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in verbs.choices.items():
        text = sub.format_help()
        assert "``" not in text, f"moekit {name} --help shows raw double backticks"
        assert len(text) > 100


# Every verb with a bad value: {run} is a trained run folder, {text} a text file, {missing} a path that is not there,
# {out} a fresh output folder. Each gets exit code 2, a message naming what is wrong, and no traceback.
BAD_VALUES = [
    ("eval", ["--checkpoint", "{run}", "--data", "{missing}"], "missing does not exist"),
    ("eval", ["--checkpoint", "{run}", "--data", "{text}", "--batch-size", "0"], "batch_size=0 must be >= 1"),
    ("eval", ["--checkpoint", "{missing}", "--data", "{text}"], "the path does not exist"),
    ("generate", ["--checkpoint", "{run}", "--max-new-tokens", "-1"], "max_new_tokens must be an integer >= 0, got -1"),
    ("generate", ["--checkpoint", "{run}", "--temperature", "warm"], "invalid float value: 'warm'"),
    ("generate", ["--checkpoint", "{run}", "--top-p", "1.5"], "top_p must be in (0, 1]"),
    ("generate", ["--checkpoint", "{run}", "--top-k", "-3"], "got -3"),
    ("convert", ["--to-hf", "{missing}", "--out", "{out}"], "the path does not exist"),
    ("convert", ["--to-hf", "{run}", "--out", "{out}", "--dtype", "float7"], "dtype='float7' is not one of"),
    ("convert", ["--to-hf", "{run}", "--out", "{out}", "--family", "gpt5"], "cannot export to family 'gpt5'"),
    ("analyze", ["--checkpoint", "{run}", "--data", "{text}", "--max-tokens", "0", "--out", "{out}"], "max_tokens=0"),
    (
        "upcycle",
        ["--from", "{missing}", "--num-experts", "4", "--top-k", "2", "--out", "{out}"],
        "the path does not exist",
    ),
    ("upcycle", ["--from", "{run}", "--num-experts", "4", "--top-k", "2", "--out", "{out}"], "already has MoE layers"),
    (
        "distill",
        ["--teacher", "{run}", "--student", "no-such-preset", "--out", "{out}"],
        "student='no-such-preset' is neither a preset",
    ),
    (
        "prune",
        ["--checkpoint", "{run}", "--keep", "0", "--calibration-data", "{text}", "--out", "{out}"],
        "keep=0 must be a positive number",
    ),
    (
        "merge-experts",
        ["--checkpoint", "{run}", "--target", "0", "--calibration-data", "{text}", "--out", "{out}"],
        "target=0 must be a positive number",
    ),
    ("mix", ["--seed", "{run}", "--domain", "a={text}", "--out", "{out}"], "--seed-model"),
    ("predict", ["--checkpoint", "{run}", "--data", "{text}"], "holds no classifier"),
    ("translate", ["--checkpoint", "{run}", "--text", "hello", "--beam", "0"], "--beam must be >= 1, got 0"),
    ("demo", ["--time-budget", "soon", "--out", "{out}"], "time_budget='soon' is not a duration"),
]


@pytest.mark.parametrize(
    ("verb", "args", "message"), BAD_VALUES, ids=[f"{v}-{i}" for i, (v, *_) in enumerate(BAD_VALUES)]
)
def test_every_verb_answers_a_bad_value_with_one_line_and_no_traceback(run_dir, tmp_path, verb, args, message):
    text = tmp_path / "text.txt"
    text.write_text("plain text for a check " * 20)
    paths = {"run": run_dir, "text": text, "missing": tmp_path / "missing", "out": tmp_path / "out"}
    proc = moekit(verb, *(a.format(**paths) for a in args), check=False, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    last = proc.stderr.strip().splitlines()[-1]
    assert "error" in last and message in last, proc.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_train_help_lists_every_config_field_with_its_type_default_and_a_line():
    import dataclasses

    from moekit.cli import build_parser
    from moekit.train.config import TrainConfig

    verbs = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    text = verbs.choices["train"].format_help()
    lines = {line.split()[0]: line for line in text.splitlines() if line.startswith("  --") and "(default" in line}
    for field in dataclasses.fields(TrainConfig):
        if field.name == "model_overrides":
            continue
        line = lines[f"--{field.name.replace('_', '-')}"]
        assert re.match(r"  --[\w-]+ \S.* \(default [^)]+\)  \w", line), line  # flag, type, default, a comment
    assert "--max-steps int (default 2000)  optimizer steps" in text
    assert "--optimizer {adamw,muon} (default adamw)" in text
    assert "--time-budget float | None (default none)  Seconds of training" in text
