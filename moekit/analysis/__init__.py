"""Routing analysis: expert load, a streaming routing recorder, statistics, specialisation, plots and reports.

- :mod:`moekit.analysis.pipeline`: :func:`analyze`, behind ``moekit analyze`` and ``moekit demo``: text in
  (:mod:`moekit.analysis.sources`), routing recorded, report out.
- :mod:`moekit.analysis.capture`: one forward pass's routing per token (``capture_routing``).
- :mod:`moekit.analysis.recorder`: :class:`RoutingRecorder` (bounded aggregates; outputs unchanged).
- :mod:`moekit.analysis.traces`: the raw per-token trace format (safetensors + JSON), only when asked.
- :mod:`moekit.analysis.stats`: balance, entropy, co-activation, layer agreement, drift, specialisation;
  :mod:`moekit.analysis.tokens`: token categories and the per-token expert view.
- :mod:`moekit.analysis.plots` / :mod:`moekit.analysis.readings` / :mod:`moekit.analysis.report`: PNG plots
  (matplotlib), their plain-language reading, and the self-contained report.html + stats.json.
- :mod:`moekit.analysis.health`: :class:`CollapseMonitor`, the trainer's collapse warning.
"""

from moekit.analysis.capture import capture_routing
from moekit.analysis.health import CollapseMonitor
from moekit.analysis.load import expert_load
from moekit.analysis.recorder import DriftMeter, RoutingRecorder
from moekit.analysis.traces import read_traces

__all__ = ["CollapseMonitor", "DriftMeter", "RoutingRecorder", "capture_routing", "expert_load", "read_traces"]
