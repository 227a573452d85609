"""The OpenAI wire format: error objects, usage, logprobs, and the response and chunk bodies of both routes."""

from __future__ import annotations

import time
import uuid
from typing import Any

from moekit.data.tokenizers import Tokenizer
from moekit.serve.sampling import TokenChoice

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "server_error",
    504: "server_error",
}


class APIError(Exception):
    """An error the client gets as ``{"error": {...}}`` with ``status``."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    def body(self) -> dict[str, Any]:
        """The OpenAI error object."""
        kind = ERROR_TYPES.get(self.status, "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def new_id(prefix: str) -> str:
    """A response id (one per response: every chunk of a stream carries it)."""
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """The ``usage`` object."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def envelope(response_id: str, kind: str, model: str, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """The fields every response and chunk shares."""
    return {"id": response_id, "object": kind, "created": int(time.time()), "model": model, "choices": choices, **extra}


def token_text(tokenizer: Tokenizer, token_id: int) -> str:
    """A token's text; ``token_id:N`` for a token that is not text on its own (one byte of a longer character),
    so that distinct tokens never share a key in ``top_logprobs``."""
    text = tokenizer.decode([token_id])
    return f"token_id:{token_id}" if "\ufffd" in text else text


def completion_logprobs(tokenizer: Tokenizer, tokens: list[TokenChoice], offset: int) -> dict[str, Any]:
    """Completions-style logprobs of ``tokens``; ``offset``: characters of text before the first one."""
    texts = [token_text(tokenizer, t.token_id) for t in tokens]
    offsets = []
    for text in texts:
        offsets.append(offset)
        offset += len(text)
    return {
        "tokens": texts,
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [
            None if t.top_logprobs is None else {token_text(tokenizer, i): lp for i, lp in t.top_logprobs}
            for t in tokens
        ],
        "text_offset": offsets,
    }


def chat_logprobs(tokenizer: Tokenizer, tokens: list[TokenChoice]) -> dict[str, Any]:
    """Chat-style logprobs (``{"content": [...]}``) of ``tokens``."""

    def entry(token_id: int, logprob: float | None) -> dict[str, Any]:
        text = token_text(tokenizer, token_id)
        raw = None if text.startswith("token_id:") else list(text.encode("utf-8"))
        return {"token": text, "logprob": logprob, "bytes": raw}

    content = []
    for t in tokens:
        item = entry(t.token_id, t.logprob)
        item["top_logprobs"] = [entry(i, lp) for i, lp in (t.top_logprobs or [])]
        content.append(item)
    return {"content": content}


def routed_experts(tokens: list[TokenChoice]) -> list[list[list[int]]]:
    """The MoE extension: [tokens, layers, top_k] experts of ``tokens``."""
    return [t.experts or [] for t in tokens]
