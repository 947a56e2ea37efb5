"""A cache copied without its timestamps (``cp -r``, not ``cp -a``): every extracted file keeps its size and bytes
but gets a new mtime, so no stamp matches by size and mtime.

Such a file is hashed (once) and, its contents matching the sha256 its stamp records, used: a writable cache gets
its stamp refreshed, a read-only one (a read-only bind mount: root ignores file modes) accepts it for the
process. A file that really differs is still refused; in a read-only cache the error says the cache cannot be
repaired and how to copy it. The hash is never computed on the normal path (a matching stamp): the real
``cache.sha256_file`` is wrapped to count its calls. ``fi-ffi cache verify`` tells a copy from a modification.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.env import subprocess_env
from helpers.other_users import mounted, needs_root
from helpers.wheels import WheelEnv, pin_tiny_wheel

from fi_ffi import loader
from fi_ffi.errors import LoaderError
from fi_ffi.loader import cache, modules

ALPHA = "tiny/jit_cache/alpha/alpha.so"
BETA = "tiny/jit_cache/beta/beta.so"
NORM = "flashinfer_jit_cache/jit_cache/norm/norm.so"


@pytest.fixture
def synthetic(monkeypatch: pytest.MonkeyPatch, fresh_cache: Path, tmp_path: Path) -> Path:
    """A small kernel wheel with two fake modules, pinned by a user lock; its folder is the wheelhouse."""
    return pin_tiny_wheel(monkeypatch, tmp_path, {ALPHA: b"A" * 5000, BETA: os.urandom(7000)})


@pytest.fixture
def hashes(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The files the real ``cache.sha256_file`` hashes from now on, in order."""
    seen: list[Path] = []
    real = cache.sha256_file

    def counted(path: Path, desc: str = "") -> str:
        seen.append(Path(path))
        return real(path, desc)

    monkeypatch.setattr(cache, "sha256_file", counted)
    return seen


def copy_without_timestamps(source: Path, target: Path) -> Path:
    """``cp -r source target``, as a user copies a cache: new files, new mtimes, same bytes."""
    subprocess.run(["cp", "-r", str(source), str(target)], check=True)
    return target


def use_cache(monkeypatch: pytest.MonkeyPatch, root: Path, *, no_wheels: Path | None = None) -> None:
    """Make ``root`` the cache; with ``no_wheels`` (an empty folder) as the wheelhouse too, so that nothing can be
    extracted again (the lock's wheel is nowhere to be found, and the session is offline)."""
    monkeypatch.setenv("FI_FFI_CACHE_DIR", str(root))
    if no_wheels is not None:
        no_wheels.mkdir(exist_ok=True)
        monkeypatch.setenv("FI_FFI_WHEELHOUSE", str(no_wheels))
    modules._indexes.clear()


def stamp_of(path: Path) -> dict[str, object]:
    return json.loads(cache.member_stamp_path(path).read_text())


@contextlib.contextmanager
def read_only(folder: Path) -> Iterator[Path]:
    """``folder`` seen through a read-only bind mount (root writes through file modes, not through this)."""
    with mounted("--bind", str(folder)) as ro:
        if subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)], capture_output=True).returncode != 0:
            pytest.skip("cannot remount read-only here")
        yield ro


