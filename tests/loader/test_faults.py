"""Cache faults: each one a LoaderError naming the path, FI_FFI_CACHE_DIR and the fix,
healed on the next start where fi_ffi can, and nothing removed that fi_ffi did not create.

Faults of the file system are produced for real: a small tmpfs for a full disk, a read-only bind mount for
a read-only cache (both need root and ``mount``), and a subprocess running as ``nobody`` (``setpriv``) for
permissions, since root ignores file modes. Where that is not possible the test skips and says why.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers.env import subprocess_env
from helpers.other_users import as_nobody, chown_tree, mounted, needs_root, nobody_world
from helpers.wheels import pin_tiny_wheel

from fi_ffi import loader
from fi_ffi.errors import IntegrityError, LoaderError, LockError
from fi_ffi.loader import cache, lockfile, modules

ALPHA = "tiny/jit_cache/alpha/alpha.so"
BETA = "tiny/jit_cache/beta/beta.so"


@pytest.fixture
def synthetic(monkeypatch: pytest.MonkeyPatch, fresh_cache: Path, tmp_path: Path) -> Path:
    """A small kernel wheel with two fake modules, pinned by a user lock; its folder is the wheelhouse."""
    return pin_tiny_wheel(monkeypatch, tmp_path, {ALPHA: b"A" * 5000, BETA: os.urandom(7000)})


def pin() -> lockfile.WheelPin:
    return loader.active_lock().kernels[0]


def temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if cache.TMP_MARK in p.name]


def assert_names_the_cache(text: str, path: Path) -> None:
    assert str(path) in text and "FI_FFI_CACHE_DIR" in text and str(cache.cache_root()) in text


# ------------------------------------------------------------------------------------ clear / data loss


def test_clear_removes_only_what_fi_ffi_created_and_says_what(synthetic: Path) -> None:
    root = cache.cache_root()
    loader.module_path("alpha")
    loader.fetch(synthetic)
    mine = {
        root / "notes.txt": b"my notes",  # the user's files in the folder FI_FFI_CACHE_DIR names
        root / "wheels" / "hand-copied.whl": b"not fetched by fi_ffi",
        cache.extracted_dir(pin().sha256) / "README": b"someone's file",
    }
    for path, data in mine.items():
        path.write_bytes(data)
    report = loader.clear_cache()
    for path, data in mine.items():
        assert path.read_bytes() == data
        assert any(p == path and "not created by fi_ffi" in why for p, why in report.kept), path
    removed = {p for p, _ in report.removed}
    assert cache.wheel_path(pin()) in removed and cache.extracted_dir(pin().sha256) in removed
    assert not cache.wheel_path(pin()).exists() and not (cache.extracted_dir(pin().sha256) / ALPHA).exists()
    assert not (root / "stamps").exists() and not (root / "locks").exists()
    assert report.freed >= synthetic.stat().st_size + 5000


def test_cli_clear_lists_removed_and_kept(synthetic: Path) -> None:
    loader.module_path("alpha")
    (cache.cache_root() / "mine").mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "fi_ffi", "cache", "clear"], capture_output=True, text=True, env=subprocess_env()
    )
    assert done.returncode == 0, done.stderr
    assert f"removed {cache.extracted_dir(pin().sha256)}" in done.stdout
    assert f"kept    {cache.cache_root() / 'mine'}: not created by fi_ffi" in done.stdout
    assert (cache.cache_root() / "mine").is_dir()


def test_two_builds_with_one_file_name_coexist_in_the_cache(
    monkeypatch: pytest.MonkeyPatch, fresh_cache: Path, make_wheel: Callable[..., Path], tmp_path: Path
) -> None:
    name = "twin-1.0+cu130-py3-none-linux_x86_64.whl"
    first = make_wheel(name, {"twin/jit_cache/m/m.so": b"first build"}, folder=tmp_path / "a")
    second = make_wheel(name, {"twin/jit_cache/m/m.so": b"second build"}, folder=tmp_path / "b")
    locks = {}
    for label, whl in (("a", first), ("b", second)):
        locks[label] = tmp_path / f"{label}.lock"
        locks[label].write_text(loader.dump_lock([loader.lock_entry(whl)]))
    monkeypatch.setenv("FI_FFI_CUDA_VERSION", "13.0")
    monkeypatch.delenv("FI_FFI_WHEELHOUSE", raising=False)
    paths = {}
    for label, whl in (("a", first), ("b", second)):
        monkeypatch.setenv("FI_FFI_LOCK", str(locks[label]))
        paths[label] = loader.fetch(whl)[0]
    assert paths["a"] != paths["b"] and paths["a"].name == paths["b"].name == name
    assert paths["a"].read_bytes() == first.read_bytes() and paths["b"].read_bytes() == second.read_bytes()
    monkeypatch.setenv("FI_FFI_OFFLINE", "1")
    for label, content in (("a", b"first build"), ("b", b"second build")):
        monkeypatch.setenv("FI_FFI_LOCK", str(locks[label]))
        assert loader.module_path("m").read_bytes() == content  # from each lock's own cached wheel
        assert loader.verify_cache(full=True).ok
    assert paths["a"].is_file() and paths["b"].is_file()


def test_a_wheel_cached_by_an_older_fi_ffi_is_moved_to_its_digest_folder(synthetic: Path) -> None:
    legacy = cache.make_dir(cache.wheels_dir()) / synthetic.name
    shutil.copy2(synthetic, legacy)
    cache.record_stamp(legacy, pin().sha256)  # as the older layout left it: verified, stamped
    os.environ.pop("FI_FFI_WHEELHOUSE")  # monkeypatch restores it
    from fi_ffi.loader import wheels

    assert wheels.ensure_wheel(pin()) == cache.wheel_path(pin())
    assert not legacy.exists() and cache.stamped(cache.wheel_path(pin()), pin().sha256)


# ------------------------------------------------------------------------------ damaged cache entries


def test_a_folder_in_place_of_an_extracted_module_is_quarantined_and_the_module_extracted_again(
    synthetic: Path,
) -> None:
    path = loader.module_path("alpha")
    path.unlink()
    path.mkdir()
    (path / "keep.txt").write_text("someone's")
    modules._indexes.clear()
    assert loader.module_path("alpha").read_bytes() == b"A" * 5000
    moved = list((cache.cache_root() / cache.QUARANTINE).glob("*alpha.so"))
    assert len(moved) == 1 and (moved[0] / "keep.txt").read_text() == "someone's"


def test_verify_full_reports_a_folder_in_place_of_a_module_and_does_not_crash(synthetic: Path) -> None:
    path = loader.module_path("alpha")
    path.unlink()
    path.mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "fi_ffi", "cache", "verify", "--full"],
        capture_output=True,
        text=True,
        env=subprocess_env(),
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert f"removed {path}: a folder is where the extracted file belongs" in done.stdout
    assert not path.exists() and loader.module_path("alpha").read_bytes() == b"A" * 5000


def test_a_folder_in_place_of_a_lock_file_is_quarantined(synthetic: Path) -> None:
    lock = cache.make_dir(cache.cache_root() / "locks") / f"extract-{pin().sha256[:16]}.lock"
    lock.mkdir()
    assert loader.module_path("alpha").read_bytes() == b"A" * 5000
    assert lock.is_file() and len(list((cache.cache_root() / cache.QUARANTINE).iterdir())) == 1


def corrupt_member_data(wheel: Path, member: str) -> None:
    """Overwrite the compressed bytes of ``member`` in place (same size; mtime put back): a deflate error."""
    st = wheel.stat()
    with zipfile.ZipFile(wheel) as zf:
        info = zf.getinfo(member)
    with open(wheel, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
        f.seek(info.header_offset + 30 + name_len + extra_len)
        f.write(b"\xff" * min(64, info.compress_size))
    os.utime(wheel, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_a_damaged_wheelhouse_wheel_whose_stamp_matches_is_reported_and_verify_full_finds_it(
    synthetic: Path,
) -> None:
    loader.module_path("alpha")  # verifies and stamps the wheelhouse wheel
    corrupt_member_data(synthetic, BETA)
    assert cache.stamped(synthetic, pin().sha256)  # the cheap check cannot see it
    with pytest.raises(IntegrityError) as info:
        loader.module_path("beta")  # was: zlib.error
    text = str(info.value)
    assert str(synthetic) in text and "damaged" in text and pin().sha256 in text and "FI_FFI_WHEELHOUSE" in text
    assert not cache.stamped(synthetic, pin().sha256)  # its stamp is dropped: the next start re-hashes it
    with pytest.raises(IntegrityError, match="has sha256"):
        loader.module_path("beta")
    cache.record_stamp(synthetic, pin().sha256)  # the stamp lies again: verify --full must find it
    report = loader.verify_cache(full=True)
    assert [p for p, _ in report.bad] == [synthetic] and "not fi_ffi's" in report.bad[0][1]
    assert synthetic.is_file() and not cache.stamped(synthetic, pin().sha256)


def test_a_damaged_cached_wheel_whose_stamp_matches_is_replaced_from_the_wheelhouse(synthetic: Path) -> None:
    copied = loader.fetch(synthetic)[0]
    assert copied == cache.wheel_path(pin())
    corrupt_member_data(copied, BETA)
    assert loader.module_path("beta").read_bytes() == zipfile.ZipFile(synthetic).read(BETA)
    assert copied.read_bytes() == synthetic.read_bytes()  # the damaged copy replaced by the wheelhouse's good one


def test_a_damaged_listing_is_detected_by_verify_and_listed_again(synthetic: Path) -> None:
    loader.module_path("alpha")
    index = cache.extracted_dir(pin().sha256) / "index.json"
    data = cache.read_json(index)
    assert data is not None
    cache.write_json(index, {**data, "members": {}})  # the damage: a listing of no members
    modules._indexes.clear()
    assert loader.available_uris() == ["alpha", "beta"]  # was: nothing found
    cache.write_json(index, {**data, "members": {}})
    report = loader.verify_cache()
    assert [p for p, _ in report.bad] == [index] and "checksum" in report.bad[0][1] and not index.exists()
    legacy = {k: v for k, v in data.items() if k != "members_sha256"}
    cache.write_json(index, {**legacy, "members": {}})  # no checksum (older fi_ffi) and empty
    assert "lists no members" in loader.verify_cache().bad[0][1]


def test_a_lock_file_that_is_not_utf8_is_a_lock_error_and_fetch_exits_2(tmp_path: Path) -> None:
    lock = tmp_path / "latin1.lock"
    lock.write_bytes("# caf\xe9\nversion = 1\n".encode("latin-1"))
    with pytest.raises(LockError, match=r"not UTF-8 text \(byte 5 is b'\\xe9'\)"):
        lockfile.read_lock(lock)
    done = subprocess.run(
        [sys.executable, "-m", "fi_ffi", "fetch"], capture_output=True, text=True,
        env=subprocess_env(FI_FFI_LOCK=str(lock)),
    )  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr and str(lock) in done.stderr


# ------------------------------------------------------------------------------------- temporary files


def test_temp_file_of_a_killed_start_is_removed_at_once(synthetic: Path) -> None:
    dest = cache.extracted_dir(pin().sha256) / "tiny/jit_cache/alpha/alpha.so"
    script = (
        "import sys, time\nfrom pathlib import Path\nfrom fi_ffi.loader import cache\n"
        "with cache.atomic_file(Path(sys.argv[1])) as (f, tmp):\n"
        "    f.write(b'x' * 100000); f.flush(); print(tmp, flush=True); time.sleep(120)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(dest)], stdout=subprocess.PIPE, text=True, env=subprocess_env()
    )
    assert proc.stdout is not None
    tmp = Path(proc.stdout.readline().strip())
    live = loader.verify_cache()
    assert tmp.is_file() and live.removed_tmp == 0  # its writer still runs: kept
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert tmp.is_file()  # what a killed start leaves behind
    assert loader.module_path("alpha").read_bytes() == b"A" * 5000  # the next extraction there cleans it
    assert not tmp.exists() and not temp_files(cache.cache_root())


def test_verify_removes_temp_files_of_dead_processes_however_young(synthetic: Path, tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(done.stdout)
    folder = cache.make_dir(cache.cache_root() / "wheels" / pin().sha256[:16])
    dead = folder / f"{cache.TMP_MARK}{cache.HOST_TAG}-{dead_pid}-0badc0de"
    dead.write_bytes(b"x" * 1000)
    mine = folder / cache.temp_name()
    mine.write_bytes(b"being written")
    other_host = folder / f"{cache.TMP_MARK}ffffff-{dead_pid}-0badc0de"  # a pid of another pid namespace
    other_host.write_bytes(b"?")
    report = loader.verify_cache()
    assert report.removed_tmp == 1 and not dead.exists() and mine.exists() and other_host.exists()


# ------------------------------------------------------------------------------------------ lock waits

HOLDER = """
import sys, time, filelock
lock = filelock.FileLock(sys.argv[1])
lock.acquire()
print("held", flush=True)
time.sleep(float(sys.argv[2]))
"""


@contextlib.contextmanager
def lock_held_elsewhere(name: str, seconds: float) -> Iterator[Path]:
    path = cache.make_dir(cache.cache_root() / "locks") / f"{name}.lock"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(path), str(seconds)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        yield path
    finally:
        proc.kill()
        proc.wait(timeout=30)


def test_a_start_waiting_on_a_lock_logs_it_and_gives_up_after_fi_ffi_lock_timeout(
    synthetic: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("FI_FFI_LOCK_TIMEOUT", "0.5")
    caplog.set_level("INFO", logger="fi_ffi")
    with lock_held_elsewhere(f"extract-{pin().sha256[:16]}", 60) as path:
        started = time.monotonic()
        with pytest.raises(LoaderError) as info:
            loader.module_path("alpha")
        assert 0.4 < time.monotonic() - started < 10
    text = str(info.value)
    assert (
        str(path) in text and "FI_FFI_LOCK_TIMEOUT" in text and f"fuser {path}" in text and "FI_FFI_CACHE_DIR" in text
    )
    assert any(
        "waiting for the lock" in r.message and "listing the modules of tiny" in r.message for r in caplog.records
    )


def test_a_start_waits_for_a_lock_until_its_holder_exits(
    synthetic: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="fi_ffi")
    with lock_held_elsewhere(f"extract-{pin().sha256[:16]}", 1.0):
        assert loader.module_path("alpha").read_bytes() == b"A" * 5000
    messages = [r.message for r in caplog.records]
    assert any("waiting for the lock" in m and "no time limit" in m for m in messages)
    assert any(m.startswith("got the lock") for m in messages)


def test_a_bad_fi_ffi_lock_timeout_is_named(synthetic: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FI_FFI_LOCK_TIMEOUT", "soon")
    with pytest.raises(LoaderError, match=r"FI_FFI_LOCK_TIMEOUT='soon': expected a number of seconds >= 0"):
        loader.module_path("alpha")


# --------------------------------------------------------------- full disk, read-only, other users


@needs_root
def test_a_full_disk_is_a_loader_error_naming_the_path_and_the_fix(
    synthetic: Path, monkeypatch: pytest.MonkeyPatch, make_wheel: Callable[..., Path], tmp_path: Path
) -> None:
    big = make_wheel("big-1.0+cu130-py3-none-linux_x86_64.whl", {"big/jit_cache/huge/huge.so": os.urandom(3 << 20)})
    lock = tmp_path / "big.lock"
    lock.write_text(loader.dump_lock([loader.lock_entry(big)]))
    monkeypatch.setenv("FI_FFI_LOCK", str(lock))
    monkeypatch.setenv("FI_FFI_WHEELHOUSE", str(big.parent))
    with mounted("-t", "tmpfs", "-o", "size=1M", "tmpfs") as disk:
        monkeypatch.setenv("FI_FFI_CACHE_DIR", str(disk))
        with pytest.raises(LoaderError) as info:
            loader.module_path("huge")  # was: OSError: [Errno 28] with no path
        text = str(info.value)
        assert_names_the_cache(text, disk / "extracted")
        assert "No space left on device" in text and "the disk is full" in text
        assert not temp_files(disk)  # nothing half-written left
        subprocess.run(["mount", "-o", "remount,size=16M", str(disk)], check=True)
        assert loader.module_path("huge").stat().st_size == 3 << 20  # not sticky


@needs_root
def test_a_read_only_cache_works_when_complete_and_names_the_fix_when_not(synthetic: Path) -> None:
    root = cache.cache_root()
    loader.module_path("alpha")
    with mounted("--bind", str(root)) as ro:
        if subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)], capture_output=True).returncode != 0:
            pytest.skip("cannot remount read-only here")
        os.environ["FI_FFI_CACHE_DIR"] = str(ro)  # fresh_cache's monkeypatch restores it
        modules._indexes.clear()
        assert loader.module_path("alpha") == cache.extracted_dir(pin().sha256) / ALPHA  # complete: works
        with pytest.raises(LoaderError) as info:
            loader.module_path("beta")  # was: OSError: [Errno 30] from the lock file
        text = str(info.value)
        assert_names_the_cache(text, ro / "locks")
        assert "Read-only file system" in text and "read-only cache works only while it already holds" in text
        done = subprocess.run(
            [sys.executable, "-m", "fi_ffi", "cache", "verify", "--full"],
            capture_output=True,
            text=True,
            env=subprocess_env(FI_FFI_CACHE_DIR=str(ro)),
        )
        assert done.returncode == 0 and "Traceback" not in done.stderr, done.stdout + done.stderr
        assert "0 bad" in done.stdout


@needs_root
def test_an_unreadable_module_is_extracted_again_for_a_user_that_obeys_file_modes(synthetic: Path) -> None:
    import pwd

    nobody = pwd.getpwnam("nobody")
    with nobody_world(synthetic) as env:
        os.environ.update(env)  # build the cache as root, then hand it to nobody
        modules._indexes.clear()
        path = loader.module_path("alpha")
        chown_tree(Path(env["FI_FFI_CACHE_DIR"]), nobody.pw_uid, nobody.pw_gid)
        os.chmod(path, 0)
        out = as_nobody(env, "verify", "alpha")  # was: PermissionError from the hash check
        assert "cannot be read (Permission denied)" in out and str(path) in out
        assert f"PATH {path}" in out and "BYTES 5000" in out


@needs_root
def test_a_lock_file_of_another_user_is_a_loader_error_naming_it(synthetic: Path) -> None:
    import pwd

    nobody = pwd.getpwnam("nobody")
    with nobody_world(synthetic) as env:
        root = Path(env["FI_FFI_CACHE_DIR"])
        lock = cache.make_dir(root / "locks") / f"extract-{pin().sha256[:16]}.lock"
        lock.touch(mode=0o644)  # root's lock file, in a cache otherwise nobody's
        os.chown(root, nobody.pw_uid, nobody.pw_gid)
        os.chown(root / "locks", nobody.pw_uid, nobody.pw_gid)
        out = as_nobody(env, "load", "alpha")
        assert out.startswith("LOADERERROR") and str(lock) in out and "belongs to uid 0" in out
        assert "FI_FFI_CACHE_DIR" in out
