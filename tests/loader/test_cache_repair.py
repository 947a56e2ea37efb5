"""The cache's repairs and checks, on real files: the shared test kernel wheel copied into folders of
the test's own, damaged by flipping bytes with its size kept and its mtime put back (``os.utime``), so that the
stamp fi_ffi recorded still matches where a test says so.

- ``fi-ffi cache verify --full`` hashes every wheel the lock pins (cache, wheelhouse, the lock's ``path``) against
  the lock's sha256 whatever its stamp says, and names the path, the expected and the found digest and the fix;
- a damaged cached wheel is replaced by a verified copy of a good local source, atomically, and the log says so;
- ``DamagedWheelError`` is a ``LoaderError``;
- faults a small campaign found in the cache commands (a cache path that cannot be a folder, a file where one
  of the cache's folders belongs) are typed errors or healed, never a traceback.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers.env import subprocess_env
from helpers.other_users import as_nobody, chown_tree, mounted, needs_root, nobody_world

from fi_ffi import errors, loader
from fi_ffi.errors import DamagedWheelError, IntegrityError, LoaderError
from fi_ffi.loader import cache, lockfile, wheels

PAGE = "flashinfer_jit_cache/jit_cache/page/page.so"
NORM = "flashinfer_jit_cache/jit_cache/norm/norm.so"


@pytest.fixture(scope="session")
def pinned_entry(shared_wheel: Path) -> lockfile.WheelPin:
    """The lock entry of the shared wheel (hashed once per session; its copies have the same bytes)."""
    return loader.lock_entry(shared_wheel)


@pytest.fixture
def use_house(
    shared_wheel: Path,
    pinned_entry: lockfile.WheelPin,
    fresh_cache: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Callable[..., Path]:
    """``use_house(folder, path_entry=None)``: copy the shared wheel into ``folder``, make that folder the
    wheelhouse and a lock pinning the wheel the lock in force (with ``path = path_entry`` if given); returns
    the copy. The cache is this test's own."""

    def make(folder: Path, path_entry: Path | None = None) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        wheel = folder / shared_wheel.name
        shutil.copyfile(shared_wheel, wheel)  # not copy2: the shared file is read-only
        pin = pinned_entry if path_entry is None else _with_path(pinned_entry, path_entry)
        lock = tmp_path / "real.lock"
        lock.write_text(loader.dump_lock([pin]))
        monkeypatch.setenv("FI_FFI_LOCK", str(lock))
        monkeypatch.setenv("FI_FFI_WHEELHOUSE", str(folder))
        monkeypatch.setenv("FI_FFI_CUDA_VERSION", "13.0")
        return wheel

    return make


def _with_path(pin: lockfile.WheelPin, path: Path) -> lockfile.WheelPin:
    import dataclasses

    return dataclasses.replace(pin, path=str(path))


def pin() -> lockfile.WheelPin:
    return loader.active_lock().kernels[0]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def member_data_offset(wheel: Path, member: str) -> int:
    """Where the compressed bytes of ``member`` start in ``wheel``."""
    with zipfile.ZipFile(wheel) as zf:
        info = zf.getinfo(member)
    with open(wheel, "rb") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
    return info.header_offset + 30 + name_len + extra_len


def flip(path: Path, offset: int, n: int = 64) -> None:
    """Invert ``n`` bytes of ``path`` at ``offset``; size kept, mtime (to the nanosecond) put back."""
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(offset)
        data = f.read(n)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def damage_member(wheel: Path, member: str = PAGE) -> None:
    """Damage the deflate stream of ``member``: the zip still opens, that member fails to unzip."""
    flip(wheel, member_data_offset(wheel, member) + 1000)


def damage_directory(wheel: Path) -> None:
    """Damage the zip's end-of-central-directory record: the zip no longer opens."""
    flip(wheel, wheel.read_bytes().rfind(b"PK\x05\x06"), 4)


def temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if cache.TMP_MARK in p.name]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fi_ffi", *args], capture_output=True, text=True, env=subprocess_env(), timeout=300
    )


# ------------------------------------------------------------------------ verify --full: every wheel, by the lock


