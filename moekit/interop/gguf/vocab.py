"""A GGUF file's vocabulary as a Hugging Face ``tokenizer.json`` (what moekit's HFTokenizer loads).

llama.cpp keeps the tokenizer in metadata: ``tokenizer.ggml.model`` names the algorithm, ``tokens`` the pieces by
id, ``token_type`` their kind (1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte), and then

* ``gpt2``: byte-level BPE with ``merges`` ("a b" strings, by rank); ``tokenizer.ggml.pre`` names the
  pre-tokenizer regex llama.cpp splits text with before BPE (only the ones written out below are supported:
  a wrong regex gives wrong ids, so others are refused);
* ``llama``: SentencePiece-style BPE with ``scores``: the adjacent pair whose concatenation is a piece with the
  highest score merges first, spaces become U+2581 with one prepended (``add_space_prefix``, default on), and
  characters with no piece fall back to ``<0xNN>`` byte pieces. As transformers does for SentencePiece models,
  the merges are derived from the pieces, ranked by the merged piece's score.

Control tokens become special added tokens (kept whole when decoding), user-defined ones plain added tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moekit.errors import CheckpointError, DataError
from moekit.interop.gguf.reader import GGUFFile
from moekit.io.safe_io import atomic_write_json

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPACE = "\u2581"

# llama.cpp's pre-tokenizer regexes (by ``tokenizer.ggml.pre``) and whether whole words in the vocabulary skip BPE.
_QWEN2_REGEX = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_REGEX = _QWEN2_REGEX.replace(r"\p{L}+|\p{N}|", r"\p{L}+|\p{N}{1,3}|")
_PRE_TOKENIZERS: dict[str, tuple[str | None, bool]] = {
    "qwen2": (_QWEN2_REGEX, False),
    "llama-bpe": (_LLAMA3_REGEX, True),
    "llama3": (_LLAMA3_REGEX, True),
    "gpt-2": (None, False),  # GPT-2's own regex, built into the ByteLevel pre-tokenizer
}


def tokenizer_json_from_gguf(gg: GGUFFile) -> dict[str, Any]:
    """The ``tokenizer.json`` dict equivalent to the GGUF's vocabulary (DataError when it cannot be expressed)."""
    model = gg.meta("tokenizer.ggml.model", None)
    tokens = gg.meta("tokenizer.ggml.tokens", None)
    if model is None or not tokens:
        raise DataError(f"{gg.path} has no tokenizer (tokenizer.ggml.model / tokens); moekit needs one for text")
    types = gg.meta_array("tokenizer.ggml.token_type")
    kinds = [NORMAL] * len(tokens) if types is None else [int(t) for t in types]
    if len(kinds) != len(tokens):
        raise CheckpointError(f"{gg.path}: tokenizer.ggml.token_type has {len(kinds)} entries for {len(tokens)} tokens")
    if model == "gpt2":
        data = _byte_level_bpe(gg, tokens)
    elif model == "llama":
        data = _sentencepiece_bpe(gg, tokens, kinds)
    else:
        raise DataError(f"{gg.path}: tokenizer.ggml.model={model!r} is not supported (moekit reads gpt2 and llama)")
    data["added_tokens"] = [
        {
            "id": i,
            "content": tok,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": kind == CONTROL,
        }
        for i, (tok, kind) in enumerate(zip(tokens, kinds))
        if kind in (CONTROL, USER_DEFINED)
    ]
    return {"version": "1.0", "truncation": None, "padding": None, "post_processor": None, **data}


def _vocab(tokens: list[str]) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        vocab.setdefault(tok, i)  # a repeated piece keeps its first id, as llama.cpp's text -> id map does
    return vocab


def _bpe_model(vocab: dict[str, int], merges: list[list[str]], **extra: Any) -> dict[str, Any]:
    return {
        "type": "BPE",
        "dropout": None,
        "unk_token": None,
        "continuing_subword_prefix": None,
        "end_of_word_suffix": None,
        "fuse_unk": False,
        "byte_fallback": False,
        "ignore_merges": False,
        "vocab": vocab,
        "merges": merges,
        **extra,
    }


