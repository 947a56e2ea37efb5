"""``FI_FFI_*`` values: a value fi_ffi would not understand is an error naming the variable and what it accepts
where the loader reads it, and ``fi-ffi doctor`` flags it (exit 0) together with wheelhouse entries that are not
folders and a cache path that is not a writable folder. The real CLI runs in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.env import run_fi_ffi, subprocess_env

from fi_ffi.errors import LoaderError
from fi_ffi.loader import settings


def doctor_notes(**env: str) -> dict[str, str]:
    done = run_fi_ffi("doctor", "--json", **env)
    assert done.returncode == 0, done.stderr
    return {row["name"]: row["note"] for row in json.loads(done.stdout)["settings"]}


@pytest.mark.parametrize("value", ["1", "true", "YES", "on", " 1 "])
def test_flags_take_the_documented_on_values(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("FI_FFI_OFFLINE", value)
    assert settings.offline() is True


@pytest.mark.parametrize("value", ["0", "false", "No", "off", ""])
def test_flags_take_the_documented_off_values(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("FI_FFI_OFFLINE", value)
    assert settings.offline() is False
    monkeypatch.setenv("FI_FFI_USE_INSTALLED", value)
    assert settings.use_installed() is (value == "")  # unset or empty: the default, on


@pytest.mark.parametrize("name", ["FI_FFI_OFFLINE", "FI_FFI_QUIET", "FI_FFI_TRUST_INSTALLED", "FI_FFI_USE_INSTALLED"])
def test_a_flag_with_another_value_is_an_error_naming_it(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    monkeypatch.setenv(name, "maybe")
    with pytest.raises(LoaderError, match=rf"^{name}='maybe': expected 1 \(or true/yes/on\).*0 \(or false/no/off\)"):
        settings.flag(name)


def test_offline_maybe_is_refused_at_once_not_retried(tmp_path: Path) -> None:
    start = time.monotonic()
    done = run_fi_ffi("fetch", FI_FFI_OFFLINE="maybe", FI_FFI_LOCK="", FI_FFI_CACHE_DIR=str(tmp_path / "cache"))
    assert done.returncode == 2
    assert "FI_FFI_OFFLINE='maybe': expected 1" in done.stderr and "Traceback" not in done.stderr
    assert time.monotonic() - start < 30  # no download attempts (they would retry for longer)


def test_doctor_flags_bad_values_and_still_exits_zero(tmp_path: Path) -> None:
    notes = doctor_notes(
        FI_FFI_OFFLINE="maybe",
        FI_FFI_LOCK_TIMEOUT="abc",
        FI_FFI_CUDA_VERSION="13",
        FI_FFI_SM="sm_90a,!",
        FI_FFI_RUNTIME="pkg",
        FI_FFI_QUIET="1",
    )
    assert "expected 1 (or true/yes/on)" in notes["FI_FFI_OFFLINE"]
    assert "FI_FFI_LOCK_TIMEOUT='abc': expected a number of seconds >= 0" in notes["FI_FFI_LOCK_TIMEOUT"]
    assert "expected major.minor" in notes["FI_FFI_CUDA_VERSION"]
    assert "expected comma-separated GPU archs" in notes["FI_FFI_SM"]
    assert "expected auto, package, lock or the path" in notes["FI_FFI_RUNTIME"]
    assert notes["FI_FFI_QUIET"] == ""
    text = run_fi_ffi("doctor", FI_FFI_LOCK_TIMEOUT="abc").stdout
    assert "FI_FFI_LOCK_TIMEOUT=abc   <- FI_FFI_LOCK_TIMEOUT='abc': expected a number" in text


def test_doctor_names_each_wheelhouse_entry_that_is_not_a_folder(tmp_path: Path) -> None:
    wheel = tmp_path / "w" / "flashinfer_jit_cache-0.6.3-cp39-abi3-linux_x86_64.whl"
    wheel.parent.mkdir()
    wheel.write_bytes(b"PK")
    plain = tmp_path / "notes.txt"
    plain.write_text("x")
    missing = tmp_path / "nowhere"
    house = os.pathsep.join([str(missing), str(plain), str(wheel), str(wheel.parent)])
    note = doctor_notes(FI_FFI_WHEELHOUSE=house)["FI_FFI_WHEELHOUSE"]
    assert f"{missing} does not exist" in note
    assert f"{plain} is a file, not a folder of wheels" in note
    assert f"{wheel} is a wheel, not a folder: name the folder that holds it ({wheel.parent})" in note
    assert doctor_notes(FI_FFI_WHEELHOUSE=str(wheel.parent))["FI_FFI_WHEELHOUSE"] == ""  # a real folder is fine


def test_a_wheel_named_as_the_wheelhouse_is_refused_where_it_is_read(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    wheel = tmp_path / "x-1-py3-none-any.whl"
    wheel.write_bytes(b"PK")
    monkeypatch.setenv("FI_FFI_WHEELHOUSE", str(wheel))
    with pytest.raises(LoaderError, match=r"^FI_FFI_WHEELHOUSE: .*x-1-py3-none-any.whl is a wheel, not a folder"):
        settings.wheelhouses()


def test_a_missing_wheelhouse_is_named_when_a_wheel_is_found_nowhere(tmp_path: Path) -> None:
    missing = tmp_path / "wheelhouse"
    done = run_fi_ffi(
        "fetch",
        FI_FFI_OFFLINE="1",
        FI_FFI_LOCK="",
        FI_FFI_WHEELHOUSE=str(missing),
        FI_FFI_CACHE_DIR=str(tmp_path / "c"),
    )
    assert done.returncode == 2
    assert f"FI_FFI_WHEELHOUSE (it names {missing}, which does not exist: make that folder" in done.stderr
    assert done.stderr.count(str(missing)) == 1, done.stderr  # said once, where the user is sent to the variable


def test_doctor_checks_the_cache_is_a_writable_folder(tmp_path: Path) -> None:
    good = json.loads(run_fi_ffi("doctor", "--json", FI_FFI_CACHE_DIR=str(tmp_path / "new" / "cache")).stdout)
    assert good["cache_problem"] == ""  # not there yet, but can be made
    plain = tmp_path / "file"
    plain.write_text("x")
    done = run_fi_ffi("doctor", FI_FFI_CACHE_DIR=str(plain))
    assert done.returncode == 0
    assert f"PROBLEM:      {plain} is a file, not a folder; set FI_FFI_CACHE_DIR to a folder" in done.stdout
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "ro"
        locked.mkdir()
        locked.chmod(0o500)
        try:
            data = json.loads(run_fi_ffi("doctor", "--json", FI_FFI_CACHE_DIR=str(locked)).stdout)
            assert "is a folder this user cannot write" in data["cache_problem"]
        finally:
            locked.chmod(0o700)


# ---- every entry point reads the variables through the table: a bad value is named before anything else ------

BAD_SETTINGS = [
    ("FI_FFI_QUIET", "2", "FI_FFI_QUIET='2': expected 1 (or true/yes/on) to turn it on, 0 (or false/no/off)"),
    ("FI_FFI_LOCK_TIMEOUT", "abc", "FI_FFI_LOCK_TIMEOUT='abc': expected a number of seconds >= 0"),
    ("FI_FFI_SM", "xyz!", "FI_FFI_SM='xyz!': expected comma-separated GPU archs such as 90a,100a"),
    ("FI_FFI_RUNTIME", "bogus", "FI_FFI_RUNTIME='bogus': expected auto, package, lock or the path of a libtvm_ffi.so"),
    (
        "FI_FFI_RUNTIME",
        "/nonexistent/libtvm_ffi.so",
        "FI_FFI_RUNTIME='/nonexistent/libtvm_ffi.so': /nonexistent/libtvm_ffi.so does not exist; set it to the path "
        "of an existing libtvm_ffi.so, or unset it",
    ),
    ("FI_FFI_RUNTIME", "<folder>", "is a folder, not the library; set it to the path of an existing libtvm_ffi.so"),
    ("FI_FFI_TRUST_INSTALLED", "maybe", "FI_FFI_TRUST_INSTALLED='maybe': expected 1 (or true/yes/on)"),
    ("FI_FFI_LOCK", "<folder>", "is a folder, not a file; set it to the path of an existing file, or unset it"),
    ("FI_FFI_LOCK", "/nonexistent/my.lock", "FI_FFI_LOCK='/nonexistent/my.lock': /nonexistent/my.lock does not exist"),
    ("FI_FFI_CACHE_DIR", "<file>", "is a file, not a folder; point it at a folder this user can write"),
    ("FI_FFI_CACHE_DIR", "/proc/fi_ffi_cache", "/proc/fi_ffi_cache does not exist and cannot be made in /proc"),
]


def _value(value: str, tmp_path: Path) -> str:
    if value == "<folder>":
        return str(tmp_path)
    if value != "<file>":
        return value
    plain = tmp_path / "a-file"
    plain.write_text("x")
    return str(plain)


@pytest.mark.parametrize(("name", "value", "message"), BAD_SETTINGS)
@pytest.mark.parametrize("command", [["list"], ["fetch"]])
def test_commands_name_a_bad_setting_before_any_download(
    tmp_path: Path, command: list[str], name: str, value: str, message: str
) -> None:
    if value.startswith("/proc/") and not Path("/proc").is_dir():
        pytest.skip("needs /proc")
    env = {"FI_FFI_LOCK": "", "FI_FFI_WHEELHOUSE": "", "FI_FFI_CACHE_DIR": str(tmp_path / "cache")}
    env[name] = _value(value, tmp_path)  # the packaged lock, nothing at hand: a download would be next
    done = run_fi_ffi(*command, **env)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.startswith(f"fi-ffi {command[0]}: {name}="), done.stderr
    assert message in done.stderr and "fi-ffi doctor" in done.stderr
    for other in ("network", "offline", "OFFLINE", "download"):
        assert other not in done.stderr, done.stderr


CACHE_DIR_ROWS = [row for row in BAD_SETTINGS if row[0] == "FI_FFI_CACHE_DIR"]


@pytest.mark.parametrize(("name", "value", "message"), CACHE_DIR_ROWS)
@pytest.mark.parametrize("action", ["path", "list", "verify", "clear"])
def test_cache_commands_refuse_a_cache_folder_as_fetch_does(
    tmp_path: Path, action: str, name: str, value: str, message: str
) -> None:
    # `cache list`/`verify`/`clear` said "the cache /proc/x is empty" (exit 0) where `fetch` and `list` refused it
    if value.startswith("/proc/") and not Path("/proc").is_dir():
        pytest.skip("needs /proc")
    done = run_fi_ffi("cache", action, **{name: _value(value, tmp_path)})
    assert done.returncode == 2 and done.stdout == "", done.stdout
    assert done.stderr.startswith(f"fi-ffi cache: {name}="), done.stderr
    assert message in done.stderr and "fi-ffi doctor" in done.stderr and "Traceback" not in done.stderr


OP_CHILD = """
import sys
sys.path.insert(0, sys.argv[1])  # tests/: helpers
import fi_ffi
from fi_ffi.launch import kernels
from helpers.fakes import fake_cuda
kernels._driver_found = True  # as on a GPU machine: the settings are what is in the way
try:
    fi_ffi.rmsnorm(fake_cuda((4, 128)), fake_cuda((128,)), 1e-6, out=fake_cuda((4, 128)))
