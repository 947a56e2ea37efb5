"""Module paths that moved, importable under their old names for one release, with a DeprecationWarning.

=========================  ===========================  =====================================================
old path                   new path                     why
=========================  ===========================  =====================================================
``fi_ffi.models``          ``fi_engine``                the serving engine is a package of its own, beside the
                                                        binding, which never imports it
``fi_ffi.typing``          ``fi_ffi.tensor.protocols``  no module named like a standard-library module
=========================  ===========================  =====================================================

``import fi_ffi.models.llama`` gives the very module ``fi_engine.llama`` (one module object under two names, so
classes compare equal). The finder is put first on :data:`sys.meta_path` by ``import fi_ffi`` and answers only for
the old paths; it imports the new module by name when the old one is asked for, never before. It is the binding's
one mention of the engine, by name only: the binding itself never imports it.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from types import ModuleType

# old prefix -> new prefix; a submodule moves with its package (fi_ffi.models.llama -> fi_engine.llama)
MOVED = {"fi_ffi.models": "fi_engine", "fi_ffi.typing": "fi_ffi.tensor.protocols"}


def new_name(name: str) -> str | None:
    """The module path that replaced ``name``, or None if ``name`` did not move."""
    for old, new in MOVED.items():
        if name == old or name.startswith(old + "."):
            return new + name[len(old) :]
    return None


class _Alias(importlib.abc.Loader):
    def __init__(self, target: str) -> None:
        self.target = target

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        warnings.warn(
            f"{spec.name} moved to {self.target}: import {self.target} instead (the old path goes in 0.2)",
            DeprecationWarning,
            stacklevel=2,
        )
        return importlib.import_module(self.target)

    def exec_module(self, module: ModuleType) -> None:  # the module ran under its new name already
        pass


class MovedModuleFinder(importlib.abc.MetaPathFinder):
    """Finds the old module paths of :data:`MOVED` and hands back the module at the new path."""

    def find_spec(
        self, fullname: str, path: object = None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        new = new_name(fullname)
        return None if new is None else importlib.machinery.ModuleSpec(fullname, _Alias(new))


def install() -> None:
    """Put the finder first on :data:`sys.meta_path`, once (``import fi_ffi`` calls it): first, so that a stale
    folder left at an old path (an old install's ``__pycache__``) cannot be found as a namespace package."""
    if not any(isinstance(f, MovedModuleFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, MovedModuleFinder())


__all__ = ["MOVED", "MovedModuleFinder", "install", "new_name"]
