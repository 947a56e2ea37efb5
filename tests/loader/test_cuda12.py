"""CUDA 12 kernel wheels: ``fi-ffi lock`` records each wheel's CUDA version, a lock of CUDA 12 builds makes fi_ffi load
``libcudart.so.12`` (not ``.so.13``) and select them, and their modules load and answer with the signatures their
builder listed. On the real CUDA 12 test wheel (``../shared/wheels-cu12``: FlashInfer 0.6.3 built with nvcc 12.4) and
the real ``libcudart.so.12`` of pip's ``nvidia-cuda-runtime-cu12`` (a dev dependency); no GPU needed.

The loading runs in child processes: a process maps one CUDA runtime for the kernel modules, and the test session's
is CUDA 13's.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.env import subprocess_env
from helpers.wheels import CU12_MISSING, find_shared_wheel, find_wheel_cu12

from fi_ffi.loader import libraries, lockfile

CU12 = find_wheel_cu12()
needs_cu12 = pytest.mark.skipif(CU12 is None, reason=CU12_MISSING)


def fi_ffi(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fi_ffi", *args], capture_output=True, text=True, timeout=120, env=subprocess_env(**env)
    )


@pytest.fixture
def cu12_lock(tmp_path: Path) -> Path:
    assert CU12 is not None
    done = fi_ffi("lock", str(CU12))
    assert done.returncode == 0, done.stderr
    path = tmp_path / "cu12.lock"
    path.write_text(done.stdout)
    return path


@needs_cu12
def test_lock_records_each_wheels_cuda_version_and_says_what_cuda_12_needs() -> None:
    core = find_shared_wheel()
    wheels = [str(CU12)] + ([str(core)] if core is not None else [])
    done = fi_ffi("lock", *wheels)
    assert done.returncode == 0, done.stderr
    lock = lockfile.parse_lock(done.stdout, Path("x.lock"))
    versions = {pin.filename: pin.cuda for pin in lock.kernels}
    assert versions[CU12.name] == "12.4"  # from +cu124
    if core is not None:
        assert versions[core.name] == "13.0"
        assert "fi_ffi uses the CUDA 13 ones (set FI_FFI_CUDA_VERSION to choose another major)" in done.stderr
    alone = fi_ffi("lock", str(CU12))
    assert "with this lock fi_ffi loads libcudart.so.12 (`pip install nvidia-cuda-runtime-cu12`" in alone.stderr
    assert "cuda-bindings 12.9 (`pip install 'cuda-bindings>=12.9,<13'`)" in alone.stderr


@needs_cu12
def test_lock_cuda_option_records_the_given_version_and_refuses_a_bare_major() -> None:
    done = fi_ffi("lock", "--cuda", "12.9", str(CU12))
    assert done.returncode == 0, done.stderr
    assert [pin.cuda for pin in lockfile.parse_lock(done.stdout, Path("x.lock")).kernels] == ["12.9"]
    bad = fi_ffi("lock", "--cuda", "12", str(CU12))
    assert bad.returncode == 2 and bad.stdout == "" and "Traceback" not in bad.stderr
    assert bad.stderr.startswith("fi-ffi lock: --cuda: expected the CUDA version the kernel wheels were built for")


@needs_cu12
def test_the_lock_decides_which_cuda_major_is_loaded(cu12_lock: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FI_FFI_CUDA_VERSION", raising=False)
    monkeypatch.setenv("FI_FFI_LOCK", str(cu12_lock))
    major, why = libraries.cuda_major()
    assert major == 12 and f"the lock {cu12_lock} pins CUDA 12 kernel wheels for" in why
    monkeypatch.setenv("FI_FFI_LOCK", str(lockfile.default_lock_path()))
    assert libraries.cuda_major()[0] == 13  # the packaged lock: CUDA 13.0 / 13.1 wheels
    both = cu12_lock.parent / "both.lock"
    pins = lockfile.read_lock(cu12_lock).kernels + lockfile.read_lock(lockfile.default_lock_path()).kernels
    both.write_text(lockfile.dump_lock(pins))
    monkeypatch.setenv("FI_FFI_LOCK", str(both))
    major, why = libraries.cuda_major()
    assert major == 13 and "(the highest of CUDA 12, 13)" in why
    monkeypatch.setenv("FI_FFI_CUDA_VERSION", "12.9")  # the override picks the major, and selects by it
    assert libraries.cuda_major() == (12, "FI_FFI_CUDA_VERSION=12.9")
    chosen = lockfile.select(lockfile.read_lock(both), "12.9", "x86_64")
    assert [pin.filename for pin in chosen.kernels] == [CU12.name]


LOAD_ALL = """
import json, re, sys
from pathlib import Path
from fi_ffi import loader
from fi_ffi.loader import dl
from fi_ffi.launch import kernels
from fi_ffi.launch.kernels import entry_point
kernels._driver_found = True  # no driver here: read the signatures as the test session does

