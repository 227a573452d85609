"""A config's fields as ``--help`` lists them: flag, type, default and the comment on (or above) the field."""

from __future__ import annotations

import dataclasses
import enum
import inspect
import re
import typing

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
