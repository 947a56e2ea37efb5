"""Finding, fetching, verifying, extracting and loading the prebuilt libraries fi_ffi calls.

The wheels are pinned in a lock file (format: :mod:`fi_ffi.loader.lockfile`); the cache layout is described
in :mod:`fi_ffi.loader.cache`, the sources of a wheel in :mod:`fi_ffi.loader.wheels`, the load order in
:mod:`fi_ffi.loader.libraries` and the environment variables in :mod:`fi_ffi.loader.settings`.

Importing this package loads nothing and imports no heavy module (``cuda.*``, ``tqdm``, ``zipfile``,
``urllib``): each public name below is a row of the exports table, imported from its submodule on first use.

Typical use::

    from fi_ffi import loader
    handle = loader.load_module("norm")        # libtvm_ffi.so, libcudart, then norm.so
    print(loader.selection().reason)           # which wheel was chosen, and why
"""

# The facade, as fi_ffi's own public surface (see fi_ffi/__init__.py): one row per name, name -> the submodule
# that defines it; ``__all__``, the lazy ``__getattr__``, ``__dir__`` and the type stub ``__init__.pyi``
# (``python tools/gen_init_stub.py``) follow from it. Unlike fi_ffi's, this ``__getattr__`` does not keep what it
# found in the package: every ``loader.<name>`` reads the submodule's attribute at that moment, so replacing
# ``fi_ffi.loader.modules.load_module`` (a test's monkeypatch) is what ``loader.load_module`` then calls, as with
# the forwarding functions this table replaced. The cost is one dict lookup and one ``sys.modules`` lookup per read;
# nothing on a launch path reads it (kernels bind once).

from __future__ import annotations

import importlib
import sys
from typing import Any

_EXPORTS: dict[str, str] = {
    # the TVM-FFI runtime and the CUDA runtime
    "runtime_library": "libraries",
    "runtime_info": "libraries",
    "RuntimeInfo": "libraries",
    "ensure_cudart": "libraries",
    "nvidia_library": "libraries",
    # kernel modules: the wheels selected for this machine, what they serve, loading
    "selection": "modules",
    "fetch": "modules",
    "load_module": "modules",
    "module_path": "modules",
    "available_uris": "modules",
    "module_source": "modules",
    "module_release": "modules",
    "module_sources": "modules",
    "listing_without_download": "modules",
    "loaded_modules": "modules",
    "symbol_checks": "modules",
    "SymbolCheck": "symbols",
    # the lock file
    "active_lock": "lockfile",
    "lock_entry": "lockfile",
    "lock_entries": "lockfile",
    "dump_lock": "lockfile",
    "Lock": "lockfile",
    "Selection": "lockfile",
    "WheelPin": "lockfile",
    # the cache
    "cache_root": "cache",
    "verify_cache": "maintenance",
    "clear_cache": "maintenance",
    "list_cache": "maintenance",
    "CacheEntry": "maintenance",
    "ClearReport": "maintenance",
    "VerifyReport": "maintenance",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    found = sys.modules.get(f"{__name__}.{module}")
    if found is None:
        found = importlib.import_module(f".{module}", __name__)
    return getattr(found, name)


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
