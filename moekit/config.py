"""Config plumbing: frozen keyword-only dataclasses with strict, helpful (de)serialisation, config files,
the one ``--key value`` override parser and the ``--help`` listing of a config's fields.

Every config in moekit subclasses :class:`Config`. Construction validates fields in
``__post_init__``; :meth:`Config.from_dict` rejects unknown keys and names the closest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import inspect
import json
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from moekit.errors import ConfigError

C = TypeVar("C", bound="Config")


# Names people type for a field that moekit spells otherwise (checked before spelling similarity).
_ALIASES = {
    "learning_rate": "lr",
    "steps": "max_steps",
    "num_steps": "max_steps",
    "epochs": "max_epochs",
    "num_epochs": "max_epochs",
    "output_dir": "out_dir",
    "seq_len": "block_size",
    "context_length": "block_size",
    "gradient_accumulation_steps": "grad_accum",
}


def closest(name: str, valid: typing.Iterable[str]) -> str | None:
    """The valid name most similar to ``name`` (or the one it is a common alias of), or None."""
    valid, name = list(valid), str(name)  # a YAML key may be a number or null
    aliased = difflib.get_close_matches(name, [a for a, field in _ALIASES.items() if field in valid], n=1, cutoff=0.8)
    if aliased:
        return _ALIASES[aliased[0]]
    matches = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    return matches[0] if matches else None


def unknown_key_error(key: str, valid: typing.Iterable[str], where: str) -> ConfigError:
    """A ConfigError for an unknown key that suggests the closest valid one."""
    valid = sorted(valid)
    hint = closest(key, valid)
    suggestion = f"; did you mean {hint!r}?" if hint else f"; valid keys: {', '.join(valid)}"
    return ConfigError(f"unknown {where} key {key!r}{suggestion}")


def check_choice(field: str, value: Any, enum_type: type[enum.Enum]) -> enum.Enum:
    """Coerce ``value`` to ``enum_type`` or raise a ConfigError listing the valid choices."""
    try:
        return enum_type(value)
    except ValueError:
        choices = [m.value for m in enum_type]
        hint = closest(str(value), choices)
        extra = f" (did you mean {hint!r}?)" if hint else ""
        raise ConfigError(f"{field}={value!r} is not one of {choices}{extra}") from None


def require(condition: bool, message: str) -> None:
    """Raise ConfigError(message) unless condition holds."""
    if not condition:
        raise ConfigError(message)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """Base class: frozen, keyword-only, validated, JSON-friendly."""

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        """Build from a plain dict; unknown keys raise ConfigError naming the closest valid key."""
        if not isinstance(data, dict):
            raise ConfigError(f"{cls.__name__} expects a mapping, got {type(data).__name__}")
        names = cls.field_names()
        for key in data:
            if key not in names:
                raise unknown_key_error(key, names, cls.__name__)
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in data and _is_required(f)]
        if missing:
            raise ConfigError(f"{cls.__name__} needs {', '.join(missing)}")
        hints = typing.get_type_hints(cls)
        for key, value in data.items():
            _check_float_range(key, hints.get(key), value)
        kwargs = {k: _coerce(hints.get(k), v) for k, v in data.items()}
        parsed_later = {f.name for f in dataclasses.fields(cls) if f.metadata.get("parsed_in_post_init")}
        for key, value in kwargs.items():
            if key not in parsed_later:
                _check_type(key, hints.get(key), value)
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict (enums as their values, nested configs as dicts)."""
        out = {}
        for f in dataclasses.fields(self):
            out[f.name] = _plain(getattr(self, f.name))
        return out

    def replace(self: C, **changes: Any) -> C:
        """A copy with ``changes`` applied (validated; unknown fields raise ConfigError)."""
        names = self.field_names()
        for key in changes:
            if key not in names:
                raise unknown_key_error(key, names, type(self).__name__)
        return dataclasses.replace(self, **changes)


def _is_required(field: dataclasses.Field) -> bool:
    return field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING


def _plain(value: Any) -> Any:
    if isinstance(value, Config):
        return value.to_dict()
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _coerce(hint: Any, value: Any) -> Any:
    """Turn JSON values back into the declared type: nested configs and tuples."""
    if hint is None or value is None:
        return value
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            if arg is type(None):
                continue
            if isinstance(arg, type) and issubclass(arg, Config) and isinstance(value, dict):
                return arg.from_dict(value)
            if typing.get_origin(arg) is tuple and isinstance(value, list):
                return tuple(value)
        return value
    if isinstance(hint, type) and issubclass(hint, Config) and isinstance(value, dict):
        return hint.from_dict(value)
    if origin is tuple and isinstance(value, list):
        return tuple(value)
    return value


_FLOAT_MAX = int(sys.float_info.max)


def _check_float_range(field: str, hint: Any, value: Any) -> None:
    """ConfigError for an integer too large to be a float in a field that takes a number."""
    takes_float = hint is float or (
        typing.get_origin(hint) in (typing.Union, types.UnionType) and float in typing.get_args(hint)
    )
    if takes_float and isinstance(value, int) and not isinstance(value, bool) and abs(value) > _FLOAT_MAX:
        raise ConfigError(f"{field}={value} is not valid: it is too large for a number (at most about 1.8e308)")