listing, found, module = Path(sys.argv[1]).read_text(), {}, ""
for line in listing.splitlines():
    if line.startswith("== "):
        module = line[3:].removesuffix(".so")
    for name, text in re.findall(r"`((\\w+)\\(.*?\\) -> [^`]+)`", line):
        found[f"{module}:{text.split('(')[0]}"] = entry_point(module, text.split("(")[0]).signature_text()
        found[f"{module}:{text.split('(')[0]}:listed"] = text
selection = loader.selection()
print(json.dumps({
    "cudart": loader.ensure_cudart(),
    "cuda": selection.cuda,
    "kernels": [(p.filename, p.cuda) for p in selection.kernels],
    "mapped13": dl.loaded_paths("libcudart.so.13", versioned=True),
    "signatures": found,
}))
"""


@needs_cu12
def test_a_cuda_12_lock_loads_libcudart_12_and_its_modules_answer(cu12_lock: Path, tmp_path: Path) -> None:
    listing = CU12.parent / "signatures-cu12.txt"
    if not listing.is_file():
        pytest.skip(f"needs {listing} (the signatures the CUDA 12 wheel's builder listed)")
    env = {
        "FI_FFI_LOCK": str(cu12_lock),
        "FI_FFI_WHEELHOUSE": str(CU12.parent),
        "FI_FFI_CACHE_DIR": str(tmp_path / "cache"),
        "FI_FFI_OFFLINE": "1",
        "FI_FFI_QUIET": "1",
        "FI_FFI_USE_INSTALLED": "0",
        "FI_FFI_CUDA_VERSION": "",
    }
    done = subprocess.run(
        [sys.executable, "-c", LOAD_ALL, str(listing)],
        capture_output=True,
        text=True,
        timeout=300,
        env=subprocess_env(**env),
    )
    if "libcudart.so.12 (the CUDA 12 runtime) is needed" in done.stderr:
        # without nvidia-cuda-runtime-cu12 (or a CUDA 12 toolkit) the error says how to get it
        assert "`python -m pip install 'nvidia-cuda-runtime-cu12'`" in done.stderr
        pytest.skip("libcudart.so.12 is not installed here (pip install nvidia-cuda-runtime-cu12)")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert re.search(r"/libcudart\.so\.12(\.[0-9.]+)?$", out["cudart"]), out["cudart"]
    assert out["mapped13"] == []  # the CUDA 13 runtime was not loaded for these modules
    assert out["cuda"].startswith("12.") and out["kernels"] == [[CU12.name, "12.4"]]
    signatures = out["signatures"]
    listed = {key: text for key, text in signatures.items() if key.endswith(":listed")}
    assert len(listed) >= 13  # norm 7, page 2, decode 1 + 2, prefill 1 + 3 entry points
    for key, text in listed.items():
        assert text in signatures[key.removesuffix(":listed")], key
