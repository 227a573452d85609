"""The ``moekit`` command line: each verb maps to a plain Python function with the same arguments."""

from __future__ import annotations

import argparse
import logging
import sys

from moekit.commands import (
    analyze,
    compress,
    convert,
    demo,
    distill,
    evaluate,
    finetune,
    generate,
    mix,
    predict,
    quantize,
    serve,
    train,
    translate,
    upcycle,
)
from moekit.errors import MoekitError, TrainingInterrupted

VERBS = (
    train, finetune, evaluate, generate, demo, analyze, distill, compress, quantize, convert, upcycle, mix, predict,
    translate, serve,
)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moekit", description="Mixture-of-Experts models on PyTorch.")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for module in VERBS:
        module.add_parser(verbs)
    for sub in verbs.choices.values():  # help texts come from docstrings: show ``code`` as plain code
        # Where any --key is a config field, an abbreviation must not swallow one (mix's --seed is not --seed-model).
        sub.allow_abbrev = not sub.get_default("free_options")
        sub.description = _plain(sub.description)
        for action in sub._actions:
            action.help = _plain(action.help)
    return parser


def _plain(text: str | None) -> str | None:
    return text.replace("``", "") if text else text


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "free_options", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    try:
        return args.func(args)
    except TrainingInterrupted as err:
        print(f"moekit {args.verb}: {err}", file=sys.stderr)
        return 130
    except MoekitError as err:
        print(f"moekit {args.verb}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # outside a training loop: nothing was being saved
        print(f"moekit {args.verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
