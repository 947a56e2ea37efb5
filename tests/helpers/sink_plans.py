"""Attention-sink plans over fake ``cuda:0`` descriptors, for the CPU tests (``tests/ops/attention/test_sink.py``, and
the bad-input
campaign's sink runs): bfloat16, 8 query heads over 2 K/V heads of 64, 16-token pages."""

from __future__ import annotations

from typing import Any

from fi_ffi.ops.attention import sink as K
from fi_ffi.ops.attention.plan import Plan
from helpers.attention_plans import workspace

H_Q, H_K, D, PAGE = 8, 2, 64, 16


def settings(mode: str = "paged", backend: str = "fa2", window_left: int = -1, layout: str = "NHD") -> Any:
    args = (H_Q, H_K, D, PAGE if mode == "paged" else 1, "bfloat16", layout, True, window_left, None, backend, False)
    return K._settings(mode, 0, args)


def fake_plan(make_array, mode: str = "paged", backend: str = "fa2", window_left: int = -1) -> Plan:  # type: ignore[no-untyped-def]
    """A sink Plan as the plan functions build it, around a synthetic schedule of the module's length."""
    ws = workspace()
    s = settings(mode, backend, window_left)
    n = 9 if backend == "fa3" else 15
    return Plan.make(make_array(*([0] * n)), ws, ws._generation, s, 2, 4, 3 if mode == "paged" else 9)
