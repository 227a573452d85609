"""A joint byte-level BPE subword tokenizer for translation, trained on the source and target sentences together.

Byte-level BPE (GPT-2's scheme, Radford et al. 2019; BPE for translation: Sennrich et al. 2016) has no
unknown tokens, and decoding gives back the exact text. One vocabulary serves both languages, so the
encoder, the decoder and the output layer can share one embedding matrix (Press & Wolf 2017).
Built on Hugging Face ``tokenizers``; saved as a standard ``tokenizer.json`` beside the model.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from moekit.data.tokenizers import TOKENIZER_FILE
from moekit.errors import DataError
from moekit.io.safe_io import atomic_write_text

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3


class SubwordTokenizer:
    """Text <-> subword ids, with ``<pad>`` = 0, ``<s>`` = 1, ``</s>`` = 2, ``<unk>`` = 3.

    ``encode`` returns the subwords only (no BOS/EOS); ``decode`` stops at the first EOS and drops the
    other special tokens.
    """

    pad_id, bos_id, eos_id = PAD_ID, BOS_ID, EOS_ID

    def __init__(self, tokenizer):
        self._tok = tokenizer
        for i, token in enumerate(SPECIAL_TOKENS):
            if tokenizer.token_to_id(token) != i:
                raise DataError(f"tokenizer: special token {token!r} must have id {i}")

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 8000, min_frequency: int = 2) -> SubwordTokenizer:
        """Learn the merges from ``texts`` (for translation: every source and target sentence).

        Args:
            texts: the training sentences.
            vocab_size: at most this many tokens (256 bytes + 4 specials + merges); fewer when the text
                runs out of pairs seen ``min_frequency`` times.
            min_frequency: a pair must occur this often to be merged.
        """
        from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

        if vocab_size < 256 + len(SPECIAL_TOKENS):
            raise DataError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)} (bytes + specials)")
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.normalizer = normalizers.NFC()
        # add_prefix_space: a word gets the same tokens at the start of a sentence as in the middle.
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    @classmethod
    def load(cls, path: str | os.PathLike) -> SubwordTokenizer:
        """From a ``tokenizer.json`` or the folder holding it."""
        from tokenizers import Tokenizer

        p = Path(path)
        file = p / TOKENIZER_FILE if p.is_dir() else p
        if not file.is_file():
            raise DataError(f"no tokenizer file at {file}")
        try:
            return cls(Tokenizer.from_file(str(file)))
        except Exception as e:  # the Rust side raises a plain Exception on malformed files
            if isinstance(e, DataError):
                raise
            raise DataError(f"{file} is not a valid tokenizer.json: {e}") from None

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``directory/tokenizer.json`` atomically; returns its path."""
        path = Path(directory) / TOKENIZER_FILE
        atomic_write_text(path, self._tok.to_str())
        return path

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        """Ids up to the first EOS -> text, special tokens dropped."""
        kept = []
        for i in ids:
            i = int(i)
            if i == EOS_ID:
                break
            if i >= len(SPECIAL_TOKENS):
                kept.append(i)
        return self._tok.decode(kept).strip()

    def __repr__(self) -> str:
        return f"SubwordTokenizer(vocab_size={self.vocab_size})"
