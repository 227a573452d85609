"""``moekit analyze --checkpoint DIR --data FILE|DIR [...] --out DIR``: routing statistics, expert
specialisation and a self-contained HTML report (report.html + stats.json + PNG plots).

Labels (``--labels``): ``file`` = one label per data file or per entry of a data folder (its
sub-folder or file name; ``name=PATH`` chooses the name); ``category`` = the token's category
(letters, digits, punctuation, whitespace, other); ``none``; ``auto`` (default) = ``file`` when
there are several sources, else ``category``.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from moekit.data.text import load_labeled_files, load_text
from moekit.errors import ConfigError, DataError

log = logging.getLogger(__name__)

LABEL_MODES = ("auto", "file", "category", "none")


def _hf_available() -> bool:
    try:
        return importlib.util.find_spec("moekit.interop.hf") is not None
    except (ImportError, ValueError):
        return False


def add_parser(verbs) -> None:
    p = verbs.add_parser(
        "analyze",
        help="routing statistics, expert specialisation and an HTML report",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", metavar="DIR", help="moekit checkpoint or run folder")
    if _hf_available():
        p.add_argument(
            "--model", dest="hf_model", metavar="HF_DIR", help="a Hugging Face model folder (instead of --checkpoint)"
        )
    p.add_argument("--data", required=True, nargs="+", help="text files or folders; NAME=PATH names a source")
    p.add_argument("--labels", choices=LABEL_MODES, default="auto", help="what to measure specialisation against")
    p.add_argument("--compare", metavar="CKPT2", help="a second checkpoint: routing drift between the two")
    p.add_argument("--max-tokens", type=int, default=65536, help="tokens to analyse, split evenly over sources")
    p.add_argument("--block-size", type=int, default=None, help="window length (default: 256, capped by context)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--view-tokens", type=int, default=240, help="tokens per source in the coloured text view")
    p.add_argument("--metrics", help="metrics.jsonl or run folder for the training plot (default: the run's)")
    p.add_argument("--raw-traces", action="store_true", help="also write per-token traces (safetensors + JSON)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.set_defaults(func=run)


# -- inputs -------------------------------------------------------------------------------------
def _load_model(checkpoint, hf_model, device):
    if (checkpoint is None) == (hf_model is None):
        raise ConfigError("give exactly one of --checkpoint (moekit) or --model (Hugging Face folder)")
    if checkpoint is not None:
        from moekit.checkpoint import load_model

        model, tokenizer = load_model(checkpoint, device)
        return model, tokenizer, str(checkpoint)
    if not _hf_available():
        raise ConfigError("--model needs moekit.interop.hf (Hugging Face import), which this install does not have")
    hf = importlib.import_module("moekit.interop.hf")
    if hasattr(hf, "load_hf"):  # (model, tokenizer or None)
        model, tokenizer = hf.load_hf(hf_model, device=device)
    else:
        import moekit

        loader = getattr(moekit, "from_hf", None) or getattr(hf, "from_hf", None)
        if loader is None:
            raise ConfigError("moekit.interop.hf has no from_hf(); cannot import the Hugging Face model")
        loaded = loader(hf_model)
        model, tokenizer = loaded if isinstance(loaded, tuple) else (loaded, None)
    if tokenizer is None:
        from moekit.data.tokenizers import load_tokenizer

        tokenizer = load_tokenizer(hf_model)  # names the missing tokenizer.json if there is none
    return model.to(device).eval(), tokenizer, str(hf_model)


def _split_entry(entry: str) -> tuple[str | None, Path]:
    name, eq, rest = entry.partition("=")
    if eq and name and "/" not in name and not Path(entry).exists():
        return name, Path(rest)
    return None, Path(entry)


def _read_folder_child(child: Path) -> str:
    try:
        return load_text(child)
    except DataError as e:
        txt = sorted(p for p in child.rglob("*.txt") if not p.name.startswith("."))
        if not child.is_dir() or not txt:
            raise
        log.warning("%s: %s; reading its .txt files only", child, e)
        return "\n\n".join(load_text(p) for p in txt)


def read_sources(data: Sequence[str | Path], by_file: bool) -> list[tuple[str, str, str]]:
    """``[(label, path, text)]`` from data entries (files, folders, ``NAME=PATH``).

    With ``by_file``, one folder is split into its entries (sub-folders and files, sorted), one label each.
    """
    entries = [_split_entry(str(d)) for d in data]
    for _, path in entries:
        if not path.exists():
            raise DataError(f"data path {path} does not exist")
    if by_file and len(entries) == 1 and entries[0][1].is_dir():
        folder = entries[0][1]
        children = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
        if len(children) > 1:
            out = []
            for child in children:
                try:
                    out.append((child.stem if child.is_file() else child.name, str(child), _read_folder_child(child)))
                except DataError as e:
                    log.warning("skipping %s: %s", child, e)
            if len(out) > 1:
                return out
    labelled = [(name or (p.name if p.is_dir() else p.stem), p) for name, p in entries]
    seen: dict[str, Path] = {}
    for label, p in labelled:
        if label in seen:
            raise DataError(f"label {label!r} is used by both {seen[label]} and {p}; name them: NAME=PATH")
        seen[label] = p
    pairs = load_labeled_files(dict(labelled))
    return [(label, str(p), text) for (label, p), (_, text) in zip(labelled, pairs)]


def _windows(ids: torch.Tensor, block: int) -> list[torch.Tensor]:
    """Non-overlapping windows of ``block`` tokens, the last one shorter if the tokens run out."""
    return list(ids.split(block)) if ids.numel() else []


def _batches(windows: list[tuple[torch.Tensor, torch.Tensor]], batch_size: int):
    """Group (ids, labels) windows of equal length into batches."""
    by_len: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for w in windows:
        by_len.setdefault(w[0].numel(), []).append(w)
    for group in by_len.values():
        for i in range(0, len(group), batch_size):
            chunk = group[i : i + batch_size]
            yield torch.stack([c[0] for c in chunk]), torch.stack([c[1] for c in chunk])


def _metrics_records(metrics, checkpoint) -> list[dict[str, Any]]:
    from moekit.train.metrics import read_metrics

    if metrics is not None:
        p = Path(metrics)
        return read_metrics(p.parent if p.is_file() else p)
    if checkpoint is None:
        return []
    from moekit.checkpoint import resolve_checkpoint

    try:
        ckpt = resolve_checkpoint(checkpoint)
    except Exception:
        return []
    for run in (ckpt, ckpt.parent, ckpt.parent.parent):
        if (run / "metrics.jsonl").is_file():
            return read_metrics(run)
    return []


def _progress(enabled: bool, console=None):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("batches"),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled,
        transient=True,
    )


# -- the function behind the verb -------------------------------------------------------------------
@torch.no_grad()
def analyze(
    checkpoint: str | Path | None = None,
    data: Sequence[str | Path] | str | Path = (),
    out: str | Path = "analysis",
    labels: str = "auto",
    compare: str | Path | None = None,
    max_tokens: int = 65536,
    raw_traces: bool = False,
    model: str | Path | None = None,
    block_size: int | None = None,
    batch_size: int = 8,
    view_tokens: int = 240,
    metrics: str | Path | None = None,
    device: str = "cpu",
    progress: bool = True,
    console=None,
) -> dict[str, Any]:
    """Analyse a model's routing on some text and write the report; the function behind ``moekit analyze``.

    Args:
        checkpoint: a moekit checkpoint or run folder (or give ``model``).
        data: text files / folders (``NAME=PATH`` names a source).
        out: output folder (report.html, stats.json, PNGs, traces/).
        labels: ``auto``, ``file``, ``category`` or ``none`` (see the module docstring).
        compare: a second checkpoint of the same architecture: routing drift.
        max_tokens: tokens analysed in all, split evenly over the sources.
        raw_traces: also write per-token traces to ``out/traces`` (format: :mod:`moekit.analysis.recorder`).
        model: a Hugging Face model folder, when ``moekit.interop.hf`` is installed.
        block_size: window length (default 256, capped by the model's context).
        batch_size: windows per forward pass.
        view_tokens: tokens per source shown in the coloured text view.
        metrics: metrics.jsonl (or its run folder) for the imbalance-over-training plot.
        device: where the model runs.
        progress: show a progress bar.

    Returns:
        ``{"out": folder, "report": path, "stats": path, "summary": dict, "traces": path or None}``.
    """
    from moekit.analysis import plots as plots_mod
    from moekit.analysis import report as report_mod
    from moekit.analysis import stats
    from moekit.analysis.recorder import DriftMeter, RoutingRecorder

    if labels not in LABEL_MODES:
        raise ConfigError(f"labels={labels!r} must be one of {', '.join(LABEL_MODES)}")
    if max_tokens < 1 or batch_size < 1:
        raise ConfigError(f"max_tokens={max_tokens} and batch_size={batch_size} must be >= 1")
    data = [data] if isinstance(data, (str, Path)) else list(data)
    if not data:
        raise ConfigError("no data given: pass one or more text files or folders")
    net, tokenizer, source = _load_model(checkpoint, model, device)
    sources = read_sources(data, by_file=labels in ("auto", "file"))
    mode = labels
    if mode == "auto":
        mode = "file" if len(sources) > 1 else "category"
    if mode == "file" and len(sources) < 2:
        log.warning("--labels file needs several files or a folder of several entries; analysing without labels")
        mode = "none"

    max_pos = getattr(getattr(net, "config", None), "max_position_embeddings", None) or 256
    block = min(block_size or 256, max_pos)
    per_source = max(1, max_tokens // len(sources))
    vocab = getattr(getattr(net, "config", None), "vocab_size", tokenizer.vocab_size)
    categories = stats.category_table(tokenizer, vocab) if mode == "category" else None
    label_names = (
        [label for label, _, _ in sources]
        if mode == "file"
        else list(stats.CATEGORIES)
        if categories is not None
        else []
    )

    windows, source_info, samples_ids = [], [], []
    for n, (label, path, text) in enumerate(sources):
        ids = tokenizer.encode(text[: per_source * 8])
        if len(ids) < per_source and len(text) > per_source * 8:
            ids = tokenizer.encode(text)
        ids_t = torch.tensor(ids[:per_source], dtype=torch.long)
        if ids_t.numel() and int(ids_t.max()) >= vocab:
            raise DataError(f"{path}: token id {int(ids_t.max())} is outside the model's vocabulary ({vocab})")
        source_info.append({"label": label, "path": path, "tokens": int(ids_t.numel())})
        samples_ids.append((label, text))
        for w in _windows(ids_t, block):
            lab = categories[w] if categories is not None else torch.full_like(w, n if mode == "file" else -1)
            windows.append((w, lab))
    if not windows:
        raise DataError("the data gave no tokens to analyse")

    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    recorder = RoutingRecorder(net, label_names=label_names, trace_dir=out_dir / "traces" if raw_traces else None)
    reference = drift = None
    if compare is not None:
        ref_model, _, _ = _load_model(compare, None, device)
        reference = RoutingRecorder(ref_model)
        shapes_a = [(agg.num_experts) for agg in recorder.layers]
        shapes_b = [(agg.num_experts) for agg in reference.layers]
        if shapes_a != shapes_b:
            raise ConfigError(
                f"--compare {compare}: its MoE layers have experts {shapes_b}, the analysed model's {shapes_a}"
            )
        drift = DriftMeter(len(recorder.layers))

    n_batches = sum(1 for _ in _batches(windows, batch_size))
    net.eval()
    with _progress(progress, console) as bar:
        task = bar.add_task("routing tokens", total=n_batches)
        for x, lab in _batches(windows, batch_size):
            x = x.to(device)
            recorder.update(x, lab if label_names else None)
            if reference is not None:
                reference.update(x)
                drift.add(recorder.last, reference.last)
            bar.advance(task)
    traces = recorder.close()

    agg = recorder.aggregates()
    drift_stats = stats.drift_summary(agg, reference.aggregates(), drift) if reference is not None else None
    training = stats.training_summary(_metrics_records(metrics, checkpoint))
    layer_types = sorted({moe.config.router.value for _, _, moe in recorder.moe_layers})
    meta = {
        "model": {
            "source": source,
            "type": type(net).__name__,
            "router": "/".join(layer_types),
            "moe_layers": len(recorder.layers),
            "parameters": net.num_parameters() if hasattr(net, "num_parameters") else None,
        },
        "data": {
            "sources": source_info,
            "labels": mode,
            "block_size": block,
            "max_tokens": max_tokens,
            "compare": str(compare) if compare is not None else None,
        },
    }
    summary = stats.summarize(agg, drift=drift_stats, training=training, meta=meta)
    samples = []
    for label, text in samples_ids:
        if view_tokens > 0:
            view = stats.token_routes(net, tokenizer, text, max_tokens=view_tokens, device=device)
            samples.append({"label": label if len(samples_ids) > 1 else Path(source_info[0]["path"]).name, **view})
    figures = plots_mod.make_plots(summary)
    paths = report_mod.write_report(out_dir, summary, figures, samples)
    summary = report_mod.load_stats(paths["stats"])
    return {"out": out_dir, "report": paths["report"], "stats": paths["stats"], "summary": summary, "traces": traces}


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console(stderr=True)
    result = analyze(
        checkpoint=args.checkpoint,
        data=args.data,
        out=args.out,
        labels=args.labels,
        compare=args.compare,
        max_tokens=args.max_tokens,
        raw_traces=args.raw_traces,
        model=getattr(args, "hf_model", None),
        block_size=args.block_size,
        batch_size=args.batch_size,
        view_tokens=args.view_tokens,
        metrics=args.metrics,
        device=args.device,
        progress=True,
        console=console,
    )
    summary = result["summary"]
    print(f"analysed {summary['tokens']:,} tokens in {len(summary['layers'])} MoE layers")
    for line in summary["readings"]["overview"]:
        print(f"- {line}")
    print(f"report: {result['report']}")
    print(f"stats:  {result['stats']}")
    if result["traces"] is not None:
        print(f"traces: {result['traces']}")
    return 0
