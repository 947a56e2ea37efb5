"""Getting a pinned wheel onto this machine: cache, wheelhouse, local path, download, ``pip download``.

:func:`ensure_wheel` returns the path of a wheel file whose sha256 matches its pin, trying in order:

1. ``<cache>/wheels/<sha256[:16]>/<filename>`` (verified once; a stamp of size + mtime_ns avoids re-hashing it;
   a copy an older fi_ffi kept at ``<cache>/wheels/<filename>`` is moved there when its stamp vouches for it).
   A cached copy found damaged is replaced by a verified copy of the first good local source (2 or 3 below:
   copied to a temporary file beside it, hashed while copied, renamed over it) and the log says so; with no
   good local source it is removed and fetched again (4),
2. ``<dir>/<filename>`` for each ``FI_FFI_WHEELHOUSE`` folder, used in place (stamped the same way),
3. the entry's ``path`` (relative to the lock's folder), used in place,
4. unless ``FI_FFI_OFFLINE`` is set: the entry's ``url`` (http/https, via :mod:`urllib.request`), then its
   ``pip`` requirement (``python -m pip download`` with the platform tags of the pinned file name).

Downloads are hashed while streaming into a temporary file inside the cache and renamed into place only
when size and sha256 match, under a cross-process lock (N processes download a wheel once). A connection
that breaks off is retried with exponential backoff (:data:`ATTEMPTS`, :data:`BACKOFF_S`), resuming with an
HTTP ``Range`` request where the server supports it; a host that cannot be reached before anything came (no
network: a name that does not resolve, a refused connection) is not retried but said at once in one line.
Proxies come from the usual environment (``HTTPS_PROXY``, ``HTTP_PROXY``, ``NO_PROXY``: urllib's defaults);
the CA bundle from ``REQUESTS_CA_BUNDLE`` or ``SSL_CERT_FILE`` / ``SSL_CERT_DIR`` (else the system's).
What is fetched, from where and how big is logged (:mod:`fi_ffi.loader.log`), before the body is read; a progress
bar is drawn on terminals.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from ..errors import FetchError, IntegrityError, LoaderError, LockError
from . import cache, remote, settings
from .lockfile import Lock, WheelPin, parse_wheel_filename
from .log import announce, warn

TIMEOUT_S = 60.0  # socket timeout for connect and for each read, seconds
USER_AGENT = "fi_ffi-loader/1"
ATTEMPTS = 5  # tries per download in all (network errors, HTTP 408/429/5xx, a connection that breaks off)
BACKOFF_S = 1.0  # pause before the first retry, seconds; doubled for each further one
MAX_BACKOFF_S = 30.0
RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


def how_to_provide(pin: WheelPin) -> str:
    """The sentence telling a user how to put ``pin``'s wheel where fi_ffi finds it."""
    origin = ""
    if pin.url:
        origin = f" It is published at {pin.url} ."
    elif pin.pip:
        name = parse_wheel_filename(pin.filename)
        origin = (
            f" Get it with `python -m pip download --no-deps --only-binary=:all: --platform {name.last_platform} "
            f"--python-version {_python_version(name.python)} --implementation {name.python[:2]} -d DIR '{pin.pip}'`."
        )
    return (
        f"Put {pin.filename} (sha256 {pin.sha256}) in {wheelhouse_place()}, or copy it into the cache with "
        f"`fi-ffi fetch --wheel PATH`.{origin}"
    )


def wheelhouse_place() -> str:
    """Where a user may put a wheel for fi_ffi to find it: ``"a folder named by FI_FFI_WHEELHOUSE"``, naming each
    folder the variable names that does not exist (the likely reason the wheel was not found there) and the fix."""
    missing = [f for f in settings.wheelhouses() if not os.path.isdir(os.path.expanduser(f))]
    if not missing:
        return "a folder named by FI_FFI_WHEELHOUSE"
    which = "which do not exist" if len(missing) > 1 else "which does not exist"
    return (
        f"a folder named by FI_FFI_WHEELHOUSE (it names {' and '.join(missing)}, {which}: make that folder, or "
        f"point FI_FFI_WHEELHOUSE at the folder that holds the wheel)"
    )


