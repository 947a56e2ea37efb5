"""The serving counters and latency histograms (:class:`ServingMetrics`), written in the Prometheus text format.

The streaming service (:mod:`fi_engine.serve.service`) updates them from its engine thread, the HTTP server
(:mod:`fi_engine.serve.openai_server`) from its event loop and serves :meth:`ServingMetrics.render` as ``/metrics``.
Pure Python, no dependency: the format is a few lines per metric (``# HELP``, ``# TYPE``, samples), and a
histogram's buckets are cumulative with a ``+Inf`` bucket, ``_sum`` and ``_count``, as Prometheus reads them.

Several API-server processes in front of one engine (``fi-engine serve --api-servers N``) each count their own
requests, and any one of them answers ``/metrics``: :meth:`ServingMetrics.shared` makes one metrics object per
process over one block of shared memory, each writing its own slot (no lock between processes: a slot has one
writer), and :meth:`~ServingMetrics.render` writes the sum over every slot (the gauges too: the requests waiting
and running in all of them).

Units: seconds for latencies, tokens and requests for counts. Every value is a float64 cell (counts are exact up to
2**53).
"""

from __future__ import annotations

import array
import bisect
import math
import multiprocessing as mp
import threading
from collections.abc import Sequence
from typing import Any, cast

from ..values import show

__all__ = ["PREFIX", "Histogram", "ServingMetrics"]

PREFIX = "fi_engine"

# Buckets in seconds. Time to first token spans a queued prefill (ms) to a long wait in a full queue (s); the
# inter-token latency is one decode step (about 1-50 ms on a GPU).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0)
ITL_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)
LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0)

MAX_SLOTS = 64  # processes sharing one block (fi_engine.serve.engine_process.MAX_CLIENTS front ends)


def _cells(count: int) -> memoryview[float]:
    """``count`` float64 cells of this process's own memory, zeroed."""
    return memoryview(bytearray(8 * count)).cast("d")


class Histogram:
    """Observations counted into fixed upper bounds (``buckets``, ascending, in the metric's unit).

    ``cells``: where its numbers live, ``len(buckets) + 2`` float64 cells (a count per bucket, the count above
    every bound, the sum); default: its own. :class:`ServingMetrics` gives it a part of its slot.
    """

    def __init__(self, buckets: Sequence[float], cells: memoryview[float] | None = None) -> None:
        bounds = [float(b) for b in buckets]
        if not bounds or any(not math.isfinite(b) for b in bounds) or bounds != sorted(set(bounds)):
            raise ValueError(f"buckets: expected strictly ascending finite bounds, got {list(buckets)!r:.80}")
        size = len(bounds) + 2
        if cells is None:
            cells = _cells(size)
        elif not isinstance(cells, memoryview) or cells.format != "d" or len(cells) != size:
            raise ValueError(f"cells: expected a memoryview of {size} float64 cells (format 'd'), got {show(cells)}")
        self.bounds = tuple(bounds)
        self._cells = cells
        self._sum_at = size - 1
        self.counts = cells[: size - 1]  # per bucket (not cumulative); the last: above every bound (+Inf)

    @staticmethod
    def cells_for(buckets: Sequence[float]) -> int:
        """How many float64 cells a histogram of ``buckets`` takes."""
        return len(buckets) + 2

    @property
    def sum(self) -> float:
        """The sum of the observations."""
        return float(self._cells[self._sum_at])

    @property
    def count(self) -> int:
        """How many observations (the sum of the buckets, so that it always agrees with them)."""
        return int(sum(self.counts))

    def observe(self, value: float) -> None:
        """Count one observation ``value`` (in the metric's unit)."""
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self._cells[self._sum_at] += value

    def lines(self, name: str) -> list[str]:
        """The ``_bucket`` (cumulative), ``_sum`` and ``_count`` samples of metric ``name``."""
        out, total = [], 0
        for bound, n in zip((*self.bounds, math.inf), self.counts, strict=True):
            total += int(n)
            out.append(f'{name}_bucket{{le="{_number(bound)}"}} {total}')
        out += [f"{name}_sum {_number(self.sum)}", f"{name}_count {total}"]
        return out


