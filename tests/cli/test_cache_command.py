"""``fi-ffi cache verify --full`` and ``fi-ffi cache clear`` report what they really did (real CLI, real files):
a damaged wheel fi_ffi did not create is bad (exit 1) and left in place; a clear that could not remove fi_ffi's
files says so and exits 1, and calls a lock file held only when a process holds it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers.env import REPO, run_fi_ffi, subprocess_env


def tiny_lock(wheel: Path) -> str:
    from fi_ffi import loader

    return loader.dump_lock([loader.lock_entry(wheel, kind="kernel", cuda="13.0")], header="test")


@pytest.mark.parametrize("damage", ["truncated", "not a zip"])
def test_verify_full_counts_a_damaged_wheel_it_did_not_create_as_bad(
    tmp_path: Path, make_wheel: Callable[..., Path], damage: str
) -> None:
    cache = tmp_path / "cache"
    good = make_wheel("foreign-1.0-py3-none-any.whl", {"foreign/a.txt": b"x" * 5000})
    wheel = cache / "wheels" / good.name  # where an older fi_ffi kept wheels, put there by hand, never verified
    wheel.parent.mkdir(parents=True)
    data = good.read_bytes()
    wheel.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"not a zip at all")
    done = run_fi_ffi("cache", "verify", "--full", FI_FFI_CACHE_DIR=str(cache), FI_FFI_LOCK="")
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"kept {wheel}: damaged: cannot be read as a wheel" in done.stdout
    assert "not created by fi_ffi, so left in place" in done.stdout
    assert "1 bad (0 removed (fetched or extracted again on next use), 1 left in place)" in done.stdout
    assert wheel.read_bytes() != b"" and "Traceback" not in done.stderr  # not deleted


def test_verify_full_leaves_an_intact_foreign_wheel_alone_and_passes(
    tmp_path: Path, make_wheel: Callable[..., Path]
) -> None:
    cache = tmp_path / "cache"
    good = make_wheel("foreign-1.0-py3-none-any.whl", {"foreign/a.txt": b"x" * 5000})
    (cache / "wheels").mkdir(parents=True)
    shutil.copy(good, cache / "wheels" / good.name)
    done = run_fi_ffi("cache", "verify", "--full", FI_FFI_CACHE_DIR=str(cache), FI_FFI_LOCK="")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 bad" in done.stdout and "left in place" in done.stdout  # named, not counted: nothing is wrong with it


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A folder another user can enter (pytest's tmp_path is private to its owner)."""
    folder = Path(tempfile.mkdtemp(prefix="fi_ffi_ro_"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _as_another_user(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run ``python -m fi_ffi args`` as a user that cannot write the cache: this user after ``chmod -w`` when it is
    not root, else ``nobody`` (root writes through any mode)."""
    command = [sys.executable, "-m", "fi_ffi", *args]
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("needs setpriv to run a command as an unprivileged user (running as root)")
        command = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *command]
    full = subprocess_env(**env, HOME="/tmp")
    full["PYTHONPATH"] = str(REPO)
    if os.geteuid() == 0:  # can that user run this interpreter with its packages and the checkout at all?
        probe = [*command[:4], sys.executable, "-c", "import filelock, platformdirs, cffi, numpy, fi_ffi"]
        seen = subprocess.run(probe, capture_output=True, text=True, timeout=120, env=full)
        if seen.returncode != 0:  # e.g. CI's venv under a mktemp -d folder (mode 700): nothing to test there
            pytest.skip(f"the unprivileged user cannot import this interpreter's packages: {seen.stderr[-200:]}")
    return subprocess.run(command, capture_output=True, text=True, timeout=120, env=full)


def test_clear_on_a_read_only_cache_says_nothing_was_removed_and_fails(
    shared_tmp: Path, make_wheel: Callable[..., Path]
) -> None:
    cache = shared_tmp / "cache"
    wheel = make_wheel("tiny-1.0-py3-none-manylinux_2_28_x86_64.whl", {"tiny/a.txt": b"abc"})
    (shared_tmp / "tiny.lock").write_text(tiny_lock(wheel))
    env = {"FI_FFI_CACHE_DIR": str(cache), "FI_FFI_LOCK": str(shared_tmp / "tiny.lock"), "FI_FFI_WHEELHOUSE": ""}
    fetched = run_fi_ffi("fetch", "--wheel", str(wheel), **env)
    assert fetched.returncode == 0, fetched.stderr
    before = sorted(p for p in cache.rglob("*"))
    assert any(p.suffix == ".whl" for p in before) and any(p.suffix == ".lock" for p in before)
    for p in [cache, *before]:
        p.chmod((p.stat().st_mode | 0o555) & ~0o222)  # readable by all, writable by none
    try:
        done = _as_another_user(["cache", "clear"], env)
    finally:
        for p in [cache, *before]:
            p.chmod(p.stat().st_mode | 0o200)
    assert done.returncode == 1, done.stdout + done.stderr
    assert sorted(p for p in cache.rglob("*")) == before  # nothing went
    assert "removed " not in done.stdout.replace("nothing removed", "")
    assert f"nothing removed from {cache}" in done.stdout
    assert "could not remove it" in done.stdout
    assert "held by a running process" not in done.stdout  # no process holds them: they cannot even be opened
    assert "fi-ffi cache clear: could not remove" in done.stderr and "Traceback" not in done.stderr


def test_clear_on_a_writable_cache_removes_and_exits_zero(tmp_path: Path, make_wheel: Callable[..., Path]) -> None:
    wheel = make_wheel("tiny-1.0-py3-none-manylinux_2_28_x86_64.whl", {"tiny/a.txt": b"abc"})
    (tmp_path / "tiny.lock").write_text(tiny_lock(wheel))
    env = {"FI_FFI_CACHE_DIR": str(tmp_path / "cache"), "FI_FFI_LOCK": str(tmp_path / "tiny.lock")}
    assert run_fi_ffi("fetch", "--wheel", str(wheel), **env).returncode == 0
    done = run_fi_ffi("cache", "clear", **env)
    assert done.returncode == 0, done.stderr
    assert f"removed {tmp_path / 'cache'}" in done.stdout and "entries fi_ffi created" in done.stdout
    assert not list((tmp_path / "cache").rglob("*.whl"))


@pytest.mark.parametrize("action", ["path", "clear"])
def test_full_is_refused_where_it_means_nothing(action: str, tmp_path: Path) -> None:
    done = run_fi_ffi("cache", action, "--full", FI_FFI_CACHE_DIR=str(tmp_path / "c"))
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip() == (
        f"fi-ffi cache {action}: --full applies to list and verify only (clear already removes everything fi_ffi "
        f"created, downloaded wheels included)"
    )


def test_path_prints_the_cache_folder(tmp_path: Path) -> None:
    done = run_fi_ffi("cache", "path", FI_FFI_CACHE_DIR=str(tmp_path / "c"))
    assert done.returncode == 0 and done.stdout.strip() == str(tmp_path / "c")
