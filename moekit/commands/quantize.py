"""``moekit quantize``: int8 / int4 experts (weight-only), optionally routing-aware, into a new checkpoint folder.

moekit quantize --checkpoint RUN | --model HF_DIR --bits 8|4 [--group-size 32|64|128] --out DIR
moekit quantize ... --calibration-data FILE [--fraction-8bit 0.25]   # most-routed experts keep 8 bits
moekit quantize ... --linear-bits 8   # attention projections and the output head too (decode reads fewer bytes)
"""

from __future__ import annotations

import argparse

from moekit.inference.model_options import add_dtype_option
from moekit.recipes.quantize import quantize


def add_parser(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser("quantize", help="quantise a model's experts to int8 / int4", description=__doc__)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="moekit checkpoint or run folder")
    source.add_argument(
        "--model", metavar="HF_DIR", help="Hugging Face model folder (read and quantised layer by layer)"
    )
    p.add_argument("--bits", type=int, default=8, choices=[4, 8], help="expert weight bits (default 8)")
    p.add_argument("--group-size", type=int, default=32, choices=[32, 64, 128], help="int4 group (default 32)")
    p.add_argument("--calibration-data", help="text: most-routed experts keep 8 bits, the others get 4")
    p.add_argument("--fraction-8bit", type=float, default=0.25, help="with calibration: share of experts at 8 bits")
    p.add_argument(
        "--linear-bits", type=int, choices=[4, 8], help="also quantise attention projections and the output head"
    )
    add_dtype_option(p)
    p.add_argument("--out", required=True, help="folder for the quantised checkpoint")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    report = quantize(
        args.out,
        checkpoint=args.checkpoint,
        hf_dir=args.model,
        bits=args.bits,
        group_size=args.group_size,
        calibration_data=args.calibration_data,
        fraction_8bit=args.fraction_8bit,
        dtype=args.dtype,
        linear_bits=args.linear_bits,
    )
    widths = [b for layer in report["spec"]["bits"].values() for b in layer]
    print(
        f"quantised {len(widths)} experts ({widths.count(8)} at 8 bits, {widths.count(4)} at 4 bits, "
        f"int4 group {report['spec']['group_size']}"
        + (f"; linears at {report['spec']['linear_bits']} bits" if "linear_bits" in report["spec"] else "")
        + f"): experts take {report['expert_bytes'] / 2**20:.1f} MiB; "
        f"wrote {report['checkpoint']}"
    )
    return 0
