"""Cache maintenance: what the cache holds (``list``), checking and repairing it (``verify``), clearing it.

Only what fi_ffi created is ever removed: files in its layout (:mod:`fi_ffi.loader.cache`), recognised by
their place and name (and, inside an extracted folder, by being listed or stamped). Anything else found in
the cache is reported and left alone; things found where fi_ffi keeps a file of its own are moved to
``quarantine/``, never deleted.

``verify --full`` also hashes, whatever their stamps say, the wheels the lock in force pins that lie outside
the cache (each ``FI_FFI_WHEELHOUSE`` folder, the entries' ``path``), against the lock's sha256: a start uses
them, so a damaged one there would fail it. It reports them and drops their stamps; it never changes them.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import stat
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import LoaderError
from . import settings, wheels
from .cache import (
    CHUNK,
    KEY,
    QUARANTINE,
    RETIMED,
    TMP_MARK,
    cache_root,
    check_member,
    clean_temps,
    discard,
    fault,
    file_lock,
    index_problem,
    is_cached_wheel,
    make_dir,
    member_stamp_path,
    quarantine,
    read_json,
    record_stamp,
    sha256_file,
    stamp_path,
    stamped,
    temp_name,
    tree_size,
)
from .lockfile import Lock, WheelPin, active_lock, active_lock_path

NOT_OURS = "not fi_ffi's file (a wheelhouse file, the lock's 'path', or an installed file): fi_ffi never changes it"


@dataclass(frozen=True)
class CacheEntry:
    """One item of :func:`list_cache`: ``kind`` is ``"wheel"``, ``"extracted"``, ``"stamp"`` or ``"other"``
    (not fi_ffi's: quarantined or unknown); ``size`` in bytes (for a folder, the total of its files)."""

    kind: str
    path: Path
    size: int
    detail: str


@dataclass(frozen=True)
class VerifyReport:
    """The result of :func:`verify_cache`.

    ``checked``: files looked at. ``bad``: (path, problem) pairs; each was removed (fi_ffi's files: fetched
    or extracted again on next use) unless ``kept`` names it. ``kept``: (path, why it was left in place: a
    read-only cache, a file fi_ffi did not create, a failed removal, or an extracted file whose mtime differs
    from its stamp while its contents match: "timestamp differs, contents match (copied without timestamps?)",
    not bad; its stamp is refreshed where the cache is writable). ``removed_tmp``: temporary files of
    dead processes (or untouched for a day) removed. ``read_only``: the cache could not be written, so
    nothing was changed.
    """

    checked: int
    bad: tuple[tuple[Path, str], ...]
    removed_tmp: int
    kept: tuple[tuple[Path, str], ...] = ()
    read_only: bool = False

    @property
    def ok(self) -> bool:
        """True when nothing was wrong."""
        return not self.bad


@dataclass(frozen=True)
class ClearReport:
    """The result of :func:`clear_cache`: ``removed`` (path, bytes) of what fi_ffi created and removed,
    ``kept`` (path, why) of what it left (not created by fi_ffi, in use, or not removable); ``failed`` (path,
    why) lists the entries of ``kept`` that fi_ffi meant to remove and could not (a read-only cache, a file
    another user owns): the clear did not do what was asked."""

    removed: tuple[tuple[Path, int], ...]
    kept: tuple[tuple[Path, str], ...]
    failed: tuple[tuple[Path, str], ...] = ()

    @property
    def freed(self) -> int:
        """Bytes freed."""
        return sum(size for _, size in self.removed)


def _cached_wheels(root: Path) -> Iterator[Path]:
    """The wheel files in fi_ffi's layout: ``wheels/<key>/<name>.whl``."""
    for folder in sorted((root / "wheels").glob("*")):
        if KEY.match(folder.name) and folder.is_dir() and not folder.is_symlink():
            yield from sorted(p for p in folder.glob("*.whl") if TMP_MARK not in p.name)


def _size(path: Path) -> int:
    try:
        return tree_size(path) if path.is_dir() and not path.is_symlink() else path.lstat().st_size
    except OSError:
        return 0


def _cache_exists(root: Path) -> bool:
    """Whether the cache folder exists (False: nothing was cached yet). Something else in its place, or a
    path that cannot be looked at (too long, a file as a parent, no permission), is a :class:`LoaderError`."""
    try:
        mode = root.stat().st_mode
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise fault(root, exc, "cannot use the cache folder") from None
    if not stat.S_ISDIR(mode):
        raise fault(root, NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR)), "cannot use the cache folder")
    return True


