"""CUDA stream arguments.

Every op takes ``stream=``: ``None`` (where the caller's framework would run: torch's current stream of the
device for torch tensors, CuPy's current stream for CuPy arrays, otherwise TVM-FFI's current stream of the
device on this thread, the legacy default stream unless something set another; see
:mod:`fi_ffi.tensor.producers`), an int handle (``cudaStream_t`` value; 0 is the legacy default stream), an object
implementing the ``__cuda_stream__`` protocol (cuda.core ``Stream``), a cuda.bindings ``CUstream`` /
``cudaStream_t``, a torch / CuPy stream (``.cuda_stream`` / ``.ptr``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .protocols import StreamLike

_HANDLE_END = 1 << 64


def stream_handle(stream: Any) -> int | None:
    """The ``cudaStream_t`` value of ``stream`` as an int (None stays None).

    Raises:
        TypeError: ``stream`` is not a stream (or its ``__cuda_stream__`` answer is malformed).
        ValueError: the handle is outside [0, 2**64).
    """
    if stream is None:
        return None
    if type(stream) is int:
        return _in_range(stream, stream)
    if isinstance(stream, bool):
        raise TypeError(f"stream: expected a CUDA stream, got {stream!r}")
    if isinstance(stream, int):
        return _in_range(int(stream), stream)
    protocol = getattr(stream, "__cuda_stream__", None)
    if protocol is not None:
        try:
            value = protocol() if callable(protocol) else protocol
        except Exception as exc:
            raise TypeError(f"stream: {type(stream).__name__}.__cuda_stream__() failed: {exc}") from exc
        # cuda.core returns (version, handle); accept a bare handle too.
        handle = value[1] if isinstance(value, tuple) and len(value) == 2 else value
        if isinstance(handle, bool) or not isinstance(handle, int):
            raise TypeError(
                f"stream: {type(stream).__name__}.__cuda_stream__ must give (version, handle) with an "
                f"int handle, got {value!r}"
            )
        return _in_range(int(handle), stream)
    for attr in ("cuda_stream", "ptr"):  # torch.cuda.Stream, cupy.cuda.Stream
        value = getattr(stream, attr, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return _in_range(value, stream)
    get_ptr = getattr(stream, "getPtr", None)  # cuda.bindings CUstream / cudaStream_t
    if callable(get_ptr):
        return _in_range(int(get_ptr()), stream)
    raise TypeError(
        f"stream: expected None, an int cudaStream_t, a __cuda_stream__ object, a cuda.bindings stream or a "
        f"torch/CuPy stream, got {type(stream).__name__}"
    )


def _in_range(handle: int, stream: Any) -> int:
    if not 0 <= handle < _HANDLE_END:
        raise ValueError(f"stream: expected a cudaStream_t handle in [0, 2**64), got {handle} (from {stream!r})")
    return handle


def device_ordinal(device: Any) -> int:
    """``device`` as a CUDA ordinal in [0, 2**31); TypeError/ValueError naming ``device`` otherwise."""
    if isinstance(device, bool) or not hasattr(device, "__index__"):
        raise TypeError(f"device: expected an int CUDA ordinal, got {type(device).__name__}")
    ordinal = int(device.__index__())
    if not 0 <= ordinal < 1 << 31:
        raise ValueError(f"device: expected a CUDA ordinal in [0, 2**31), got {ordinal}")
    return ordinal


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
        from ..abi.cdefs import get_ffi
        from ..abi.raised import take_raised
        from ..abi.runtime import api

        out = get_ffi().new("uintptr_t*")
        if api().TVMFFIEnvSetStream(2, self.device, self.stream, out) != 0:
            raise take_raised("TVMFFIEnvSetStream", (str(self.device), hex(self.stream)))
        self._previous.append(int(out[0]))
        return self.stream

    def __exit__(self, *exc: object) -> None:
        from ..abi.cdefs import get_ffi
        from ..abi.runtime import api

        api().TVMFFIEnvSetStream(2, self.device, self._previous.pop(), get_ffi().NULL)


def current_stream(device: int = 0) -> int:
    """TVM-FFI's current stream of CUDA device ``device`` on this thread (0: the legacy default stream)."""
    from ..abi.runtime import api

    return int(api().TVMFFIEnvGetStream(2, device_ordinal(device)))
