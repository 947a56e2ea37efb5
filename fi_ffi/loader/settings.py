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
``FI_FFI_CUDA_VERSION``     ``major.minor`` used to select kernel wheels instead of asking libcudart; its major is the
                            libcudart loaded (default: the major of the lock's kernel wheels)
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
import re

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
_FALSE = {"0", "false", "no", "off"}
FLAGS = (OFFLINE, QUIET, TRUST_INSTALLED, USE_INSTALLED)
"""The on/off variables: ``1``/``true``/``yes``/``on`` or ``0``/``false``/``no``/``off`` (any case), or unset."""


def get(name: str) -> str:
    """The value of ``name`` with surrounding blanks removed, ``""`` when unset."""
    return os.environ.get(name, "").strip()


def flag(name: str, default: bool = False) -> bool:
    """Whether on/off variable ``name`` is on (``default`` when unset or empty).

    Raises:
        LoaderError: any other value, naming the variable and the values accepted (a value such as ``maybe``
            must not silently mean off).
    """
    value = get(name).lower()
    if not value:
        return default
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise LoaderError(
        f"{name}={get(name)!r}: expected 1 (or true/yes/on) to turn it on, 0 (or false/no/off) or unset to turn it off"
    )


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
    """The folders named by ``FI_FFI_WHEELHOUSE``, in order.

    Raises:
        LoaderError: an entry is a file (a wheel named instead of its folder); a missing folder is allowed here
            (``fi-ffi doctor`` and the error for a wheel found nowhere name it).
    """
    folders = [p for p in get(WHEELHOUSE).split(os.pathsep) if p]
    for folder in folders:
        problem = wheelhouse_problem(folder)
        if problem and os.path.exists(os.path.expanduser(folder)):
            raise LoaderError(f"{WHEELHOUSE}: {problem}")
    return folders


def wheelhouse_problem(folder: str) -> str:
    """What is wrong with wheelhouse entry ``folder`` (``""``: a readable folder)."""
    path = os.path.expanduser(folder)
    if os.path.isdir(path):
        return "" if os.access(path, os.R_OK | os.X_OK) else f"{folder} is a folder this user cannot read"
    if folder.endswith(".whl") and os.path.isfile(path):
        parent = os.path.dirname(folder) or "."
        return f"{folder} is a wheel, not a folder: name the folder that holds it ({parent})"
    if os.path.exists(path):
        return f"{folder} is a file, not a folder of wheels"
    return f"{folder} does not exist"


def problems() -> dict[str, str]:
    """Every set ``FI_FFI_*`` loader variable whose value fi_ffi would refuse or that points nowhere useful, with
    what is wrong (for ``fi-ffi doctor``); reading them never raises here."""
    out: dict[str, str] = {}
    for name in FLAGS:
        try:
            flag(name)
        except LoaderError as exc:
            out[name] = str(exc)
    try:
        lock_timeout()
    except LoaderError as exc:
        out[LOCK_TIMEOUT] = str(exc)
    bad = [p for p in (wheelhouse_problem(f) for f in get(WHEELHOUSE).split(os.pathsep) if f) if p]
    if bad:
        out[WHEELHOUSE] = "; ".join(bad)
    cuda = get(CUDA_VERSION)
    if cuda and not re.fullmatch(r"\d+\.\d+", cuda):
        out[CUDA_VERSION] = f"{CUDA_VERSION}={cuda!r}: expected major.minor, such as 13.0"
    sm = get(SM)
    bad_sm = [a for a in sm_filter() if not re.fullmatch(r"\d+[a-z]?", a)]
    if sm and (bad_sm or not sm_filter()):
        out[SM] = f"{SM}={sm!r}: expected comma-separated GPU archs such as 90a,100a"
    runtime = get(RUNTIME)
    if runtime and runtime not in ("auto", "package", "lock") and not os.path.isfile(os.path.expanduser(runtime)):
        out[RUNTIME] = f"{RUNTIME}={runtime!r}: expected auto, package, lock or the path of a libtvm_ffi.so"
    lock = get(LOCK)
    if lock and not os.path.isfile(os.path.expanduser(lock)):
        out[LOCK] = f"{LOCK}={lock!r}: no such file"
    return out


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
    return flag(USE_INSTALLED, default=True)
