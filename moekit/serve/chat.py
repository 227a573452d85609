"""Chat templates: a checkpoint's own Jinja ``chat_template`` rendered as transformers renders it (an immutable
sandboxed Jinja environment, ``trim_blocks``/``lstrip_blocks``, ``loopcontrols``, ``raise_exception``, ``tojson``,
``strftime_now``), or moekit's plain template for its own byte/char models:

    System: {content}
    User: {content}
    Assistant: {content}
    Assistant:

one ``Role: content`` line per message, then ``Assistant:`` to ask for the answer; with the plain template an answer
also ends where the model starts a new ``\\nUser:`` line.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

from moekit.errors import DataError

PLAIN_TEMPLATE = (
    "{% for message in messages %}{{ message.role | capitalize }}: {{ message.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
PLAIN_STOP = ("\nUser:",)


class ChatTemplate:
    """Turns OpenAI ``messages`` into the prompt text the model was trained on."""

    def __init__(self, source: str, special_tokens: dict[str, str] | None = None, stop: tuple[str, ...] = ()):
        from jinja2.exceptions import TemplateSyntaxError

        env = _environment()
        try:
            self._template = env.from_string(source)
        except TemplateSyntaxError as err:
            raise DataError(f"the chat template does not parse: {err}") from None
        self.special_tokens = special_tokens or {}
        self.stop = stop  # stop strings every chat answer gets (the plain template's next turn)
        self.is_plain = source == PLAIN_TEMPLATE

    def render(self, messages: list[dict[str, Any]]) -> str:
        """The prompt for ``messages`` with the assistant's turn opened; a template's own error is a ValueError."""
        from jinja2.exceptions import TemplateError

        try:
            return self._template.render(messages=messages, add_generation_prompt=True, **self.special_tokens)
        except TemplateError as err:
            raise ValueError(f"the chat template refused these messages: {err}") from None

    @classmethod
    def find(cls, folder: str | Path | None) -> ChatTemplate:
        """``folder``'s template (``chat_template.jinja``, else ``tokenizer_config.json``'s), else the plain one."""
        if folder is not None:
            root = Path(folder)
            root = root if root.is_dir() else root.parent
            config = _read_json(root / "tokenizer_config.json")
            tokens = {k: _token_text(config.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
            source = _template_source(root, config)
            if source:
                return cls(source, {k: v for k, v in tokens.items() if v is not None})
        return cls(PLAIN_TEMPLATE, stop=PLAIN_STOP)


def end_token_ids(folder: str | Path, eos_token_id: int | None) -> tuple[int, ...]:
    """The tokens that end an answer: the tokenizer's EOS and the ``eos_token_id`` (one or a list) of the
    folder's ``generation_config.json`` and ``config.json``, as transformers' generate stops on them."""
    root = Path(folder)
    root = root if root.is_dir() else root.parent
    ids = [] if eos_token_id is None else [eos_token_id]
    for name in ("generation_config.json", "config.json"):
        found = _read_json(root / name).get("eos_token_id")
        for token in found if isinstance(found, list) else [found]:
            if isinstance(token, int) and token not in ids:
                ids.append(token)
    return tuple(ids)


def _template_source(root: Path, config: dict[str, Any]) -> str | None:
    jinja_file = root / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: transformers uses "default"
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise DataError(f"{path} is not valid JSON: {err}") from None
    return data if isinstance(data, dict) else {}


def _token_text(token: Any) -> str | None:
    if isinstance(token, dict):
        token = token.get("content")
    return token if isinstance(token, str) else None


def _environment():
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        from jinja2.exceptions import TemplateError

        raise TemplateError(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env
