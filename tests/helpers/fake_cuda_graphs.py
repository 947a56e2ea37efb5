"""A stand-in for the CUDA runtime's graph calls (:class:`FakeRuntime`), for the CPU tests of the engine's CUDA graphs:
:class:`fi_engine.kernels.graph.CudaGraph` runs as it is over it (``monkeypatch.setattr(fi_engine.kernels.graph, "_rt",
lambda: rt)``), and a test reads what was captured, launched and destroyed, and whether a capture is in progress."""

from __future__ import annotations

from typing import Any


class FakeRuntime:
    """The part of cuda.bindings.runtime that CudaGraph calls: capture mode, the graphs made and destroyed, and the
    thread's last error (a launch refused in capture sets it; cudaGetLastError reads and resets it)."""

    INVALIDATED = 901  # cudaErrorStreamCaptureInvalidated

    class cudaStreamCaptureMode:
        cudaStreamCaptureModeThreadLocal = 2

    def __init__(self, instantiate_error: int = 0) -> None:
        self.capturing = False
        self.invalidated = False
        self.last_error = 0
        self.instantiate_error = instantiate_error
        self.live: set[str] = set()
        self.launched: list[str] = []
        self.serial = 0

    @staticmethod
    def cudaStream_t(ptr):
        return ptr

    def cudaStreamBeginCapture(self, stream, mode):
        assert not self.capturing
        self.capturing, self.invalidated = True, False
        return (0,)

    def cudaStreamEndCapture(self, stream):
        assert self.capturing
        self.capturing = False
        if self.invalidated:
            return (self.INVALIDATED, None)
        self.serial += 1
        self.live.add(f"graph{self.serial}")
        return (0, f"graph{self.serial}")

    def cudaGraphInstantiate(self, graph, flags):
        if self.instantiate_error:
            self.last_error = self.instantiate_error
            return (self.instantiate_error, None)
        self.live.add(f"exec-{graph}")
        return (0, f"exec-{graph}")

    def cudaGraphLaunch(self, exec_, stream):
        assert not self.capturing and exec_ in self.live
        self.launched.append(exec_)
        return (0,)

    def cudaGraphDestroy(self, graph):
        self.live.remove(graph)
        return (0,)

    def cudaGraphExecDestroy(self, exec_):
        self.live.remove(exec_)
        return (0,)

    def cudaGetLastError(self):
        err, self.last_error = self.last_error, 0
        return (err,)

    def refuse_launch(self):
        """What a launch that capture does not allow does: invalidates the capture and sets the last error."""
        self.invalidated = True
        self.last_error = self.INVALIDATED


def install_fake_runtime(monkeypatch: Any) -> FakeRuntime:
    """A :class:`FakeRuntime` that :class:`fi_engine.kernels.graph.CudaGraph` calls for the rest of the test
    (``monkeypatch``: pytest's fixture, which undoes it)."""
    import fi_engine.kernels.graph as graph_module

    rt = FakeRuntime()
    monkeypatch.setattr(graph_module, "_rt", lambda: rt)
    return rt


def log_llama_pass_kernels(monkeypatch: Any) -> None:
    """The Llama pass's own launches of fi_ffi's ops that a stand-in runner cannot make (RoPE, SiLU-and-mul, eager or
    packed) logged instead to the step view's log: its ``q`` (``"rope"``) and its ``gu`` (``"silu"``), each a
    callable."""
    from types import SimpleNamespace

    from fi_engine.models import llama

    logged = SimpleNamespace(
        rope_inplace=lambda q, *a: q("rope"),
        silu_and_mul=lambda gu, *a: gu("silu"),
        prepared_silu_and_mul=lambda gu, *a: lambda: gu("silu"),  # (packed once, launched by calling)
    )
    monkeypatch.setattr(llama, "kernels", logged)
