"""``moekit translate --checkpoint RUN (--text "..." | --input FILE [--output FILE]) [--beam N]``.

Translates with a model from ``moekit train --task translate``: greedy with ``--beam 1`` (the default),
beam search with a length penalty otherwise. ``--input`` reads one sentence per line (plain or .gz) and
writes one translation per line (an empty line stays empty); with ``--reference FILE`` it also reports
the corpus BLEU (sacrebleu). Translations go to stdout (or ``--output``), everything else to stderr.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from moekit.data.parallel import read_lines
from moekit.errors import ConfigError, DataError
from moekit.io.safe_io import atomic_write_text
from moekit.tasks.decoding import corpus_bleu
from moekit.tasks.decoding import translate as translate_sentences
from moekit.tasks.translate import load_translator


def add_parser(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser("translate", help="translate text with a trained translation model", description=__doc__)
    p.add_argument("--checkpoint", required=True, help="run folder of moekit train --task translate")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", action="append", help="a sentence to translate (repeatable)")
    source.add_argument("--input", help="file with one sentence per line (plain or .gz)")
    p.add_argument("--output", default=None, help="write the translations here (default: print them)")
    p.add_argument("--reference", default=None, help="reference translations of --input: print BLEU")
    p.add_argument("--beam", type=int, default=1, help="beam size (1 = greedy, the default)")
    p.add_argument("--length-penalty", type=float, default=0.6, help="GNMT length-penalty alpha for beam search")
    p.add_argument("--max-new-tokens", type=int, default=None, help="longest translation in tokens")
    p.add_argument("--batch-size", type=int, default=64, help="sentences decoded together")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.set_defaults(func=run)


def translate(
    checkpoint,
    text=None,
    input=None,
    output=None,
    reference=None,
    beam=1,
    length_penalty=0.6,
    max_new_tokens=None,
    batch_size=64,
    threads=None,
) -> dict:
    """Translate ``text`` (a sentence or a list) or the lines of ``input``; returns translations and BLEU."""
    import torch

    if beam < 1:
        raise ConfigError(f"--beam must be >= 1, got {beam}")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    if (text is None) == (input is None):
        raise ConfigError("give exactly one of text and input")
    if reference is not None and input is None:
        raise ConfigError("--reference goes with --input")
    if threads:
        torch.set_num_threads(threads)
    model, tokenizer = load_translator(checkpoint)
    sentences = [text] if isinstance(text, str) else list(text) if text is not None else read_lines(input, True)
    hyps = translate_sentences(model, tokenizer, sentences, beam, max_new_tokens, batch_size, length_penalty)
    bleu = None
    if reference is not None:
        refs = read_lines(reference, allow_empty_lines=True)
        if len(refs) != len(hyps):
            raise DataError(f"{input} has {len(hyps)} lines but {reference} has {len(refs)}")
        bleu = corpus_bleu(hyps, refs)
    if output is not None:
        atomic_write_text(Path(output), "".join(h + "\n" for h in hyps))
    return {"translations": hyps, "bleu": bleu}


def run(args: argparse.Namespace) -> int:
    result = translate(
        args.checkpoint,
        args.text,
        args.input,
        args.output,
        args.reference,
        args.beam,
        args.length_penalty,
        args.max_new_tokens,
        args.batch_size,
        args.threads,
    )
    if args.output is None:
        for line in result["translations"]:
            print(line)
    else:
        print(f"{len(result['translations'])} translations written to {args.output}", file=sys.stderr)
    if result["bleu"] is not None:
        print(f"BLEU {result['bleu']:.2f} ({'greedy' if args.beam == 1 else f'beam {args.beam}'})", file=sys.stderr)
    return 0
