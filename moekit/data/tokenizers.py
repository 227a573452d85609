"""Tokenizers: UTF-8 bytes (the default), characters of a corpus, or a local Hugging Face ``tokenizer.json``.

All three share one small interface (:class:`Tokenizer`): ``encode(text) -> list[int]``,
``decode(ids) -> str``, ``vocab_size``, ``eos_token_id`` (may be None), ``to_dict()`` and ``save(dir)``.
``save`` writes ``dir/tokenizer.json``: a copy of the HF file, or a small moekit JSON
(``{"type": "byte" | "char", ...}``); :func:`load_tokenizer` tells them apart by content.
Nothing is ever downloaded.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from moekit.config import closest
from moekit.errors import ConfigError, DataError
from moekit.io.safe_io import atomic_write_bytes, atomic_write_json

__all__ = [
    "TOKENIZER_FILE",
    "ByteTokenizer",
    "CharTokenizer",
    "HFTokenizer",
    "Tokenizer",
    "build_tokenizer",
    "load_tokenizer",
    "tokenizer_from_dict",
]

TOKENIZER_FILE = "tokenizer.json"
KINDS = ("byte", "char")

# Special tokens tried, in order, when an HF tokenizer comes without a tokenizer_config.json naming its EOS.
_COMMON_EOS = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|eot_id|>", "<|im_end|>", "[SEP]")


def _check_ids(ids: Sequence[int], vocab_size: int, kind: str) -> list[int]:
    ids = [int(i) for i in ids]  # accept tensors / numpy ints
    for pos, i in enumerate(ids):
        if not 0 <= i < vocab_size:
            raise DataError(f"{kind} tokenizer: id {i} at position {pos} is outside the vocabulary [0, {vocab_size})")
    return ids


class Tokenizer:
    """The interface every moekit tokenizer implements."""

    kind: str = ""

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    @property
    def eos_token_id(self) -> int | None:
        return None

    def encode(self, text: str) -> list[int]:
        """Text -> token ids."""
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        """Token ids -> text."""
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly description; :func:`tokenizer_from_dict` rebuilds the tokenizer from it."""
        raise NotImplementedError

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``directory/tokenizer.json`` (atomically) and return its path."""
        path = Path(directory) / TOKENIZER_FILE
        atomic_write_json(path, {"moekit_tokenizer": 1, **self.to_dict()})
        return path

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size})"


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as tokens: vocabulary 256, no unknown tokens, works on any text.

    Decoding uses ``errors='replace'``: a model can emit byte sequences that are not valid UTF-8
    (e.g. half of a multi-byte character), and printing those must not crash.
    """

    kind = "byte"

    @property
    def vocab_size(self) -> int:
        return 256

    def encode(self, text: str) -> list[int]:
        """Text -> its UTF-8 bytes.

        Args:
            text: any string.

        Returns:
            One id (0..255) per byte.
        """
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        """Bytes -> text; invalid UTF-8 becomes U+FFFD. Ids outside 0..255 raise DataError."""
        return bytes(_check_ids(ids, 256, "byte")).decode("utf-8", errors="replace")

    def to_dict(self) -> dict[str, Any]:
        return {"type": "byte"}


