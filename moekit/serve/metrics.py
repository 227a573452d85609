"""``GET /metrics``: the server's counters in the Prometheus text format (version 0.0.4)."""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Sequence

from moekit.serve.engine import Engine

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclasses.dataclass
class Metrics:
    """What the HTTP side counts (the engine counts tokens, steps and expert load)."""

    requests: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # (route, status)
    ttft_buckets: list[int] = dataclasses.field(default_factory=lambda: [0] * len(TTFT_BUCKETS))
    ttft_sum: float = 0.0
    ttft_count: int = 0
    started: float = dataclasses.field(default_factory=time.monotonic)

    def request_done(self, route: str, status: int) -> None:
        """Count one finished request."""
        self.requests[(route, status)] += 1

    def first_token(self, seconds: float) -> None:
        """Record one time to first token."""
        self.ttft_sum += seconds
        self.ttft_count += 1
        for i, bound in enumerate(TTFT_BUCKETS):
            if seconds <= bound:
                self.ttft_buckets[i] += 1

    def render(self, engine: Engine) -> str:
        """The exposition text."""
        stats = engine.stats
        lines: list[str] = []

        def metric(name: str, kind: str, help_: str, samples: Sequence[tuple[str, float]]) -> None:
            lines.extend([f"# HELP {name} {help_}", f"# TYPE {name} {kind}"])
            lines.extend(f"{name}{labels} {value:g}" for labels, value in samples)

        requests = [(f'{{route="{r}",status="{s}"}}', n) for (r, s), n in sorted(self.requests.items())]
        metric("moekit_requests_total", "counter", "HTTP requests by route and status.", requests)
        metric("moekit_prompt_tokens_total", "counter", "Prompt tokens encoded.", [("", stats.prompt_tokens)])
        metric("moekit_generation_tokens_total", "counter", "Tokens generated.", [("", stats.generated_tokens)])
        metric("moekit_queue_depth", "gauge", "Requests waiting for a batch slot.", [("", engine.queue_depth)])
        metric("moekit_running_requests", "gauge", "Requests in the running batch.", [("", stats.running)])
        uptime = max(time.monotonic() - self.started, 1e-9)
        metric("moekit_generation_tokens_per_second", "gauge", "Tokens generated per second since start.",
               [("", stats.generated_tokens / uptime)])  # fmt: skip
        cumulative = [(f'{{le="{b}"}}', n) for b, n in zip(TTFT_BUCKETS, self.ttft_buckets)]
        cumulative.append(('{le="+Inf"}', self.ttft_count))
        lines.extend(["# HELP moekit_time_to_first_token_seconds Time to first token.",
                      "# TYPE moekit_time_to_first_token_seconds histogram"])  # fmt: skip
        lines.extend(f"moekit_time_to_first_token_seconds_bucket{labels} {n}" for labels, n in cumulative)
        lines.append(f"moekit_time_to_first_token_seconds_sum {self.ttft_sum:g}")
        lines.append(f"moekit_time_to_first_token_seconds_count {self.ttft_count}")
        load = [
            (f'{{layer="{layer}",expert="{e}"}}', n)
            for layer, counts in sorted(stats.expert_tokens.items())
            for e, n in enumerate(counts)
        ]
        metric("moekit_expert_tokens_total", "counter", "Token assignments per MoE layer and expert.", load)
        return "\n".join(lines) + "\n"
