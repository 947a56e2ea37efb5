"""The query offsets of a decode step, ``0, 1, ..., max_batch``, for FlashInfer's prefill-style kernels run as decode
(one query row a request): the Llama family's decode graphs on the FA2 paged-prefill kernel, gpt-oss's attention with
sinks, DeepSeek's MLA plan. One array, made once per model at its first use outside any capture: the host copy for the
plans, a device copy and its descriptors (one per row count) for the runs.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..kernels import flashinfer as kernels

__all__: list[str] = []


class DecodeQueryOffsets:
    """``0, 1, ..., max_batch`` as int32 on the host and, where ``device`` (the default), on ``eng``'s device (its CuPy
    array made here: make this outside a CUDA-graph capture, which refuses allocation)."""

    def __init__(self, eng: Any, device: bool = True) -> None:
        self._host = np.arange(eng.max_batch + 1, dtype=np.int32)
        self._device = eng.cupy.asarray(self._host) if device else None
        self._device_id = eng.device
        self._views: dict[int, Any] = {}  # a descriptor of the device copy's first rows + 1 entries, by rows

    def host(self, rows: int) -> np.ndarray:
        """The offsets of a step of ``rows`` rows, ``rows + 1`` entries on the host (a view: plans copy it)."""
        return self._host[: rows + 1]

    def view(self, rows: int) -> Any:
        """A descriptor of the device copy's first ``rows + 1`` entries (made once per row count; no allocation, so
        a capture may ask for it)."""
        view = self._views.get(rows)
        if view is None:
            if self._device is None:
                raise RuntimeError("these decode query offsets were made without a device copy (device=False)")
            view = self._views[rows] = kernels.descriptor(
                self._device.data.ptr, (rows + 1,), "int32", self._device_id, owner=self._device
            )
        return view
