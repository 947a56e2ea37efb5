"""Getting wheels: download from a local HTTP server, wheelhouse, local path, pip, offline mode, stamps."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
from helpers.http_server import LocalServer
from helpers.wheels import WheelEnv

from fi_ffi import loader
from fi_ffi.errors import FetchError, IntegrityError, LoaderError, LockError
from fi_ffi.loader import cache, lockfile, wheels

NAME = "demo_kernels-1.0+cu130-py3-none-linux_x86_64.whl"
PAYLOAD = os.urandom(300_000)
# One byte that differs from PAYLOAD's first and last bytes: tampering with a fixed byte would change nothing
# in one run of 256 (a random payload may already hold it).
OTHER_BYTE = bytes([next(b for b in range(256) if b not in (PAYLOAD[0], PAYLOAD[-1]))])
SHA = hashlib.sha256(PAYLOAD).hexdigest()


def pin_for(
    url: str = "", *, sha: str = SHA, size: int | None = None, filename: str = NAME, extra: str = ""
) -> lockfile.WheelPin:
    text = f'version = 1\n[[kernel]]\nfilename = "{filename}"\nsha256 = "{sha}"\ncuda = "13.0"\narch = "x86_64"\n'
    if url:
        text += f'url = "{url}"\n'
    if size is not None:
        text += f"size = {size}\n"
    return lockfile.parse_lock(text + extra, Path("/locks/demo.lock")).kernels[0]


def cache_files(root: Path) -> list[str]:
    """Every file in the cache, relative, except lock files and stamps."""
    if not root.exists():
        return []
    return sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file() and p.suffix != ".lock" and p.parent.name != "stamps"
    )


def no_temp_files(root: Path) -> bool:
    return not [p for p in root.rglob("*") if cache.TMP_MARK in p.name] if root.exists() else True


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Retries pause 10 ms, not 1-8 s (the retry logic itself is what runs)."""
    monkeypatch.setattr(wheels, "BACKOFF_S", 0.01)


@pytest.fixture
def online(monkeypatch: pytest.MonkeyPatch, fresh_cache: Path) -> Path:
    """Network allowed (the local server only), a fresh cache, no wheelhouse."""
    monkeypatch.delenv("FI_FFI_OFFLINE", raising=False)
    monkeypatch.delenv("FI_FFI_WHEELHOUSE", raising=False)
    return fresh_cache


# -------------------------------------------------------------------------------------------- downloads


def test_download_lands_verified_in_the_cache_and_is_reused(online: Path, http_server: LocalServer) -> None:
    url = http_server.add("/dl/a.whl", PAYLOAD)
    pin = pin_for(url, size=len(PAYLOAD))
    path = wheels.ensure_wheel(pin)
    assert path == online / "wheels" / SHA[:16] / NAME
    assert path.read_bytes() == PAYLOAD
    assert cache.stamped(path, SHA)
    assert cache_files(online) == [f"wheels/{SHA[:16]}/{NAME}"] and no_temp_files(online)
    http_server.stop()
    assert wheels.ensure_wheel(pin) == path  # from the cache: no request, no error
    assert http_server.hits == ["/dl/a.whl"]


def test_download_with_wrong_hash_is_rejected_and_leaves_nothing(online: Path, http_server: LocalServer) -> None:
    url = http_server.add("/dl/bad.whl", PAYLOAD[:-1] + OTHER_BYTE)
    with pytest.raises(IntegrityError) as info:
        wheels.ensure_wheel(pin_for(url))
    text = str(info.value)
    assert url in text and SHA in text
    assert hashlib.sha256(PAYLOAD[:-1] + OTHER_BYTE).hexdigest() in text
    assert "fi-ffi lock" in text and "FI_FFI_WHEELHOUSE" in text
    assert cache_files(online) == [] and no_temp_files(online)


def test_truncated_download_is_a_fetch_error_and_leaves_nothing(online: Path, http_server: LocalServer) -> None:
    url = http_server.add("/dl/short.whl", PAYLOAD[:100_000], claim_length=len(PAYLOAD))
    with pytest.raises(FetchError) as info:
        wheels.ensure_wheel(pin_for(url))
    text = str(info.value)
    assert url in text and "truncated" in text and f"100000 of {len(PAYLOAD)} bytes" in text
    assert "fi-ffi fetch --wheel" in text
    assert cache_files(online) == [] and no_temp_files(online)


def test_server_gone_is_a_fetch_error_and_leaves_nothing(online: Path, http_server: LocalServer) -> None:
    url = http_server.url("/dl/a.whl")
    http_server.stop()
    with pytest.raises(FetchError) as info:
        wheels.ensure_wheel(pin_for(url))
    text = str(info.value)  # nothing came and the host refused: no network, said at once (no retries)
    assert f"no network: cannot reach 127.0.0.1:{http_server.port}" in text and "refused" in text.lower()
    assert "a.whl" in text and "Check the network" in text and "fi-ffi fetch --wheel" in text
    assert cache_files(online) == [] and no_temp_files(online)