def _byte_level_bpe(gg: GGUFFile, tokens: list[str]) -> dict[str, Any]:
    pre = gg.meta("tokenizer.ggml.pre", "gpt-2")
    if pre not in _PRE_TOKENIZERS:
        raise DataError(
            f"{gg.path}: tokenizer.ggml.pre={pre!r} is not supported (moekit knows {', '.join(_PRE_TOKENIZERS)}); "
            "its ids would differ from llama.cpp's"
        )
    regex, ignore_merges = _PRE_TOKENIZERS[pre]
    merges = [m.split(" ", 1) for m in gg.meta("tokenizer.ggml.merges", [])]
    if any(len(m) != 2 for m in merges):
        raise CheckpointError(f"{gg.path}: tokenizer.ggml.merges holds an entry that is not 'left right'")
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": regex is None}
    if regex is None:
        pre_tokenizer: dict[str, Any] = byte_level
    else:
        split = {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}
        pre_tokenizer = {"type": "Sequence", "pretokenizers": [split, byte_level]}
    return {
        "normalizer": None,
        "pre_tokenizer": pre_tokenizer,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "model": _bpe_model(_vocab(tokens), merges, ignore_merges=ignore_merges),
    }


def _sentencepiece_bpe(gg: GGUFFile, tokens: list[str], kinds: list[int]) -> dict[str, Any]:
    scores = gg.meta_array("tokenizer.ggml.scores")
    if scores is None or len(scores) != len(tokens):
        raise CheckpointError(f"{gg.path}: a llama (SentencePiece) vocabulary needs one score per token")
    vocab = _vocab(tokens)
    ranked = []
    for tok, i in vocab.items():
        if kinds[i] not in (NORMAL, USER_DEFINED) or len(tok) < 2:
            continue
        for cut in range(1, len(tok)):
            left, right = tok[:cut], tok[cut:]
            if left in vocab and right in vocab:
                ranked.append((-float(scores[i]), i, vocab[left], vocab[right], left, right))
    merges = [[left, right] for *_, left, right in sorted(ranked)]
    unk_id = gg.meta("tokenizer.ggml.unknown_token_id", None)
    unk = tokens[int(unk_id)] if unk_id is not None and 0 <= int(unk_id) < len(tokens) else None
    prefix = bool(gg.meta("tokenizer.ggml.add_space_prefix", True))
    escape = {"type": "Replace", "pattern": {"String": " "}, "content": SPACE}
    normalizers = ([{"type": "Prepend", "prepend": SPACE}] if prefix else []) + [escape]
    decoders: list[dict[str, Any]] = [
        {"type": "Replace", "pattern": {"String": SPACE}, "content": " "},
        {"type": "ByteFallback"},
        {"type": "Fuse"},
    ]
    if prefix:
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    return {
        "normalizer": {"type": "Sequence", "normalizers": normalizers},
        "pre_tokenizer": None,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": _bpe_model(vocab, merges, unk_token=unk, byte_fallback=True),
    }


def write_tokenizer(gg: GGUFFile, folder: str | Path) -> Path:
    """Write ``tokenizer.json`` and a ``tokenizer_config.json`` naming BOS/EOS (and the file's chat template, if any)
    into ``folder``; returns the folder."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    data = tokenizer_json_from_gguf(gg)
    atomic_write_json(out / "tokenizer.json", data)
    tokens = gg.meta("tokenizer.ggml.tokens")
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "source": f"GGUF {gg.path.name}"}
    for token in ("bos", "eos"):
        tid = gg.meta(f"tokenizer.ggml.{token}_token_id", None)
        if tid is not None and 0 <= int(tid) < len(tokens):
            config[f"{token}_token"] = tokens[int(tid)]
    template = gg.meta("tokenizer.chat_template", None)
    if isinstance(template, str):  # what `moekit serve` answers chats with
        config["chat_template"] = template
    atomic_write_json(out / "tokenizer_config.json", config)
    return out
