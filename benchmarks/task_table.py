"""What every task benchmark shares: ``--set`` options, and the markdown table (and JSON) of its runs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def parse_sets(items: list[str]) -> dict:
    """``key=value`` options (``model.moe.top_k=2 batch_tokens=1024``) with JSON values where they parse."""
    extra = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            extra[key] = json.loads(value)
        except ValueError:
            extra[key] = value
    return extra


def write_table(args, task: str, data_line: str, columns: list[tuple[str, str, str]], rows: list[dict]) -> None:
    """Write ``args.out`` (markdown) and ``args.json``: a heading naming the budget and threads, the data and
    the command, then one row per model with ``columns`` as (header, row key, format spec)."""
    side_by_side = ", side by side on one core each" if args.parallel else ""
    lines = [
        f"# {task}: MoE vs dense (equal active parameters, {args.budget} each, {args.threads} thread(s){side_by_side})",
        "",
        f"{data_line}; torch {torch.__version__}; command: `python {' '.join(sys.argv)}`",
        "",
        "| model | " + " | ".join(header for header, _, _ in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for r in rows:
        lines.append(f"| {r['model']} | " + " | ".join(format(r[key], spec) for _, key, spec in columns) + " |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n", encoding="utf-8")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2), encoding="utf-8")
