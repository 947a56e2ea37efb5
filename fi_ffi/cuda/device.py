"""The calling thread's current CUDA device and per-device properties, through ``cuda.bindings.runtime``.

Some kernels look at the *current* CUDA device (``cudaGetDevice``) rather than at their tensors' device: the
GDN prefill launcher reads the current device's properties to pick its code path and SM count. Ops that call
such kernels make the tensors' device current for the call with :func:`make_current` and put the previous one
back with :func:`restore`.

``cuda.bindings.runtime`` is imported on first use (it takes a few hundred milliseconds), never at import of
fi_ffi. A device's :class:`DeviceProperties` (compute capability, SM count, resident blocks per SM) are read once
per ordinal, together, into the one cache every op asks (registered in :mod:`fi_ffi.caches`): they cannot change
while the process lives. Results go through :func:`fi_ffi.cuda.runtime.check`. Where the failure means there is
no usable GPU at all (no driver, no device, cuda-bindings missing: :func:`fi_ffi.cuda.runtime.no_device`) the
query raises :class:`~fi_ffi.errors.UnsupportedDeviceError` (what ops refuse devices with; its ``__cause__`` is
the :class:`~fi_ffi.errors.CudaError` with the code); any other failure (a bad ordinal, say) is that
``CudaError``; :func:`known_properties` answers None instead, for choices that have an answer without a GPU.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from .. import caches
from ..errors import CudaError, UnsupportedDeviceError
from . import runtime as cuda_runtime


class DeviceProperties(NamedTuple):
    """What fi_ffi reads of a CUDA device, once: ``compute_capability`` ``(major, minor)`` (``(9, 0)`` for
    H100/H200), ``sm_count`` streaming multiprocessors, ``max_blocks_per_sm`` resident thread blocks per SM."""

    compute_capability: tuple[int, int]
    sm_count: int
    max_blocks_per_sm: int

    @property
    def max_resident_blocks(self) -> int:
        """``sm_count * max_blocks_per_sm``: an upper bound on the thread blocks of any grid resident at once."""
        return self.sm_count * self.max_blocks_per_sm


# Ordinal -> its properties; None: they could not be read (no driver, no device, no cuda-bindings), which
# :func:`known_properties` remembers and :func:`properties` asks again, to raise the reason.
_properties: dict[int, DeviceProperties | None] = {}
caches.register("CUDA device properties (per ordinal)", _properties.clear)
_UNREAD: Any = object()  # an ordinal not asked yet (None: asked, unreadable)


def _no_device(exc: CudaError, what: str) -> UnsupportedDeviceError:
    cause = f"{exc.name}: {exc.description}" if exc.name and exc.description else exc.name or exc.description
    return UnsupportedDeviceError(f"no CUDA device is available ({what} failed with {cause}). {exc.hint}")


def _runtime() -> Any:
    """``cuda.bindings.runtime``; UnsupportedDeviceError where cuda-bindings cannot be imported."""
    try:
        return cuda_runtime.runtime()
    except CudaError as exc:
        raise _no_device(exc, "cannot query CUDA devices: import cuda.bindings.runtime") from exc


def _check(result: Any, what: str) -> Any:
    """:func:`fi_ffi.cuda.runtime.check`, with "no usable GPU" failures as UnsupportedDeviceError."""
    try:
        return cuda_runtime.check(result, what)
    except CudaError as exc:
        if cuda_runtime.no_device(exc):
            raise _no_device(exc, what) from exc
        raise


def _ordinal(device_id: Any) -> int:
    """``device_id`` as a CUDA device ordinal (a C int >= 0), else TypeError/ValueError naming it."""
    if isinstance(device_id, bool) or not isinstance(device_id, int):
        raise TypeError(f"device_id: expected an int, got {type(device_id).__name__}")
    if not 0 <= device_id < 1 << 31:
        raise ValueError(f"device_id: expected a CUDA device ordinal in [0, 2**31), got {device_id}")
    return device_id


def current_device() -> int:
    """The ordinal of this thread's current CUDA device (``cudaGetDevice``)."""
    return int(_check(_runtime().cudaGetDevice(), "cudaGetDevice"))