def local_sources(pin: WheelPin) -> list[tuple[Path, str]]:
    """Where ``pin``'s wheel may lie on this machine outside the cache, in the order they are tried: each
    ``FI_FFI_WHEELHOUSE`` folder, then the lock entry's ``path``. (path, where that path comes from) pairs;
    the paths need not exist."""
    out = [
        (Path(os.path.expanduser(folder)) / pin.filename, f"the wheelhouse {folder} (FI_FFI_WHEELHOUSE)")
        for folder in settings.wheelhouses()
    ]
    if pin.local_path is not None:
        out.append((pin.local_path, f"the lock {pin.lock_path} ('path')"))
    return out


def ensure_wheel(pin: WheelPin) -> Path:
    """The path of ``pin``'s wheel, verified; fetched into the cache if no local copy exists (see module doc)."""
    cached = cache.wheel_path(pin)
    _adopt_legacy_copy(pin, cached)
    if cached.is_file():
        if _cached_digest(cached, pin) is None:
            return cached
        with cache.file_lock(f"fetch-{pin.sha256[:16]}", f"checking the cached {pin.filename}"):
            # A damaged copy would be re-hashed at every start; another process may have replaced it meanwhile.
            # The folder is keyed by this digest, so a mismatch is damage, never another build.
            found = _cached_digest(cached, pin)
            if found is None:
                return cached
            if _replace_damaged(pin, cached, found):
                return cached
    for candidate, where in local_sources(pin):
        if candidate.is_file():
            _check_local(candidate, pin, where)
            return candidate
    local = pin.local_path
    where = f"; the lock's 'path' {local} does not exist" if local is not None else ""  # (a missing wheelhouse:
    # how_to_provide names it, as for every way a wheel can fail to arrive)
    if settings.offline():
        raise LoaderError(
            f"fi_ffi needs {pin.filename} and FI_FFI_OFFLINE forbids downloading it{where}. {how_to_provide(pin)}"
        )
    if not pin.url and not pin.pip:
        raise LoaderError(
            f"{pin.filename} is not in the cache or a wheelhouse, and the lock {pin.lock_path} gives no url or "
            f"pip requirement to download it{where}. {how_to_provide(pin)}"
        )
    with cache.file_lock(f"fetch-{pin.sha256[:16]}", f"downloading {pin.filename}"):
        if cached.is_file() and cache.check_wheel(cached, pin.sha256) is None:
            return cached  # another process fetched it while we waited
        cache.clean_temps(cache.make_dir(cached.parent))  # what killed downloads left behind
        if pin.url:
            return download(pin.url, pin, cached)
        return pip_download(pin, cached)


def _cached_digest(cached: Path, pin: WheelPin) -> str | None:
    """``None`` if the cache's copy of ``pin``'s wheel checks out (stamp or hash), else what was found instead:
    its sha256, or why it cannot be read (then it is as good as damaged: a good copy replaces it)."""
    try:
        return cache.check_wheel(cached, pin.sha256)
    except LoaderError as exc:
        return f"unreadable ({exc})"


def _replace_damaged(pin: WheelPin, cached: Path, found: str) -> bool:
    """The cache's copy ``cached`` of ``pin``'s wheel is damaged (``found``: its sha256, or why it is unreadable).

    Replace it by a verified copy of the first good local source (:func:`local_sources`) and return True. A
    source whose copy does not hash to the pin is passed over (:func:`ensure_wheel` names it if no better one
    turns up). With no good source the damaged copy is removed (a download replaces it) and False returned;
    also False, with the copy left, when the cache cannot be written (a good source is then used in place).
    Every outcome is logged. Called under the wheel's ``fetch-`` lock.
    """
    damaged = f"the cached {cached} is damaged (found {found}; the lock {pin.lock_path} pins sha256 {pin.sha256})"
    for source, where in local_sources(pin):
        if not source.is_file():
            continue
        try:
            copy_into_cache(source, pin, cached)
        except IntegrityError:
            continue  # that copy is damaged too
        except LoaderError as exc:  # the cache cannot be written (full, read-only): use a good source in place
            warn(f"{damaged}; it could not be replaced by a copy of {source} from {where}: {exc}")
            return False
        warn(f"{damaged}; replaced it by a verified copy of {source} from {where}")
        return True
    cache.discard(cached, "a damaged cached wheel")
    warn(f"{damaged}; removed it: no good local copy replaces it (FI_FFI_WHEELHOUSE, the lock's 'path')")
    return False