def test_http_error_is_a_fetch_error(online: Path, http_server: LocalServer) -> None:
    url = http_server.add("/dl/gone.whl", b"", status=410)
    with pytest.raises(FetchError, match=r"HTTP 410") as info:
        wheels.ensure_wheel(pin_for(url))
    assert url in str(info.value)
    with pytest.raises(FetchError, match=r"HTTP 404"):
        wheels.ensure_wheel(pin_for(http_server.url("/dl/missing.whl")))
    assert cache_files(online) == [] and no_temp_files(online)


def test_announced_size_differing_from_the_pin_stops_before_downloading(online: Path, http_server: LocalServer) -> None:
    url = http_server.add("/dl/a.whl", PAYLOAD)
    with pytest.raises(IntegrityError, match=rf"offers {len(PAYLOAD)} bytes.*pins {re.escape(NAME)} at 12 bytes"):
        wheels.ensure_wheel(pin_for(url, size=12))
    assert cache_files(online) == [] and no_temp_files(online)


def test_damaged_cache_copy_is_replaced_by_a_fresh_download(online: Path, http_server: LocalServer) -> None:
    url = http_server.add("/dl/a.whl", PAYLOAD)
    pin = pin_for(url)
    path = wheels.ensure_wheel(pin)
    path.write_bytes(PAYLOAD[:5000])  # size and mtime change: the stamp no longer vouches for it
    assert wheels.ensure_wheel(pin).read_bytes() == PAYLOAD
    assert len(http_server.hits) == 2


# ------------------------------------------------------------------------------------- offline, wheelhouse


def test_offline_missing_wheel_says_which_file_and_how_to_provide_it(
    monkeypatch: pytest.MonkeyPatch, fresh_cache: Path, http_server: LocalServer
) -> None:
    monkeypatch.setenv("FI_FFI_OFFLINE", "1")
    monkeypatch.delenv("FI_FFI_WHEELHOUSE", raising=False)
    url = http_server.add("/dl/a.whl", PAYLOAD)
    with pytest.raises(LoaderError) as info:
        wheels.ensure_wheel(pin_for(url))
    text = str(info.value)
    assert NAME in text and SHA in text and "FI_FFI_OFFLINE" in text
    assert "FI_FFI_WHEELHOUSE" in text and "fi-ffi fetch --wheel PATH" in text and url in text
    assert http_server.hits == []


def test_offline_module_lookup_then_fetch_wheel_makes_it_work(
    monkeypatch: pytest.MonkeyPatch, fresh_cache: Path, shared_wheel: Path, tmp_path: Path
) -> None:
    pin = loader.lock_entry(shared_wheel, url="https://example.invalid/never-contacted.whl")
    lock = tmp_path / "offline.lock"
    lock.write_text(loader.dump_lock([pin]))
    monkeypatch.setenv("FI_FFI_LOCK", str(lock))
    monkeypatch.setenv("FI_FFI_OFFLINE", "1")
    monkeypatch.setenv("FI_FFI_CUDA_VERSION", "13.0")
    monkeypatch.delenv("FI_FFI_WHEELHOUSE", raising=False)
    with pytest.raises(LoaderError, match=r"fi-ffi fetch --wheel PATH") as info:
        loader.module_path("norm")
    assert shared_wheel.name in str(info.value)
    copied = loader.fetch(shared_wheel)
    assert copied == [fresh_cache / "wheels" / pin.sha256[:16] / shared_wheel.name]
    assert cache.stamped(copied[0], pin.sha256)
    assert loader.module_path("norm").name == "norm.so"
    assert loader.fetch() == copied  # the selected wheel is there already


def test_fetch_wheel_rejects_unpinned_or_altered_files(
    monkeypatch: pytest.MonkeyPatch, fresh_cache: Path, make_wheel: Callable[..., Path], tmp_path: Path
) -> None:
    whl = make_wheel(NAME, {"demo_kernels/jit_cache/m/m.so": b"x"})
    lock = tmp_path / "demo.lock"
    lock.write_text(loader.dump_lock([replace(loader.lock_entry(whl), sha256="c" * 64)]))
    monkeypatch.setenv("FI_FFI_LOCK", str(lock))
    with pytest.raises(IntegrityError, match=rf"pins {re.escape(NAME)} with sha256 c{{64}}"):
        loader.fetch(whl)
    other = make_wheel("other-1.0-py3-none-any.whl", {"other/jit_cache/m/m.so": b"x"})
    with pytest.raises(LockError, match=r"pins no wheel named other-1\.0-py3-none-any\.whl"):
        loader.fetch(other)
    assert cache_files(fresh_cache) == [] and no_temp_files(fresh_cache)


