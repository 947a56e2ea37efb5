"""Binding of kernel-module entry points, once per process.

:func:`entry_point` loads the module ``uri`` (extracting it from the pinned wheel on first use, see
:mod:`fi_ffi.loader`) and binds its ``__tvm_ffi_<name>`` symbol. Later calls return the same
:class:`~fi_ffi.abi.call.EntryPoint`.
"""

from __future__ import annotations

import threading

from .. import caches
from ..abi.call import EntryPoint

_lock = threading.Lock()
_bound: dict[tuple[str, str], EntryPoint] = {}


def entry_point(uri: str, name: str) -> EntryPoint:
    """The entry point ``name`` of kernel module ``uri`` (e.g. ``("norm", "rmsnorm")``)."""
    ep = _bound.get((uri, name))
    if ep is None:
        with _lock:
            ep = _bound.get((uri, name))
            if ep is None:
                from .. import loader

                handle = loader.load_module(uri)
                ep = _bound[(uri, name)] = EntryPoint(handle, name, uri)
    return ep


def _reset() -> None:
    with _lock:
        _bound.clear()


caches.register("bound entry points (per module and name)", _reset)