def copy_into_cache(source: Path, pin: WheelPin, dest: Path) -> None:
    """Copy the local wheel ``source`` to ``dest`` in the cache, hashing it as it is read, and stamp it.

    Atomic: the bytes go to a temporary file in ``dest``'s folder, which replaces ``dest`` only when their sha256
    is ``pin``'s; otherwise (:class:`IntegrityError`) or on any fault (:class:`LoaderError`) the temporary file
    is removed and ``dest`` left as it was.
    """
    h = hashlib.sha256()
    try:
        with open(source, "rb") as src, cache.atomic_file(dest) as (out, _):
            while block := src.read(cache.CHUNK):
                h.update(block)
                out.write(block)
            if h.hexdigest() != pin.sha256:
                raise IntegrityError(
                    f"{source} has sha256 {h.hexdigest()} as read while copying it into the cache, but the lock "
                    f"{pin.lock_path} pins {pin.filename} with sha256 {pin.sha256}; it was not copied"
                )
    except OSError as exc:
        raise cache.fault(source, exc, "cannot copy into the cache:") from None
    cache.record_stamp(dest, pin.sha256)


def _adopt_legacy_copy(pin: WheelPin, cached: Path) -> None:
    """Move ``<cache>/wheels/<filename>`` (kept there by an older fi_ffi) to the digest-keyed place, if its
    stamp says it is this pin's build. A copy of another build (another lock's) is left where it is."""
    legacy = cache.wheels_dir() / pin.filename
    if cached.exists() or not legacy.is_file() or not cache.stamped(legacy, pin.sha256):
        return
    what = f"moving {pin.filename} to its digest-keyed folder"
    with cache.file_lock(f"fetch-{pin.sha256[:16]}", what), contextlib.suppress(OSError, LoaderError):
        if cache.stamped(legacy, pin.sha256):
            os.replace(legacy, cache.make_dir(cached.parent) / pin.filename)
            cache.discard(cache.stamp_path(legacy), "a stamp")
            cache.record_stamp(cached, pin.sha256)


def _check_local(path: Path, pin: WheelPin, where: str) -> None:
    actual = cache.check_wheel(path, pin.sha256)
    if actual is not None and not _is_whole_zip(path):
        raise IntegrityError(
            f"{path} from {where} is damaged or incomplete (not a whole zip file; sha256 {actual}, the lock "
            f"{pin.lock_path} pins {pin.sha256}): a truncated download or copy? Copy the pinned {pin.filename} "
            f"there again, or remove it so that the wheel is fetched"
        )
    if actual is not None:
        raise IntegrityError(
            f"{path} from {where} has sha256 {actual}, but the lock {pin.lock_path} pins {pin.filename} with "
            f"sha256 {pin.sha256}. Replace the file with the pinned build, or pin this one in a lock of your "
            f"own (`fi-ffi lock {path}`, then FI_FFI_LOCK=that file)"
        )


def _is_whole_zip(path: Path) -> bool:
    """Whether ``path`` opens as a zip (its central directory, at the end of the file, is there and readable): a
    truncated copy fails here, a complete wheel of another build does not."""
    import zipfile

    try:
        with zipfile.ZipFile(path):
            return True
    except (OSError, zipfile.BadZipFile, EOFError):
        return False


