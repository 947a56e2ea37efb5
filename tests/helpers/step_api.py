"""Driving an engine's step API (``fi_engine.runtime.stepping.StepEngine``) to the end, for the GPU tests."""

from __future__ import annotations

from typing import Any

from fi_engine.runtime.stepping import StepOutput


def drain(engine: Any, limit: int = 10_000) -> dict[int, list[StepOutput]]:
    """step() until nothing is queued or active (at most ``limit`` calls); every request's outputs in order."""
    seen: dict[int, list[StepOutput]] = {}
    for _ in range(limit):
        if not engine.has_unfinished:
            break
        for o in engine.step():
            seen.setdefault(o.rid, []).append(o)
    assert not engine.has_unfinished
    return seen
