"""The few CUDA driver calls fi_ffi makes itself, through cffi in ABI mode (libcuda, nothing compiled).

Four users: :mod:`fi_ffi.tensor.intake` asks which device owns a CUDA-array-interface pointer and orders a consumer
stream after a producer's (an event), :class:`~fi_ffi.ops.attention.workspace.Workspace` records and waits for the
plan-copy event on every plan, :mod:`fi_ffi.ops.segment_gemm` copies its host-computed argument arrays from the
workspace's page-locked buffer (and its prepared form waits for that copy on the call's stream), and the engine's
small-row GEMV (:mod:`fi_engine.kernels.dense`) is launched with ``cuLaunchKernel`` on an argument array packed once
(``cuLaunchKernelEx`` where it asks for programmatic dependent launch: a ``CUlaunchConfig`` with one
``CUlaunchAttribute``, laid out as ``cuda.h`` declares them), as are its skinny GEMM's kernels, whose blocks an SM
holds it asks ``cuOccupancyMaxActiveBlocksPerMultiprocessor``.
Not through cuda-bindings: its ``cuPointerGetAttribute(s)`` reports device ordinal 0 for every pointer
(NVIDIA/cuda-python #2928), and each call there costs microseconds (argument objects, an enum per returned error),
which the per-plan event calls cannot afford. Events and streams are passed as integer handles.

:func:`probe` says what the driver library is (loadable or not, the CUDA version it supports, whether ``cuInit``
works) without raising; :mod:`fi_ffi.cuda.requirements` turns that into the one message about the driver.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

CDEFS = """
int cuInit(unsigned int flags);
int cuDriverGetVersion(int* version);
int cuGetErrorName(int error, const char** name);
int cuPointerGetAttributes(unsigned int count, int* attributes, void** data, uint64_t ptr);
int cuCtxGetDevice(int* device);
int cuDeviceGet(int* device, int ordinal);
int cuDevicePrimaryCtxRetain(void** context, int device);
int cuDevicePrimaryCtxRelease_v2(int device);
int cuCtxPushCurrent_v2(void* context);
int cuCtxPopCurrent_v2(void** context);
int cuEventCreate(uintptr_t* event, unsigned int flags);
int cuEventRecord(uintptr_t event, uintptr_t stream);
int cuEventQuery(uintptr_t event);
int cuEventSynchronize(uintptr_t event);
int cuStreamWaitEvent(uintptr_t stream, uintptr_t event, unsigned int flags);
int cuEventDestroy_v2(uintptr_t event);
int cuMemcpyHtoDAsync_v2(uint64_t dst, uintptr_t src, size_t bytes, uintptr_t stream);
int cuStreamSynchronize(uintptr_t stream);
int cuLaunchKernel(uintptr_t f, unsigned int gridDimX, unsigned int gridDimY, unsigned int gridDimZ,
                   unsigned int blockDimX, unsigned int blockDimY, unsigned int blockDimZ, unsigned int sharedMemBytes,
                   uintptr_t stream, void** kernelParams, void** extra);
typedef struct { int id; char pad[4]; unsigned char value[64]; } CUlaunchAttribute;
typedef struct {
    unsigned int gridDimX, gridDimY, gridDimZ, blockDimX, blockDimY, blockDimZ, sharedMemBytes;
    uintptr_t hStream;
    CUlaunchAttribute* attrs;
    unsigned int numAttrs;
} CUlaunchConfig;
int cuLaunchKernelEx(const CUlaunchConfig* config, uintptr_t f, void** kernelParams, void** extra);
int cuOccupancyMaxActiveBlocksPerMultiprocessor(int* numBlocks, uintptr_t func, int blockSize, size_t dynamicSMemSize);
"""
ERROR_NOT_READY = 600  # CUDA_ERROR_NOT_READY: an event query whose work is still pending

LIBRARY = "libcuda.so.1"


@dataclass(frozen=True)
class DriverProbe:
    """What the NVIDIA driver library says about itself, read once per process.

    ``load_error``: ``""`` if :data:`LIBRARY` was opened, else the dynamic loader's message (no driver installed).
    ``version``: the newest CUDA version the driver runs, as ``cuDriverGetVersion`` gives it (``1000 * major + 10 *
    minor``: ``12080`` is CUDA 12.8; 0 where unknown). ``init``: ``cuInit(0)``'s ``CUresult`` (0: usable; -1 where
    the library did not load or lacks the call).
    """

    load_error: str
    version: int
    init: int

    @property
    def found(self) -> bool:
        """True if a driver library was opened and answers as one (it may still be too old, or see no GPU). A
        library that loads but answers neither ``cuDriverGetVersion`` nor ``cuInit`` (a stand-in such as the CUDA
        toolkit's ``stubs/libcuda.so``) is no driver: every NVIDIA driver tells its version."""
        return not self.load_error and (self.version > 0 or self.init == 0)


_lock = threading.Lock()
# (ffi, libcuda after cuInit or None where no driver can be used, what the library said about itself)
_state: tuple[Any, Any, DriverProbe] | None = None


def _call(lib: Any, name: str, *args: Any) -> int:
    """``lib.name(*args)``, or -1 where the library has no such function (an old or partial libcuda)."""
    try:
        function = getattr(lib, name)
    except AttributeError:
        return -1
    return int(function(*args))


def _load() -> tuple[Any, Any, DriverProbe]:
    global _state
    if _state is None:
        with _lock:
            if _state is None:
                import cffi

                ffi = cffi.FFI()
                ffi.cdef(CDEFS)
                try:
                    lib = ffi.dlopen(LIBRARY)
                except OSError as exc:
                    _state = (ffi, None, DriverProbe(str(exc) or f"cannot load {LIBRARY}", 0, -1))
                    return _state
                # cuDriverGetVersion answers before (and without) cuInit: an old driver says its version even
                # where cuInit fails
                version = ffi.new("int*")
                known = _call(lib, "cuDriverGetVersion", version) == 0
                init = _call(lib, "cuInit", 0)
                probed = DriverProbe("", version[0] if known else 0, init)
                _state = (ffi, lib if init == 0 else None, probed)
    return _state


def probe() -> DriverProbe:
    """The :class:`DriverProbe` of this process's driver library (loads it once; never raises)."""
    return _load()[2]


def ffi() -> Any:
    """The cffi FFI that declares the driver calls of :data:`CDEFS` (for their out-parameters and argument arrays)."""
    return _load()[0]


def load() -> Any:
    """libcuda after ``cuInit``, or None where there is no usable driver (CPU-only machines)."""
    return _load()[1]


def error_name(err: int) -> str:
    """The driver's name of error code ``err`` (``CUDA_ERROR_...``), or ``CUresult N`` if it has none."""
    ffi, lib, _ = _load()
    text = ffi.new("const char**")
    if lib is not None and lib.cuGetErrorName(err, text) == 0:
        return str(ffi.string(text[0]).decode())
    return f"CUresult {err}"


__all__ = ["CDEFS", "ERROR_NOT_READY", "LIBRARY", "DriverProbe", "error_name", "ffi", "load", "probe"]