def list_cache() -> list[CacheEntry]:
    """What the cache holds: wheels, extracted folders (with their wheel's name), wheelhouse stamps, and
    anything else found there (``"other"``: quarantined, or not fi_ffi's). A loader variable set to a value fi_ffi
    would refuse (``FI_FFI_CACHE_DIR`` naming what cannot be a cache) is a :class:`LoaderError`, as for a fetch."""
    settings.snapshot()
    root = cache_root()
    out: list[CacheEntry] = []
    if not _cache_exists(root):
        return out
    for wheel in _cached_wheels(root):
        if wheel.is_file():
            out.append(CacheEntry("wheel", wheel, _size(wheel), "verified" if _has_stamp(wheel) else "unverified"))
    for folder in sorted((root / "extracted").glob("*")):
        if folder.is_dir() and KEY.match(folder.name):
            info = read_json(folder / "wheel.json") or {}
            files = [f for f in folder.rglob("*.so") if f.is_file()]
            size = sum(_size(f) for f in files)
            out.append(CacheEntry("extracted", folder, size, f"{len(files)} files from {info.get('filename', '?')}"))
    for stamp in sorted((root / "stamps").glob("*.json")):
        data = read_json(stamp) or {}
        path = Path(str(data.get("path", "?")))
        if not path.is_relative_to(root):
            stamped_size = int(data.get("size", 0) or 0)
            out.append(
                CacheEntry(
                    "stamp", stamp, _size(stamp), f"verified {path} ({stamped_size / 2**20:.1f} MiB, kept there)"
                )
            )
    for path, why in _foreign(root):
        out.append(CacheEntry("other", path, _size(path), why))
    return out


def _has_stamp(wheel: Path) -> bool:
    stamp = read_json(stamp_path(wheel))
    return stamp is not None and stamped(wheel, str(stamp.get("sha256")))


def _foreign(root: Path) -> list[tuple[Path, str]]:
    """Top-level things in the cache and its fi_ffi folders that fi_ffi's layout does not account for."""
    out: list[tuple[Path, str]] = []
    layout = {"wheels", "stamps", "extracted", "locks", QUARANTINE}
    with contextlib.suppress(OSError):
        for p in sorted(root.iterdir()):
            if p.name == QUARANTINE:
                out.append((p, "moved aside by fi_ffi (not its files): inspect it and delete it yourself"))
            elif p.name not in layout and TMP_MARK not in p.name:
                out.append((p, "not created by fi_ffi"))
    patterns = {
        "wheels": lambda p: (KEY.match(p.name) and p.is_dir()) or TMP_MARK in p.name,
        "stamps": lambda p: re.fullmatch(r"[0-9a-f]{24}\.json", p.name) or TMP_MARK in p.name,
        "extracted": lambda p: KEY.match(p.name) and p.is_dir(),
        "locks": lambda p: p.name.endswith(".lock"),
    }
    for name, ok in patterns.items():
        with contextlib.suppress(OSError):
            for p in sorted((root / name).iterdir()):
                if not ok(p):
                    out.append((p, "not created by fi_ffi (not in its layout)"))
    return out


