"""A stand-in for CuPy's ``asarray`` in the CPU tests of the families' load paths (``WeightLoader`` uploads through
``eng.cupy.asarray``): each "upload" is kept on the host under a fake device address, so a test reads back what the
load registered with the GEMMs (``by_ptr[address]``)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np


class HostArrays:
    """Stands in for CuPy's ``asarray``: each "upload" is kept on the host under a fake device address."""

    def __init__(self) -> None:
        self.by_ptr: dict[int, np.ndarray] = {}

    def asarray(self, arr: np.ndarray) -> Any:
        ptr = (len(self.by_ptr) + 1) << 20
        self.by_ptr[ptr] = np.array(arr)
        return SimpleNamespace(data=SimpleNamespace(ptr=ptr))
