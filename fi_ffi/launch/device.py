"""The calling thread's current CUDA device and per-device properties, through ``cuda.bindings.runtime``.

Some kernels look at the *current* CUDA device (``cudaGetDevice``) rather than at their tensors' device: the
GDN prefill launcher reads the current device's properties to pick its code path and SM count. Ops that call
such kernels make the tensors' device current for the call with :func:`make_current` and put the previous one
back with :func:`restore`.

``cuda.bindings.runtime`` is imported on first use (it takes a few hundred milliseconds), never at import of
fi_ffi. Compute capability and SM count are cached per device ordinal: they cannot change while the process
lives. A failing query (no driver, no device, bad ordinal) raises
:class:`~fi_ffi.errors.UnsupportedDeviceError` whose text names the CUDA error.
"""

from __future__ import annotations

import threading
from typing import Any

from ..errors import UnsupportedDeviceError

_rt: Any = None
_lock = threading.Lock()
_capability: dict[int, tuple[int, int]] = {}
_sm_count: dict[int, int] = {}
# cudaErrorInitializationError, StubLibrary, InsufficientDriver, NoDevice, Unknown: no usable GPU at all.
_NO_DEVICE = (3, 34, 35, 100, 999)


def _runtime() -> Any:
    global _rt
    if _rt is None:
        with _lock:
            if _rt is None:
                try:
                    from cuda.bindings import runtime
                except ImportError as exc:
                    raise UnsupportedDeviceError(
                        f"cannot query CUDA devices: cuda.bindings.runtime is not importable ({exc}); "
                        "install cuda-bindings"
                    ) from exc
                _rt = runtime
    return _rt


def _fail(rt: Any, err: Any, what: str) -> UnsupportedDeviceError:
    name = rt.cudaGetErrorName(err)[1]
    name = name.decode() if isinstance(name, bytes) else str(name)
    if int(err) in _NO_DEVICE:
        return UnsupportedDeviceError(f"no CUDA device is available ({what} failed with {name})")
    return UnsupportedDeviceError(f"{what} failed with {name}")


def _ordinal(device_id: Any) -> int:
    """``device_id`` as a CUDA device ordinal (a C int >= 0), else TypeError/ValueError naming it."""
    if isinstance(device_id, bool) or not isinstance(device_id, int):
        raise TypeError(f"device_id: expected an int, got {type(device_id).__name__}")
    if not 0 <= device_id < 1 << 31:
        raise ValueError(f"device_id: expected a CUDA device ordinal in [0, 2**31), got {device_id}")
    return device_id


def current_device() -> int:
    """The ordinal of this thread's current CUDA device (``cudaGetDevice``)."""
    rt = _runtime()
    err, device = rt.cudaGetDevice()
    if err:
        raise _fail(rt, err, "cudaGetDevice")
    return int(device)


def set_device(device_id: int) -> None:
    """Make ``device_id`` this thread's current CUDA device (``cudaSetDevice``)."""
    device_id = _ordinal(device_id)
    rt = _runtime()
    (err,) = rt.cudaSetDevice(device_id)
    if err:
        raise _fail(rt, err, f"cudaSetDevice({device_id})")


def make_current(device_id: int) -> int:
    """Make ``device_id`` current if it is not already; return the device to :func:`restore`, or -1.

    -1 means nothing was changed (the cheap, common case: one ``cudaGetDevice`` and no set).
    """
    device_id = _ordinal(device_id)
    rt = _runtime()
    err, previous = rt.cudaGetDevice()
    if err:
        raise _fail(rt, err, "cudaGetDevice")
    if previous == device_id:
        return -1
    (err,) = rt.cudaSetDevice(device_id)
    if err:
        raise _fail(rt, err, f"cudaSetDevice({device_id})")
    return int(previous)


def restore(previous: int) -> None:
    """Undo :func:`make_current`: set ``previous`` back unless it is -1. Never raises (used in ``finally``)."""
    if previous >= 0:
        _rt.cudaSetDevice(previous)


def _attribute(rt: Any, device_id: int, attr: Any, what: str) -> int:
    err, value = rt.cudaDeviceGetAttribute(attr, device_id)
    if err:
        raise _fail(rt, err, f"{what} of cuda:{device_id}")
    return int(value)


def compute_capability(device_id: int) -> tuple[int, int]:
    """``(major, minor)`` of CUDA device ``device_id``, e.g. ``(9, 0)`` for H100/H200; cached per device."""
    device_id = _ordinal(device_id)
    cc = _capability.get(device_id)
    if cc is None:
        rt = _runtime()
        attrs = rt.cudaDeviceAttr
        major = _attribute(rt, device_id, attrs.cudaDevAttrComputeCapabilityMajor, "cudaDeviceGetAttribute")
        minor = _attribute(rt, device_id, attrs.cudaDevAttrComputeCapabilityMinor, "cudaDeviceGetAttribute")
        cc = _capability[device_id] = (major, minor)
    return cc


def sm_count(device_id: int) -> int:
    """Number of streaming multiprocessors of CUDA device ``device_id``; cached per device."""
    device_id = _ordinal(device_id)
    n = _sm_count.get(device_id)
    if n is None:
        rt = _runtime()
        n = _sm_count[device_id] = _attribute(
            rt, device_id, rt.cudaDeviceAttr.cudaDevAttrMultiProcessorCount, "cudaDeviceGetAttribute"
        )
    return n


__all__ = ["compute_capability", "current_device", "make_current", "restore", "set_device", "sm_count"]
