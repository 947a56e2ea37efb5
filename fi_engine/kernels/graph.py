"""One CUDA graph captured from a stream and replayed, with cuda-python (``cuda.bindings.runtime``).

Capture uses ``cudaStreamCaptureModeThreadLocal``: this thread may not make calls that are illegal during
capture (synchronizing, legacy-stream work); other threads are unaffected. The captured work must use only
memory that outlives the graph and must not allocate (the engine's buffers are allocated up front). A failing
call raises :class:`~fi_ffi.errors.CudaError` (:func:`fi_ffi.cuda.check`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from fi_ffi.cuda import check as _check
from fi_ffi.cuda import cudart as _rt  # cuda.bindings.runtime, imported on first use
from fi_ffi.errors import CudaError

__all__ = ["CudaGraph"]


class CudaGraph:
    """A graph captured once from the work issued on ``stream`` inside :meth:`capture`, then launched."""

    def __init__(self, stream: int) -> None:
        self.stream = stream
        self._s: Any = None  # the cudaStream_t object, made once
        self._graph: Any = None
        self._exec: Any = None

    @property
    def captured(self) -> bool:
        return self._exec is not None

    @contextmanager
    def capture(self) -> Iterator[None]:
        """Record the work issued on the stream in the ``with`` block (not executed now); instantiate it."""
        if self._exec is not None:
            raise ValueError("graph: already captured; close() it first")
        rt = _rt()
        s = self._s = rt.cudaStream_t(self.stream)
        _check(
            rt.cudaStreamBeginCapture(s, rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal),
            "cudaStreamBeginCapture",
        )
        try:
            yield
        except BaseException:
            try:  # leave the stream usable; drop the partial graph (the block's error is the one raised)
                graph = _check(rt.cudaStreamEndCapture(s), "cudaStreamEndCapture")
            except CudaError:
                graph = None
            if graph is not None:
                rt.cudaGraphDestroy(graph)
            # a launch refused in capture also left its error as the thread's last error: reset it, or the next
            # eager launch's own error check (cudaGetLastError in the modules) would report it again
            rt.cudaGetLastError()
            raise
        try:
            self._graph = _check(rt.cudaStreamEndCapture(s), "cudaStreamEndCapture")
            self._exec = _check(rt.cudaGraphInstantiate(self._graph, 0), "cudaGraphInstantiate")
        except CudaError:
            rt.cudaGetLastError()  # as above: the error is raised once, not met again by the next launch
            raise

    def launch(self) -> None:
        """Enqueue one replay on the stream (asynchronous)."""
        rt = _rt()
        _check(rt.cudaGraphLaunch(self._exec, self._s), "cudaGraphLaunch")

    def close(self) -> None:
        """Destroy the executable graph and the graph (idempotent; the stream stays the caller's)."""
        rt = _rt()
        if self._exec is not None:
            rt.cudaGraphExecDestroy(self._exec)
            self._exec = None
        if self._graph is not None:
            rt.cudaGraphDestroy(self._graph)
            self._graph = None