def size_text(n: int | None) -> str:
    """``n`` bytes for a reader (``1.2 GiB``), or ``size unknown``."""
    if n is None:
        return "size unknown"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def _opener() -> Any:
    """A urllib opener with the environment's proxies (urllib's default ProxyHandler reads ``*_PROXY`` and
    ``NO_PROXY``) and its CA bundle: ``REQUESTS_CA_BUNDLE``, else ``SSL_CERT_FILE``/``SSL_CERT_DIR``, else the
    system's."""
    import ssl
    import urllib.request

    cafile = capath = None
    for name in ("REQUESTS_CA_BUNDLE", "SSL_CERT_FILE"):
        value = settings.get(name)
        if value:
            if not os.path.isfile(value):
                raise FetchError(f"{name}={value} names no file; point it at a PEM file of CA certificates or unset it")
            cafile = value
            break
    value = settings.get("SSL_CERT_DIR")
    if value and os.path.isdir(value):
        capath = value
    try:
        context = ssl.create_default_context(cafile=cafile, capath=capath)
    except (ssl.SSLError, OSError) as exc:
        raise FetchError(f"cannot load the CA certificates {cafile or capath}: {exc}") from None
    return urllib.request.build_opener(urllib.request.HTTPSHandler(context=context))


class _Retry(Exception):
    """A download attempt failed in a way another attempt may not (network, 5xx, a cut connection)."""


@dataclass
class _Progress:
    """What a download has received so far, across attempts."""

    received: int = 0
    total: int | None = None  # bytes of the whole file, once a response told
    validator: str = ""  # ETag or Last-Modified of the first response: a resumed range must be of that file
    announced: bool = False

    def __post_init__(self) -> None:
        self.hash = hashlib.sha256()

    def restart(self, out: IO[bytes]) -> None:
        out.seek(0)
        out.truncate()
        self.received = 0
        self.hash = hashlib.sha256()


def download(url: str, pin: WheelPin, dest: Path) -> Path:
    """Download ``url`` to ``dest``, checking ``pin``'s size and sha256; nothing is left behind on failure.

    Retries :data:`ATTEMPTS` times in all with exponential backoff, resuming (HTTP ``Range``) after a
    connection that broke off when the server allows it; logs what it fetches.
    """
    if not url.startswith(("https://", "http://")):
        raise FetchError(f"refusing to download {url}: only http:// and https:// addresses are fetched")
    fix = f"Check the network (and proxy settings), then retry. {how_to_provide(pin)}"
    opener = _opener()
    state = _Progress()
    started = time.monotonic()
    with cache.atomic_file(dest) as (out, _), cache.progress(pin.size, pin.filename) as bar:
        for attempt in range(1, ATTEMPTS + 1):
            try:
                _attempt(opener, url, pin, out, state, bar, fix)
                break
            except _Retry as exc:
                if attempt == ATTEMPTS:
                    raise FetchError(f"cannot download {url} ({ATTEMPTS} attempts): {exc}. {fix}") from None
                pause = min(BACKOFF_S * 2 ** (attempt - 1), MAX_BACKOFF_S)
                resume = f", resuming at byte {state.received}" if state.received else ""
                announce(f"{pin.filename}: {exc}; retry in {pause:g} s (attempt {attempt + 1} of {ATTEMPTS}{resume})")
                time.sleep(pause)
        _check_download(url, pin, state.hash.hexdigest(), state.received, state.total, fix)
    cache.record_stamp(dest, pin.sha256)
    took = time.monotonic() - started
    announce(f"fetched {pin.filename} ({size_text(state.received)}, sha256 verified) in {took:.1f} s")
    return dest


