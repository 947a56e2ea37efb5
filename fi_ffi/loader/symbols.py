"""Which symbols a kernel module references that nothing in this process provides.

Kernel modules are loaded ``RTLD_LAZY | RTLD_LOCAL``, as TVM-FFI loads them (:mod:`fi_ffi.loader.modules`): a
function the module calls is bound when the call first runs, so a module may load although it references
functions nobody defines. FlashInfer 0.7.2's FA2 batch prefill module is one: its dispatch names CTA-tile-32
kernel instantiations (``BatchPrefillWith{Ragged,Paged}KVCacheDispatched<32u, ...>``) that its own template
never compiles for head dims below 512, and which its planner never selects there. Calling code that does
reach such a function aborts the process (the dynamic linker's "symbol lookup error"), so the loader finds
these names at load time and reports them (a debug log line, ``fi-ffi doctor``, ``fi-ffi list --json``).

How a name is judged provided, exactly as the dynamic linker would resolve it for the module:

- the global scope, ``dlsym(RTLD_DEFAULT, name)``: the program, the libraries loaded with it and every
  library loaded RTLD_GLOBAL (``libtvm_ffi.so``, whose ``TVMFFI*`` symbols the modules use without listing
  it as NEEDED);
- the module's own scope: for a loaded module ``dlsym(handle, name)``, which searches the module and the
  libraries it needs (``libcudart.so.13``, ``libc.so.6``, ...); for a module file not loaded here, each of its
  ``DT_NEEDED`` libraries opened by soname (the one already in the process if any, else loaded
  ``RTLD_LAZY | RTLD_LOCAL``: system libraries such as ``libgcc_s.so.1``; the module itself is not loaded).

The names come from the file (:mod:`fi_ffi.loader.elf`: undefined, non-weak), read once per file.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

from ..errors import LoaderError
from . import dl, elf


@dataclass(frozen=True)
class SymbolCheck:
    """The outcome for one module file.

    ``unresolved``: the undefined (non-weak) symbols of ``path`` that nothing provides, sorted (mangled C++
    names). ``missing_libraries``: ``DT_NEEDED`` libraries that could not be opened (only for a file checked
    without loading it; then the check is incomplete). ``loaded``: checked against the loaded module (True)
    or against its needed libraries (False). ``error``: why the file could not be checked (its unresolved
    list is then empty and means nothing).
    """

    path: str
    unresolved: tuple[str, ...] = ()
    missing_libraries: tuple[str, ...] = ()
    loaded: bool = False
    error: str = ""

    @property
    def ok(self) -> bool:
        """Checked completely, and every symbol is provided."""
        return not (self.unresolved or self.missing_libraries or self.error)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "unresolved": list(self.unresolved), "missing_libraries": list(self.missing_libraries)}

    def summary(self) -> str:
        """One line: what is missing, or that nothing is."""
        if self.error:
            return f"not checked: {self.error}"
        parts = []
        if self.unresolved:
            parts.append(
                f"{len(self.unresolved)} undefined symbol(s) that nothing provides (calling code that needs one "
                f"aborts the process): {', '.join(self.unresolved)}"
            )
        if self.missing_libraries:
            parts.append(f"needed libraries not found: {', '.join(self.missing_libraries)}")
        return "; ".join(parts) or "every undefined symbol is provided"


def _provided(name: str, scopes: list[Any]) -> bool:
    return any(dl.symbol_address(scope, name) for scope in scopes)


def check_loaded(path: str | os.PathLike[str], handle: Any) -> SymbolCheck:
    """Check the module file ``path``, loaded in this process as ``handle``. A file that cannot be read is
    reported in :attr:`SymbolCheck.error`, never raised: the module itself loaded."""
    name = os.fspath(path)
    try:
        symbols = elf.imports(name)
    except LoaderError as exc:
        return SymbolCheck(name, loaded=True, error=str(exc))
    scopes = [dl.global_scope(), handle]
    missing = tuple(s for s in symbols.undefined if not _provided(s, scopes))
    return SymbolCheck(name, unresolved=missing, loaded=True)


def check_file(path: str | os.PathLike[str]) -> SymbolCheck:
    """Check the module file ``path`` without loading it: against the global scope and its ``DT_NEEDED``
    libraries. The TVM-FFI runtime must be loaded already (:func:`fi_ffi.loader.runtime_library`), or every
    ``TVMFFI*`` name counts as missing."""
    name = os.fspath(path)
    try:
        symbols = elf.imports(name)
    except LoaderError as exc:
        return SymbolCheck(name, error=str(exc))
    scopes = [dl.global_scope()]
    absent = []
    for soname in symbols.needed:
        handle = dl.find_loaded(soname)
        if handle is None:
            try:
                handle = dl.open_library(soname, dl.RTLD_LAZY | dl.RTLD_LOCAL)
            except LoaderError:
                absent.append(soname)
                continue
        scopes.append(handle)
    missing = tuple(s for s in symbols.undefined if not _provided(s, scopes))
    return SymbolCheck(name, unresolved=missing, missing_libraries=tuple(absent))
