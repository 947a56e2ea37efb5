"""CUDA stream arguments.

Every op takes ``stream=``: ``None`` (use TVM-FFI's current stream of the device on this thread, which is the
legacy default stream unless something set another), an int handle (``cudaStream_t`` value; 0 is the legacy
default stream), an object implementing the ``__cuda_stream__`` protocol (cuda.core ``Stream``), a
cuda.bindings ``CUstream`` / ``cudaStream_t``, a torch / CuPy stream (``.cuda_stream`` / ``.ptr``).
"""

from __future__ import annotations

from typing import Any


def stream_handle(stream: Any) -> int | None:
    """The ``cudaStream_t`` value of ``stream`` as an int (None stays None); TypeError if not a stream."""
    if stream is None or type(stream) is int:
        return stream
    if isinstance(stream, bool):
        raise TypeError(f"stream: expected a CUDA stream, got {stream!r}")
    if isinstance(stream, int):
        return int(stream)
    protocol = getattr(stream, "__cuda_stream__", None)
    if protocol is not None:
        value = protocol() if callable(protocol) else protocol
        # cuda.core returns (version, handle); accept a bare handle too.
        handle = value[1] if isinstance(value, tuple) else value
        return int(handle)
    for attr in ("cuda_stream", "ptr"):  # torch.cuda.Stream, cupy.cuda.Stream
        value = getattr(stream, attr, None)
        if isinstance(value, int):
            return value
    get_ptr = getattr(stream, "getPtr", None)  # cuda.bindings CUstream / cudaStream_t
    if callable(get_ptr):
        return int(get_ptr())
    raise TypeError(
        f"stream: expected None, an int cudaStream_t, a __cuda_stream__ object, a cuda.bindings stream or a "
        f"torch/CuPy stream, got {type(stream).__name__}"
    )
