"""Shared timing helpers of the benchmark scripts: host time per call over many back-to-back calls."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any


def per_call_us(fn: Callable[[], Any], n: int = 20_000, warm: int = 500, sync: Callable[[], Any] | None = None,
                repeats: int = 3) -> float:
    """Best of ``repeats`` runs of the mean host time of one call of ``fn``, in microseconds.

    ``sync`` (e.g. ``torch.cuda.synchronize``) runs before each timed loop so queued GPU work from the warm-up
    does not stall the host inside the loop; the loop itself never synchronizes.
    """
    for _ in range(warm):
        fn()
    best = float("inf")
    for _ in range(repeats):
        if sync is not None:
            sync()
        start = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - start) / n * 1e6)
    return best


class Report:
    """Rows of (name, us/call) printed as a table with ratios against named baselines."""

    def __init__(self, title: str) -> None:
        self.title = title
        self.rows: dict[str, float | None] = {}

    def measure(self, name: str, fn: Callable[[], Any], **kw: Any) -> float | None:
        try:
            value: float | None = per_call_us(fn, **kw)
        except Exception as exc:  # a peer that is missing or broken is reported, not fatal
            print(f"  {name}: unavailable ({type(exc).__name__}: {exc})")
            value = None
        self.rows[name] = value
        return value

    def ratio(self, ours: str, peer: str) -> float | None:
        a, b = self.rows.get(ours), self.rows.get(peer)
        return None if a is None or b is None else a / b

    def print(self, ratios: list[tuple[str, str]]) -> None:
        print(f"\n{self.title}")
        for name, value in self.rows.items():
            shown = "unavailable" if value is None else f"{value:8.3f} us/call"
            print(f"  {name:62s} {shown}")
        for ours, peer in ratios:
            r = self.ratio(ours, peer)
            print(f"  ratio {ours} / {peer}: {'n/a' if r is None else f'{r:.2f}x'}")

    def dump(self, path: str, ratios: list[tuple[str, str]]) -> None:
        data = {"title": self.title, "us_per_call": self.rows,
                "ratios": {f"{a} / {b}": self.ratio(a, b) for a, b in ratios}}
        with open(path, "w") as fh:
            json.dump(data, fh, indent=2)