class _Verifier:
    """State of one :func:`verify_cache` run."""

    def __init__(self, root: Path, full: bool) -> None:
        self.root = root
        self.full = full
        self.checked = 0
        self.bad: list[tuple[Path, str]] = []
        self.kept: list[tuple[Path, str]] = []
        self.exists = _cache_exists(root)
        self.read_only = self.exists and not _writable(root)
        self.lock_in_force: Lock | None = None  # read for `full` only: the cheap check needs no lock
        if full:
            try:
                self.lock_in_force = active_lock()
            except LoaderError as exc:
                where = active_lock_path()
                self.bad.append((where, f"cannot be read, so the wheels it pins were not hashed: {exc}"))
                self.kept.append((where, NOT_OURS))
        self.local = _local_wheels(self.lock_in_force) if self.lock_in_force is not None else {}

    def pinned_sha256(self, wheel: Path) -> str:
        """The sha256 that the lock in force pins for the cached ``wheel`` (``wheels/<key>/<name>``); ``""`` if
        it pins none (another lock's wheel, or no lock read): then its folder's digest and stamp judge it."""
        for pin in self.lock_in_force.all_pins() if self.lock_in_force is not None else ():
            if pin.filename == wheel.name and pin.sha256.startswith(wheel.parent.name):
                return pin.sha256
        return ""

    def lock(self, name: str, what: str) -> Any:
        # A read-only cache cannot change under us (nor take a lock file): no lock needed.
        return contextlib.nullcontext() if self.read_only else file_lock(name, what)

    def problem(self, path: Path, problem: str, *, remove: tuple[Path, ...] = ()) -> None:
        """Record ``problem`` of ``path``; remove ``remove`` (fi_ffi's files) unless the cache is read-only."""
        self.bad.append((path, problem))
        if self.read_only:
            self.kept.append((path, "not removed: the cache is read-only (or not writable by this user)"))
            return
        for p in remove:
            try:
                discard(p, "a damaged file")
            except LoaderError as exc:
                self.kept.append((p, f"could not remove it: {exc}"))


def _writable(root: Path) -> bool:
    """Whether this process can create files in the cache (probed: access() is wrong for root on some mounts)."""
    try:
        probe = make_dir(root / "locks") / temp_name()
        probe.touch()
        probe.unlink()
    except (OSError, LoaderError):
        return False
    return True


def _local_wheels(lock: Lock) -> dict[Path, tuple[list[WheelPin], str]]:
    """The wheel files that ``lock``'s entries would be taken from outside the cache, and exist: absolute
    path -> (the pins of that file name, where the path comes from)."""
    out: dict[Path, tuple[list[WheelPin], str]] = {}
    for pin in lock.all_pins():
        for path, where in wheels.local_sources(pin):
            path = Path(os.path.abspath(path))
            if not is_cached_wheel(path) and path.is_file():
                out.setdefault(path, ([], where))[0].append(pin)
    return out


def verify_cache(full: bool = False) -> VerifyReport:
    """Check every cached wheel, listing and extracted file; remove the bad ones so they are fetched or
    extracted again. Never raises for what it finds: problems are reported.

    Cheap (default): sizes and mtimes against the stamps (a matching stamp spares the hash; an extracted file of
    the stamp's size with another mtime is hashed, and kept with its stamp refreshed when its contents match),
    listings against their checksums. ``full``: hash everything, whatever the stamps say: cached wheels against the
    lock's sha256 (else the digest they are keyed by), the wheels the lock pins outside the cache (wheelhouses, the
    lock's ``path``) against the lock's sha256, other files fi_ffi has stamped against their stamps, extracted
    files against their stamps and the zip CRCs. Only fi_ffi's own files are removed; a file of someone else's
    that is bad loses its stamp and is reported. A read-only cache is checked, not changed. A cache folder
    that is not a folder, or cannot be looked at, is a :class:`LoaderError`, as is a loader variable set to a value
    fi_ffi would refuse (``FI_FFI_CACHE_DIR`` naming what cannot be a cache), before anything is looked at.
    """
    settings.snapshot()
    root = cache_root()
    v = _Verifier(root, full)
    if v.exists:
        _verify_wheels(v)
        _verify_stamps(v)
        for folder in sorted((root / "extracted").glob("*")):
            if folder.is_dir() and KEY.match(folder.name):
                with v.lock(f"extract-{folder.name}", f"verifying {folder}"):  # an extraction may be mid-way
                    _verify_extracted(v, folder)
    _verify_local_wheels(v)
    removed_tmp = len(clean_temps(root, recursive=True)) if v.exists and not v.read_only else 0
    return VerifyReport(
        checked=v.checked, bad=tuple(v.bad), removed_tmp=removed_tmp, kept=tuple(v.kept), read_only=v.read_only
    )


