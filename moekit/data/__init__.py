"""moekit.data: tokenizers, text loading, the built-in corpus and token batch loaders."""

from moekit.data.corpus import builtin_corpus
from moekit.data.loader import TokenDataset, TokenLoader, as_token_tensor, iter_eval_batches, split_tokens
from moekit.data.text import load_labeled_files, load_text
from moekit.data.tokenizers import (
    ByteTokenizer,
    CharTokenizer,
    HFTokenizer,
    Tokenizer,
    build_tokenizer,
    load_tokenizer,
    tokenizer_from_dict,
)

__all__ = [
    "ByteTokenizer",
    "CharTokenizer",
    "HFTokenizer",
    "TokenDataset",
    "TokenLoader",
    "Tokenizer",
    "as_token_tensor",
    "build_tokenizer",
    "builtin_corpus",
    "iter_eval_batches",
    "load_labeled_files",
    "load_text",
    "load_tokenizer",
    "split_tokens",
    "tokenizer_from_dict",
]