except Exception as exc:
    print(type(exc).__name__, exc)
"""


@pytest.mark.parametrize(("name", "value"), [("FI_FFI_QUIET", "2"), ("FI_FFI_TRUST_INSTALLED", "maybe")])
def test_an_op_refuses_a_bad_setting_instead_of_ignoring_it(shared_wheel: Path, name: str, value: str) -> None:
    # a fresh process, as a user's: its first op binds its module under these settings (it went on before)
    done = subprocess.run(
        [sys.executable, "-c", OP_CHILD, str(Path(__file__).resolve().parents[1])],
        capture_output=True,
        text=True,
        timeout=120,
        env=subprocess_env(**{name: value}),
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"LoaderError {name}='{value}': expected 1 (or true/yes/on)"), done.stdout


def test_doctor_names_a_cache_folder_that_cannot_be_made() -> None:
    if not Path("/proc").is_dir():
        pytest.skip("needs /proc")
    done = run_fi_ffi("doctor", "--json", FI_FFI_CACHE_DIR="/proc/fi_ffi_cache")
    data = json.loads(done.stdout)
    # root passes every permission check here, yet nothing can be made under /proc: tried, not guessed
    assert "/proc/fi_ffi_cache does not exist and cannot be made in /proc" in data["cache_problem"]
    note = {row["name"]: row["note"] for row in data["settings"]}["FI_FFI_CACHE_DIR"]
    assert note.startswith("FI_FFI_CACHE_DIR='/proc/fi_ffi_cache': /proc/fi_ffi_cache does not exist"), note
