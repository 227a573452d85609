"""The ``moekit`` command line: each verb maps to a plain Python function with the same arguments."""

from __future__ import annotations

import argparse
import sys

from moekit.errors import MoekitError


def _layer_demo(args: argparse.Namespace) -> int:
    import torch

    from moekit.nn import MoE, reference_moe

    torch.manual_seed(0)
    layer = MoE(hidden_size=64, num_experts=8, top_k=2, expert_hidden_size=128)
    x = torch.randn(4, 32, 64)
    y, aux = layer(x)
    diff = (y - reference_moe(layer, x)).abs().max().item()
    print(f"MoE layer: out {tuple(y.shape)}, aux loss {aux.loss.item():.4f}, max |fast - reference| = {diff:.2e}")
    print("tokens per expert:", aux.tokens_per_expert.tolist())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moekit", description="Mixture-of-Experts models on PyTorch.")
    verbs = parser.add_subparsers(dest="verb", required=True)
    demo = verbs.add_parser("demo", help="run the main demo")
    demo.set_defaults(func=_layer_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except MoekitError as err:
        print(f"moekit {args.verb}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
