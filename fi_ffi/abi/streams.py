"""TVM-FFI's current stream: per CUDA device and thread, the stream a call made with ``stream=None`` runs on.

:func:`current_stream` reads it, :class:`stream_scope` sets it for a block. Reading the stream *argument* a
caller passes (an int handle, a ``__cuda_stream__`` object, ...) is :mod:`fi_ffi.tensor.streams`'s.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..tensor.streams import device_ordinal, stream_handle
from .cdefs import get_ffi
from .raised import take_raised
from .runtime import api

if TYPE_CHECKING:
    from ..tensor.protocols import StreamLike

__all__ = ["current_stream", "stream_scope"]

_KDLCUDA = 2  # the device type TVM-FFI keeps current streams for


class stream_scope:
    """Make ``stream`` TVM-FFI's current stream of CUDA device ``device`` on this thread for a block.

    Ops called with ``stream=None`` inside the block run on it; the previous stream is restored on exit,
    also when the block raises. Cheaper than passing ``stream=`` to each call (which sets and restores
    the stream around every call), so a runtime can wrap a whole decode step::

        with fi_ffi.stream_scope(my_stream):
            for layer in layers:
                fi_ffi.rmsnorm(x, w, out=out)
    """

    def __init__(self, stream: StreamLike, device: int = 0) -> None:
        handle = stream_handle(stream)
        if handle is None:
            raise TypeError("stream: expected a CUDA stream, got None")
        self.stream = handle
        self.device = device_ordinal(device)
        self._previous: list[int] = []

    def __enter__(self) -> int:
        out = get_ffi().new("uintptr_t*")
        if api().TVMFFIEnvSetStream(_KDLCUDA, self.device, self.stream, out) != 0:
            raise take_raised("TVMFFIEnvSetStream", (str(self.device), hex(self.stream)))
        self._previous.append(int(out[0]))
        return self.stream

    def __exit__(self, *exc: object) -> None:
        api().TVMFFIEnvSetStream(_KDLCUDA, self.device, self._previous.pop(), get_ffi().NULL)


def current_stream(device: int = 0) -> int:
    """TVM-FFI's current stream of CUDA device ``device`` on this thread (0: the legacy default stream)."""
    return int(api().TVMFFIEnvGetStream(_KDLCUDA, device_ordinal(device)))
