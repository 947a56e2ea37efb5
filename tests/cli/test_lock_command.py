"""``fi-ffi lock`` with what a new user types (real CLI, real files): a folder, a pattern that matched nothing, a
missing file, an address that is not a URL and a truncated wheel are each named with their fix (exit 2, no
traceback); a truncated wheel in a wheelhouse gets damage advice, not "pin it in a lock of your own"."""

from __future__ import annotations

import random
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers.env import subprocess_env

from fi_ffi import loader
from fi_ffi.errors import IntegrityError

KERNEL = "flashinfer_jit_cache-0.6.3+cu130-cp39-abi3-manylinux_2_28_x86_64.whl"


def lock(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fi_ffi", "lock", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=subprocess_env(),
        cwd=cwd,
    )


@pytest.fixture
def kernel_wheel(make_wheel: Callable[..., Path]) -> Path:
    """A small wheel in the kernel layout (one module, a few KB of bytes standing in for its .so)."""
    return make_wheel(KERNEL, {"flashinfer_jit_cache/jit_cache/norm/norm.so": random.Random(0).randbytes(20000)})


def half(wheel: Path) -> bytes:
    data = wheel.read_bytes()
    return data[: len(data) // 2]


def refused(done: subprocess.CompletedProcess[str], text: str) -> None:
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.startswith("fi-ffi lock: ") and text in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""


def test_a_folder_is_named_with_the_pattern_to_use(kernel_wheel: Path) -> None:
    refused(lock(str(kernel_wheel.parent)), f"{kernel_wheel.parent} is a folder; name its wheels (fi-ffi lock ")


def test_a_pattern_that_matched_nothing_and_a_missing_file_are_named(tmp_path: Path) -> None:
    refused(lock(str(tmp_path / "*.whl")), "*.whl matched no file")
    refused(lock(str(tmp_path / "a-1-py3-none-any.whl")), "a-1-py3-none-any.whl: no such file")


@pytest.mark.parametrize("url", ["notaurl", "ftp://host/x.whl", "https://", "http:/x.whl"])
def test_a_url_that_is_not_an_address_is_refused(kernel_wheel: Path, url: str) -> None:
    refused(
        lock("--url", url, str(kernel_wheel)),
        f"--url: expected an http(s):// or file:// address of the wheel, got {url!r}",
    )


def test_a_good_url_is_written_into_the_lock(kernel_wheel: Path) -> None:
    done = lock("--url", "https://example.invalid/w/x.whl", str(kernel_wheel))
    assert done.returncode == 0, done.stderr
    assert 'url = "https://example.invalid/w/x.whl"' in done.stdout


def test_a_truncated_wheel_gets_damage_advice(kernel_wheel: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut" / KERNEL
    cut.parent.mkdir()
    cut.write_bytes(half(kernel_wheel))
    refused(lock(str(cut)), "the file is damaged or incomplete (a truncated download or copy?)")


def test_a_truncated_wheel_in_a_wheelhouse_gets_damage_advice(
    kernel_wheel: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "k.lock"
    path.write_text(loader.dump_lock([loader.lock_entry(kernel_wheel)], header="test"))
    house = tmp_path / "house"
    house.mkdir()
    (house / KERNEL).write_bytes(half(kernel_wheel))
    monkeypatch.setenv("FI_FFI_LOCK", str(path))
    monkeypatch.setenv("FI_FFI_WHEELHOUSE", str(house))
    monkeypatch.setenv("FI_FFI_CACHE_DIR", str(tmp_path / "cache"))
    from fi_ffi.loader import wheels

    pin = loader.active_lock().all_pins()[0]
    with pytest.raises(IntegrityError, match=r"is damaged or incomplete \(not a whole zip file") as info:
        wheels.ensure_wheel(pin)
    assert "lock of your own" not in str(info.value) and f"Copy the pinned {KERNEL} there again" in str(info.value)


def test_a_whole_wheel_of_another_build_in_a_wheelhouse_gets_the_lock_advice(
    kernel_wheel: Path, make_wheel: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "k.lock"
    path.write_text(loader.dump_lock([loader.lock_entry(kernel_wheel)], header="test"))
    other = make_wheel(KERNEL, {"flashinfer_jit_cache/jit_cache/norm/norm.so": b"another build"}, tmp_path / "house")
    monkeypatch.setenv("FI_FFI_LOCK", str(path))
    monkeypatch.setenv("FI_FFI_WHEELHOUSE", str(other.parent))
    monkeypatch.setenv("FI_FFI_CACHE_DIR", str(tmp_path / "cache"))
    from fi_ffi.loader import wheels

    with pytest.raises(IntegrityError, match="pin this one in a lock of your own"):
        wheels.ensure_wheel(loader.active_lock().all_pins()[0])
