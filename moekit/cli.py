"""The ``moekit`` command line: each verb maps to a plain Python function with the same arguments."""

from __future__ import annotations

import argparse
import logging
import sys

from moekit.commands import analyze, convert, demo, evaluate, generate
from moekit.commands import distill as distill_command
from moekit.commands import merge as merge_command
from moekit.commands import mix as mix_command
from moekit.commands import predict as predict_command
from moekit.commands import prune as prune_command
from moekit.commands import train as train_command
from moekit.commands import translate as translate_command
from moekit.commands import upcycle as upcycle_command
from moekit.errors import MoekitError

VERBS = (
    train_command,
    evaluate,
    generate,
    demo,
    analyze,
    distill_command,
    prune_command,
    merge_command,
    convert,
    upcycle_command,
    mix_command,
    predict_command,
    translate_command,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moekit", description="Mixture-of-Experts models on PyTorch.")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for module in VERBS:
        module.add_parser(verbs)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "free_options", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    try:
        return args.func(args)
    except MoekitError as err:
        print(f"moekit {args.verb}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"moekit {args.verb}: interrupted; the last checkpoint is intact", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
