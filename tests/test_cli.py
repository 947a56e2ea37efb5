"""The ``fi-ffi`` command, run as a real subprocess (``python -m fi_ffi``) on this CPU-only machine."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import subprocess_env


def fi_ffi(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fi_ffi", *args], capture_output=True, text=True, timeout=120,
                          env=subprocess_env(**env))


def test_doctor_reports_and_exits_zero_without_a_gpu(shared_wheel: Path) -> None:
    done = fi_ffi("doctor")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    for label in ("NVIDIA driver:", "CUDA runtime:", "Lock:", "selection:", "TVM-FFI:", "Cache:"):
        assert label in out
    assert "GPUs:           none" in out or "GPU 0:" in out
    assert shared_wheel.name in out  # the session lock pins the shared wheel


def test_doctor_json_is_machine_readable(shared_wheel: Path) -> None:
    done = fi_ffi("doctor", "--json")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["system"]["arch"]
    assert data["lock"]["entries"][0]["filename"] == shared_wheel.name
    assert data["lock"]["cuda"].startswith("13.")
    assert data["tvm_ffi_runtime"]["source"] in ("loaded", "package", "lock", "env")


def test_doctor_names_a_broken_lock_and_still_exits_zero(tmp_path: Path) -> None:
    bad = tmp_path / "bad.lock"
    bad.write_text("version = 7\n")
    done = fi_ffi("doctor", FI_FFI_LOCK=str(bad))
    assert done.returncode == 0
    assert "version" in done.stdout and str(bad) in done.stdout


@pytest.mark.cpu_only
def test_smoke_without_a_gpu_says_so_and_fails() -> None:
    done = fi_ffi("smoke")
    assert done.returncode == 1
    assert "needs a CUDA GPU" in done.stdout
    assert "Lock:" in done.stdout  # followed by the doctor summary


def test_lock_then_fetch_then_cache_cycle(shared_wheel: Path, tmp_path: Path) -> None:
    lock = tmp_path / "mine.lock"
    done = fi_ffi("lock", str(shared_wheel))
    assert done.returncode == 0, done.stderr
    assert "865dd2def285393e98953a8a6e49ab785df2ec3b59e3bd778cd924a8da5d5d50" in done.stdout
    lock.write_text(done.stdout)
    cache = tmp_path / "cache"
    env = {"FI_FFI_LOCK": str(lock), "FI_FFI_CACHE_DIR": str(cache), "FI_FFI_WHEELHOUSE": str(tmp_path / "none")}
    fetched = fi_ffi("fetch", "--wheel", str(shared_wheel), **env)
    assert fetched.returncode == 0, fetched.stderr
    assert Path(fetched.stdout.strip().splitlines()[-1]).is_file()
    assert fi_ffi("cache", "path", **env).stdout.strip() == str(cache)
    listing = fi_ffi("cache", "list", **env)
    assert shared_wheel.name in listing.stdout
    verify = fi_ffi("cache", "verify", "--full", **env)
    assert verify.returncode == 0 and "0 bad" in verify.stdout
    cleared = fi_ffi("cache", "clear", **env)
    assert cleared.returncode == 0 and list(cache.iterdir()) == []  # FI_FFI_CACHE_DIR itself is the user's
    assert f"removed {cache / 'wheels'}" in cleared.stdout and shared_wheel.name in cleared.stdout


def test_fetch_offline_with_nothing_available_names_the_fix(tmp_path: Path) -> None:
    done = fi_ffi("fetch", FI_FFI_LOCK="", FI_FFI_CACHE_DIR=str(tmp_path / "c"), FI_FFI_OFFLINE="1",
                  FI_FFI_WHEELHOUSE="")
    assert done.returncode == 2
    assert "flashinfer_jit_cache-0.6.3+cu130" in done.stderr
    assert "FI_FFI_WHEELHOUSE" in done.stderr or "fetch --wheel" in done.stderr


def test_fetch_rejects_a_wheel_the_lock_does_not_pin(tmp_path: Path) -> None:
    stray = tmp_path / "other-1.0-py3-none-any.whl"
    stray.write_bytes(b"PK\x05\x06" + b"\0" * 18)
    done = fi_ffi("fetch", "--wheel", str(stray), FI_FFI_CACHE_DIR=str(tmp_path / "c"))
    assert done.returncode == 2
    assert stray.name in done.stderr


def test_list_prints_the_variants_of_the_active_lock(kernel_modules: list[str]) -> None:
    pytest.importorskip("fi_ffi.ops.variants")
    done = fi_ffi("list", "--kind", "batch_decode", "--dtype", "f16")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines and all("batch_decode" in line and "f16" in line for line in lines)
    none = fi_ffi("list", "--head-dim", "96")
    assert none.returncode == 1


def test_version_and_help() -> None:
    assert fi_ffi("--version").stdout.startswith("fi-ffi ")
    helptext = fi_ffi("--help").stdout
    for command in ("doctor", "fetch", "cache", "lock", "list", "smoke"):
        assert command in helptext