def _matches(hint: Any, value: Any) -> bool:
    """Whether ``value`` (after :func:`_coerce`) fits the type hint ``hint``; enums, nested configs and
    anything unusual are left to the config's own checks."""
    if hint is None or hint is Any:
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(arg, value) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return isinstance(value, (str, hint))  # its value is checked by check_choice
    if origin in (tuple, list) and _element_type(hint) is not None:
        return isinstance(value, origin) and all(_matches(_element_type(hint), v) for v in value)
    if origin in (tuple, list, dict):
        return isinstance(value, origin)
    return True


def _element_type(hint: Any) -> Any:
    """X of ``tuple[X, ...]`` or ``list[X]``; None for other hints."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) is tuple and len(args) == 2 and args[1] is Ellipsis:
        return args[0]
    return args[0] if typing.get_origin(hint) is list and len(args) == 1 else None


_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null"}
_PLURALS = {bool: "booleans", int: "integers", float: "numbers", str: "strings"}


def _type_name(hint: Any) -> str:
    element = _element_type(hint)
    if element in _PLURALS:
        return f"a list of {_PLURALS[element]}"
    return _TYPE_NAMES.get(hint, getattr(hint, "__name__", str(hint)))


def _check_type(field: str, hint: Any, value: Any) -> None:
    """ConfigError naming the field, the value and what it takes, when ``value`` does not fit ``hint``."""
    if _matches(hint, value):
        return
    arms = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    wanted = " or ".join(_type_name(arm) for arm in arms)
    raise ConfigError(f"{field}={value!r} is not valid: {field} takes {wanted}")


# -- config files and command-line overrides -------------------------------------------------------

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10 has no TOML reader
    tomllib = None


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML, TOML or JSON file as a dict (by extension; YAML for anything else)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {p} is not UTF-8 text: byte {e.start} is 0x{e.object[e.start]:02x}") from None
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
    except RecursionError:  # the parsers recurse once per nesting level
        raise ConfigError(f"cannot parse config file {p}: it is nested too deeply") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping of keys to values, not {type(data).__name__}")
    for key in data:
        if not isinstance(key, str):
            raise ConfigError(f"config file {p}: key {key!r} is not a name (quote it in YAML: '{key}':)")
    return data


def parse_overrides(tokens: list[str]) -> dict[str, Any]:
    """``["--lr", "1e-3", "--model.num_experts=8", "--bias-update", "false"]`` -> typed dict.

    Values are parsed as YAML scalars (numbers, booleans, null); every key needs a value (``--key true``).
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
                raise ConfigError(f"--{key} needs a value (e.g. --{key} 10, --{key} true, or --{key}=VALUE)")
        out[key.replace("-", "_")] = _scalar(value)
        i += 1
    return out


_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _scalar(text: str) -> Any:
    try:
        value = yaml.safe_load(text)
    except (yaml.YAMLError, ValueError, RecursionError):  # ValueError: an integer of over 4300 digits
        return text
    if isinstance(value, str) and _NUMBER.fullmatch(text.strip()):
        return float(text)  # YAML 1.1 reads "1e-3" as a string; --lr 1e-3 means a number
    return value if isinstance(value, (int, float, bool, type(None))) else text


# -- help ----------------------------------------------------------------------------------------------------
_FIELD_LINE = re.compile(r"^\s+(\w+): [^#]*?(?:#\s*(.*))?$")


def field_comments(cls: type) -> dict[str, str]:
    """Each field's comment in the source of ``cls`` and its dataclass bases: the one on the field's line, or
    the first line of those right above it (a subclass that redeclares a field without one keeps its base's)."""
    names = {f.name for f in dataclasses.fields(cls)}
    comments: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = inspect.getsource(klass).splitlines()
        except (OSError, TypeError):  # no source (a frozen install): flags, types and defaults only
            continue
        above: list[str] = []
        for line in source:
            text = line.strip()
            if text.startswith("#"):
                above.append(text.lstrip("#").strip())
                continue
            match = _FIELD_LINE.match(line)
            if match and match.group(1) in names and (match.group(2) or above):
                comments[match.group(1)] = match.group(2) or above[0]
            above = []
    return comments


def _default(field: dataclasses.Field) -> str:
    value = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
    if isinstance(value, enum.Enum):
        value = value.value
    return "none" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def fields_help(cls: type, skip: tuple[str, ...] = ()) -> str:
    """One line per field of the config dataclass ``cls``: ``--flag TYPE (default X)  comment``."""
    comments, hints = field_comments(cls), typing.get_type_hints(cls)
    lines = []
    for field in dataclasses.fields(cls):
        if field.name in skip:
            continue
        hint = hints[field.name]
        is_enum = isinstance(hint, type) and issubclass(hint, enum.Enum)
        kind = "{" + ",".join(str(m.value) for m in hint) + "}" if is_enum else str(field.type)
        comment = comments.get(field.name, "")
        lines.append(f"  --{field.name.replace('_', '-')} {kind} (default {_default(field)})  {comment}".rstrip())
    return "\n".join(lines)