def _verify_wheels(v: _Verifier) -> None:
    for wheel in _cached_wheels(v.root):
        v.checked += 1
        key = wheel.parent.name
        with v.lock(f"fetch-{key}", f"verifying {wheel.name}"):  # a download may be between rename and stamp
            if not wheel.is_file():
                v.problem(wheel, "not a file (something else took the wheel's place)", remove=(wheel,))
                continue
            try:
                problem = _wheel_problem(wheel, v.full, key, v.pinned_sha256(wheel))
            except LoaderError as exc:
                problem = f"cannot be checked: {exc}"
            if problem:
                v.problem(wheel, problem, remove=(wheel, stamp_path(wheel)))
    for p in sorted((v.root / "wheels").glob("*.whl")):  # an older fi_ffi kept wheels/<filename>
        _adopt_legacy_wheel(v, p)


def _wheel_problem(wheel: Path, full: bool, key: str, pinned: str) -> str:
    """What is wrong with the cached ``wheel`` (in folder ``key``), ``""`` if nothing; ``pinned``: the sha256 the
    lock in force pins for it, or ``""``."""
    if full and pinned:  # the lock's word, whatever the stamp says
        actual = sha256_file(wheel, desc=f"verifying {wheel.name}")
        if actual == pinned:
            record_stamp(wheel, actual)
            return ""
        return (
            f"its sha256 is {actual}, expected {pinned} (pinned by the lock in force): damaged; the next start takes "
            "a good local copy (FI_FFI_WHEELHOUSE, the lock's 'path') or fetches the wheel again"
        )
    stamp = read_json(stamp_path(wheel))
    if stamp and stamped(wheel, str(stamp.get("sha256"))) and str(stamp.get("sha256")).startswith(key):
        if full and sha256_file(wheel, desc=f"verifying {wheel.name}") != stamp.get("sha256"):
            return f"sha256 differs from the one recorded when it was verified, {stamp.get('sha256')}"
        return ""
    # Unstamped, or changed since it was verified: its folder names the digest it must have.
    actual = sha256_file(wheel, desc=f"verifying {wheel.name}")
    if actual.startswith(key):
        record_stamp(wheel, actual)
        return ""
    return f"changed since it was verified, or never verified: its sha256 {actual} does not start with {key}"


def _foreign_wheel_damage(v: _Verifier, wheel: Path) -> str:
    """``full``: what is wrong with a wheel in the cache that fi_ffi did not create (``""``: nothing found). Against
    the lock in force when it pins that file name (the sha256), else as a zip (every member's CRC)."""
    import zipfile

    pins = [pin for pin in v.lock_in_force.all_pins() if pin.filename == wheel.name] if v.lock_in_force else []
    try:
        if pins:
            actual = sha256_file(wheel, desc=f"verifying {wheel.name}")
            expected = {pin.sha256 for pin in pins}
            return (
                "" if actual in expected else f"its sha256 is {actual}, the lock pins {' or '.join(sorted(expected))}"
            )
        with zipfile.ZipFile(wheel) as zf:
            broken = zf.testzip()
        return f"damaged: member {broken} fails its CRC check" if broken else ""
    except (OSError, LoaderError, zipfile.BadZipFile, EOFError) as exc:
        return f"damaged: cannot be read as a wheel ({exc})"


def _adopt_legacy_wheel(v: _Verifier, wheel: Path) -> None:
    """``wheels/<filename>`` (an older layout): move it to ``wheels/<key>/`` if its stamp vouches for it."""
    stamp = read_json(stamp_path(wheel))
    sha = str((stamp or {}).get("sha256", ""))
    if not wheel.is_file() or not stamp or not re.fullmatch(r"[0-9a-f]{64}", sha) or not stamped(wheel, sha):
        damage = _foreign_wheel_damage(v, wheel) if v.full and wheel.is_file() else ""
        if damage:  # bad, and said so (exit 1); still not fi_ffi's to delete
            v.checked += 1
            v.bad.append((wheel, f"{damage}; not created by fi_ffi, so left in place: replace or remove it"))
        v.kept.append(
            (
                wheel,
                "not created by fi_ffi, or changed since it was verified: left alone "
                "(add wheels with `fi-ffi fetch --wheel PATH`)",
            )
        )
        return
    v.checked += 1
    if v.read_only:
        v.kept.append((wheel, "older cache layout; not moved to wheels/<sha256[:16]>/: the cache is read-only"))
        return
    try:
        dest = make_dir(v.root / "wheels" / sha[:16]) / wheel.name
        os.replace(wheel, dest)
        discard(stamp_path(wheel), "a stamp")
        record_stamp(dest, sha)
    except (OSError, LoaderError) as exc:
        v.kept.append((wheel, f"older cache layout; could not move it to wheels/{sha[:16]}/: {exc}"))


