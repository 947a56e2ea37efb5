"""Module paths that moved, importable under their old names for one release, with a DeprecationWarning.

=========================  ===========================  =====================================================
old path                   new path                     why
=========================  ===========================  =====================================================
``fi_ffi.models``          ``fi_engine``                the serving engine is a package of its own, beside the
                                                        binding, which never imports it
``fi_ffi.typing``          ``fi_ffi.tensor.protocols``  no module named like a standard-library module
=========================  ===========================  =====================================================

``import fi_ffi.models.llama`` gives the very module ``fi_engine.llama`` (one module object under two names, so
classes compare equal; the engine's own finder, :mod:`fi_engine.moved`, then hands ``fi_engine.llama`` on to
``fi_engine.models.llama``). The finder is put first on :data:`sys.meta_path` by ``import fi_ffi`` and answers only for
the old paths; it imports the new module by name when the old one is asked for, never before. It is the binding's
one mention of the engine, by name only: the binding itself never imports it. The mechanism serves other tables
too (:func:`install` takes one): the engine installs its own.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from collections.abc import Mapping
from types import ModuleType

# old prefix -> new prefix; a submodule moves with its package (fi_ffi.models.llama -> fi_engine.llama)
MOVED = {"fi_ffi.models": "fi_engine", "fi_ffi.typing": "fi_ffi.tensor.protocols"}


def new_name(name: str, table: Mapping[str, str] = MOVED) -> str | None:
    """The module path that replaced ``name`` by ``table`` (old prefix -> new prefix), or None if ``name`` did
    not move."""
    for old, new in table.items():
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
    """Finds the old module paths of ``table`` (default :data:`MOVED`) and hands back the module at the new path."""

    def __init__(self, table: Mapping[str, str] = MOVED) -> None:
        self.table = dict(table)

    def find_spec(
        self, fullname: str, path: object = None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        new = new_name(fullname, self.table)
        return None if new is None else importlib.machinery.ModuleSpec(fullname, _Alias(new))


def install(table: Mapping[str, str] = MOVED) -> None:
    """Put a finder of ``table``'s old paths first on :data:`sys.meta_path`, once per table (``import fi_ffi``
    installs :data:`MOVED`; ``import fi_engine`` the engine's own table): first, so that a stale folder left at an
    old path (an old install's ``__pycache__``) cannot be found as a namespace package."""
    table = dict(table)
    if not any(isinstance(f, MovedModuleFinder) and f.table == table for f in sys.meta_path):
        sys.meta_path.insert(0, MovedModuleFinder(table))


__all__ = ["MOVED", "MovedModuleFinder", "install", "new_name"]