def set_device(device_id: int) -> None:
    """Make ``device_id`` this thread's current CUDA device (``cudaSetDevice``)."""
    device_id = _ordinal(device_id)
    _check(_runtime().cudaSetDevice(device_id), f"cudaSetDevice({device_id})")


def make_current(device_id: int) -> int:
    """Make ``device_id`` current if it is not already; return the device to :func:`restore`, or -1.

    -1 means nothing was changed (the cheap, common case: one ``cudaGetDevice`` and no set).
    """
    device_id = _ordinal(device_id)
    rt = _runtime()
    previous = int(_check(rt.cudaGetDevice(), "cudaGetDevice"))
    if previous == device_id:
        return -1
    _check(rt.cudaSetDevice(device_id), f"cudaSetDevice({device_id})")
    return previous


def restore(previous: int) -> None:
    """Undo :func:`make_current`: set ``previous`` back unless it is -1. Never raises (used in ``finally``)."""
    if previous >= 0:
        cuda_runtime.runtime().cudaSetDevice(previous)  # imported: make_current returned >= 0


def _attribute(device_id: int, name: str) -> int:
    """``cudaDeviceGetAttribute(cudaDevAttr<name>, device_id)``."""
    rt = _runtime()
    attr = getattr(rt.cudaDeviceAttr, f"cudaDevAttr{name}")
    return int(
        _check(rt.cudaDeviceGetAttribute(attr, device_id), f"cudaDeviceGetAttribute({name}) of cuda:{device_id}")
    )


def _read(device_id: int) -> DeviceProperties:
    """Read ``device_id``'s properties from the runtime and cache them (``device_id`` already checked)."""
    found = _properties[device_id] = DeviceProperties(
        (_attribute(device_id, "ComputeCapabilityMajor"), _attribute(device_id, "ComputeCapabilityMinor")),
        _attribute(device_id, "MultiProcessorCount"),
        _attribute(device_id, "MaxBlocksPerMultiprocessor"),
    )
    return found


def properties(device_id: int) -> DeviceProperties:
    """The :class:`DeviceProperties` of CUDA device ``device_id``, read on first use; UnsupportedDeviceError where
    there is no usable GPU, CudaError for an ordinal the runtime refuses."""
    device_id = _ordinal(device_id)
    found = _properties.get(device_id)
    return _read(device_id) if found is None else found


def known_properties(device_id: int) -> DeviceProperties | None:
    """:func:`properties`, or None where they cannot be read (no driver, no device, no cuda-bindings, an ordinal
    the runtime refuses): for choices that have an answer without a GPU. The None is remembered too."""
    found = _properties.get(device_id, _UNREAD)
    if found is not _UNREAD:
        return found
    try:
        device_id = _ordinal(device_id)
    except (TypeError, ValueError):  # not an ordinal: nothing to remember it under
        return None
    try:
        return _read(device_id)
    except (CudaError, UnsupportedDeviceError):  # UnsupportedDeviceError is no CudaError: both are "unknown"
        _properties[device_id] = None
        return None


def compute_capability(device_id: int) -> tuple[int, int]:
    """``(major, minor)`` of CUDA device ``device_id``, e.g. ``(9, 0)`` for H100/H200; read once per device."""
    device_id = _ordinal(device_id)
    found = _properties.get(device_id)
    return (_read(device_id) if found is None else found).compute_capability


def sm_count(device_id: int) -> int:
    """Number of streaming multiprocessors of CUDA device ``device_id``; read once per device."""
    device_id = _ordinal(device_id)
    found = _properties.get(device_id)
    return (_read(device_id) if found is None else found).sm_count


__all__ = [
    "DeviceProperties",
    "compute_capability",
    "current_device",
    "known_properties",
    "make_current",
    "properties",
    "restore",
    "set_device",
    "sm_count",
]