def _attempt(opener: Any, url: str, pin: WheelPin, out: IO[bytes], state: _Progress, bar: Any, fix: str) -> None:
    """One request: the whole file, or (after a cut) the rest of it; raises :class:`_Retry` when worth retrying."""
    import http.client
    import ssl
    import urllib.error
    import urllib.parse
    import urllib.request

    headers = {"User-Agent": USER_AGENT}
    if state.received:
        headers["Range"] = f"bytes={state.received}-"
        if state.validator:
            headers["If-Range"] = state.validator  # a changed file comes whole (200), not as a spliced range
    try:
        response = opener.open(urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S)
    except urllib.error.HTTPError as exc:
        if exc.code in RETRY_STATUS:
            raise _Retry(f"HTTP {exc.code} {exc.reason}") from None
        raise FetchError(f"downloading {url} failed: HTTP {exc.code} {exc.reason}. {fix}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, ssl.SSLCertVerificationError):
            raise FetchError(
                f"cannot download {url}: {reason}. If a proxy or private CA signs this server's certificate, point "
                "REQUESTS_CA_BUNDLE (or SSL_CERT_FILE) at a PEM file holding that CA"
            ) from None
        why = None if state.received or state.announced else remote.unreachable(exc)
        if why is not None:  # nothing came yet and the host cannot be reached: no network, say so at once
            raise FetchError(
                f"no network: cannot reach {urllib.parse.urlsplit(url).netloc} ({why}); {pin.filename} was not "
                f"downloaded. {fix}"
            ) from None
        raise _Retry(str(reason)) from None
    with response:
        length_header = response.headers.get("Content-Length", "")
        length = int(length_header) if length_header.isdigit() else None
        if state.received and response.status == 206:
            first = _range_start(response.headers.get("Content-Range", ""))
            if first != state.received:
                state.restart(out)
                raise _Retry(f"the server answered the range request from byte {first}; starting over")
        elif state.received:
            announce(f"{pin.filename}: the server sent the whole file again (no resume); starting over")
            state.restart(out)
            bar.reset()
        total = state.received + length if length is not None else None
        if total is not None and pin.size is not None and total != pin.size:
            raise IntegrityError(
                f"{url} offers {total} bytes, but the lock {pin.lock_path} pins {pin.filename} at {pin.size} "
                f"bytes (sha256 {pin.sha256}); the server has a different file. {how_to_provide(pin)}"
            )
        state.total = total if total is not None else state.total
        if not state.validator:
            etag = response.headers.get("ETag", "")
            state.validator = etag if etag and not etag.startswith("W/") else response.headers.get("Last-Modified", "")
        if not state.announced:
            state.announced = True
            announce(f"fetching {pin.filename} ({size_text(total or pin.size)}) from {url}")
            if total is not None:
                bar.total = total
        while True:
            try:
                block = response.read(cache.CHUNK)
            except (OSError, http.client.HTTPException) as exc:
                raise _Retry(f"the connection broke off after {state.received} bytes: {exc!r}") from None
            if not block:
                break
            state.hash.update(block)
            out.write(block)
            state.received += len(block)
            bar.update(len(block))
        if state.total is not None and state.received < state.total:
            raise _Retry(f"the download was truncated: got {state.received} of {state.total} bytes")


def _range_start(content_range: str) -> int | None:
    """The first byte of ``Content-Range: bytes first-last/total``, or ``None``."""
    unit, _, spec = content_range.partition(" ")
    first = spec.partition("-")[0]
    return int(first) if unit == "bytes" and first.isdigit() else None


def _check_download(url: str, pin: WheelPin, digest: str, received: int, length: int | None, fix: str) -> None:
    if length is not None and received < length:
        raise FetchError(f"the download of {url} was truncated: got {received} of {length} bytes. {fix}")
    if pin.size is not None and received != pin.size:
        raise IntegrityError(
            f"{url} delivered {received} bytes, but the lock {pin.lock_path} pins {pin.size} bytes for "
            f"{pin.filename} (expected sha256 {pin.sha256}, got {digest}). {fix}"
        )
    if digest != pin.sha256:
        raise IntegrityError(
            f"{url} delivered a file with sha256 {digest}, but the lock {pin.lock_path} expects {pin.sha256} "
            f"for {pin.filename}; it was not used. If the server's file changed and you trust it, pin it in a "
            f"lock of your own (`fi-ffi lock FILE`, then FI_FFI_LOCK=that file). {how_to_provide(pin)}"
        )


def _python_version(tag: str) -> str:
    digits = tag[2:]
    return f"{digits[0]}.{digits[1:]}" if len(digits) > 1 else digits


def pip_download(pin: WheelPin, dest: Path) -> Path:
    """``python -m pip download`` ``pin.pip`` for the platform of ``pin.filename`` into a temporary folder in the
    cache, verify it, and move it to ``dest``."""
    name = parse_wheel_filename(pin.filename)
    tmpdir = cache.make_dir(dest.parent) / cache.temp_name("-pip")
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--platform", name.last_platform, "--python-version", _python_version(name.python),
        "--implementation", name.python[:2], "--disable-pip-version-check", "--no-input",
        "-d", str(tmpdir), pin.pip,
    ]  # fmt: skip
    fix = how_to_provide(pin)
    announce(f"fetching {pin.filename} ({size_text(pin.size)}) with `pip download {pin.pip}` (pip's index settings)")
    try:
        try:
            tmpdir.mkdir()
        except OSError as exc:
            raise cache.fault(tmpdir, exc, "cannot create a download folder") from None
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        except OSError as exc:
            raise FetchError(f"cannot run pip ({' '.join(cmd[:4])}): {exc}. {fix}") from None
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-8:])
            hint = " (pip is not installed in this environment)" if "No module named pip" in tail else ""
            raise FetchError(f"`pip download {pin.pip}` failed{hint} (exit {proc.returncode}):\n{tail}\n{fix}")
        got = tmpdir / pin.filename
        if not got.is_file():
            found = ", ".join(sorted(p.name for p in tmpdir.iterdir())) or "nothing"
            raise FetchError(f"`pip download {pin.pip}` produced {found}, not the pinned {pin.filename}. {fix}")
        actual = cache.sha256_file(got)
        if actual != pin.sha256:
            raise IntegrityError(
                f"`pip download {pin.pip}` gave {pin.filename} with sha256 {actual}, but the lock "
                f"{pin.lock_path} expects {pin.sha256}; it was not used. {fix}"
            )
        try:
            os.replace(got, dest)
        except OSError as exc:
            raise cache.fault(dest, exc, "cannot put in place") from None
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    cache.record_stamp(dest, pin.sha256)
    announce(f"fetched {pin.filename} ({size_text(dest.stat().st_size)}, sha256 verified)")
    return dest


