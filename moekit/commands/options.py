"""Shared command-line plumbing: config files and free-form ``--key value`` overrides."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from moekit.errors import ConfigError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = None


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML, TOML or JSON file as a dict (by extension; YAML for anything else)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix == ".toml":
            if tomllib is None:
                raise ConfigError(f"reading {p} needs Python 3.11+ (tomllib); use YAML or JSON on 3.10")
            data = tomllib.loads(text)
        elif p.suffix == ".json":
            data = json.loads(text)
        else:
            data = yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot parse config file {p}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping of keys to values, not {type(data).__name__}")
    return data


def parse_overrides(tokens: list[str]) -> dict[str, Any]:
    """``["--lr", "1e-3", "--model.num_experts=8", "--bias-update", "false"]`` -> typed dict.

    Values are parsed as YAML scalars (numbers, booleans, null); a flag with no value means true.
    """
    out: dict[str, Any] = {}
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--") or len(token) == 2:
            raise ConfigError(f"unexpected argument {token!r}; options look like --key value")
        key, eq, value = token[2:].partition("=")
        if not eq:
            if i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
                value = tokens[i + 1]
                i += 1
            else:
                value = "true"
        out[key.replace("-", "_")] = _scalar(value)
        i += 1
    return out


_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _scalar(text: str) -> Any:
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str) and _NUMBER.fullmatch(text.strip()):
        return float(text)  # YAML 1.1 reads "1e-3" as a string; --lr 1e-3 means a number
    return value if isinstance(value, (int, float, bool, type(None))) else text
