"""The environment variables that steer the loader, read at call time (never cached across a change).

Their rows (kind, default, meaning) are in :data:`fi_ffi.variables.VARIABLES`, the one table of every ``FI_FFI_*``
variable; the readers here read through it (:func:`get`, :func:`flag`), adding the loader's error type
(:class:`~fi_ffi.errors.LoaderError`) and what only the loader knows (a wheelhouse entry that is a wheel).
``docs/operations.md`` ("Configuration") lists them for users.
"""

from __future__ import annotations

import os

from .. import variables
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

FLAGS = tuple(name for name in ALL if variables.VARIABLES[name].kind == "flag")
"""The on/off variables: ``1``/``true``/``yes``/``on`` or ``0``/``false``/``no``/``off`` (any case), or unset."""


def get(name: str) -> str:
    """The value of ``name`` with surrounding blanks removed, ``""`` when unset (an ``FI_FFI_*`` name through
    :func:`fi_ffi.variables.raw`, which refuses one without a row; others, such as ``SSL_CERT_FILE``, as they are)."""
    if name.startswith("FI_FFI_"):
        return variables.raw(name)
    return os.environ.get(name, "").strip()


def flag(name: str, default: bool | None = None) -> bool:
    """Whether on/off variable ``name`` is on (``default`` when unset or empty; ``None``: its row's default).

    Raises:
        LoaderError: any other value, naming the variable and the values accepted (a value such as ``maybe``
            must not silently mean off).
    """
    if default is not None and not get(name):
        return default
    return variables.flag(name, LoaderError)


def offline() -> bool:
    """``FI_FFI_OFFLINE`` is set: no network access at all."""
    return flag(OFFLINE)


def quiet() -> bool:
    """``FI_FFI_QUIET`` is set: no progress bars."""
    return flag(QUIET)


def lock_timeout() -> float | None:
    """``FI_FFI_LOCK_TIMEOUT`` in seconds, or ``None`` (unset: wait for a cache lock as long as it takes).

    Raises:
        LoaderError: not a finite number >= 0.
    """
    return variables.seconds(LOCK_TIMEOUT, LoaderError)


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
    """Every set ``FI_FFI_*`` variable whose value fi_ffi would refuse, that points nowhere useful or that fi_ffi does
    not read (:func:`fi_ffi.variables.problems`), with what is wrong (for ``fi-ffi doctor``); never raises."""
    out = variables.problems()
    bad = [p for p in (wheelhouse_problem(f) for f in get(WHEELHOUSE).split(os.pathsep) if f) if p]
    if bad:
        out[WHEELHOUSE] = "; ".join(bad)
    cache = _cache_dir_setting()
    if cache:
        out[CACHE_DIR] = cache
    return out


def _cache_dir_setting(existing_ok: bool = False) -> str:
    """What is wrong with ``FI_FFI_CACHE_DIR`` (``""``: unset, or a folder fi_ffi can write or make).
    ``existing_ok``: an existing folder passes even where it cannot be written (a read-only cache serves what it
    holds; the loader names the fix when it must write)."""
    value = get(CACHE_DIR)
    root = os.path.abspath(os.path.expanduser(value)) if value else ""
    why = cache_dir_problem(root) if value and not (existing_ok and os.path.isdir(root)) else ""
    return f"{CACHE_DIR}={value!r}: {why}; point it at a folder this user can write" if why else ""


def cache_dir_problem(root: str) -> str:
    """Why fi_ffi cannot keep its cache in folder ``root`` (``""``: it can). Tried, not read from permission bits
    (root passes every access check, yet nothing can be made under ``/proc``): a temporary folder is made in
    ``root``, or in its nearest existing parent where ``root`` is still to be made, and removed at once."""
    import tempfile

    if os.path.exists(root) and not os.path.isdir(root):
        return f"{root} is a file, not a folder"
    parent = root
    while not os.path.exists(parent) and os.path.dirname(parent) != parent:
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"{root} cannot be made: {parent} is a file"
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".fi_ffi-probe-", dir=parent))
    except OSError as exc:
        reason = exc.strerror or str(exc)
        if parent == root:
            return f"{root} is a folder this user cannot write ({reason})"
        return f"{root} does not exist and cannot be made in {parent} ({reason})"
    return ""


def check() -> None:
    """Refuse the loader's variables when one is set to a value it would refuse: one :class:`LoaderError` naming
    each such variable, its value and what it takes (:func:`fi_ffi.variables.problem`; ``FI_FFI_CACHE_DIR`` also a
    file, or a folder that cannot be made), before anything is fetched or loaded under them."""
    bad = [variables.problem(name) for name in ALL if name != CACHE_DIR]
    bad.append(_cache_dir_setting(existing_ok=True))
    wheelhouses()  # an entry that is a file or a wheel
    bad = [why for why in bad if why]
    if bad:
        raise LoaderError("; ".join(bad) + " (`fi-ffi doctor` lists every FI_FFI_* variable set)")


def sm_filter() -> tuple[str, ...]:
    """The GPU archs named by ``FI_FFI_SM`` (``"sm_90a"`` and ``"90a"`` both give ``"90a"``)."""
    return variables.archs_of(get(SM))


_checked: tuple[str, ...] | None = None  # the values check() last accepted


def snapshot() -> tuple[str, ...]:
    """The values of all variables above; a change of any of them invalidates the loader's memo tables. New values
    are checked first (:func:`check`): every selection, fetch and module load reads them through here.

    Raises:
        LoaderError: a variable is set to a value the loader would refuse.
    """
    global _checked
    values = tuple(variables.raw(name) for name in ALL)
    if values != _checked:
        check()
        _checked = values
    return values


def use_installed() -> bool:
    """Installed kernel distributions may be used in place (``FI_FFI_USE_INSTALLED`` is not ``0``)."""
    return flag(USE_INSTALLED, default=True)
