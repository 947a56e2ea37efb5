"""The cache: lazy extraction, listings, repair of damaged files, concurrent processes, maintenance."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers.env import subprocess_env
from helpers.wheels import WheelEnv, pin_tiny_wheel

from fi_ffi import loader
from fi_ffi.errors import IntegrityError, KernelNotFoundError, LoaderError
from fi_ffi.loader import cache, dl, lockfile

PREFIX = "flashinfer_jit_cache/jit_cache"
FIXED = ("norm", "page", "gdn_prefill_sm90")


def member(uri: str) -> str:
    return f"{PREFIX}/{uri}/{uri}.so"


def so_files(root: Path) -> list[str]:
    return sorted(p.name for p in root.rglob("*.so"))


def temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if cache.TMP_MARK in p.name]


@pytest.fixture
def synthetic(monkeypatch: pytest.MonkeyPatch, fresh_cache: Path, tmp_path: Path) -> Path:
    """A small kernel wheel with two fake modules, pinned (with member hashes) by a user lock + wheelhouse."""
    return pin_tiny_wheel(
        monkeypatch,
        tmp_path,
        {"tiny/jit_cache/alpha/alpha.so": b"A" * 5000, "tiny/jit_cache/beta/beta.so": b"B" * 7000},
        hash_members=True,
    )


# ------------------------------------------------------------------------------------------- extraction


def test_modules_are_extracted_lazily_one_at_a_time(
    shared_wheel_env: WheelEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FI_FFI_CUDA_VERSION", "13.0")
    path = loader.module_path("norm")
    with zipfile.ZipFile(shared_wheel_env.wheel) as zf:
        assert path.read_bytes() == zf.read(member("norm"))
    assert so_files(shared_wheel_env.cache) == ["norm.so"]
    assert path.with_name("norm.so.stamp").is_file()
    folder = shared_wheel_env.cache / "extracted" / lockfile.read_lock(shared_wheel_env.lock).kernels[0].sha256[:16]
    assert path.is_relative_to(folder)
    assert json.loads((folder / "wheel.json").read_text())["filename"] == shared_wheel_env.wheel.name
    assert not temp_files(shared_wheel_env.cache)


def test_available_uris_lists_the_21_modules_and_the_listing_outlives_the_wheel(
    shared_wheel_env: WheelEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FI_FFI_CUDA_VERSION", "13.0")
    uris = loader.available_uris()
    assert len(uris) == 21 and set(FIXED) <= set(uris)
    assert sum(u.endswith("_sm90") and u.startswith("batch_prefill") for u in uris) == 2
    loader.module_path("page")
    # No wheel reachable any more: the recorded listing and the extracted file are enough.
    monkeypatch.setenv("FI_FFI_WHEELHOUSE", str(shared_wheel_env.cache / "nowhere"))
    monkeypatch.setenv("FI_FFI_OFFLINE", "1")
    from fi_ffi.loader import modules

    modules._indexes.clear()  # forget the in-process memo: read the listing from disk
    assert loader.available_uris() == uris
    assert loader.module_path("page").is_file()
    with pytest.raises(LoaderError, match="FI_FFI_OFFLINE"):
        loader.module_path("norm")  # not extracted yet, and the wheel is out of reach


def test_unknown_uri_names_the_closest_existing_ones(
    shared_wheel_env: WheelEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FI_FFI_CUDA_VERSION", "13.0")
    wanted = (
        "single_decode_with_kv_cache_dtype_q_f16_dtype_kv_f16_dtype_o_f16_head_dim_qk_256_head_dim_vo_256"
        "_posenc_0_use_swa_False_use_logits_cap_False"
    )
    with pytest.raises(KernelNotFoundError) as info:
        loader.module_path(wanted)
    text = str(info.value)
    assert wanted in text and shared_wheel_env.wheel.name in text and "CUDA 13.0" in text
    assert wanted.replace("256", "128") in text  # the hd-128 variant is suggested
    with pytest.raises(KernelNotFoundError, match=r"Closest existing modules:\n  norm"):
        loader.module_path("norms")
    with pytest.raises(KernelNotFoundError, match="available_uris"):
        loader.module_path("zzzz")


def test_member_hash_mismatch_is_an_integrity_error(synthetic: Path) -> None:
    lock = Path(os.environ["FI_FFI_LOCK"])
    text = lock.read_text()
    good = lockfile.read_lock(lock).kernels[0].members["tiny/jit_cache/beta/beta.so"]
    lock.write_text(text.replace(good, "e" * 64))
    assert loader.module_path("alpha").read_bytes() == b"A" * 5000
    with pytest.raises(IntegrityError, match=rf"sha256 {good}.*expects e{{64}}"):
        loader.module_path("beta")
    assert so_files(cache.cache_root()) == ["alpha.so"]
    assert not temp_files(cache.cache_root())


def test_runtime_member_missing_from_its_wheel_is_reported(fresh_cache: Path, make_wheel: Callable[..., Path]) -> None:
    whl = make_wheel("apache_tvm_ffi-0.1.15-cp312-cp312-linux_x86_64.whl", {"tvm_ffi/lib/other.so": b"x"})
    pin = loader.lock_entry(whl, kind="runtime")
    with pytest.raises(LoaderError, match=r"has no member tvm_ffi/lib/libtvm_ffi.so"):
        cache.extract_member(pin, pin.library, lambda: whl)


def test_a_crash_between_file_and_stamp_is_repaired(synthetic: Path) -> None:
    path = loader.module_path("alpha")
    path.write_bytes(b"half")  # as if the process died after some bytes and the stamp never came
    path.with_name("alpha.so.stamp").unlink()
    stale = path.with_name(cache.TMP_MARK + "123-deadbeef")
    stale.write_bytes(b"leftover of a crash")
    assert loader.module_path("alpha").read_bytes() == b"A" * 5000
    old = time.time() - cache.STALE_TMP_S - 60
    os.utime(stale, (old, old))
    report = loader.verify_cache(full=True)
    assert report.ok and report.removed_tmp == 1 and not stale.exists()


# -------------------------------------------------------------------------------------------- repair


def test_truncated_module_is_extracted_again_and_loads(shared_wheel_env: WheelEnv, kernel_modules: list[str]) -> None:
    path = loader.module_path("norm")
    full_size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(4096)
    handle = loader.load_module("norm")
    assert path.stat().st_size == full_size
    assert dl.symbol_address(handle, "__tvm_ffi_rmsnorm") != 0
    assert loader.loaded_modules()["norm"] == str(path)


def test_module_damaged_without_size_change_is_repaired_after_the_loader_rejects_it(
    shared_wheel_env: WheelEnv, kernel_modules: list[str]
) -> None:
    path = loader.module_path("page")
    st = path.stat()
    with open(path, "r+b") as f:
        f.write(b"GARBAGE!")  # clobbers the ELF header; size kept
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # and mtime: the cheap check still passes
    assert cache.member_ok(path)
    handle = loader.load_module("page")
    assert dl.symbol_address(handle, "__tvm_ffi_append_paged_kv_cache") != 0
    assert path.read_bytes()[:4] == b"\x7fELF"


def test_verify_cache_cheap_and_full(shared_wheel_env: WheelEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FI_FFI_CUDA_VERSION", "13.0")
    norm, page = loader.module_path("norm"), loader.module_path("page")
    assert loader.verify_cache(full=True).ok
    with open(norm, "r+b") as f:
        f.truncate(100)
    st = page.stat()
    with open(page, "r+b") as f:
        f.seek(st.st_size // 2)
        f.write(b"\0\1\2\3")
    os.utime(page, ns=(st.st_atime_ns, st.st_mtime_ns))
    cheap = loader.verify_cache()
    assert [p.name for p, _ in cheap.bad] == ["norm.so"] and "truncated" in cheap.bad[0][1]
    assert not norm.exists()
    full = loader.verify_cache(full=True)
    assert [p.name for p, _ in full.bad] == ["page.so"] and "sha256" in full.bad[0][1]
    assert full.checked == 3 and not page.exists()  # the listing, page.so and the stamped wheelhouse wheel
    assert loader.module_path("page").stat().st_size == st.st_size
    assert loader.verify_cache(full=True).ok


def test_verify_cache_judges_cached_wheels_by_their_digest_key_and_keeps_what_is_not_fis(synthetic: Path) -> None:
    pin = loader.active_lock().kernels[0]
    good = cache.wheel_path(pin)
    cache.make_dir(good.parent)
    shutil.copy(synthetic, good)  # put there by hand: no stamp yet
    wrong = cache.make_dir(good.parent.parent / ("0" * 16)) / synthetic.name  # another digest's folder
    shutil.copy(synthetic, wrong)
    junk = good.parent.parent / "junk-1.0-py3-none-any.whl"  # not in fi_ffi's layout
    junk.write_bytes(b"junk")
    report = loader.verify_cache()
    assert [p for p, _ in report.bad] == [wrong] and "does not start with 0000000000000000" in report.bad[0][1]
    assert not wrong.exists() and cache.stamped(good, pin.sha256)
    assert junk.read_bytes() == b"junk" and any(p == junk and "not created by fi_ffi" in w for p, w in report.kept)
    st = good.stat()
    with open(good, "r+b") as f:
        f.seek(100)
        f.write(b"#")
    os.utime(good, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert loader.verify_cache().ok  # the cheap check trusts the stamp
    full = loader.verify_cache(full=True)
    assert [p for p, _ in full.bad] == [good, junk] and not good.exists()
    # the full check reads the junk too: damaged, so bad, yet not fi_ffi's file, so left in place
    assert "damaged" in full.bad[1][1] and junk.read_bytes() == b"junk"


def test_list_and_clear_cache(synthetic: Path) -> None:
    loader.module_path("alpha")
    loader.fetch(synthetic)
    entries = {e.kind: e for e in loader.list_cache()}
    assert entries["wheel"].path.name == synthetic.name and entries["wheel"].detail == "verified"
    assert entries["extracted"].size == 5000 and "1 files from tiny-1.0" in entries["extracted"].detail
    root = cache.cache_root()
    report = loader.clear_cache()
    assert report.freed >= synthetic.stat().st_size + 5000 and report.kept == ()
    extracted = cache.extracted_dir(loader.active_lock().kernels[0].sha256)
    assert {p.name for p, _ in report.removed} >= {synthetic.name, extracted.name}
    assert root.is_dir() and list(root.iterdir()) == [] and loader.list_cache() == []
    assert loader.clear_cache().removed == ()


# --------------------------------------------------------------------------------------- concurrency

WORKER = r"""
import json, os, sys, time
from pathlib import Path
from fi_ffi import loader
ready, go = Path(sys.argv[1]), Path(sys.argv[2])
ready.touch()
while not go.exists():
    time.sleep(0.002)