def _verify_stamps(v: _Verifier) -> None:
    for stamp_file in sorted((v.root / "stamps").glob("*.json")):
        data = read_json(stamp_file) or {}
        target = Path(str(data.get("path", "")))
        sha = str(data.get("sha256"))
        if not data.get("path") or not target.is_file() or not stamped(target, sha):
            if not v.read_only:  # stale: the file moved or changed; it is re-hashed on next use
                with contextlib.suppress(LoaderError):
                    discard(stamp_file, "a stamp")
            continue
        if v.full and not is_cached_wheel(target) and Path(os.path.abspath(target)) not in v.local:
            v.checked += 1
            try:
                actual = sha256_file(target)
            except LoaderError as exc:
                v.problem(target, f"cannot be read to check it: {exc}", remove=(stamp_file,))
                continue
            if actual != sha:
                v.problem(
                    target,
                    f"its sha256 is now {actual}, not the {sha} recorded when fi_ffi verified it (same size and "
                    "mtime); its stamp was removed, the file itself is not fi_ffi's and was left alone: replace "
                    "it with the pinned build",
                    remove=(stamp_file,),
                )
                v.kept.append((target, "not fi_ffi's file (a wheelhouse or installed file)"))


def _verify_local_wheels(v: _Verifier) -> None:
    """``full``: hash each wheel the lock in force pins outside the cache against the lock's sha256 (stamps or
    not: a stamp may match a changed file); a bad one is reported with the fix and loses its stamp."""
    for path, (pins, where) in v.local.items():
        v.checked += 1
        try:
            actual = sha256_file(path, desc=f"verifying {path.name}")
        except LoaderError as exc:
            v.problem(path, f"from {where}: cannot be read to check it: {exc}", remove=(stamp_path(path),))
            v.kept.append((path, NOT_OURS))
            continue
        if any(pin.sha256 == actual for pin in pins):
            if v.exists and not v.read_only:
                record_stamp(path, actual)  # the next start need not hash it again
            continue
        expected = " or ".join(sorted({pin.sha256 for pin in pins}))
        v.problem(
            path,
            f"from {where}: its sha256 is {actual}, expected {expected} (pinned by the lock {pins[0].lock_path}), "
            "so a start that needs it fails. Replace it with the pinned build, or take it out of there; it is not "
            "fi_ffi's file, so it was left as it is (its stamp was removed)",
            remove=(stamp_path(path),),
        )
        v.kept.append((path, NOT_OURS))


def _verify_extracted(v: _Verifier, folder: Path) -> None:
    index_file = folder / "index.json"
    data = read_json(index_file)
    index: dict[str, Any] = {}
    if index_file.exists() or index_file.is_symlink():
        v.checked += 1
        sha = str(data.get("sha256", "")) if data else ""
        if data is not None and not sha.startswith(folder.name):
            problem = f"it names the wheel sha256 {sha!r}, which does not start with this folder's {folder.name}"
        else:
            problem = index_problem(data, sha)
        if problem:
            v.problem(
                index_file,
                f"damaged listing: {problem}; it is listed from the wheel again on next use",
                remove=(index_file,),
            )
        else:
            assert data is not None
            index = data["members"]
    for dest in sorted(folder.rglob("*.so")):
        if TMP_MARK in dest.name or (not dest.exists() and not dest.is_symlink()):
            continue
        v.checked += 1
        member = dest.relative_to(folder).as_posix()
        if dest.is_dir() and not dest.is_symlink():
            v.bad.append(
                (
                    dest,
                    "a folder is where the extracted file belongs; it is moved to quarantine/ and the "
                    "file extracted again on next use",
                )
            )
            if v.read_only:
                v.kept.append((dest, "not moved: the cache is read-only"))
                continue
            try:
                quarantine(dest, f"the extracted file {dest.name}")
                discard(member_stamp_path(dest), "a stamp")
            except LoaderError as exc:
                v.kept.append((dest, f"could not move it: {exc}"))
            continue
        problem = _member_problem(v, dest, index.get(member))
        if not problem and index and member not in index and read_json(member_stamp_path(dest)):
            problem = "its wheel's listing (index.json) does not list it: the listing is damaged"
            v.problem(index_file, problem + "; it is listed from the wheel again on next use", remove=(index_file,))
            continue
        if problem:
            v.problem(dest, problem, remove=(dest, member_stamp_path(dest)))


