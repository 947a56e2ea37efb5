"""C declarations parsed once, on first use: one ``cffi.FFI`` per set of declarations (ABI mode, nothing compiled).

fi_ffi keeps a few independent sets (TVM-FFI and DLPack in :mod:`fi_ffi.abi.cdefs`, libc's ``dl*`` in
:mod:`fi_ffi.loader.dl`, cuBLAS in :mod:`fi_engine.kernels.cublas`); each module holds a :class:`Declarations` and
asks it for its FFI, so ``import fi_ffi`` parses nothing. This module imports nothing of fi_ffi's: every layer may
use it.
"""

from __future__ import annotations

import threading

import cffi

__all__ = ["Declarations"]


class Declarations:
    """C declarations and the ``cffi.FFI`` that holds them, made on the first :meth:`ffi` call (thread-safe)."""

    __slots__ = ("_ffi", "_lock", "text")

    def __init__(self, text: str) -> None:
        self.text = text
        self._ffi: cffi.FFI | None = None
        self._lock = threading.Lock()

    def ffi(self) -> cffi.FFI:
        """The FFI with :attr:`text` declared (parsed once)."""
        found = self._ffi
        if found is None:
            with self._lock:
                if self._ffi is None:
                    ffi = cffi.FFI()
                    ffi.cdef(self.text)
                    self._ffi = ffi
                found = self._ffi
        return found