def test_wheelhouse_wheel_is_used_in_place_and_stamped(shared_wheel_env: WheelEnv) -> None:
    pin = lockfile.read_lock(shared_wheel_env.lock).kernels[0]
    assert not cache.stamped(shared_wheel_env.wheel, pin.sha256)
    assert wheels.ensure_wheel(pin) == shared_wheel_env.wheel
    assert cache.stamped(shared_wheel_env.wheel, pin.sha256)
    assert not (shared_wheel_env.cache / "wheels").exists()  # nothing copied
    stamps = [e for e in loader.list_cache() if e.kind == "stamp"]
    # a stamp is listed at its own size (it is what the cache holds), and names the wheel it vouches for and its size
    assert [e.size for e in stamps] == [stamps[0].path.stat().st_size]
    wheel_mib = shared_wheel_env.wheel.stat().st_size / 2**20
    assert str(shared_wheel_env.wheel) in stamps[0].detail and f"{wheel_mib:.1f} MiB" in stamps[0].detail


def test_wheelhouse_file_with_wrong_hash_is_an_integrity_error(
    monkeypatch: pytest.MonkeyPatch, fresh_cache: Path, tmp_path: Path
) -> None:
    house = tmp_path / "house"
    house.mkdir()
    (house / NAME).write_bytes(PAYLOAD + b"tampered")
    monkeypatch.setenv("FI_FFI_WHEELHOUSE", str(house))
    with pytest.raises(IntegrityError) as info:
        wheels.ensure_wheel(pin_for())
    text = str(info.value)
    assert str(house / NAME) in text and SHA in text and hashlib.sha256(PAYLOAD + b"tampered").hexdigest() in text
    # PAYLOAD is not a zip: damage advice (copy it again), not "pin it in a lock of your own"
    assert "damaged or incomplete" in text and "fi-ffi lock" not in text


def test_stamp_spares_rehashing_until_size_or_mtime_change(
    monkeypatch: pytest.MonkeyPatch, fresh_cache: Path, tmp_path: Path
) -> None:
    house = tmp_path / "house"
    house.mkdir()
    wheel = house / NAME
    wheel.write_bytes(PAYLOAD)
    monkeypatch.setenv("FI_FFI_WHEELHOUSE", str(house))
    pin = pin_for()
    assert wheels.ensure_wheel(pin) == wheel
    st = wheel.stat()
    with open(wheel, "r+b") as f:  # same size, mtime put back: the cheap check cannot see it
        f.write(OTHER_BYTE)
    os.utime(wheel, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert wheels.ensure_wheel(pin) == wheel  # trusted by its stamp, not re-hashed
    os.utime(wheel, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    with pytest.raises(IntegrityError):  # mtime moved: re-hashed, and the change is found
        wheels.ensure_wheel(pin)


def test_lock_path_entry_is_used_in_place(monkeypatch: pytest.MonkeyPatch, fresh_cache: Path, tmp_path: Path) -> None:
    monkeypatch.delenv("FI_FFI_WHEELHOUSE", raising=False)
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / NAME).write_bytes(PAYLOAD)
    lock = tmp_path / "with-path.lock"
    lock.write_text(loader.dump_lock([replace(pin_for(), path=f"files/{NAME}")]))
    pin = lockfile.read_lock(lock).kernels[0]
    assert wheels.ensure_wheel(pin) == tmp_path / "files" / NAME
    (tmp_path / "files" / NAME).unlink()
    with pytest.raises(LoaderError, match="does not exist"):
        wheels.ensure_wheel(pin)


# --------------------------------------------------------------------------------------------------- pip


def pip_pin(wheel: Path, requirement: str) -> lockfile.WheelPin:
    pin = loader.lock_entry(wheel, pip=requirement)
    return lockfile.parse_lock(loader.dump_lock([pin]), Path("/locks/pip.lock")).runtimes[0]


def test_pip_download_fetches_verifies_and_caches_the_runtime_wheel(
    monkeypatch: pytest.MonkeyPatch, online: Path, tvm_ffi_runtime_wheel: Path, tmp_path: Path
) -> None:
    links = tmp_path / "links"
    links.mkdir()
    shutil.copy(tvm_ffi_runtime_wheel, links)
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip reads its options from the environment: local folder only
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))
    pin = pip_pin(tvm_ffi_runtime_wheel, "apache-tvm-ffi==0.1.15.post2")
    path = wheels.ensure_wheel(pin)
    assert path == online / "wheels" / pin.sha256[:16] / tvm_ffi_runtime_wheel.name
    assert path.read_bytes() == tvm_ffi_runtime_wheel.read_bytes()
    assert cache_files(online) == [f"wheels/{pin.sha256[:16]}/{tvm_ffi_runtime_wheel.name}"] and no_temp_files(online)
    missing = replace(
        pip_pin(tvm_ffi_runtime_wheel, "apache-tvm-ffi==0.1.99"),
        sha256="d" * 64,
        filename="apache_tvm_ffi-0.1.99-cp312-cp312-linux_x86_64.whl",
    )
    with pytest.raises(FetchError, match=r"pip download apache-tvm-ffi==0.1.99` failed") as info:
        wheels.ensure_wheel(missing)
    assert "0.1.99" in str(info.value) and "FI_FFI_WHEELHOUSE" in str(info.value)
    assert no_temp_files(online)
