"""Binding of kernel-module entry points, once per process; the ops' one way to the loader.

:func:`entry_point` loads the module ``uri`` (extracting it from the pinned wheel on first use, see
:mod:`fi_ffi.loader`) and binds its ``__tvm_ffi_<name>`` symbol. Later calls return the same
:class:`~fi_ffi.abi.call.EntryPoint`. :func:`module_release` says which FlashInfer release serves a module (for the
ops that refuse a release's known defect).

Both first ask for a usable NVIDIA driver (:func:`require_driver`, which the attention plans also ask before they
choose their module: :mod:`fi_ffi.ops.attention.variants`): without one an op or plan says "no NVIDIA driver found"
and the fix, before any download or module load (which would end in a network error, or in
the CUDA runtime's "driver version is insufficient" from inside the module). Once a driver was found that is a
single flag test, on first calls only: a bound entry point never asks again.
"""

from __future__ import annotations

import threading

from .. import caches
from ..abi.call import EntryPoint

_lock = threading.Lock()
_bound: dict[tuple[str, str], EntryPoint] = {}
_driver_found = False  # True once cuInit succeeded in this process (the CPU test suite sets it: tests/conftest.py)


def require_driver(what: str) -> None:
    """Raise :class:`~fi_ffi.errors.CudaError` ("no NVIDIA driver found", or the driver that sees no GPU, and the
    fix: :func:`fi_ffi.cuda.runtime.no_driver`) for ``what`` (the module or entry point about to be used) where this
    machine has no usable CUDA driver; nothing once one was found."""
    global _driver_found
    if _driver_found:
        return
    from ..cuda import driver, runtime

    if driver.load() is None:
        raise runtime.no_driver(what)
    _driver_found = True


def entry_point(uri: str, name: str) -> EntryPoint:
    """The entry point ``name`` of kernel module ``uri`` (e.g. ``("norm", "rmsnorm")``)."""
    ep = _bound.get((uri, name))
    if ep is None:
        with _lock:
            ep = _bound.get((uri, name))
            if ep is None:
                require_driver(f"{uri}.{name}")
                from .. import loader

                handle = loader.load_module(uri)
                ep = _bound[(uri, name)] = EntryPoint(handle, name, uri)
    return ep


def module_release(uri: str) -> str:
    """The FlashInfer release module ``uri`` is served from (:func:`fi_ffi.loader.module_release`), once a driver is
    found."""
    require_driver(uri)
    from .. import loader

    return loader.module_release(uri)


def _reset() -> None:
    with _lock:
        _bound.clear()


caches.register("bound entry points (per module and name)", _reset)
