"""Command-line overrides are typed like the config file's values."""

from __future__ import annotations

import pytest

from moekit.config import parse_overrides
from moekit.errors import ConfigError


def test_overrides_are_typed():
    got = parse_overrides(["--lr", "1e-3", "--max-steps=20", "--bias-update", "false", "--tokenizer", "char", "--tb"])
    assert got == {"lr": 1e-3, "max_steps": 20, "bias_update": False, "tokenizer": "char", "tb": True}
    assert isinstance(got["lr"], float)  # YAML 1.1 alone would leave "1e-3" a string
    assert parse_overrides(["--model", "null"]) == {"model": None}
    assert parse_overrides(["--data", "inf", "--prompt", "nan"]) == {"data": "inf", "prompt": "nan"}


def test_a_value_without_a_key_is_an_error():
    with pytest.raises(ConfigError, match="unexpected argument '1e-3'"):
        parse_overrides(["1e-3"])