class CharTokenizer(Tokenizer):
    """One token per distinct character of a corpus (nanoGPT's shakespeare_char), ids in sorted order.

    Args:
        chars: the vocabulary; sorted and de-duplicated here so equal sets give equal ids.
    """

    kind = "char"

    def __init__(self, chars: Sequence[str] | str):
        chars = sorted(set(chars))
        if not chars:
            raise DataError("char tokenizer: the vocabulary is empty (was the corpus empty?)")
        for c in chars:
            if not isinstance(c, str) or len(c) != 1:
                raise DataError(f"char tokenizer: vocabulary entry {c!r} is not a single character")
        self.chars: list[str] = chars
        self._stoi = {c: i for i, c in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        """Build the vocabulary from the distinct characters of ``text``."""
        if not text:
            raise DataError("char tokenizer: cannot build a vocabulary from empty text")
        return cls(set(text))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        """Text -> one id per character.

        Raises:
            DataError: a character is not in the vocabulary (names it and its position).
        """
        stoi = self._stoi
        try:
            return [stoi[c] for c in text]
        except KeyError:
            pass
        # Slow path only to build a helpful message.
        for pos, c in enumerate(text):
            if c not in stoi:
                raise DataError(
                    f"char tokenizer: character {c!r} (U+{ord(c):04X}) at position {pos} is not in the "
                    f"{len(self.chars)}-character vocabulary; build the tokenizer from a corpus that contains it "
                    f"or use the byte tokenizer"
                ) from None
        raise AssertionError("unreachable")

    def decode(self, ids: Sequence[int]) -> str:
        """Ids -> text. Ids outside the vocabulary raise DataError."""
        return "".join(self.chars[i] for i in _check_ids(ids, len(self.chars), "char"))

    def to_dict(self) -> dict[str, Any]:
        return {"type": "char", "chars": list(self.chars)}


class HFTokenizer(Tokenizer):
    """A local Hugging Face ``tokenizer.json`` loaded with the ``tokenizers`` library (never downloads).

    Args:
        path: a folder holding ``tokenizer.json`` or the file itself. A ``tokenizer_config.json`` beside it
            supplies the EOS token when present.
        add_special_tokens: let the tokenizer's post-processor add BOS/EOS on encode. Off by default: a
            training corpus is encoded in one go and must not get a BOS in the middle.
    """

    kind = "hf"

    def __init__(self, path: str | os.PathLike, add_special_tokens: bool = False):
        from tokenizers import Tokenizer as _HFTok

        p = Path(path)
        file = p / TOKENIZER_FILE if p.is_dir() else p
        if not file.is_file():
            raise DataError(f"no tokenizer file at {file}")
        try:
            self._tok = _HFTok.from_file(str(file))
        except Exception as e:  # the Rust side raises a plain Exception on malformed files
            raise DataError(f"{file} is not a valid Hugging Face tokenizer.json: {e}") from None
        self.path = file
        self.add_special_tokens = add_special_tokens
        self._config_file = file.parent / "tokenizer_config.json"
        self._eos = self._find_eos()

    def _find_eos(self) -> int | None:
        eos = None
        if self._config_file.is_file():
            try:
                eos = json.loads(self._config_file.read_text(encoding="utf-8")).get("eos_token")
            except (ValueError, AttributeError, OSError):
                eos = None  # a broken side file should not stop the tokenizer from working
            if isinstance(eos, dict):
                eos = eos.get("content")
        candidates = [eos] if isinstance(eos, str) else list(_COMMON_EOS)
        for token in candidates:
            tid = self._tok.token_to_id(token)
            if tid is not None:
                return tid
        return None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def eos_token_id(self) -> int | None:
        return self._eos

    def encode(self, text: str) -> list[int]:
        """Text -> ids with the HF tokenizer."""
        return self._tok.encode(text, add_special_tokens=self.add_special_tokens).ids

    def decode(self, ids: Sequence[int]) -> str:
        """Ids -> text (special tokens kept, so decode(encode(x)) round-trips)."""
        return self._tok.decode(_check_ids(ids, self.vocab_size, "hf"), skip_special_tokens=False)

    def to_dict(self) -> dict[str, Any]:
        data = self.path.read_bytes()
        return {
            "type": "hf",
            "path": str(self.path),
            "sha256": hashlib.sha256(data).hexdigest(),
            "vocab_size": self.vocab_size,
            "eos_token_id": self.eos_token_id,
            "add_special_tokens": self.add_special_tokens,
        }

    def save(self, directory: str | os.PathLike) -> Path:
        """Copy ``tokenizer.json`` (and ``tokenizer_config.json`` if any) into ``directory``."""
        out = Path(directory) / TOKENIZER_FILE
        if out.resolve() != self.path.resolve():
            atomic_write_bytes(out, self.path.read_bytes())
        if self._config_file.is_file():
            cfg_out = out.parent / self._config_file.name
            if cfg_out.resolve() != self._config_file.resolve():
                atomic_write_bytes(cfg_out, self._config_file.read_bytes())
        return out

    def __repr__(self) -> str:
        return f"HFTokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


def tokenizer_from_dict(data: dict[str, Any]) -> Tokenizer:
    """Rebuild a tokenizer from :meth:`Tokenizer.to_dict` output.

    Args:
        data: ``{"type": "byte"}``, ``{"type": "char", "chars": [...]}`` or ``{"type": "hf", "path": ...}``.

    Returns:
        The tokenizer.
    """
    kind = data.get("type") if isinstance(data, dict) else None
    if kind == "byte":
        return ByteTokenizer()
    if kind == "char":
        chars = data.get("chars")
        if not isinstance(chars, (list, str)):
            raise DataError(f"char tokenizer description needs a 'chars' list, got {chars!r}")
        return CharTokenizer(chars)
    if kind == "hf":
        return HFTokenizer(data["path"], add_special_tokens=bool(data.get("add_special_tokens", False)))
    raise ConfigError(f"unknown tokenizer type {kind!r}; expected one of byte, char, hf")


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load what :meth:`Tokenizer.save` wrote, or any local HF ``tokenizer.json``.

    Args:
        path: a folder holding ``tokenizer.json``, or the file itself.

    Returns:
        ByteTokenizer / CharTokenizer for moekit files, HFTokenizer for Hugging Face files.

    Raises:
        DataError: the file is missing, not JSON, or neither kind.
    """
    p = Path(path)
    file = p / TOKENIZER_FILE if p.is_dir() else p
    if not file.is_file():
        raise DataError(f"no tokenizer file at {file}")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise DataError(f"{file} is not valid JSON: {e}") from None
    if isinstance(data, dict) and data.get("type") in KINDS:
        return tokenizer_from_dict(data)
    # An HF tokenizer.json always has a "model" object (BPE, WordPiece, Unigram, WordLevel).
    if isinstance(data, dict) and isinstance(data.get("model"), dict):
        return HFTokenizer(file)
    raise DataError(
        f"{file} is neither a moekit tokenizer ({{'type': 'byte'|'char'}}) nor a Hugging Face tokenizer.json"
    )


def build_tokenizer(kind: str | os.PathLike, text: str | None = None) -> Tokenizer:
    """Make a tokenizer from a name or a path.

    Args:
        kind: ``"byte"``, ``"char"`` (needs ``text``), or a path to a folder/file with ``tokenizer.json``.
        text: the corpus a char tokenizer takes its vocabulary from.

    Returns:
        The tokenizer.

    Raises:
        ConfigError: an unknown kind (suggesting the closest), or ``"char"`` without text.
    """
    if isinstance(kind, str) and kind in KINDS:
        if kind == "byte":
            return ByteTokenizer()
        if text is None:
            raise ConfigError("tokenizer='char' builds its vocabulary from the corpus; pass text=")
        return CharTokenizer.from_text(text)
    if Path(kind).exists():
        return load_tokenizer(kind)
    hint = closest(str(kind), KINDS)
    extra = f"; did you mean {hint!r}?" if hint else ""
    raise ConfigError(
        f"tokenizer={str(kind)!r} is neither one of {list(KINDS)} nor an existing path to a tokenizer.json{extra}"
    )