def _number(value: float) -> str:
    if value == math.inf:
        return "+Inf"
    return repr(float(value)) if not float(value).is_integer() else f"{value:.1f}"


# A slot's cells, in order: the named counters, the HTTP status table, the three histograms.
REASONS = ("stop", "length", "abort")  # fi_engine.runtime.stepping.FinishReason
_FINISHED = 0
_REJECTED = _FINISHED + len(REASONS)
_PROMPT = _REJECTED + 1
_GENERATED = _PROMPT + 1
_CACHE_QUERIES = _GENERATED + 1  # prompt tokens looked up in the engine's prefix cache
_CACHE_HITS = _CACHE_QUERIES + 1  # ... and found there
_SPEC_DRAFTS = _CACHE_HITS + 1  # speculative decoding: drafts verified (a request's in one step)
_SPEC_DRAFT_TOKENS = _SPEC_DRAFTS + 1  # ... their tokens
_SPEC_ACCEPTED = _SPEC_DRAFT_TOKENS + 1  # ... and those accepted
_WAITING = _SPEC_ACCEPTED + 1
_RUNNING = _WAITING + 1
_OTHER_CODES = _RUNNING + 1  # responses whose status found the table full
_CODES = _OTHER_CODES + 1  # (status, count) pairs, filled in the order statuses first occur
CODE_PAIRS = 16  # distinct HTTP statuses a slot tells apart (the server gives about 8)
_TTFT = _CODES + 2 * CODE_PAIRS
_ITL = _TTFT + Histogram.cells_for(TTFT_BUCKETS)
_LATENCY = _ITL + Histogram.cells_for(ITL_BUCKETS)
SLOT_CELLS = _LATENCY + Histogram.cells_for(LATENCY_BUCKETS)