def _member_problem(v: _Verifier, dest: Path, listed: list[int] | None) -> str:
    check = check_member(dest)  # size and mtime; hashed only where the size matches and the mtime does not
    if check.problem:
        return check.problem
    if check.retimed:  # intact: a copy of the cache made without its timestamps (`cp -r`)
        if check.restamped:
            why = f"{RETIMED}; its stamp now records its mtime"
        elif v.read_only:
            why = (
                f"{RETIMED}; its stamp cannot be refreshed: the cache is read-only, so every process that uses it "
                "hashes the file once (copy the cache with its timestamps: cp -a, rsync -t)"
            )
        else:
            why = f"{RETIMED}; its stamp could not be refreshed"
        v.kept.append((dest, why))
    stamp = read_json(member_stamp_path(dest)) or {}
    if listed and listed[0] != stamp.get("size"):
        return f"size {stamp.get('size')} differs from the wheel's {listed[0]}"
    if v.full:
        h = hashlib.sha256()
        crc = 0
        try:
            with open(dest, "rb") as f:
                while block := f.read(CHUNK):
                    h.update(block)
                    crc = zlib.crc32(block, crc)
        except OSError as exc:
            return f"cannot be read ({exc.strerror or exc}); it is extracted again, readable, on next use"
        if h.hexdigest() != stamp.get("sha256"):
            return f"sha256 {h.hexdigest()} differs from the one recorded at extraction {stamp.get('sha256')}"
        if listed and listed[1] != crc:
            return f"crc32 {crc:#010x} differs from the wheel's {listed[1]:#010x}"
    return ""


def clear_cache() -> ClearReport:
    """Remove what fi_ffi created in the cache (wheels, stamps, extracted files and listings, lock files not
    held, temporary files of dead processes) and report it; everything else is kept and reported.

    The cache root stays when ``FI_FFI_CACHE_DIR`` names it (the user's folder); the default one is removed
    once empty. Libraries already loaded stay mapped. A lock another process holds, and
    its folder's files, are kept (that process is writing them). A loader variable set to a value fi_ffi would refuse
    (``FI_FFI_CACHE_DIR`` naming what cannot be a cache) is a :class:`LoaderError`, before anything is removed.
    """
    settings.snapshot()
    root = cache_root()
    if not _cache_exists(root):
        return ClearReport((), ())
    removed: list[tuple[Path, int]] = []
    kept: list[tuple[Path, str]] = list(_foreign(root))

    def remove(path: Path) -> None:
        size = _unlink(path, kept)
        if size is not None:
            removed.append((path, size))

    removed += clean_temps(root, recursive=True)
    for wheel in _cached_wheels(root):
        if wheel.is_file() or wheel.is_symlink():
            remove(wheel)
    for stamp in sorted((root / "stamps").glob("*.json")):
        if re.fullmatch(r"[0-9a-f]{24}\.json", stamp.name) and not stamp.is_dir():
            remove(stamp)
    for folder in sorted((root / "extracted").glob("*")):
        if KEY.match(folder.name) and folder.is_dir() and not folder.is_symlink():
            _clear_extracted(folder, removed, kept)
    for lock in sorted((root / "locks").glob("*.lock")):
        if lock.is_file() and not lock.is_symlink():
            _clear_lock(lock, removed, kept)
    for name in ("wheels", "stamps", "extracted", "locks"):
        _prune_empty(root / name)
    if not settings.get(settings.CACHE_DIR):  # the default folder is fi_ffi's own; FI_FFI_CACHE_DIR is the user's
        with contextlib.suppress(OSError):
            root.rmdir()  # only if empty
    failed = tuple((p, why) for p, why in kept if why.startswith(_NOT_REMOVED))
    return ClearReport(tuple(removed), tuple(kept), failed)


