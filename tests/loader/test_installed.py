"""A pinned kernel wheel already installed with pip is used in place (not downloaded and extracted again),
when something ties the installation to the pin (fi_ffi.loader.installed)."""

from __future__ import annotations

import platform
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from fi_ffi import loader
from fi_ffi.errors import LoaderError
from fi_ffi.loader import cache, dl, installed, modules

ALPHA = "tiny/jit_cache/alpha/alpha.so"


def pip_install(wheel: Path, target: Path) -> Path:
    """``pip install --target`` a local wheel (no index, no network); returns ``target``."""
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--disable-pip-version-check",
         "--target", str(target), str(wheel)],
        capture_output=True, text=True,
    )  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"pip cannot install a local wheel here: {done.stderr.strip()[-300:]}")
    return target


@pytest.fixture(autouse=True)
def _use_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests are about installed distributions: let the loader use them (the session turns that off)."""
    monkeypatch.setenv("FI_FFI_USE_INSTALLED", "1")


def test_fi_ffi_use_installed_0_turns_installed_distributions_off(
    site: Path, tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fi_ffi.loader import installed

    use_lock(tmp_path, monkeypatch, tiny, members=True)
    monkeypatch.setenv("FI_FFI_TRUST_INSTALLED", "1")
    pin = loader.active_lock().kernels[0]
    assert installed.find(pin) is not None
    monkeypatch.setenv("FI_FFI_USE_INSTALLED", "0")
    assert installed.find(pin) is None


@pytest.fixture
def tiny(make_wheel: Callable[..., Path]) -> Path:
    return make_wheel(
        f"tiny-1.0+cu130-py3-none-linux_{platform.machine()}.whl",
        {ALPHA: b"A" * 5000, "tiny/jit_cache/beta/beta.so": b"B" * 7000},
    )


@pytest.fixture
def site(tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``tiny`` pip-installed into a folder on sys.path; no wheelhouse, offline: the wheel is out of reach."""
    target = pip_install(tiny, tmp_path / "site")
    monkeypatch.syspath_prepend(str(target))
    monkeypatch.setenv("FI_FFI_OFFLINE", "1")
    monkeypatch.delenv("FI_FFI_WHEELHOUSE", raising=False)
    monkeypatch.setenv("FI_FFI_CUDA_VERSION", "13.0")
    modules._indexes.clear()
    return target


def use_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, wheel: Path, *, members: bool) -> None:
    lock = tmp_path / f"tiny-{'members' if members else 'plain'}.lock"  # a new path: the selection is memoized
    lock.write_text(loader.dump_lock([loader.lock_entry(wheel, hash_members=members)]))
    monkeypatch.setenv("FI_FFI_LOCK", str(lock))


def test_an_installed_wheel_with_the_pinned_archive_hash_is_used_in_place(
    site: Path, tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_cache: Path
) -> None:
    use_lock(tmp_path, monkeypatch, tiny, members=False)  # direct_url.json (pip installed that file) ties it
    assert loader.available_uris() == ["alpha", "beta"]
    assert loader.module_path("alpha") == site / ALPHA
    assert loader.fetch() == [site]  # nothing to download
    assert not (fresh_cache / "extracted").exists() and not (fresh_cache / "wheels").exists()


def test_an_index_install_is_used_when_the_lock_pins_member_hashes_or_the_user_trusts_it(
    site: Path,
    tiny: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    next(site.glob("*.dist-info/direct_url.json")).unlink()  # as an install from an index leaves it
    use_lock(tmp_path, monkeypatch, tiny, members=False)
    caplog.set_level("INFO", logger="fi_ffi")
    with pytest.raises(LoaderError, match="FI_FFI_OFFLINE"):
        loader.module_path("alpha")  # nothing ties it to the pin: not used, and the wheel is out of reach
    assert any("FI_FFI_TRUST_INSTALLED=1" in r.message for r in caplog.records)
    monkeypatch.setenv("FI_FFI_TRUST_INSTALLED", "1")
    assert loader.module_path("alpha") == site / ALPHA
    monkeypatch.delenv("FI_FFI_TRUST_INSTALLED")
    use_lock(tmp_path, monkeypatch, tiny, members=True)  # the lock's member hashes match RECORD
    assert loader.module_path("alpha") == site / ALPHA


def test_a_modified_installed_file_is_not_used(
    site: Path, tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    use_lock(tmp_path, monkeypatch, tiny, members=False)
    (site / ALPHA).write_bytes(b"X" * 5000)
    caplog.set_level("WARNING", logger="fi_ffi")
    monkeypatch.setenv("FI_FFI_WHEELHOUSE", str(tiny.parent))  # the pinned wheel is used instead
    path = loader.module_path("alpha")
    assert path == cache.extracted_dir(loader.active_lock().kernels[0].sha256) / ALPHA
    assert path.read_bytes() == b"A" * 5000
    assert any("its RECORD says" in r.message for r in caplog.records)


def test_another_version_or_build_is_not_used(
    site: Path, make_wheel: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = make_wheel(
        f"tiny-1.0+cu131-py3-none-linux_{platform.machine()}.whl", {ALPHA: b"A" * 5000}, folder=tmp_path / "other"
    )
    use_lock(tmp_path, monkeypatch, other, members=True)
    monkeypatch.setenv("FI_FFI_TRUST_INSTALLED", "1")
    assert installed.find(loader.active_lock().kernels[0]) is None  # installed: 1.0+cu130, pinned: 1.0+cu131


def test_the_installed_shared_wheel_loads_in_place(
    shared_wheel: Path,
    shared_wheel_lock: Path,
    kernel_modules: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    target = pip_install(shared_wheel, tmp_path / "site")
    monkeypatch.syspath_prepend(str(target))
    monkeypatch.setenv("FI_FFI_LOCK", str(shared_wheel_lock))  # the core wheel alone: the one installed here
    monkeypatch.setenv("FI_FFI_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("FI_FFI_OFFLINE", "1")
    monkeypatch.delenv("FI_FFI_WHEELHOUSE", raising=False)
    monkeypatch.setenv("FI_FFI_CUDA_VERSION", "13.0")
    modules._indexes.clear()
    modules._handles.clear()
    handle = loader.load_module("norm")
    assert loader.loaded_modules()["norm"] == str(target / "flashinfer_jit_cache/jit_cache/norm/norm.so")
    assert dl.symbol_address(handle, "__tvm_ffi_rmsnorm") != 0
    assert len(loader.available_uris()) == 21  # every module of the core wheel


def test_symbol_checks_read_installed_files_in_place_without_loading_or_extracting(
    site: Path,
    tiny: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    fresh_cache: Path,
    kernel_modules: list[str],
) -> None:
    use_lock(tmp_path, monkeypatch, tiny, members=False)
    beta = "tiny/jit_cache/beta/beta.so"
    assert modules.files_on_disk() == {"alpha": site / ALPHA, "beta": site / beta}
    checks = loader.symbol_checks()
    for uri, member in (("alpha", ALPHA), ("beta", beta)):  # the tiny wheel's "modules" are not ELF files
        check = checks[uri]
        assert check.path == str(site / member) and not check.loaded and not check.ok
        assert check.error.startswith(f"{site / member}: not a readable ELF64 shared library: it does not start")
    assert "alpha" not in loader.loaded_modules() and not (fresh_cache / "extracted").exists()
