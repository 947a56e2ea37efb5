"""Environment variables that steer the loader, read at call time (never cached across a change).

==========================  ================================================================================
``FI_FFI_CACHE_DIR``        cache root; default ``platformdirs.user_cache_dir("fi_ffi")``
``FI_FFI_LOCK``             a wheel lock (same format as the packaged ``wheels.lock``) replacing the default;
                            a section it lacks (``[[kernel]]`` or ``[[runtime]]``) comes from the default lock
``FI_FFI_WHEELHOUSE``       folder(s) of wheels, ``os.pathsep``-separated, searched by file name (and sha256
                            verified) before any download; wheels found there are used in place
``FI_FFI_OFFLINE``          ``1``: never touch the network; a missing wheel is an error that says how to provide it
``FI_FFI_QUIET``            ``1``: no progress bars, and no ``fi_ffi:`` progress lines on stderr when logging is
                            not configured (see :mod:`fi_ffi.loader.log`)
``FI_FFI_CUDA_VERSION``     ``major.minor`` used to select kernel wheels instead of asking libcudart
``FI_FFI_SM``               comma-separated GPU archs (``90a,100a``): kernel entries whose ``sm`` list names none
                            of them are skipped (entries without ``sm`` are always kept)
``FI_FFI_RUNTIME``          where ``libtvm_ffi.so`` comes from: ``auto`` (default: a copy already loaded, else
                            the installed ``apache-tvm-ffi`` package, else the lock's runtime wheel),
                            ``package``, ``lock``, or the path of a ``libtvm_ffi.so``
``FI_FFI_LOCK_TIMEOUT``     seconds a start waits for a cache lock held by another process before it gives up
                            with an error naming the lock (default: wait as long as it takes, logging the wait)
``FI_FFI_TRUST_INSTALLED``  ``1``: use a pip-installed kernel distribution (``flashinfer-jit-cache``) whose
                            name, version and wheel tags match a pin even when nothing ties it to the pin's
                            sha256 (see :mod:`fi_ffi.loader.installed`)
``FI_FFI_USE_INSTALLED``    ``0``: never use pip-installed kernel distributions in place; always the pinned wheel
                            from the wheelhouse or the cache (default ``1``; the test suite sets ``0``)
==========================  ================================================================================
"""

from __future__ import annotations

import os

from ..errors import LoaderError

CACHE_DIR = "FI_FFI_CACHE_DIR"
LOCK = "FI_FFI_LOCK"
WHEELHOUSE = "FI_FFI_WHEELHOUSE"
OFFLINE = "FI_FFI_OFFLINE"
QUIET = "FI_FFI_QUIET"
CUDA_VERSION = "FI_FFI_CUDA_VERSION"
SM = "FI_FFI_SM"
RUNTIME = "FI_FFI_RUNTIME"
LOCK_TIMEOUT = "FI_FFI_LOCK_TIMEOUT"
TRUST_INSTALLED = "FI_FFI_TRUST_INSTALLED"
USE_INSTALLED = "FI_FFI_USE_INSTALLED"

ALL = (
    CACHE_DIR,
    LOCK,
    WHEELHOUSE,
    OFFLINE,
    QUIET,
    CUDA_VERSION,
    SM,
    RUNTIME,
    LOCK_TIMEOUT,
    TRUST_INSTALLED,
    USE_INSTALLED,
)

_TRUE = {"1", "true", "yes", "on"}


def get(name: str) -> str:
    """The value of ``name`` with surrounding blanks removed, ``""`` when unset."""
    return os.environ.get(name, "").strip()


def flag(name: str) -> bool:
    """Whether ``name`` is set to a true value (``1``, ``true``, ``yes``, ``on``; any case)."""
    return get(name).lower() in _TRUE


def offline() -> bool:
    """``FI_FFI_OFFLINE`` is set: no network access at all."""
    return flag(OFFLINE)


def quiet() -> bool:
    """``FI_FFI_QUIET`` is set: no progress bars."""
    return flag(QUIET)


def lock_timeout() -> float | None:
    """``FI_FFI_LOCK_TIMEOUT`` in seconds, or ``None`` (unset: wait for a cache lock as long as it takes)."""
    text = get(LOCK_TIMEOUT)
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):  # also rejects nan
        raise LoaderError(
            f"{LOCK_TIMEOUT} must be a number of seconds >= 0 (found {text!r}); unset it to wait without a limit"
        )
    return value


def trust_installed() -> bool:
    """``FI_FFI_TRUST_INSTALLED`` is set: an installed kernel distribution matching a pin by name, version and
    tags is used even when nothing ties it to the pin's sha256."""
    return flag(TRUST_INSTALLED)


def wheelhouses() -> list[str]:
    """The folders named by ``FI_FFI_WHEELHOUSE``, in order."""
    return [p for p in get(WHEELHOUSE).split(os.pathsep) if p]


def sm_filter() -> tuple[str, ...]:
    """The GPU archs named by ``FI_FFI_SM`` (``"sm_90a"`` and ``"90a"`` both give ``"90a"``)."""
    out = []
    for item in get(SM).replace(";", ",").split(","):
        item = item.strip().lower().removeprefix("sm_").removeprefix("sm")
        if item:
            out.append(item)
    return tuple(out)


def snapshot() -> tuple[str, ...]:
    """The values of all variables above; a change of any of them invalidates the loader's memo tables."""
    return tuple(os.environ.get(name, "") for name in ALL)


def use_installed() -> bool:
    """Installed kernel distributions may be used in place (``FI_FFI_USE_INSTALLED`` is not ``0``)."""
    return get(USE_INSTALLED).strip() != "0"
