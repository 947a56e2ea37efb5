"""Fake CUDA descriptors for the CPU tests: a call whose descriptors claim ``cuda:0`` over host memory passes our
checks, crosses the FFI, passes the module's signature check, and stops at the module's first CUDA call.

Used by every op family's CPU test (``from helpers.fakes import assert_reached_the_kernel, fake_cuda``) and by the
walk-through of docs/ADDING_A_KERNEL.md.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from fi_ffi.errors import KernelError
from fi_ffi.launch.aliasing import footprint
from fi_ffi.tensor.descriptor import Tensor


def fake_cuda(
    shape: tuple[int, ...], dtype: str = "float16", strides: tuple[int, ...] | None = None, device: object = "cuda:0"
) -> Tensor:
    """A descriptor that claims CUDA memory, pointing at 16-byte aligned host memory the module never reads.

    The memory covers the tensor's extent, so two fakes never claim overlapping bytes (the launcher refuses
    outputs over inputs); huge test shapes, refused before any kernel, get a token allocation."""
    extent = footprint(Tensor.from_pointer(16, shape, dtype, device, strides))[1]
    host = np.zeros((extent if extent < 1 << 26 else 0) + 64, dtype=np.uint8)
    ptr = (host.ctypes.data + 15) // 16 * 16
    return Tensor.from_pointer(ptr, shape, dtype, device, strides, owner=host)


def assert_reached_the_kernel(err: KernelError) -> None:
    """The module accepted the argument list and failed on the missing CUDA device/driver."""
    assert err.kind != "TypeError", f"signature mismatch: {err}"
    assert "cuda" in err.message.lower() or "device" in err.message.lower(), err.message


def reached(call: Callable[[], object]) -> str:
    """Run ``call``: it must stop at the module's CUDA device check (not at a signature or argument check, so its
    arguments got through); returns the error's text."""
    with pytest.raises(KernelError) as info:
        call()
    assert_reached_the_kernel(info.value)
    return str(info.value)
