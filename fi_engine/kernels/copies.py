"""What the engine's ``cudaMemcpyAsync`` calls (through CuPy) take besides device addresses: the copy kinds
(``cudaMemcpyKind``, as ``cuda_runtime_api.h`` numbers them) and the address of a host array, page-locked where the
copy is asynchronous (the step arrays' staging buffers, the tokens' pinned copies)."""

from __future__ import annotations

import numpy as np

__all__ = ["D2D", "D2H", "H2D", "host_address"]

H2D, D2H, D2D = 1, 2, 3  # cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost, cudaMemcpyDeviceToDevice


def host_address(host: np.ndarray) -> int:
    """The address of ``host``'s first element (numpy's array interface)."""
    return int(host.__array_interface__["data"][0])
