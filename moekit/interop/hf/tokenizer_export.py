"""An export's tokenizer: a Hugging Face folder's tokenizer files copied along, and moekit's own byte and char
tokenizers written as Hugging Face ``tokenizer.json`` + ``tokenizer_config.json``.

Built with the ``tokenizers`` library so that ``transformers.AutoTokenizer.from_pretrained`` of an export
gives the same ids as moekit's tokenizer, both ways, with no special tokens (none is added on encode, and
the vocabulary stays the model's):

* byte: a byte-level BPE without merges; its 256 tokens are GPT-2's printable stand-ins for the bytes,
  listed so that token id == byte value. Decoding turns invalid UTF-8 into U+FFFD, as moekit does.
* char: a word-level model over the corpus's characters (id order kept), a pre-tokenizer that isolates
  every character and a decoder that joins them back without spaces. An unknown character is an error
  in both (moekit has no unknown token to map it to).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from moekit.data.tokenizers import TOKENIZER_FILE, ByteTokenizer, CharTokenizer, HFTokenizer, Tokenizer, load_tokenizer
from moekit.errors import DataError
from moekit.io.safe_io import atomic_write_bytes, atomic_write_json
from moekit.models import MoELM

logger = logging.getLogger(__name__)

TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
# Files carried along with the weights: the tokenizer in its every form, plus generation defaults.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


def byte_stand_ins() -> list[str]:
    """The printable character that stands for each byte 0..255 in a byte-level BPE vocabulary (GPT-2's rule:
    printable Latin-1 bytes stand for themselves, the others take the code points from 256 up, in order)."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    out, spare = [], 256
    for b in range(256):
        if b in printable:
            out.append(chr(b))
        else:
            out.append(chr(spare))
            spare += 1
    return out


def _byte_tokenizer():
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    vocab = {char: byte for byte, char in enumerate(byte_stand_ins())}
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def _char_tokenizer(chars: list[str]):
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    tok = HFTokenizer(models.WordLevel(vocab={c: i for i, c in enumerate(chars)}, unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return tok


def has_hf_form(tokenizer: Tokenizer) -> bool:
    """True for the tokenizers :func:`save_hf_tokenizer` writes (moekit's byte and char ones)."""
    return isinstance(tokenizer, (ByteTokenizer, CharTokenizer))


def save_hf_tokenizer(tokenizer: ByteTokenizer | CharTokenizer, folder: str | Path, max_length: int) -> Path:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` for ``tokenizer`` into ``folder``; returns the first.

    Args:
        tokenizer: moekit's byte or char tokenizer.
        folder: the export folder.
        max_length: the model's context (``model_max_length``).
    """
    out = Path(folder)
    hf = _byte_tokenizer() if isinstance(tokenizer, ByteTokenizer) else _char_tokenizer(tokenizer.chars)
    atomic_write_bytes(out / TOKENIZER_FILE, hf.to_str(pretty=True).encode("utf-8"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": max_length,
        "clean_up_tokenization_spaces": False,
        "add_bos_token": False,
        "add_eos_token": False,
        "bos_token": None,
        "eos_token": None,
        "pad_token": None,
        "unk_token": None,
    }
    atomic_write_json(out / TOKENIZER_CONFIG_FILE, config)
    return out / TOKENIZER_FILE


def _is_hf_tokenizer_file(file: Path) -> bool:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(data, dict) and isinstance(data.get("model"), dict)


def copy_tokenizer_files(source: Path, out: Path, skip: tuple[str, ...] = ()) -> list[str]:
    """Copy the tokenizer (and generation config) files of ``source`` into ``out``, but those named in ``skip``;
    returns their names."""
    copied = []
    for name in TOKENIZER_FILES:
        file = source / name
        if name in skip or not file.is_file() or (out / name).resolve() == file.resolve():
            continue
        if name == TOKENIZER_FILE and not _is_hf_tokenizer_file(file):
            logger.warning("%s is a moekit byte/char tokenizer, not a Hugging Face one; not copied", file)
            continue
        atomic_write_bytes(out / name, file.read_bytes())
        copied.append(name)
    return copied


def carry_tokenizer(model: MoELM, tokenizer, out: Path) -> None:
    """Put the model's tokenizer into the export in Hugging Face form (see ``to_hf``'s ``tokenizer``)."""
    if tokenizer is None:
        source = getattr(model, "_hf_source", None)
        if isinstance(source, Path) and source.is_dir():
            copy_tokenizer_files(source, out)
        return
    if not isinstance(tokenizer, Tokenizer):
        folder = Path(tokenizer)
        if not folder.is_dir():
            raise DataError(f"tokenizer={str(folder)!r} is not a folder with tokenizer files")
        if not (folder / TOKENIZER_FILE).is_file() or _is_hf_tokenizer_file(folder / TOKENIZER_FILE):
            copy_tokenizer_files(folder, out)
            return
        copy_tokenizer_files(folder, out, skip=(TOKENIZER_FILE, TOKENIZER_CONFIG_FILE))  # generation config...
        tokenizer = load_tokenizer(folder)  # moekit's own byte/char tokenizer: written in HF form below
    if isinstance(tokenizer, HFTokenizer):
        copy_tokenizer_files(tokenizer.path.parent, out)
        tokenizer.save(out)
    elif has_hf_form(tokenizer):
        save_hf_tokenizer(tokenizer, out, max_length=model.config.max_position_embeddings)
    else:
        logger.warning("the %s tokenizer has no Hugging Face form; the export carries no tokenizer", tokenizer.kind)
