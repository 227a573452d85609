"""``moekit upcycle --from DENSE --num-experts E --top-k K [...] --out DIR``: dense model -> MoE."""

from __future__ import annotations

import argparse

from moekit.checkpoint import save_checkpoint
from moekit.io.folders import check_output_folder
from moekit.recipes.btx import load_dense
from moekit.recipes.upcycle import upcycle


def add_parser(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser("upcycle", help="turn a dense model into an MoE (sparse upcycling)", description=__doc__)
    p.add_argument(
        "--from", dest="source", required=True, help="moekit dense checkpoint or HF llama/mistral/qwen folder"
    )
    p.add_argument("--num-experts", type=int, required=True)
    p.add_argument("--top-k", type=int, required=True)
    p.add_argument("--granularity", type=int, default=1, help="split the FFN into G finer experts")
    p.add_argument("--noise", type=float, default=0.0, help="relative noise on expert weights (0 = exact)")
    p.add_argument("--shared-experts", type=int, default=0)
    p.add_argument("--shared-expert-gate", action="store_true", help="Qwen2-MoE sigmoid gate on the shared experts")
    p.add_argument("--reinit-fraction", type=float, default=0.0, help="Drop-Upcycling: neurons re-initialised")
    p.add_argument("--router", default="softmax_topk", choices=["softmax_topk", "sigmoid_topk"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output folder (a moekit checkpoint that moekit.load reads)")
    p.add_argument("--overwrite", action="store_true", help="write into --out even if it is not empty")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    check_output_folder(args.out, args.overwrite)
    dense, tokenizer = load_dense(args.source)
    model = upcycle(
        dense,
        args.num_experts,
        args.top_k,
        args.granularity,
        args.noise,
        args.shared_experts,
        args.reinit_fraction,
        args.router,
        args.seed,
        shared_expert_gate=args.shared_expert_gate,
    )
    path = save_checkpoint(args.out, 0, model, tokenizer)
    counts = model.num_parameters()
    print(f"upcycled {args.source} -> {path} ({counts['total']:,} parameters, {counts['active']:,} active)")
    return 0