@pytest.mark.parametrize("stamp", ["matching", "stale", "never recorded", "wheelhouse inside the cache folder"])
def test_verify_full_hashes_a_wheelhouse_wheel_against_the_lock_whatever_its_stamp_says(
    use_house: Callable[..., Path], shared_wheel: Path, tmp_path: Path, stamp: str
) -> None:
    folder = cache.cache_root() / "house" if stamp == "wheelhouse inside the cache folder" else tmp_path / "house"
    wheel = use_house(folder)
    if stamp != "never recorded":
        loader.module_path("norm")  # verifies the wheelhouse wheel and stamps it
        assert cache.stamped(wheel, pin().sha256)
    damage_member(wheel)
    if stamp == "stale":  # the stamp no longer matches (say, a copy tool rounded the mtime): was skipped unhashed
        st = wheel.stat()
        os.utime(wheel, ns=(st.st_atime_ns, st.st_mtime_ns + 1000))
    damaged = wheel.read_bytes()
    found = hashlib.sha256(damaged).hexdigest()
    if stamp == "matching":
        assert cli("cache", "verify").returncode == 0  # without --full a matching stamp spares the hash
    done = cli("cache", "verify", "--full")  # was: rc 0 for all but "matching"
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stdout + done.stderr
    line = next(x for x in done.stdout.splitlines() if x.startswith(f"kept {wheel}:"))
    assert f"sha256 is {found}" in line and f"expected {pin().sha256}" in line
    assert "Replace it with the pinned build" in line and "FI_FFI_WHEELHOUSE" in line
    assert wheel.read_bytes() == damaged and not cache.stamped(wheel, pin().sha256)  # reported, never changed
    with pytest.raises(IntegrityError) as info:  # the next start hashes it: a clear error, not a failed unzip
        loader.module_path("page")
    assert not isinstance(info.value, DamagedWheelError)
    assert str(wheel) in str(info.value) and found in str(info.value) and pin().sha256 in str(info.value)
    shutil.copyfile(shared_wheel, wheel)  # the pinned build back: verify passes, the start works
    assert cli("cache", "verify", "--full").returncode == 0
    assert loader.module_path("page").is_file()


def test_verify_full_passes_a_good_wheelhouse_and_the_start_after_it_works(
    use_house: Callable[..., Path], tmp_path: Path
) -> None:
    wheel = use_house(tmp_path / "house")
    report = loader.verify_cache(full=True)  # no cache yet: the wheelhouse wheel is hashed all the same
    assert report.ok and report.checked == 1
    assert loader.module_path("page").is_file()
    damage_member(wheel)
    assert [p for p, _ in loader.verify_cache(full=True).bad] == [wheel]


def test_verify_full_checks_the_cached_wheel_against_the_lock_and_the_lock_path(
    use_house: Callable[..., Path], tmp_path: Path
) -> None:
    good = use_house(tmp_path / "elsewhere")
    wheel = use_house(tmp_path / "house", path_entry=good)  # the lock's 'path' names the other copy
    cached = loader.fetch(wheel)[0]
    assert cached == cache.wheel_path(pin())
    damage_member(good)
    damage_member(cached)
    report = loader.verify_cache(full=True)
    bad = dict(report.bad)
    assert set(bad) == {good, cached}, report
    assert "the lock" in bad[good] and "('path')" in bad[good] and pin().sha256 in bad[good]
    assert f"expected {pin().sha256}" in bad[cached] and not cached.exists()  # fi_ffi's copy: removed
    assert good.is_file() and any(p == good and "never changes it" in why for p, why in report.kept)


def test_verify_full_reports_a_lock_it_cannot_read(use_house: Callable[..., Path], tmp_path: Path) -> None:
    use_house(tmp_path / "house")
    broken = tmp_path / "broken.lock"
    broken.write_text("version = 1\n[[kernel]]\nfilename = 3\n")
    os.environ["FI_FFI_LOCK"] = str(broken)  # use_house's monkeypatch restores it
    assert loader.verify_cache().ok  # the cheap check does not read the lock
    report = loader.verify_cache(full=True)
    assert [p for p, _ in report.bad] == [broken] and "cannot be read" in report.bad[0][1]


# ------------------------------------------------------------------------ a damaged cached wheel is replaced


