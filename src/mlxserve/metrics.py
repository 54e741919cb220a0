"""Server metrics in Prometheus' text format: request and token counters, latency histograms,
and the engine's gauges (running, waiting, memory, prefix-cache hits)."""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections import Counter
from itertools import groupby

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Histogram:
    def __init__(self, buckets=LATENCY_BUCKETS_S):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last is +Inf
        self.total = 0.0
        self.n = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.buckets, value)] += 1
        self.total += value
        self.n += 1

    def lines(self, name: str) -> list[str]:
        out, cumulative = [], 0
        for bound, count in zip((*self.buckets, float("inf")), self.counts):
            cumulative += count
            le = "+Inf" if bound == float("inf") else repr(bound)
            out.append(f'{name}_bucket{{le="{le}"}} {cumulative}')
        out += [f"{name}_sum {self.total}", f"{name}_count {self.n}"]
        return out


class Metrics:
    """Filled by the server as requests finish; read by GET /metrics."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests = Counter()  # by finish reason
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.ttft = Histogram()
        self.itl = Histogram()

    def record(self, final, token_times: list[float]) -> None:
        """A request ended: `final` is its last TokenEvent, `token_times` its tokens' times."""
        with self._lock:
            self.requests[final.finish_reason or "unknown"] += 1
            self.prompt_tokens += final.prompt_tokens
            self.completion_tokens += final.completion_tokens
            if final.ttft_s is not None:
                self.ttft.observe(final.ttft_s)
            # A step's tokens share its time. A step that delivered n of them (an accepted
            # speculative draft) counts as n gaps of 1/n of its wait each, as bench's ITL does:
            # the count stays the tokens after the first and the sum the time they took, where
            # n - 1 gaps of 0 s would make the latency look far better than any client sees.
            steps = [(when, len(list(tokens))) for when, tokens in groupby(token_times)]
            for (previous, _), (when, n) in zip(steps, steps[1:]):
                for _ in range(n):
                    self.itl.observe((when - previous) / n)

    def render(self, engine_stats: dict) -> str:
        with self._lock:
            lines = [
                "# HELP mlxserve_requests_total Requests finished, by finish reason.",
                "# TYPE mlxserve_requests_total counter",
                *(f'mlxserve_requests_total{{finish_reason="{r}"}} {n}' for r, n in sorted(self.requests.items())),
                "# HELP mlxserve_prompt_tokens_total Prompt tokens of finished requests.",
                "# TYPE mlxserve_prompt_tokens_total counter",
                f"mlxserve_prompt_tokens_total {self.prompt_tokens}",
                "# HELP mlxserve_generation_tokens_total Generated tokens of finished requests.",
                "# TYPE mlxserve_generation_tokens_total counter",
                f"mlxserve_generation_tokens_total {self.completion_tokens}",
                "# HELP mlxserve_time_to_first_token_seconds Time from arrival to the first token.",
                "# TYPE mlxserve_time_to_first_token_seconds histogram",
                *self.ttft.lines("mlxserve_time_to_first_token_seconds"),
                "# HELP mlxserve_inter_token_latency_seconds Time between consecutive tokens of a request.",
                "# TYPE mlxserve_inter_token_latency_seconds histogram",
                *self.itl.lines("mlxserve_inter_token_latency_seconds"),
            ]
        gauges = {
            "running": ("Requests being generated.", engine_stats.get("running")),
            "waiting": ("Requests waiting for admission.", engine_stats.get("waiting")),
            "requests_in_progress": ("Requests accepted and not finished, counted now (the busy limit's figure).",
                                     engine_stats.get("requests_in_progress")),
            "kv_bytes_in_use": ("KV-cache bytes held by requests.", engine_stats.get("kv_bytes_in_use")),
            "kv_bytes_budget": ("KV-cache memory budget in bytes.", engine_stats.get("kv_bytes_budget")),
            "prefix_cached_bytes": ("Bytes of KV blocks in the prefix cache.", engine_stats.get("prefix_cached_bytes")),
            "prefix_hit_rate": ("Share of prompt tokens served from the prefix cache.", engine_stats.get("prefix_hit_rate")),
        }
        for name, (help_text, value) in gauges.items():
            if value is not None:
                lines += [f"# HELP mlxserve_{name} {help_text}", f"# TYPE mlxserve_{name} gauge", f"mlxserve_{name} {value}"]
        counters = {
            "preemptions": ("preemptions_total", "Rows preempted for memory since start."),
            "drafted_tokens": ("draft_tokens_total", "Speculative draft tokens verified since start."),
            "accepted_tokens": ("draft_tokens_accepted_total", "Speculative draft tokens accepted since start."),
        }
        for key, (name, help_text) in counters.items():
            if engine_stats.get(key) is not None:
                lines += [f"# HELP mlxserve_{name} {help_text}", f"# TYPE mlxserve_{name} counter",
                          f"mlxserve_{name} {engine_stats[key]}"]
        return "\n".join(lines) + "\n"
