"""Stand-ins for the GPU parts of the families' load paths in the CPU tests: CuPy's ``asarray`` (``WeightLoader``
uploads through ``eng.cupy.asarray``; each "upload" is kept on the host under a fake device address, so a test reads
back what the load registered with the GEMMs: ``by_ptr[address]``) and ``empty``, and the MoE layer's classes
(:class:`MoEArguments`: what the load hands ``MoELayer`` and ``MoEScratch``, which build CUDA kernels and buffers)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np


class HostArrays:
    """Stands in for CuPy's ``asarray`` (each "upload" kept on the host under a fake device address) and ``empty``
    (a host array: the 16-bit copy buffers of e4m3 experts)."""

    float16, uint16 = np.float16, np.uint16

    def __init__(self) -> None:
        self.by_ptr: dict[int, np.ndarray] = {}

    def asarray(self, arr: np.ndarray) -> Any:
        ptr = (len(self.by_ptr) + 1) << 20
        self.by_ptr[ptr] = np.array(arr)
        return SimpleNamespace(data=SimpleNamespace(ptr=ptr))

    def empty(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        return np.empty(shape, dtype)


class MoEArguments:
    """Stands in for ``fi_engine.layers.moe.MoELayer`` and ``MoEScratch`` (patch both): keeps the positional and
    keyword arguments a family's load gives them (``weights``, ``capacity``, ``fp8_experts``, ...), and what the load
    sets on the layer afterwards; ``weights`` as the layer has it (its first argument)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs
        self.weights = args[0] if args else kwargs.get("weights")