@pytest.mark.parametrize("damage", ["stamp matches, found at unzip", "truncated", "directory, listing"])
def test_a_damaged_cached_wheel_is_replaced_by_a_verified_copy_of_the_wheelhouse_wheel(
    use_house: Callable[..., Path], tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    wheel = use_house(tmp_path / "house")
    cached = loader.fetch(wheel)[0]
    assert cached == cache.wheel_path(pin()) and cache.stamped(cached, pin().sha256)
    good_mtime = wheel.stat().st_mtime_ns
    with caplog.at_level(logging.WARNING, logger="fi_ffi.loader"):
        if damage == "stamp matches, found at unzip":
            damage_member(cached)
            assert cache.stamped(cached, pin().sha256)  # the cheap check cannot see it
            assert loader.module_path("page").read_bytes() == zipfile.ZipFile(wheel).read(PAGE)
        elif damage == "truncated":
            with open(cached, "r+b") as f:
                f.truncate(cached.stat().st_size // 2)
            assert loader.module_path("norm").read_bytes() == zipfile.ZipFile(wheel).read(NORM)
        else:  # the listing is read from the wheel: through a function, so a damaged cached copy is replaced
            damage_directory(cached)
            assert cache.stamped(cached, pin().sha256)
            listing = cache.write_index(pin(), lambda: wheels.ensure_wheel(pin()))
            assert PAGE in listing
    # was: the cached copy removed, the wheelhouse's used in place
    assert cached.is_file() and sha256(cached) == pin().sha256 and cache.stamped(cached, pin().sha256)
    assert f"replaced it by a verified copy of {wheel}" in caplog.text and str(cached) in caplog.text
    assert not temp_files(cache.cache_root())  # nothing half-written left
    assert sha256(wheel) == pin().sha256 and wheel.stat().st_mtime_ns == good_mtime  # the source untouched


def test_a_damaged_cached_wheel_is_replaced_from_the_lock_path_when_the_wheelhouse_copy_is_bad_too(
    use_house: Callable[..., Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good = use_house(tmp_path / "elsewhere")
    wheel = use_house(tmp_path / "house", path_entry=good)
    cached = loader.fetch(wheel)[0]
    damage_member(cached)
    damage_member(wheel, NORM)  # the wheelhouse's copy: damaged too (no stamp: hashed when copied)
    bad_wheelhouse = wheel.read_bytes()
    with caplog.at_level(logging.WARNING, logger="fi_ffi.loader"):
        assert loader.module_path("page").read_bytes() == zipfile.ZipFile(good).read(PAGE)
    assert sha256(cached) == pin().sha256 and f"replaced it by a verified copy of {good}" in caplog.text
    assert wheel.read_bytes() == bad_wheelhouse  # not fi_ffi's: left as it is
    assert not temp_files(cache.cache_root()) and not temp_files(cached.parent)


def test_a_damaged_cached_wheel_without_a_good_source_is_removed_and_the_bad_source_named(
    use_house: Callable[..., Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    wheel = use_house(tmp_path / "house")
    cached = loader.fetch(wheel)[0]
    with open(cached, "r+b") as f:
        f.truncate(1000)
    damage_member(wheel, NORM)
    with caplog.at_level(logging.WARNING, logger="fi_ffi.loader"), pytest.raises(IntegrityError) as info:
        loader.module_path("norm")
    assert str(wheel) in str(info.value) and pin().sha256 in str(info.value)
    assert not cached.exists() and "no good local copy replaces it" in caplog.text
    assert wheel.is_file() and not temp_files(cache.cache_root())


def test_a_start_never_removes_a_wheelhouse_wheel_that_lies_inside_the_cache_folder(
    use_house: Callable[..., Path],
) -> None:
    wheel = use_house(cache.cache_root() / "my-wheels")
    loader.module_path("norm")
    damage_member(wheel)
    damaged = wheel.read_bytes()
    with pytest.raises(DamagedWheelError) as info:  # was: the user's file deleted as if it were fi_ffi's copy
        loader.module_path("page")
    assert not info.value.refetch and "FI_FFI_WHEELHOUSE" in str(info.value)
    assert wheel.read_bytes() == damaged


# ------------------------------------------------------------------------------------- the error's place


def test_damaged_wheel_error_is_a_loader_error_of_fi_ffi_errors(use_house: Callable[..., Path], tmp_path: Path) -> None:
    assert issubclass(errors.DamagedWheelError, errors.IntegrityError)
    assert issubclass(errors.DamagedWheelError, errors.LoaderError)
    assert cache.DamagedWheelError is errors.DamagedWheelError
    wheel = use_house(tmp_path / "house")
    loader.module_path("norm")
    damage_member(wheel)
    with pytest.raises(LoaderError) as info:
        loader.module_path("page")
    assert type(info.value) is DamagedWheelError and str(wheel) in str(info.value)


# ---------------------------------------------------------------------- faults from the campaign, made real


@pytest.mark.parametrize("where", ["a file", "a name too long", "below a file"])
@pytest.mark.parametrize("command", [("list",), ("clear",), ("verify",), ("verify", "--full")])
def test_cache_commands_on_a_cache_path_that_cannot_be_a_folder_name_it(
    use_house: Callable[..., Path], tmp_path: Path, where: str, command: tuple[str, ...]
) -> None:
    use_house(tmp_path / "house")
    if where == "a file":
        root = tmp_path / "cachefile"
        root.write_text("mine")
        fix = f"{root} is a file, not a folder; point it at a folder this user can write"
    elif where == "a name too long":
        root = tmp_path / ("x" * 300)
        fix = "File name too long"
    else:
        (tmp_path / "plain").write_text("mine")
        root = tmp_path / "plain" / "cache"
        fix = f"{root} cannot be made: {tmp_path / 'plain'} is a file; point it at a folder this user can write"
    os.environ["FI_FFI_CACHE_DIR"] = str(root)  # fresh_cache's monkeypatch restores it
    done = cli("cache", *command)  # was: a traceback (list, clear), or rc 0 with "0 bad"
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stdout + done.stderr
    assert str(root) in done.stderr and fix in done.stderr and "FI_FFI_CACHE_DIR" in done.stderr
    if where != "a name too long":
        assert (tmp_path / ("cachefile" if where == "a file" else "plain")).read_text() == "mine"


@pytest.mark.parametrize("folder", ["locks", "wheels", "extracted", "wheels/<key>", "extracted/<key>"])
def test_a_file_where_a_cache_folder_belongs_is_moved_aside_and_the_start_goes_on(
    use_house: Callable[..., Path], tmp_path: Path, folder: str
) -> None:
    wheel = use_house(tmp_path / "house")
    blocker = cache.cache_root() / folder.replace("<key>", pin().sha256[:16])
    cache.make_dir(blocker.parent)
    blocker.write_text("someone's")
    if folder == "locks":
        assert not loader.verify_cache().read_only  # was: "the cache is read-only"
    assert loader.fetch(wheel)[0] == cache.wheel_path(pin())  # was: LoaderError "a file is where a folder belongs"
    assert loader.module_path("norm").is_file()
    moved = list((cache.cache_root() / cache.QUARANTINE).iterdir())
    assert len(moved) == 1 and moved[0].read_text() == "someone's" and blocker.is_dir()


# ------------------------------------------------- made real as root: a full disk, a user that obeys file modes


@needs_root
def test_a_replacement_that_does_not_fit_leaves_no_half_written_file_and_the_good_wheel_serves(
    use_house: Callable[..., Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    wheel = use_house(tmp_path / "house")
    with mounted("-t", "tmpfs", "-o", "size=34M", "tmpfs") as disk:  # one wheel and two modules fit, not two wheels
        os.environ["FI_FFI_CACHE_DIR"] = str(disk)  # fresh_cache's monkeypatch restores it
        cached = loader.fetch(wheel)[0]
        loader.module_path("norm")
        damage_member(cached)
        damaged = cached.read_bytes()
        with caplog.at_level(logging.WARNING, logger="fi_ffi.loader"):
            assert loader.module_path("page").read_bytes() == zipfile.ZipFile(wheel).read(PAGE)
        assert "could not be replaced" in caplog.text and "No space left on device" in caplog.text
        assert cached.read_bytes() == damaged and not temp_files(disk)  # untouched, nothing half-written
        subprocess.run(["mount", "-o", "remount,size=96M", str(disk)], check=True)
        other = next(u for u in loader.available_uris() if u not in ("norm", "page"))
        assert loader.module_path(other).is_file()  # room now: the damaged copy is replaced on the way
        assert sha256(cached) == pin().sha256 and not temp_files(disk)


@needs_root
def test_an_unreadable_cached_wheel_is_replaced_from_the_wheelhouse_for_a_user_that_obeys_file_modes(
    use_house: Callable[..., Path], tmp_path: Path
) -> None:
    import pwd

    nobody = pwd.getpwnam("nobody")
    wheel = use_house(tmp_path / "house")
    with nobody_world(wheel) as env:
        os.environ.update(env)  # build the cache as root, then hand it to nobody
        cached = loader.fetch(Path(env["FI_FFI_WHEELHOUSE"]) / wheel.name)[0]
        loader.module_path("norm")  # records the listing: only the extraction of page needs the wheel
        chown_tree(Path(env["FI_FFI_CACHE_DIR"]), nobody.pw_uid, nobody.pw_gid)
        os.chmod(cached, 0)
        out = as_nobody(env, "load", "page")  # was: LoaderError "cannot read" the cached wheel
        assert "LOADERERROR" not in out and f"BYTES {len(zipfile.ZipFile(wheel).read(PAGE))}" in out, out
        assert sha256(cached) == pin().sha256 and cached.stat().st_uid == nobody.pw_uid
