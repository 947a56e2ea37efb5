"""Reading a stream argument (and a device ordinal argument): what a caller passed, as a ``cudaStream_t`` int.

Every op takes ``stream=``: ``None`` (where the caller's framework would run: torch's current stream of the
device for torch tensors, CuPy's current stream for CuPy arrays, otherwise TVM-FFI's current stream of the
device on this thread, the legacy default stream unless something set another; see
:mod:`fi_ffi.tensor.intake`), an int handle (``cudaStream_t`` value; 0 is the legacy default stream), an object
implementing the ``__cuda_stream__`` protocol (cuda.core ``Stream``), a cuda.bindings ``CUstream`` /
``cudaStream_t``, a torch / CuPy stream (``.cuda_stream`` / ``.ptr``). This module only reads such an
argument; TVM-FFI's current stream (what ``None`` resolves to, :func:`fi_ffi.current_stream` and
:class:`fi_ffi.stream_scope`) is the TVM-FFI layer's, in :mod:`fi_ffi.abi.streams`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    pass

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