def import_wheel(path: Path, lock: Lock) -> Path:
    """Copy the local wheel ``path`` into the cache after checking that ``lock`` pins it (name and sha256).

    The file is hashed first, to find the pin among several of one file name (several releases or builds),
    and again while it is copied (it might change in between).
    """
    path = Path(path)
    every_pin = lock.all_pins()
    expected = f"a wheel the lock {lock.path} pins" + (f", such as {every_pin[0].filename}" if every_pin else "")
    if path.is_dir():
        raise LoaderError(f"{path} is a folder, not a wheel file; expected {expected}")
    if not path.is_file():
        raise LoaderError(f"{path}: no such file")
    try:
        parse_wheel_filename(path.name)
    except LockError:  # a config, an archive: no lock could pin it, so `fi-ffi lock` is no way out either
        raise LoaderError(
            f"{path} is not a wheel file (name-version-python-abi-platform.whl); expected {expected}"
        ) from None
    pins = [p for p in every_pin if p.filename == path.name]
    if not pins:
        raise LockError(
            f"the lock {lock.path} pins no wheel named {path.name}; to use a self-built wheel, pin it in a lock "
            f"of your own (`fi-ffi lock {path}`, then FI_FFI_LOCK=that file)"
        )
    actual = cache.sha256_file(path)
    pin = next((p for p in pins if p.sha256 == actual), None)
    if pin is None:
        pinned = " or ".join(sorted({p.sha256 for p in pins}))
        raise IntegrityError(
            f"{path} has sha256 {actual}, but the lock {pins[0].lock_path} pins {path.name} with sha256 {pinned}; "
            f"it was not copied. Use the pinned build, or pin this file in a lock of your own (`fi-ffi lock {path}`)"
        )
    dest = cache.wheel_path(pin)
    if dest.is_file() and _cached_digest(dest, pin) is None:
        return dest
    with cache.file_lock(f"fetch-{pin.sha256[:16]}", f"copying {path} into the cache"):
        copy_into_cache(path, pin, dest)  # hashed again as copied: it might have changed since
    announce(f"copied {path} into the cache ({dest})")
    return dest
