"""``moekit generate --checkpoint DIR --prompt TEXT``: stream a continuation to the terminal.

``--model HF_DIR`` reads a Hugging Face model folder (config.json, safetensors, tokenizer.json) or a llama.cpp
``.gguf`` file instead; ``--dtype`` casts the weights, ``--expert-memory`` offloads the experts.
"""

from __future__ import annotations

import argparse
import sys

from moekit.inference.generate import stream_text
from moekit.inference.model_options import add_model_options, load_model_of
from moekit.nn.offload import offload_stats


def add_parser(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser("generate", help="generate text from a checkpoint", description=__doc__)
    add_model_options(p)
    p.add_argument("--prompt", default="\n", help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--stop", action="append", default=[], help="stop when this text appears (repeatable)")
    p.add_argument("--seed", type=int, default=None)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    model, tokenizer = load_model_of(args)
    pieces = stream_text(
        model,
        tokenizer,
        args.prompt,
        stop=args.stop,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
    )
    # The first piece checks the options and the prompt: an error then comes before the echoed prompt, on its own line.
    sys.stdout.write(args.prompt + next(pieces, ""))
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    stats = offload_stats(model)
    if stats is not None:
        print(stats.summary(), file=sys.stderr)
    return 0
