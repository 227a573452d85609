"""moekit's own byte and char tokenizers as Hugging Face ``tokenizer.json`` + ``tokenizer_config.json``.

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

from pathlib import Path

from moekit.data.tokenizers import TOKENIZER_FILE, ByteTokenizer, CharTokenizer, Tokenizer
from moekit.io.safe_io import atomic_write_bytes, atomic_write_json

TOKENIZER_CONFIG_FILE = "tokenizer_config.json"


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