_NOT_REMOVED = "could not remove it"
"""How :func:`clear_cache` begins the reason for a file of fi_ffi's that it failed to remove."""


def _unlink(path: Path, kept: list[tuple[Path, str]]) -> int | None:
    """Remove the file ``path``: its size in bytes, or None when it was gone already or could not be removed
    (then it is added to ``kept`` with the reason)."""
    size = _size(path)
    try:
        path.unlink()
    except FileNotFoundError:
        return None
    except OSError as exc:
        kept.append((path, f"{_NOT_REMOVED}: {exc.strerror or exc}"))
        return None
    return size


def _clear_extracted(folder: Path, removed: list[tuple[Path, int]], kept: list[tuple[Path, str]]) -> None:
    """Remove fi_ffi's files in one extracted folder: its listings, and each member that has a stamp or is
    listed, with the stamp. The folder entry in ``removed`` carries the total size."""
    index = (read_json(folder / "index.json") or {}).get("members")
    listed = set(index) if isinstance(index, dict) else set()
    total = 0
    leftovers: list[Path] = []
    for path in sorted(folder.rglob("*")):
        if path.is_dir() and not path.is_symlink():
            continue
        rel = path.relative_to(folder).as_posix()
        if TMP_MARK in path.name:  # dead owners' ones are gone already (clean_temps)
            kept.append((path, "being written by a running process"))
            continue
        ours = (
            rel in ("wheel.json", "index.json")
            or rel in listed
            or rel.endswith(".so.stamp")
            or member_stamp_path(path).exists()  # sorted: a member comes before its stamp
        )
        if not ours:
            leftovers.append(path)
            continue
        total += _unlink(path, kept) or 0
    for path in leftovers:
        if path.exists() or path.is_symlink():
            kept.append((path, "not created by fi_ffi (neither listed nor stamped)"))
    _prune_empty(folder)
    if total or not folder.exists():  # an entry only when something went: a read-only cache removes nothing
        removed.append((folder, total))


def _clear_lock(lock: Path, removed: list[tuple[Path, int]], kept: list[tuple[Path, str]]) -> None:
    """Remove a lock file no process holds: taken without waiting, unlinked while held (filelock's waiters
    notice an unlinked lock file and retry on a new one, so mutual exclusion holds)."""
    import filelock

    try:  # filelock reports a lock file it may not open as held (it retries until the timeout): ask first
        os.close(os.open(lock, os.O_RDWR))
    except OSError as exc:
        kept.append((lock, f"{_NOT_REMOVED}: cannot open it to see whether a process holds it ({exc.strerror or exc})"))
        return
    held = filelock.FileLock(str(lock))
    try:
        held.acquire(timeout=0)
    except filelock.Timeout:
        kept.append((lock, "held by a running process"))
        return
    except OSError as exc:  # cannot even be opened (a read-only cache): whether it is held is unknown
        kept.append((lock, f"{_NOT_REMOVED}: cannot open it to see whether a process holds it ({exc.strerror or exc})"))
        return
    try:
        lock.unlink()
        removed.append((lock, 0))
    except OSError as exc:
        kept.append((lock, f"could not remove it: {exc.strerror or exc}"))
    finally:
        held.release()


def _prune_empty(folder: Path) -> None:
    """Remove empty folders under and including ``folder``, deepest first."""
    if not folder.is_dir() or folder.is_symlink():
        return
    for p in sorted((d for d in folder.rglob("*") if d.is_dir() and not d.is_symlink()), key=lambda d: -len(d.parts)):
        with contextlib.suppress(OSError):
            p.rmdir()
    with contextlib.suppress(OSError):
        folder.rmdir()