def flip_a_byte(path: Path, offset: int = 100) -> None:
    """Change one byte of ``path`` in place (size kept; the mtime moves, as any edit moves it)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


# ------------------------------------------------------------------------------------------- the fast path


def test_a_matching_stamp_spares_the_hash(synthetic: Path, hashes: list[Path]) -> None:
    path = loader.module_path("alpha")  # extracted (hashed as it is written); from now on its stamp vouches for it
    hashes.clear()
    modules._indexes.clear()
    for _ in range(3):
        assert loader.module_path("alpha") == path
        assert cache.check_member(path) == cache.MemberCheck("")
    assert hashes == []
    assert cache.check_member(path, full=True).ok and hashes == [path]  # the counter sees the check's hashing


# -------------------------------------------------------------------------------- a writable copy of a cache


def test_a_cache_copied_without_timestamps_is_used_and_its_stamps_refreshed(
    synthetic: Path, hashes: list[Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    original = loader.module_path("alpha")
    copy = copy_without_timestamps(cache.cache_root(), tmp_path / "copy")
    use_cache(monkeypatch, copy, no_wheels=tmp_path / "empty")
    moved = cache.extracted_dir(loader.active_lock().kernels[0].sha256) / ALPHA
    assert moved.read_bytes() == original.read_bytes()
    assert moved.stat().st_mtime_ns != stamp_of(moved)["mtime_ns"]  # the copy has new mtimes: no stamp matches
    hashes.clear()
    assert loader.module_path("alpha") == moved  # was: extracted again, which needs the wheel (none here)
    assert hashes == [moved]  # hashed once, on the mismatch
    assert stamp_of(moved)["mtime_ns"] == moved.stat().st_mtime_ns  # the stamp refreshed
    assert not [p for p in moved.parent.iterdir() if cache.TMP_MARK in p.name]  # atomically: nothing half-written
    hashes.clear()
    modules._indexes.clear()
    assert loader.module_path("alpha") == moved and hashes == []  # cheap again


def test_a_modified_file_with_its_size_kept_is_still_extracted_again(
    synthetic: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = loader.module_path("alpha")
    flip_a_byte(path)
    check = cache.check_member(path)
    assert not check.ok and check.problem.startswith("modified: its sha256 is ") and not check.retimed
    assert loader.module_path("alpha") == path and path.read_bytes() == b"A" * 5000  # extracted again


def test_verify_tells_a_copy_without_timestamps_from_a_modification(
    synthetic: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    loader.module_path("alpha")
    loader.module_path("beta")
    use_cache(monkeypatch, copy_without_timestamps(cache.cache_root(), tmp_path / "copy"))
    folder = cache.extracted_dir(loader.active_lock().kernels[0].sha256)
    flip_a_byte(folder / BETA)  # beta really changed; alpha was only copied
    report = loader.verify_cache()
    assert [(p, why.split(":")[0]) for p, why in report.bad] == [(folder / BETA, "modified")]
    kept = dict(report.kept)
    assert kept[folder / ALPHA] == f"{cache.RETIMED}; its stamp now records its mtime"
    assert "truncated" not in " ".join(why for _, why in report.bad)
    again = loader.verify_cache()
    assert again.ok and folder / ALPHA not in dict(again.kept)  # refreshed: nothing to say the second time


# ------------------------------------------------------------------------------- a read-only copy of a cache


@needs_root
def test_a_read_only_copy_without_timestamps_is_used_and_hashed_once_per_process(
    synthetic: Path, hashes: list[Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    loader.module_path("alpha")
    copy = copy_without_timestamps(cache.cache_root(), tmp_path / "copy")
    with read_only(copy) as ro:
        use_cache(monkeypatch, ro, no_wheels=tmp_path / "empty")
        path = cache.extracted_dir(loader.active_lock().kernels[0].sha256) / ALPHA
        stamp = stamp_of(path)
        hashes.clear()
        assert loader.module_path("alpha") == path  # was: LoaderError, cannot take the lock ... Read-only
        assert loader.module_path("alpha") == path
        assert hashes == [path]  # once: accepted in memory, as the stamp cannot be written
        assert stamp_of(path) == stamp
        check = cache.check_member(path)
        assert check.ok and check.retimed and not check.restamped


@needs_root
def test_a_read_only_cache_names_a_file_that_really_differs_and_the_fix(
    synthetic: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    original = loader.module_path("alpha")
    copy = copy_without_timestamps(cache.cache_root(), tmp_path / "copy")
    flip_a_byte(copy / original.relative_to(cache.cache_root()))
    with read_only(copy) as ro:
        use_cache(monkeypatch, ro)
        path = cache.extracted_dir(loader.active_lock().kernels[0].sha256) / ALPHA
        with pytest.raises(LoaderError) as info:
            loader.module_path("alpha")
        text = str(info.value)
        assert text.startswith(f"{path}: differs from its stamp (modified: its sha256 is ")
        assert f"the cache at {ro} is read-only, so it cannot be repaired" in text
        assert "copy the cache with its timestamps (cp -a, rsync -t)" in text and "writable FI_FFI_CACHE_DIR" in text
        with pytest.raises(LoaderError, match="read-only cache works only while it already holds"):
            loader.module_path("beta")  # never extracted: missing, not different, so the lock's fault is the error


@needs_root
def test_a_read_only_copy_of_a_real_cache_loads_norm_and_verify_says_why_its_stamps_differ(
    shared_wheel_env: WheelEnv, kernel_modules: list[str], tmp_path: Path
) -> None:
    path = loader.module_path("norm")
    copy = copy_without_timestamps(shared_wheel_env.cache, tmp_path / "copy")
    with read_only(copy) as ro:
        env = subprocess_env(FI_FFI_CACHE_DIR=str(ro), FI_FFI_WHEELHOUSE=str(tmp_path / "nowhere"))
        code = "from fi_ffi import loader; loader.load_module('norm'); print(loader.loaded_modules()['norm'])"
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
        moved = ro / path.relative_to(shared_wheel_env.cache)
        assert done.returncode == 0, done.stderr  # was: LoaderError: cannot take the lock ... Read-only file system
        assert done.stdout.strip() == str(moved)
        verify = [sys.executable, "-m", "fi_ffi", "cache", "verify"]
        done = subprocess.run(verify, capture_output=True, text=True, env=env)
        assert done.returncode == 0 and "Traceback" not in done.stderr, done.stdout + done.stderr
        assert f"left in place: {moved}: {cache.RETIMED}; its stamp cannot be refreshed: the cache is read-only" in (
            done.stdout
        )
        assert "truncated or modified" not in done.stdout and "0 bad" in done.stdout
