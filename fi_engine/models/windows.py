"""Attention plans per sliding window, for the families whose layers attend within different windows (Gemma 2 and
gpt-oss: sliding layers and whole-context layers alternate).

A step is planned once per distinct window, each plan on a workspace of its own: a plan is stale once another is made
on its workspace. The first window plans on the engine's prefill and decode workspaces; every further window has two
of its own (prefill, decode). A family holds one :class:`WindowPlans` as its state and keeps its per-layer attention
calls direct (a dict lookup of the layer's window in the plans this returns).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ..kernels import flashinfer as kernels

__all__: list[str] = []


class WindowPlans:
    """The distinct windows of ``windows`` (each layer's ``window_left``, tokens) and the workspaces their plans use,
    allocated on GPU ``device``: two per window beyond the first."""

    def __init__(self, windows: Sequence[int], device: int) -> None:
        self.distinct = sorted(set(windows))
        self.extra_ws = [kernels.workspace(device) for _ in range(2 * (len(self.distinct) - 1))]

    def plan(
        self, eng: Any, decode: bool, planner: Callable[..., Any], arrays: Sequence[Any], **options: Any
    ) -> dict[int, Any]:
        """The plans by window: ``planner`` (a fi_ffi plan function) called once per distinct window, in increasing
        order, with the step's index ``arrays``, the model's heads, head size and page size, then ``q_data_type``,
        ``window_left``, the engine's stream, the window's workspace and ``options``. A decode step also sets
        ``eng.decode_plan`` to the first window's (the one the decode graph's layout check watches)."""
        c = eng.config
        first = eng.decode_workspace if decode else eng.prefill_workspace
        n = len(self.distinct) - 1
        spaces = [first, *(self.extra_ws[n:] if decode else self.extra_ws[:n])]
        plans = {
            window: planner(
                *arrays,
                c.num_qo_heads,
                c.num_kv_heads,
                c.head_dim,
                eng.page_size,
                q_data_type=eng.dtype,
                window_left=window,
                stream=eng.stream_ptr,
                workspace=ws,
                **options,
            )
            for window, ws in zip(self.distinct, spaces, strict=True)
        }
        if decode:
            eng.decode_plan = plans[self.distinct[0]]
        return plans

    def close(self) -> None:
        """Free the extra workspaces (the engine frees its own)."""
        for ws in self.extra_ws:
            ws.close()
