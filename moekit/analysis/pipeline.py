"""The analysis pipeline behind ``moekit analyze`` and ``moekit demo``: load a model and text, record the
routing, summarise it, and write ``report.html`` + ``stats.json`` + PNG plots (+ raw traces when asked).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from moekit.analysis import report, stats
from moekit.analysis.recorder import DriftMeter, RoutingRecorder
from moekit.analysis.sources import LABEL_MODES, AnalysisInputs, batches, prepare_inputs
from moekit.analysis.tokens import token_routes
from moekit.checkpoint import load_model, resolve_checkpoint
from moekit.data.tokenizers import Tokenizer
from moekit.errors import ConfigError
from moekit.interop.hf.api import load_for_inference


@dataclasses.dataclass(frozen=True)
class AnalysisResult:
    """What :func:`analyze` wrote: the output folder, report.html, stats.json (and its content) and traces."""

    out: Path
    report: Path
    stats: Path
    summary: dict[str, Any]
    traces: Path | None


def _progress(enabled: bool, console: Console | None) -> Progress:
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("batches"))
    return Progress(*columns, TimeRemainingColumn(), console=console, disable=not enabled, transient=True)


@torch.no_grad()
def record_routing(
    model: torch.nn.Module,
    inputs: AnalysisInputs,
    batch_size: int = 8,
    device: str = "cpu",
    compare: str | Path | None = None,
    trace_dir: Path | None = None,
    progress: bool = True,
    console: Console | None = None,
) -> tuple[RoutingRecorder, list[dict[str, Any]] | None]:
    """Route every window through ``model`` and record it; with ``compare`` (a checkpoint with the same MoE
    layers), also the drift between the two, token by token. Returns the recorder (its ``close()`` writes
    the traces) and the drift."""
    recorder = RoutingRecorder(model, label_names=inputs.label_names, trace_dir=trace_dir)
    reference = RoutingRecorder(load_model(compare, device)[0]) if compare is not None else None
    if reference is not None:
        shapes, reference_shapes = ([agg.num_experts for agg in r.layers] for r in (recorder, reference))
        if shapes != reference_shapes:
            raise ConfigError(
                f"--compare {compare}: its MoE layers have experts {reference_shapes}, the analysed model's {shapes}"
            )
    drift = DriftMeter(len(recorder.layers))
    model.eval()
    with _progress(progress, console) as bar:
        task = bar.add_task("routing tokens", total=sum(1 for _ in batches(inputs.windows, batch_size)))
        for x, labels in batches(inputs.windows, batch_size):
            x = x.to(device)
            recorder.update(x, labels if inputs.label_names else None)
            if reference is not None:
                reference.update(x)
                drift.add(recorder.last, reference.last)
            bar.advance(task)
    if reference is None:
        return recorder, None
    return recorder, stats.drift_summary(recorder.aggregates(), reference.aggregates(), drift)


def metrics_records(metrics: str | Path | None, checkpoint: str | Path | None) -> list[dict[str, Any]]:
    """The training log for the imbalance plot: ``metrics`` (a metrics.jsonl or its run folder), else the run's."""
    files = [Path(metrics), Path(metrics) / "metrics.jsonl"] if metrics is not None else []
    if metrics is None and checkpoint is not None:
        try:
            ckpt = resolve_checkpoint(checkpoint)
            files = [run / "metrics.jsonl" for run in (ckpt, ckpt.parent, ckpt.parent.parent)]
        except Exception:  # not a moekit checkpoint: there is no training log to show
            pass
    for file in files:
        if file.is_file():
            return [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
    return []


def summarize_recording(
    model: torch.nn.Module,
    source: str,
    inputs: AnalysisInputs,
    recorder: RoutingRecorder,
    drift: list[dict[str, Any]] | None,
    max_tokens: int,
    compare: str | Path | None = None,
    training_records: Sequence[dict[str, Any]] = (),
) -> dict[str, Any]:
    """The JSON-ready summary behind stats.json: routing statistics plus what was analysed."""
    routers = sorted({moe.config.router.value for _, _, moe in recorder.moe_layers})
    meta = {
        "model": {
            "source": source,
            "type": type(model).__name__,
            "router": "/".join(routers),
            "moe_layers": len(recorder.layers),
            "parameters": model.num_parameters() if hasattr(model, "num_parameters") else None,
        },
        "data": {
            "sources": inputs.sources,
            "labels": inputs.mode,
            "block_size": inputs.block,
            "max_tokens": max_tokens,
            "compare": str(compare) if compare is not None else None,
        },
    }
    training = stats.training_summary(training_records)
    return stats.summarize(recorder.aggregates(), drift=drift, training=training, meta=meta)


def token_views(
    model: torch.nn.Module, tokenizer: Tokenizer, inputs: AnalysisInputs, view_tokens: int, device: str = "cpu"
) -> list[dict[str, Any]]:
    """The first ``view_tokens`` tokens of each source with their experts, for the coloured text view."""
    if view_tokens <= 0:
        return []
    one = len(inputs.texts) == 1  # a single source is named by its file
    return [
        {
            "label": Path(inputs.sources[0]["path"]).name if one else label,
            **token_routes(model, tokenizer, text, max_tokens=view_tokens, device=device),
        }
        for label, text in inputs.texts
    ]


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
    dtype: torch.dtype | str | None = None,
    progress: bool = True,
    console: Console | None = None,
    esft_selection: dict[str, Any] | None = None,
) -> AnalysisResult:
    """Analyse a model's routing on some text and write the report in ``out``; what ``moekit analyze`` runs.

    The model is a moekit ``checkpoint`` (or run folder) or a Hugging Face ``model`` folder; ``data`` are text files
    or folders (``NAME=PATH`` names a source) labelled by ``labels`` (``auto``, ``file``, ``category`` or ``none``:
    :mod:`moekit.analysis.sources`). ``max_tokens`` in all, split evenly over the sources, are routed in windows of
    ``block_size`` (default 256, capped by the context), ``batch_size`` windows per forward pass. ``compare`` (a
    checkpoint with the same MoE layers) adds routing drift; ``raw_traces`` writes per-token traces to
    ``out/traces`` (:mod:`moekit.analysis.traces`); ``view_tokens`` per source fill the coloured text view;
    ``metrics`` (a metrics.jsonl or its run folder; default: the run's) gives the imbalance-over-training plot.
    ``esft_selection`` (an ``esft_selection.json`` record of ``moekit finetune --esft``) adds its view. ``dtype``
    casts the analysed model's float weights (default: as stored).
    """
    if labels not in LABEL_MODES:
        raise ConfigError(f"labels={labels!r} must be one of {', '.join(LABEL_MODES)}")
    if max_tokens < 1 or batch_size < 1:
        raise ConfigError(f"max_tokens={max_tokens} and batch_size={batch_size} must be >= 1")
    data = [data] if isinstance(data, (str, Path)) else list(data)
    if not data:
        raise ConfigError("no data given: pass one or more text files or folders")
    net, tokenizer = load_for_inference(checkpoint, model, dtype=dtype)
    net = net.to(device)
    inputs = prepare_inputs(net, tokenizer, data, labels, max_tokens, block_size)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    trace_dir = out_dir / "traces" if raw_traces else None
    recorder, drift = record_routing(net, inputs, batch_size, device, compare, trace_dir, progress, console)
    traces = recorder.close()
    source = str(checkpoint if checkpoint is not None else model)
    training = metrics_records(metrics, checkpoint)
    summary = summarize_recording(net, source, inputs, recorder, drift, max_tokens, compare, training)
    if esft_selection is not None:
        summary["esft"] = esft_selection
    from moekit.analysis import plots  # matplotlib: a quarter second that every other verb would pay at startup

    samples = token_views(net, tokenizer, inputs, view_tokens, device)
    paths = report.write_report(out_dir, summary, plots.make_plots(summary), samples)
    summary = report.load_stats(paths["stats"])  # what stats.json holds (JSON-safe numbers)
    return AnalysisResult(out_dir, paths["report"], paths["stats"], summary, traces)