paths = {uri: str(loader.module_path(uri)) for uri in loader.available_uris()}
handle = loader.load_module("norm") if os.environ.get("LOAD") == "1" else None
stamps = {uri: Path(p + ".stamp").read_text() for uri, p in paths.items()}
print(json.dumps({"paths": paths, "stamps": stamps, "loaded": handle is not None}))
"""


def test_eight_processes_extract_into_one_empty_cache_at_once(
    shared_wheel_env: WheelEnv, tmp_path: Path, kernel_modules: list[str]
) -> None:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    go = tmp_path / "go"
    procs = []
    for i in range(8):
        env = subprocess_env(LOAD="1" if i % 2 == 0 else "0")
        cmd = [sys.executable, str(script), str(tmp_path / f"ready{i}"), str(go)]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"ready{i}").exists() for i in range(8)):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "a worker died early"
        time.sleep(0.01)
    go.touch()
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        results.append(json.loads(out))
    assert all(r == {**results[0], "loaded": r["loaded"]} for r in results)
    assert sum(r["loaded"] for r in results) == 4
    with zipfile.ZipFile(shared_wheel_env.wheel) as zf:
        for uri, path in results[0]["paths"].items():
            assert Path(path).read_bytes() == zf.read(member(uri)), uri
            assert cache.member_ok(Path(path), full=True)
    assert len(results[0]["paths"]) == 21
    assert not temp_files(shared_wheel_env.cache)
