"""The serving counters and latency histograms (:class:`ServingMetrics`), written in the Prometheus text format.

The streaming service (:mod:`fi_engine.service`) updates them from its engine thread, the HTTP server
(:mod:`fi_engine.openai_server`) from its event loop and serves :meth:`ServingMetrics.render` as ``/metrics``.
Pure Python, no dependency: the format is a few lines per metric (``# HELP``, ``# TYPE``, samples), and a
histogram's buckets are cumulative with a ``+Inf`` bucket, ``_sum`` and ``_count``, as Prometheus reads them.

Units: seconds for latencies, tokens and requests for counts.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Sequence

__all__ = ["PREFIX", "Histogram", "ServingMetrics"]

PREFIX = "fi_engine"

# Buckets in seconds. Time to first token spans a queued prefill (ms) to a long wait in a full queue (s); the
# inter-token latency is one decode step (about 1-50 ms on a GPU).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0)
ITL_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)
LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0)


class Histogram:
    """Observations counted into fixed upper bounds (``buckets``, ascending, in the metric's unit)."""

    def __init__(self, buckets: Sequence[float]) -> None:
        bounds = [float(b) for b in buckets]
        if not bounds or any(not math.isfinite(b) for b in bounds) or bounds != sorted(set(bounds)):
            raise ValueError(f"buckets: expected strictly ascending finite bounds, got {list(buckets)!r:.80}")
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(bounds) + 1)  # the last one: above every bound (+Inf)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        """Count one observation ``value`` (in the metric's unit)."""
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        """The ``_bucket`` (cumulative), ``_sum`` and ``_count`` samples of metric ``name``."""
        out, total = [], 0
        for bound, n in zip((*self.bounds, math.inf), self.counts, strict=True):
            total += n
            out.append(f'{name}_bucket{{le="{_number(bound)}"}} {total}')
        out += [f"{name}_sum {_number(self.sum)}", f"{name}_count {self.count}"]
        return out


def _number(value: float) -> str:
    if value == math.inf:
        return "+Inf"
    return repr(float(value)) if not float(value).is_integer() else f"{value:.1f}"


class ServingMetrics:
    """What a server reports: requests (finished, by reason; refused with 429), tokens (prompt, generated), the
    queue (waiting: accepted, no token yet; running: generating) and latencies (time to first token, inter-token
    latency, whole request), all thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.finished: dict[str, int] = {}
        self.rejected = 0
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.waiting = 0
        self.running = 0
        self.responses: dict[int, int] = {}
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)
        self.latency = Histogram(LATENCY_BUCKETS)

    def request_finished(self, reason: str, latency_s: float) -> None:
        """A request ended with finish ``reason``, ``latency_s`` seconds after it arrived."""
        with self._lock:
            self.finished[reason] = self.finished.get(reason, 0) + 1
            self.latency.observe(latency_s)

    def request_rejected(self) -> None:
        """A request was refused: the queue was full."""
        with self._lock:
            self.rejected += 1

    def tokens(self, prompt: int = 0, generated: int = 0) -> None:
        """Count ``prompt`` prompt tokens (a request taken) and ``generated`` new tokens."""
        with self._lock:
            self.prompt_tokens += prompt
            self.generation_tokens += generated

    def first_token(self, seconds: float) -> None:
        """A request's first token came ``seconds`` after it arrived."""
        with self._lock:
            self.ttft.observe(seconds)

    def inter_token(self, seconds: float, tokens: int = 1) -> None:
        """``tokens`` tokens that arrived together ``seconds`` after the previous ones: each counts
        ``seconds / tokens``."""
        with self._lock:
            for _ in range(tokens):
                self.itl.observe(seconds / tokens)

    def queue(self, waiting: int, running: int) -> None:
        """The requests now waiting (no token yet) and running."""
        with self._lock:
            self.waiting, self.running = waiting, running

    def response(self, status: int) -> None:
        """The server answered an API request with HTTP ``status``."""
        with self._lock:
            self.responses[status] = self.responses.get(status, 0) + 1

    def render(self) -> str:
        """Every metric in the Prometheus text exposition format (version 0.0.4), ending in a newline."""
        p = PREFIX
        with self._lock:
            out = [
                f"# HELP {p}_requests_total Requests finished, by finish reason (stop, length, abort).",
                f"# TYPE {p}_requests_total counter",
                *(f'{p}_requests_total{{finish_reason="{k}"}} {v}' for k, v in sorted(self.finished.items())),
                f"# HELP {p}_requests_rejected_total Requests refused because the queue was full (HTTP 429).",
                f"# TYPE {p}_requests_rejected_total counter",
                f"{p}_requests_rejected_total {self.rejected}",
                f"# HELP {p}_prompt_tokens_total Prompt tokens of the requests accepted.",
                f"# TYPE {p}_prompt_tokens_total counter",
                f"{p}_prompt_tokens_total {self.prompt_tokens}",
                f"# HELP {p}_generation_tokens_total Tokens generated.",
                f"# TYPE {p}_generation_tokens_total counter",
                f"{p}_generation_tokens_total {self.generation_tokens}",
                f"# HELP {p}_requests_waiting Requests accepted that have no token yet (the queue depth).",
                f"# TYPE {p}_requests_waiting gauge",
                f"{p}_requests_waiting {self.waiting}",
                f"# HELP {p}_requests_running Requests generating.",
                f"# TYPE {p}_requests_running gauge",
                f"{p}_requests_running {self.running}",
                f"# HELP {p}_http_responses_total HTTP responses of the API endpoints, by status code.",
                f"# TYPE {p}_http_responses_total counter",
                *(f'{p}_http_responses_total{{code="{k}"}} {v}' for k, v in sorted(self.responses.items())),
                f"# HELP {p}_time_to_first_token_seconds Time from a request's arrival to its first token.",
                f"# TYPE {p}_time_to_first_token_seconds histogram",
                *self.ttft.lines(f"{p}_time_to_first_token_seconds"),
                f"# HELP {p}_inter_token_latency_seconds Time between a request's successive tokens.",
                f"# TYPE {p}_inter_token_latency_seconds histogram",
                *self.itl.lines(f"{p}_inter_token_latency_seconds"),
                f"# HELP {p}_request_latency_seconds Time from a request's arrival to its end.",
                f"# TYPE {p}_request_latency_seconds histogram",
                *self.latency.lines(f"{p}_request_latency_seconds"),
            ]
        return "\n".join(out) + "\n"
