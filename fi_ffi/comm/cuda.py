"""The few CUDA runtime calls the communication layer makes, through cuda-python (``cuda.bindings.runtime``).

Device memory for IPC workspaces and staging, streams of its own, copies, and the legacy IPC handles
(``cudaIpcGetMemHandle`` / ``cudaIpcOpenMemHandle``): 64-byte handles of ``cudaMalloc`` allocations that a process
on the same host opens to map a peer's memory. No multicast object is ever made here.

Errors are :class:`fi_ffi.errors.CudaError` from :func:`fi_ffi.cuda.runtime.check` (``CudaError`` stays importable
from here: it is the same class).
"""

from __future__ import annotations

from typing import Any

from ..cuda import runtime as cuda_runtime
from ..errors import CudaError

IPC_HANDLE_BYTES = 64

_rt = cuda_runtime.runtime  # cuda.bindings.runtime, imported on first use


def device_count() -> int:
    """Number of visible CUDA devices (0 without a driver)."""
    try:
        return int(cuda_runtime.check(_rt().cudaGetDeviceCount(), "cudaGetDeviceCount"))
    except (CudaError, ImportError, OSError, RuntimeError):
        return 0


def set_device(device: int) -> None:
    """Make ``device`` current on this thread."""
    cuda_runtime.check(_rt().cudaSetDevice(device), f"cudaSetDevice({device})")


def new_stream(device: int) -> int:
    """A new non-blocking stream on ``device`` (destroy it with :func:`destroy_stream`)."""
    rt = _rt()
    set_device(device)
    stream = cuda_runtime.check(rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking), "cudaStreamCreateWithFlags")
    return int(stream)


def destroy_stream(stream: int) -> None:
    cuda_runtime.check(_rt().cudaStreamDestroy(stream), "cudaStreamDestroy")


def synchronize(stream: int) -> None:
    cuda_runtime.check(_rt().cudaStreamSynchronize(stream), "cudaStreamSynchronize")


def copy_to_device(dst: int, data: bytes, stream: int) -> None:
    """Copy host ``data`` to device address ``dst`` and wait for it."""
    import numpy as np

    rt = _rt()
    host = np.frombuffer(bytes(data), np.uint8).copy()  # kept alive until the copy is done (synchronize below)
    cuda_runtime.check(
        rt.cudaMemcpyAsync(dst, _address(host), len(data), rt.cudaMemcpyKind.cudaMemcpyHostToDevice, stream),
        "cudaMemcpyAsync(host to device)",
    )
    synchronize(stream)


def copy_to_host(src: int, nbytes: int, stream: int) -> bytes:
    """``nbytes`` from device address ``src``, after the work queued on ``stream``."""
    import numpy as np

    rt = _rt()
    out = np.empty(nbytes, np.uint8)
    cuda_runtime.check(
        rt.cudaMemcpyAsync(_address(out), src, nbytes, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream),
        "cudaMemcpyAsync(device to host)",
    )
    synchronize(stream)
    return out.tobytes()


def _address(host: Any) -> int:
    """The address of numpy array ``host``'s first element (its array interface)."""
    return int(host.__array_interface__["data"][0])


def memset(dst: int, value: int, nbytes: int, stream: int) -> None:
    cuda_runtime.check(_rt().cudaMemsetAsync(dst, value, nbytes, stream), "cudaMemsetAsync")


class DeviceBuffer:
    """``nbytes`` of ``cudaMalloc`` memory on ``device`` (``ptr``), freed exactly once by :meth:`close`."""

    def __init__(self, device: int, nbytes: int) -> None:
        if nbytes <= 0:
            raise ValueError(f"nbytes: expected > 0, got {nbytes}")
        set_device(device)
        self.device = device
        self.nbytes = nbytes
        self.ptr = int(cuda_runtime.check(_rt().cudaMalloc(nbytes), f"cudaMalloc({nbytes})"))

    def close(self) -> None:
        ptr, self.ptr = self.ptr, 0
        if ptr:
            set_device(self.device)
            cuda_runtime.check(_rt().cudaFree(ptr), "cudaFree")

    def __enter__(self) -> DeviceBuffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def ipc_handle(ptr: int) -> bytes:
    """The 64-byte IPC handle of the ``cudaMalloc`` allocation starting at ``ptr``."""
    from ..abi.cdefs import get_ffi

    ffi = get_ffi()
    handle = cuda_runtime.check(_rt().cudaIpcGetMemHandle(ptr), "cudaIpcGetMemHandle")
    # the struct's 64 bytes, whatever cuda-bindings names its field
    return bytes(ffi.buffer(ffi.cast("char *", handle.getPtr()), IPC_HANDLE_BYTES))


def ipc_open(handle: bytes) -> int:
    """Map a peer's allocation from its IPC handle (peer access enabled lazily); close with :func:`ipc_close`."""
    from ..abi.cdefs import get_ffi

    ffi = get_ffi()
    rt = _rt()
    if len(handle) != IPC_HANDLE_BYTES:
        raise ValueError(f"handle: expected {IPC_HANDLE_BYTES} bytes (a cudaIpcMemHandle_t), got {len(handle)}")
    h = rt.cudaIpcMemHandle_t()
    ffi.memmove(ffi.cast("char *", h.getPtr()), bytes(handle), IPC_HANDLE_BYTES)
    ptr = cuda_runtime.check(rt.cudaIpcOpenMemHandle(h, rt.cudaIpcMemLazyEnablePeerAccess), "cudaIpcOpenMemHandle")
    return int(ptr)


def ipc_close(ptr: int) -> None:
    cuda_runtime.check(_rt().cudaIpcCloseMemHandle(ptr), "cudaIpcCloseMemHandle")


__all__ = [
    "IPC_HANDLE_BYTES",
    "CudaError",
    "DeviceBuffer",
    "copy_to_device",
    "copy_to_host",
    "destroy_stream",
    "device_count",
    "ipc_close",
    "ipc_handle",
    "ipc_open",
    "memset",
    "new_stream",
    "set_device",
    "synchronize",
]


def device_synchronize() -> None:
    """Wait for all work on the current device."""
    cuda_runtime.check(_rt().cudaDeviceSynchronize(), "cudaDeviceSynchronize")
