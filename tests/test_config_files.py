"""Command-line overrides are typed like the config file's values."""

from __future__ import annotations

import re

import pytest

from moekit.config import parse_overrides
from moekit.errors import ConfigError
from moekit.train.config import TrainConfig


def test_overrides_are_typed():
    got = parse_overrides(["--lr", "1e-3", "--max-steps=20", "--bias-update", "false", "--tokenizer", "char", "--tb=1"])
    assert got == {"lr": 1e-3, "max_steps": 20, "bias_update": False, "tokenizer": "char", "tb": 1}
    assert isinstance(got["lr"], float)  # YAML 1.1 alone would leave "1e-3" a string
    assert parse_overrides(["--model", "null"]) == {"model": None}
    assert parse_overrides(["--data", "inf", "--prompt", "nan"]) == {"data": "inf", "prompt": "nan"}


def test_a_value_without_a_key_is_an_error():
    with pytest.raises(ConfigError, match="unexpected argument '1e-3'"):
        parse_overrides(["1e-3"])


@pytest.mark.parametrize("tokens", [["--max-steps"], ["--progress", "--lr", "1"], ["--lr", "1", "--tb"]])
def test_a_key_without_a_value_is_an_error(tokens):
    with pytest.raises(ConfigError, match="needs a value"):
        parse_overrides(tokens)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"batch_size": True}, "batch_size=True is not valid: batch_size takes an integer"),
        ({"batch_size": "ten"}, "batch_size='ten' is not valid: batch_size takes an integer"),
        ({"max_steps": 2.5}, "max_steps takes an integer"),
        ({"lr": "abc"}, "lr='abc' is not valid: lr takes a number"),
        ({"progress": "yes"}, "progress takes true or false"),
        ({"seed": None}, "seed takes an integer"),
        ({"threads": "two"}, "threads takes an integer or null"),
    ],
)
def test_values_of_the_wrong_type_are_refused_naming_the_field(options, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        TrainConfig.from_options(options)


def test_well_typed_values_and_durations_pass():
    config = TrainConfig.from_options({"lr": 1, "time_budget": "2m", "threads": None, "batch_size": 8})
    assert config.lr == 1 and config.time_budget == 120.0 and config.batch_size == 8


@pytest.mark.parametrize(
    ("typed", "suggested"),
    [("lerning_rate", "lr"), ("learning-rate", "lr"), ("epochs", "max_epochs"), ("max_step", "max_steps")],
)
def test_suggestions_a_person_would_agree_with(typed, suggested):
    from moekit.tasks.classify import ClassifyConfig

    with pytest.raises(ConfigError, match=f"did you mean '{suggested}'"):
        ClassifyConfig.from_options({typed: 1})
