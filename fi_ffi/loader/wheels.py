"""Getting a pinned wheel onto this machine: cache, wheelhouse, local path, download, ``pip download``.

:func:`ensure_wheel` returns the path of a wheel file whose sha256 matches its pin, trying in order:

1. ``<cache>/wheels/<filename>`` (verified once; a stamp of size + mtime_ns avoids re-hashing it),
2. ``<dir>/<filename>`` for each ``FI_FFI_WHEELHOUSE`` folder, used in place (stamped the same way),
3. the entry's ``path`` (relative to the lock's folder), used in place,
4. unless ``FI_FFI_OFFLINE`` is set: the entry's ``url`` (http/https, via :mod:`urllib.request`), then its
   ``pip`` requirement (``python -m pip download`` with the platform tags of the pinned file name).

Downloads are hashed while streaming into a temporary file inside the cache and renamed into place only
when size and sha256 match, under a cross-process lock (N processes download a wheel once).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

from ..errors import FetchError, IntegrityError, LoaderError, LockError
from . import cache, settings
from .lockfile import Lock, WheelPin, parse_wheel_filename

TIMEOUT_S = 60.0  # socket timeout for connect and for each read, seconds
USER_AGENT = "fi_ffi-loader/1"


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
        f"Put {pin.filename} (sha256 {pin.sha256}) in a folder named by FI_FFI_WHEELHOUSE, or copy it into the "
        f"cache with `fi-ffi fetch --wheel PATH`.{origin}"
    )


def ensure_wheel(pin: WheelPin) -> Path:
    """The path of ``pin``'s wheel, verified; fetched into the cache if no local copy exists (see module doc)."""
    cached = cache.wheels_dir() / pin.filename
    if cached.is_file():
        if cache.check_wheel(cached, pin.sha256) is None:
            return cached
        with cache.file_lock(f"fetch-{pin.sha256[:16]}"):
            # A damaged copy would be re-hashed at every start; another process may have replaced it meanwhile.
            if cache.check_wheel(cached, pin.sha256) is None:
                return cached
            cache.remove_quietly(cached)
    for folder in settings.wheelhouses():
        candidate = Path(os.path.expanduser(folder)) / pin.filename
        if candidate.is_file():
            _check_local(candidate, pin, f"the wheelhouse {folder} (FI_FFI_WHEELHOUSE)")
            return candidate
    local = pin.local_path
    if local is not None and local.is_file():
        _check_local(local, pin, f"the lock {pin.lock_path} ('path')")
        return local
    where = f"; the lock's 'path' {local} does not exist" if local is not None else ""
    if settings.offline():
        raise LoaderError(
            f"fi_ffi needs {pin.filename} and FI_FFI_OFFLINE forbids downloading it{where}. {how_to_provide(pin)}"
        )
    if not pin.url and not pin.pip:
        raise LoaderError(
            f"{pin.filename} is not in the cache or a wheelhouse, and the lock {pin.lock_path} gives no url or "
            f"pip requirement to download it{where}. {how_to_provide(pin)}"
        )
    with cache.file_lock(f"fetch-{pin.sha256[:16]}"):
        if cached.is_file() and cache.check_wheel(cached, pin.sha256) is None:
            return cached  # another process fetched it while we waited
        if pin.url:
            return download(pin.url, pin, cached)
        return pip_download(pin, cached)


def _check_local(path: Path, pin: WheelPin, where: str) -> None:
    actual = cache.check_wheel(path, pin.sha256)
    if actual is not None:
        raise IntegrityError(
            f"{path} from {where} has sha256 {actual}, but the lock {pin.lock_path} pins {pin.filename} with "
            f"sha256 {pin.sha256}. Replace the file with the pinned build, or pin this one in a lock of your "
            f"own (`fi-ffi lock {path}`, then FI_FFI_LOCK=that file)"
        )


def download(url: str, pin: WheelPin, dest: Path) -> Path:
    """Download ``url`` to ``dest``, checking ``pin``'s size and sha256; nothing is left behind on failure."""
    import http.client
    import urllib.error
    import urllib.request

    if not url.startswith(("https://", "http://")):
        raise FetchError(f"refusing to download {url}: only http:// and https:// addresses are fetched")
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    fix = f"Check the network (and proxy settings), then retry. {how_to_provide(pin)}"
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as exc:
        raise FetchError(f"downloading {url} failed: HTTP {exc.code} {exc.reason}. {fix}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise FetchError(f"cannot download {url}: {reason}. {fix}") from None
    with response:
        length_header = response.headers.get("Content-Length")
        length = int(length_header) if length_header and length_header.isdigit() else None
        if length is not None and pin.size is not None and length != pin.size:
            raise IntegrityError(
                f"{url} offers {length} bytes, but the lock {pin.lock_path} pins {pin.filename} at {pin.size} "
                f"bytes (sha256 {pin.sha256}); the server has a different file. {how_to_provide(pin)}"
            )
        h = hashlib.sha256()
        received = 0
        with cache.atomic_file(dest) as (out, _), cache.progress(length or pin.size, pin.filename) as bar:
            while True:
                try:
                    block = response.read(cache.CHUNK)
                except (OSError, http.client.HTTPException) as exc:
                    raise FetchError(f"downloading {url} broke off after {received} bytes: {exc!r}. {fix}") from None
                if not block:
                    break
                h.update(block)
                out.write(block)
                received += len(block)
                bar.update(len(block))
            _check_download(url, pin, h.hexdigest(), received, length, fix)
    cache.record_stamp(dest, pin.sha256)
    return dest


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
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmpdir = dest.parent / f"{cache.TMP_MARK}pip-{os.getpid()}-{os.urandom(4).hex()}"
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--platform", name.last_platform, "--python-version", _python_version(name.python),
        "--implementation", name.python[:2], "--disable-pip-version-check", "--no-input",
        "-d", str(tmpdir), pin.pip,
    ]  # fmt: skip
    fix = how_to_provide(pin)
    try:
        tmpdir.mkdir()
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
        os.replace(got, dest)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    cache.record_stamp(dest, pin.sha256)
    return dest


def import_wheel(path: Path, lock: Lock) -> Path:
    """Copy the local wheel ``path`` into the cache after checking that ``lock`` pins it (name and sha256)."""
    path = Path(path)
    if not path.is_file():
        raise LoaderError(f"{path}: no such file")
    pins = [p for p in lock.all_pins() if p.filename == path.name]
    if not pins:
        raise LockError(
            f"the lock {lock.path} pins no wheel named {path.name}; to use a self-built wheel, pin it in a lock "
            f"of your own (`fi-ffi lock {path}`, then FI_FFI_LOCK=that file)"
        )
    pin = pins[0]
    dest = cache.wheels_dir() / pin.filename
    h = hashlib.sha256()
    with cache.file_lock(f"fetch-{pin.sha256[:16]}"):
        try:
            with open(path, "rb") as src, cache.atomic_file(dest) as (out, _):
                while block := src.read(cache.CHUNK):
                    h.update(block)
                    out.write(block)
                if h.hexdigest() != pin.sha256:
                    raise IntegrityError(
                        f"{path} has sha256 {h.hexdigest()}, but the lock {pin.lock_path} pins {pin.filename} "
                        f"with sha256 {pin.sha256}; it was not copied. Use the pinned build, or pin this file in "
                        f"a lock of your own (`fi-ffi lock {path}`)"
                    )
        except OSError as exc:
            raise LoaderError(f"cannot copy {path} into the cache {dest.parent}: {exc}") from None
        with contextlib.suppress(OSError):
            cache.record_stamp(dest, pin.sha256)
    return dest
