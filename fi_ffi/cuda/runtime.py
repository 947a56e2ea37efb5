"""The one place fi_ffi turns CUDA runtime results into values or errors (``cuda.bindings.runtime``).

Every CUDA runtime call fi_ffi makes itself (workspace and comm allocations, streams, events, CUDA graphs,
device queries, the first-use checks) goes through :func:`check`, as cuda.core's ``handle_return`` does::

    from fi_ffi.cuda import runtime as cuda_runtime

    rt = cuda_runtime.runtime()
    ptr = cuda_runtime.check(rt.cudaMalloc(nbytes), f"cudaMalloc({nbytes})")

A failure is one :class:`~fi_ffi.errors.CudaError` naming the call, the CUDA error name and description, and a fix;
it carries the error code (``code``) so that a caller that must say "no GPU" differently (the device queries
of :mod:`fi_ffi.cuda.device` raise :class:`~fi_ffi.errors.UnsupportedDeviceError`) converts it there, by code
(:func:`no_device`). ``cuda.bindings.runtime`` is imported on first use (a few hundred milliseconds), never at
import of fi_ffi. The CUDA *driver* calls on the per-plan hot path are made through :mod:`fi_ffi.cuda.driver` (cffi,
no per-call objects); their failures become the same CudaError through :func:`driver_error` / :func:`no_driver`.
Where the driver explains a failure (none installed, or older than the runtime), the error's description and fix are
:mod:`fi_ffi.cuda.requirements`' ("no NVIDIA driver found", or the driver's version, the one needed and the way out).
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

from ..errors import CudaError
from . import requirements

_lock = threading.Lock()
_rt: Any = None
_runtime_version: int | None = None  # cudaRuntimeGetVersion of cuda.bindings.runtime (its static cudart), once

# cudaErrorInitializationError, StubLibrary, InsufficientDriver, NoDevice, Unknown: no usable GPU at all.
NO_DEVICE_CODES = frozenset((3, 34, 35, 100, 999))
_MEMORY_CODES = frozenset((2,))  # cudaErrorMemoryAllocation
_BAD_DEVICE_CODES = frozenset((101,))  # cudaErrorInvalidDevice

_HINT_NO_DEVICE = (
    "No usable CUDA GPU: check that `nvidia-smi` lists one, that CUDA_VISIBLE_DEVICES does not hide it and that the "
    "driver is at least as new as the CUDA runtime (`python -m fi_ffi doctor` shows both)"
)
_HINT_MEMORY = "The device is out of memory: free buffers, or ask for smaller ones"
_HINT_BAD_DEVICE = "The device ordinal does not exist: use one below cudaGetDeviceCount() (`nvidia-smi` lists them)"
_HINT_OTHER = (
    "An earlier asynchronous kernel failure can surface in a later call: rerun with CUDA_LAUNCH_BLOCKING=1 to "
    "find the call that caused it"
)


def runtime() -> Any:
    """The ``cuda.bindings.runtime`` module, imported once; CudaError (``code`` None) where it cannot be imported."""
    global _rt
    if _rt is None:
        with _lock:
            if _rt is None:
                try:
                    from cuda.bindings import runtime as rt
                except ImportError as exc:
                    raise CudaError(
                        "import cuda.bindings.runtime",
                        None,
                        "",
                        f"cuda-bindings is not importable ({exc})",
                        "Install it with `python -m pip install cuda-bindings` (it comes with cuda-python)",
                    ) from exc
                _rt = rt
    return _rt


def hint(code: int) -> str:
    """What to do about CUDA error ``code`` (one sentence, for the error text)."""
    if code in NO_DEVICE_CODES:
        return _HINT_NO_DEVICE
    if code in _MEMORY_CODES:
        return _HINT_MEMORY
    if code in _BAD_DEVICE_CODES:
        return _HINT_BAD_DEVICE
    return _HINT_OTHER


def error(err: Any, what: str) -> CudaError:
    """The :class:`CudaError` for ``cudaError_t`` ``err`` returned by the call ``what`` (not raised)."""
    rt = runtime()
    code = int(err)
    # cuda-bindings 13.0 names only its cudaError_t enum (later releases take an int too); a code this release has
    # no member for is named by its number below
    with contextlib.suppress(Exception):
        err = rt.cudaError_t(code)
    try:
        name = _text(rt.cudaGetErrorName(err), f"cudaError {code}")
        description = _text(rt.cudaGetErrorString(err), "unknown CUDA error")
    except Exception:  # (the same, for the lookups themselves)
        name, description = f"cudaError {code}", "unknown CUDA error"
    explained = requirements.explain(code, runtime_version())
    if explained is not None:  # no driver, or one older than the runtime: say which, and the way out
        description, fix = explained
        return CudaError(what, code, name, description, fix)
    return CudaError(what, code, name, description, hint(code))


def runtime_version() -> int:
    """The CUDA version of cuda-bindings' own runtime (``cudaRuntimeGetVersion``: ``13000`` for 13.0; answers
    without a driver), 0 where it does not answer."""
    global _runtime_version
    if _runtime_version is None:
        try:
            err, version = runtime().cudaRuntimeGetVersion()
            _runtime_version = int(version) if int(err) == 0 else 0
        except Exception:  # cuda-bindings missing or an unexpected result: the version is simply unknown
            _runtime_version = 0
    return _runtime_version


def _text(result: Any, default: str) -> str:
    """The string of a ``(err, bytes)`` result of cudaGetErrorName / cudaGetErrorString (``default`` if none)."""
    value = result[1] if isinstance(result, tuple) and len(result) > 1 else None
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return default if value is None else str(value)


def check(result: Any, what: str) -> Any:
    """The value(s) of a cuda.bindings runtime call's ``result``, or raise :class:`CudaError` naming ``what``.

    Args:
        result: what the call returned: ``(err,)``, ``(err, value)``, ``(err, v1, v2, ...)`` or a bare ``err``.
        what: the call as the error should name it, e.g. ``"cudaSetDevice(1)"``.

    Returns:
        None for ``(err,)``, the value for ``(err, value)``, else the tuple of values.
    """
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:  # cudaSuccess
        raise error(err, what)
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


class DeviceScope:
    """``with DeviceScope(device_id):`` makes ``device_id`` the calling thread's current CUDA device for the block
    and puts the previous one back after it (also on error); nothing is set when it is current already.

    A failed ``cudaGetDevice`` / ``cudaSetDevice`` on entry is a :class:`CudaError`; restoring never raises.
    """

    __slots__ = ("device_id", "previous")

    def __init__(self, device_id: int) -> None:
        self.device_id = device_id
        self.previous: int | None = None

    def __enter__(self) -> None:
        rt = runtime()
        current = check(rt.cudaGetDevice(), "cudaGetDevice")
        if current != self.device_id:
            check(rt.cudaSetDevice(self.device_id), f"cudaSetDevice({self.device_id})")
            self.previous = current

    def __exit__(self, *exc: object) -> None:
        if self.previous is not None:
            runtime().cudaSetDevice(self.previous)
            self.previous = None


def driver_error(err: int, what: str) -> CudaError:
    """The :class:`CudaError` for ``CUresult`` ``err`` of the CUDA *driver* call ``what`` (:mod:`fi_ffi.cuda.driver`).

    The driver's codes agree with the runtime's where the hints differ (2 out of memory, 3/34/100/999 no usable
    GPU, 101 bad ordinal), so :func:`hint` and :func:`no_device` hold for both.
    """
    from . import driver

    return CudaError(what, int(err), driver.error_name(err), "a CUDA driver call failed", hint(int(err)))


def no_driver(what: str) -> CudaError:
    """The :class:`CudaError` for a driver call ``what`` made where libcuda cannot be loaded or initialised."""
    from . import driver

    probed = driver.probe()
    if not probed.found:
        return CudaError(what, 100, "", requirements.no_driver_cause(), requirements.NO_DRIVER_FIX)
    init = f"cuInit failed with {driver.error_name(probed.init)}" if probed.init > 0 else "cuInit is not exported"
    return CudaError(what, 100, "", f"cannot use the CUDA driver ({driver.LIBRARY}: {init})", _HINT_NO_DEVICE)


def no_device(exc: CudaError) -> bool:
    """True if ``exc`` means there is no usable GPU at all (no driver, no device, or cuda-bindings missing)."""
    return exc.code is None or exc.code in NO_DEVICE_CODES


__all__ = [
    "NO_DEVICE_CODES",
    "CudaError",
    "DeviceScope",
    "check",
    "driver_error",
    "error",
    "hint",
    "no_device",
    "no_driver",
    "runtime",
    "runtime_version",
]
