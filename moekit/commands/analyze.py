"""``moekit analyze --checkpoint DIR --data FILE|DIR [...] --out DIR``: routing statistics, expert
specialisation and a self-contained HTML report (report.html + stats.json + PNG plots).

Labels (``--labels``): ``file`` = one label per data file or per entry of a data folder (its
sub-folder or file name; ``name=PATH`` chooses the name); ``category`` = the token's category
(letters, digits, punctuation, whitespace, other); ``none``; ``auto`` (default) = ``file`` when
there are several sources, else ``category``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from moekit.analysis.pipeline import analyze
from moekit.analysis.sources import LABEL_MODES
from moekit.inference.model_options import add_dtype_option
from moekit.io.folders import check_output_folder
from moekit.recipes.esft import SELECTION_FILE, read_selection_record


def add_parser(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser(
        "analyze",
        help="routing statistics, expert specialisation and an HTML report",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", metavar="DIR", help="moekit checkpoint or run folder")
    p.add_argument("--model", metavar="HF_DIR", help="a Hugging Face model folder or .gguf file (not --checkpoint)")
    add_dtype_option(p)
    p.add_argument("--data", required=True, nargs="+", help="text files or folders; NAME=PATH names a source")
    p.add_argument("--labels", choices=LABEL_MODES, default="auto", help="what to measure specialisation against")
    p.add_argument("--compare", metavar="CKPT2", help="a second checkpoint: routing drift between the two")
    p.add_argument(
        "--esft-selection",
        metavar="FILE",
        help=f"an ESFT selection to show (default: the checkpoint folder's {SELECTION_FILE}, if any)",
    )
    p.add_argument("--max-tokens", type=int, default=65536, help="tokens to analyse, split evenly over sources")
    p.add_argument("--block-size", type=int, default=None, help="window length (default: 256, capped by context)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--view-tokens", type=int, default=240, help="tokens per source in the coloured text view")
    p.add_argument("--metrics", help="metrics.jsonl or run folder for the training plot (default: the run's)")
    p.add_argument("--raw-traces", action="store_true", help="also write per-token traces (safetensors + JSON)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--overwrite", action="store_true", help="write into --out even if it is not empty")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    check_output_folder(args.out, args.overwrite)
    selection = args.esft_selection
    if selection is None and args.checkpoint and (Path(args.checkpoint) / SELECTION_FILE).is_file():
        selection = Path(args.checkpoint) / SELECTION_FILE  # a `moekit finetune --method esft` run
    result = analyze(
        checkpoint=args.checkpoint,
        data=args.data,
        out=args.out,
        labels=args.labels,
        compare=args.compare,
        max_tokens=args.max_tokens,
        raw_traces=args.raw_traces,
        model=args.model,
        block_size=args.block_size,
        batch_size=args.batch_size,
        view_tokens=args.view_tokens,
        metrics=args.metrics,
        device=args.device,
        dtype=args.dtype,
        console=Console(stderr=True),
        esft_selection=read_selection_record(selection) if selection is not None else None,
    )
    print(f"analysed {result.summary['tokens']:,} tokens in {len(result.summary['layers'])} MoE layers")
    for line in result.summary["readings"]["overview"]:
        print(f"- {line}")
    print(f"report: {result.report}")
    print(f"stats:  {result.stats}")
    if result.traces is not None:
        print(f"traces: {result.traces}")
    return 0