class ServingMetrics:
    """What a server reports: requests (finished, by reason; refused with 429), tokens (prompt, generated), the
    engine's prefix cache (prompt tokens looked up and found, as vLLM's ``prefix_cache_queries`` and
    ``prefix_cache_hits``, and their ratio), speculative decoding (drafts verified, their tokens and those accepted,
    as vLLM's ``spec_decode`` counters, and the acceptance rate), the queue (waiting: accepted, no token yet;
    running: generating) and latencies (time to first token, inter-token latency, whole request), all thread-safe.

    ``ServingMetrics()`` counts for one process; :meth:`shared` makes the metrics of several processes over one
    block of shared memory. Its attributes (``finished``, ``rejected``, ``prompt_tokens``, ``generation_tokens``,
    ``prefix_cache_counts``, ``speculation_counts``, ``waiting``, ``running``, ``responses``, the histograms
    ``ttft``, ``itl``, ``latency``) are this one's own counts; :meth:`render` writes the sum over the block.
    """

    def __init__(self) -> None:
        self._attach(None, 0, 1)

    @classmethod
    def shared(cls, count: int) -> list[ServingMetrics]:
        """``count`` metrics over one block of shared memory (``count * SLOT_CELLS`` float64 cells): the ``i``-th
        writes slot ``i``, and each one's :meth:`render` sums every slot. Pass them to ``spawn``-started processes
        in their arguments (the block is shared, not copied); ``count``: 1 to 64."""
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_SLOTS:
            raise ValueError(f"count: expected an int in [1, {MAX_SLOTS}] (processes), got {show(count)}")
        block = mp.get_context("spawn").RawArray("d", SLOT_CELLS * count)
        out = []
        for i in range(count):
            m = cls.__new__(cls)
            m._attach(block, i, count)
            out.append(m)
        return out

    def _attach(self, raw: Any, slot: int, count: int) -> None:
        self._raw = raw  # the shared block (a multiprocessing RawArray), or None: this process's own cells
        self._slot_index = slot
        self._slots = count
        block: memoryview[float] = _cells(SLOT_CELLS) if raw is None else memoryview(raw).cast("B").cast("d")
        self._block = block
        self._own = block[slot * SLOT_CELLS : (slot + 1) * SLOT_CELLS]
        own = self._own
        self._lock = threading.Lock()
        self._code_at: dict[int, int] = {}  # status -> its count's cell (this slot's table; only this one writes)
        self.ttft = Histogram(TTFT_BUCKETS, own[_TTFT:_ITL])
        self.itl = Histogram(ITL_BUCKETS, own[_ITL:_LATENCY])
        self.latency = Histogram(LATENCY_BUCKETS, own[_LATENCY:SLOT_CELLS])

    def __getstate__(self) -> dict[str, Any]:
        if self._raw is None:
            raise ValueError(
                "metrics: a ServingMetrics() counts for its own process; make ServingMetrics.shared(n) to pass "
                "metrics to other processes"
            )
        if any(self._own):
            raise ValueError("metrics: hand shared metrics to their process before they count anything")
        return {"raw": self._raw, "slot": self._slot_index, "count": self._slots}  # pickles while spawning only

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._attach(state["raw"], state["slot"], state["count"])

    # -- this slot's counts ------------------------------------------------------------------------------------

    @property
    def finished(self) -> dict[str, int]:
        """Requests finished, by finish reason (only the reasons that occurred)."""
        return {r: int(self._own[_FINISHED + i]) for i, r in enumerate(REASONS) if self._own[_FINISHED + i]}

    # the counts of one cell each (ints; read-only)
    rejected = property(lambda self: int(self._own[_REJECTED]))
    prompt_tokens = property(lambda self: int(self._own[_PROMPT]))
    generation_tokens = property(lambda self: int(self._own[_GENERATED]))
    waiting = property(lambda self: int(self._own[_WAITING]))
    running = property(lambda self: int(self._own[_RUNNING]))

    @property
    def prefix_cache_counts(self) -> tuple[int, int]:
        """``(queries, hits)``: prompt tokens looked up in the engine's prefix cache (of the requests whose engine
        reported its hit) and found there."""
        return int(self._own[_CACHE_QUERIES]), int(self._own[_CACHE_HITS])

    @property
    def speculation_counts(self) -> tuple[int, int, int]:
        """``(drafts, draft_tokens, accepted_tokens)``: the drafts the engine verified (speculative decoding), their
        tokens, and those accepted."""
        own = self._own
        return int(own[_SPEC_DRAFTS]), int(own[_SPEC_DRAFT_TOKENS]), int(own[_SPEC_ACCEPTED])

    @property
    def responses(self) -> dict[int, int]:
        """HTTP responses of the API endpoints, by status (only the statuses that occurred)."""
        return _codes([self._values(self._slot_index)])

    # -- updates -----------------------------------------------------------------------------------------------

    def request_finished(self, reason: str, latency_s: float) -> None:
        """A request ended with finish ``reason`` (``"stop"``, ``"length"`` or ``"abort"``), ``latency_s`` seconds
        after it arrived."""
        if reason not in REASONS:
            raise ValueError(f"reason: expected one of {', '.join(REASONS)}, got {show(reason)}")
        with self._lock:
            self._own[_FINISHED + REASONS.index(reason)] += 1
            self.latency.observe(latency_s)

    def request_rejected(self) -> None:
        """A request was refused: the queue was full."""
        with self._lock:
            self._own[_REJECTED] += 1

    def tokens(self, prompt: int = 0, generated: int = 0) -> None:
        """Count ``prompt`` prompt tokens (a request taken) and ``generated`` new tokens."""
        with self._lock:
            own = self._own
            own[_PROMPT] += prompt
            own[_GENERATED] += generated

    def prefix_cache(self, queries: int, hits: int) -> None:
        """A request's ``queries`` prompt tokens were looked up in the engine's prefix cache and ``hits`` of them
        found (its :attr:`~fi_engine.runtime.stepping.StepOutput.num_cached_tokens`)."""
        with self._lock:
            own = self._own
            own[_CACHE_QUERIES] += queries
            own[_CACHE_HITS] += hits

    def speculation(self, draft_tokens: int, accepted_tokens: int) -> None:
        """The engine verified a draft of ``draft_tokens`` tokens for a request and accepted ``accepted_tokens`` of
        them (:attr:`~fi_engine.runtime.stepping.StepOutput.num_draft_tokens`)."""
        with self._lock:
            own = self._own
            own[_SPEC_DRAFTS] += 1
            own[_SPEC_DRAFT_TOKENS] += draft_tokens
            own[_SPEC_ACCEPTED] += accepted_tokens

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
            self._own[_WAITING], self._own[_RUNNING] = waiting, running

    def response(self, status: int) -> None:
        """The server answered an API request with HTTP ``status``."""
        with self._lock:
            at = self._code_at.get(status)
            if at is None:
                at = _OTHER_CODES
                for pair in range(_CODES, _CODES + 2 * CODE_PAIRS, 2):
                    if not self._own[pair]:  # a free pair: the status first, then its count (a reader skips 0)
                        self._own[pair] = status
                        at = pair + 1
                        break
                self._code_at[status] = at
            self._own[at] += 1

    def _values(self, slot: int) -> list[float]:
        """Slot ``slot``'s cells now (another process's slot may be mid-update: a count a step behind)."""
        return cast("list[float]", self._block[slot * SLOT_CELLS : (slot + 1) * SLOT_CELLS].tolist())

    # -- the text ----------------------------------------------------------------------------------------------

    def render(self) -> str:
        """Every metric, summed over the slots of the block, in the Prometheus text exposition format (version
        0.0.4), ending in a newline."""
        slots = [self._values(i) for i in range(self._slots)]
        total = [math.fsum(column) for column in zip(*slots, strict=True)]
        cells: memoryview[float] = memoryview(array.array("d", total)).cast("B").cast("d")
        ttft = Histogram(TTFT_BUCKETS, cells[_TTFT:_ITL])
        itl = Histogram(ITL_BUCKETS, cells[_ITL:_LATENCY])
        latency = Histogram(LATENCY_BUCKETS, cells[_LATENCY:SLOT_CELLS])
        finished = {r: int(total[_FINISHED + i]) for i, r in enumerate(REASONS) if total[_FINISHED + i]}
        codes = _codes(slots)
        queries, hits = int(total[_CACHE_QUERIES]), int(total[_CACHE_HITS])
        drafted, accepted = int(total[_SPEC_DRAFT_TOKENS]), int(total[_SPEC_ACCEPTED])
        p = PREFIX
        out = [
            f"# HELP {p}_requests_total Requests finished, by finish reason (stop, length, abort).",
            f"# TYPE {p}_requests_total counter",
            *(f'{p}_requests_total{{finish_reason="{k}"}} {v}' for k, v in sorted(finished.items())),
            f"# HELP {p}_requests_rejected_total Requests refused because the queue was full (HTTP 429).",
            f"# TYPE {p}_requests_rejected_total counter",
            f"{p}_requests_rejected_total {int(total[_REJECTED])}",
            f"# HELP {p}_prompt_tokens_total Prompt tokens of the requests accepted.",
            f"# TYPE {p}_prompt_tokens_total counter",
            f"{p}_prompt_tokens_total {int(total[_PROMPT])}",
            f"# HELP {p}_generation_tokens_total Tokens generated.",
            f"# TYPE {p}_generation_tokens_total counter",
            f"{p}_generation_tokens_total {int(total[_GENERATED])}",
            f"# HELP {p}_prefix_cache_queries_total Prompt tokens looked up in the engine's prefix cache (requests "
            "whose engine reports its hits).",
            f"# TYPE {p}_prefix_cache_queries_total counter",
            f"{p}_prefix_cache_queries_total {queries}",
            f"# HELP {p}_prefix_cache_hits_total Prompt tokens found in the engine's prefix cache (not computed "
            "again).",
            f"# TYPE {p}_prefix_cache_hits_total counter",
            f"{p}_prefix_cache_hits_total {hits}",
            f"# HELP {p}_prefix_cache_hit_rate Prefix cache hits / queries since the start (0 before any query).",
            f"# TYPE {p}_prefix_cache_hit_rate gauge",
            f"{p}_prefix_cache_hit_rate {_number(hits / queries if queries else 0.0)}",
            f"# HELP {p}_spec_decode_num_drafts_total Drafts verified by speculative decoding (a request's in a step).",
            f"# TYPE {p}_spec_decode_num_drafts_total counter",
            f"{p}_spec_decode_num_drafts_total {int(total[_SPEC_DRAFTS])}",
            f"# HELP {p}_spec_decode_num_draft_tokens_total Draft tokens verified by speculative decoding.",
            f"# TYPE {p}_spec_decode_num_draft_tokens_total counter",
            f"{p}_spec_decode_num_draft_tokens_total {drafted}",
            f"# HELP {p}_spec_decode_num_accepted_tokens_total Draft tokens the model accepted.",
            f"# TYPE {p}_spec_decode_num_accepted_tokens_total counter",
            f"{p}_spec_decode_num_accepted_tokens_total {accepted}",
            f"# HELP {p}_spec_decode_acceptance_rate Accepted / draft tokens since the start (0 before any draft).",
            f"# TYPE {p}_spec_decode_acceptance_rate gauge",
            f"{p}_spec_decode_acceptance_rate {_number(accepted / drafted if drafted else 0.0)}",
            f"# HELP {p}_requests_waiting Requests accepted that have no token yet (the queue depth).",
            f"# TYPE {p}_requests_waiting gauge",
            f"{p}_requests_waiting {int(total[_WAITING])}",
            f"# HELP {p}_requests_running Requests generating.",
            f"# TYPE {p}_requests_running gauge",
            f"{p}_requests_running {int(total[_RUNNING])}",
            f"# HELP {p}_http_responses_total HTTP responses of the API endpoints, by status code.",
            f"# TYPE {p}_http_responses_total counter",
            *(f'{p}_http_responses_total{{code="{k}"}} {v}' for k, v in sorted(codes.items(), key=_by_code)),
        ]
        if self._slots > 1:  # how the API servers share the load
            out += [
                f"# HELP {p}_api_server_http_responses_total HTTP responses of the API endpoints, by API-server "
                "process (--api-servers).",
                f"# TYPE {p}_api_server_http_responses_total counter",
                *(
                    f'{p}_api_server_http_responses_total{{api_server="{i}"}} {_served(slot)}'
                    for i, slot in enumerate(slots)
                ),
            ]
        out += [
            f"# HELP {p}_time_to_first_token_seconds Time from a request's arrival to its first token.",
            f"# TYPE {p}_time_to_first_token_seconds histogram",
            *ttft.lines(f"{p}_time_to_first_token_seconds"),
            f"# HELP {p}_inter_token_latency_seconds Time between a request's successive tokens.",
            f"# TYPE {p}_inter_token_latency_seconds histogram",
            *itl.lines(f"{p}_inter_token_latency_seconds"),
            f"# HELP {p}_request_latency_seconds Time from a request's arrival to its end.",
            f"# TYPE {p}_request_latency_seconds histogram",
            *latency.lines(f"{p}_request_latency_seconds"),
        ]
        return "\n".join(out) + "\n"


def _codes(slots: list[list[float]]) -> dict[Any, int]:
    """The HTTP statuses of ``slots`` (each a slot's cells) summed: status -> count, ``"other"`` for those that
    found a slot's table full; only counts above 0."""
    out: dict[Any, int] = {}
    for cells in slots:
        for pair in range(_CODES, _CODES + 2 * CODE_PAIRS, 2):
            status, n = cells[pair], cells[pair + 1]
            if status and n:
                out[int(status)] = out.get(int(status), 0) + int(n)
        if cells[_OTHER_CODES]:
            out["other"] = out.get("other", 0) + int(cells[_OTHER_CODES])
    return out


def _served(cells: list[float]) -> int:
    """The HTTP responses a slot counted (every status)."""
    return int(cells[_OTHER_CODES]) + sum(int(cells[pair + 1]) for pair in range(_CODES, _CODES + 2 * CODE_PAIRS, 2))


def _by_code(item: tuple[Any, int]) -> tuple[int, str]:
    return (0, f"{item[0]:09d}") if isinstance(item[0], int) else (1, str(item[0]))
