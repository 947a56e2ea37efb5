"""fi_ffi.cuda.requirements: "no NVIDIA driver found" and "driver too old" worded in one place, and said the same by
the runtime's errors, the device queries, ``fi-ffi smoke`` and ``fi-ffi doctor``.

No mocks: each case runs ``python -m fi_ffi`` (or a short script) in a child process against a real driver library
or none. The "no driver" case is this CPU machine as it is (skipped where a driver loads). The "driver too old" cases
put a real shared library, compiled here with gcc into ``tmp_path`` with the soname ``libcuda.so.1``, first on
``LD_LIBRARY_PATH``: it exports ``cuDriverGetVersion`` (answering 11080 or 12080) and ``cuInit`` (0), and nothing else.
It is what fi_ffi's own ``dlopen("libcuda.so.1")`` (cffi) opens, and also what cuda-bindings' statically linked
runtime opens and asks, so the ``cudaErrorInsufficientDriver`` it returns is the real runtime's answer to that
driver version, not a value we made up. Nothing in the process is patched.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers.env import run_fi_ffi, subprocess_env
from helpers.wheels import find_wheel_cu12

from fi_ffi.cuda import driver, requirements

_gcc = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc to build the stand-in driver library")


def needs_gcc(test: Any) -> Any:
    """gcc builds the stand-in driver; CPU machines only: a GPU machine's own driver is found before the stand-in
    put on LD_LIBRARY_PATH (its container injects it)."""
    return pytest.mark.cpu_only(_gcc(test))


no_driver_here = pytest.mark.skipif(
    driver.probe().found, reason="an NVIDIA driver (libcuda.so.1) loads here: the no-driver case cannot be seen"
)


def bindings_major() -> int:
    from fi_ffi.cuda import runtime as cuda_runtime

    return cuda_runtime.runtime_version() // 1000


def old_driver(tmp_path: Path, version: int) -> Path:
    """A folder holding a ``libcuda.so.1`` whose ``cuDriverGetVersion`` answers ``version`` and ``cuInit`` 0."""
    folder = tmp_path / f"driver{version}"
    folder.mkdir()
    source = folder / "libcuda.c"
    source.write_text(
        f"int cuDriverGetVersion(int *v) {{ *v = {version}; return 0; }}\n"
        "int cuInit(unsigned int flags) { return 0; }\n"
    )
    out = folder / "libcuda.so.1"
    subprocess.run(
        ["gcc", "-O2", "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", str(out), str(source)],
        check=True,
        timeout=60,
    )
    return folder


def fi_ffi(*args: str, library_path: Path | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    extra = dict(env)
    if library_path is not None:
        extra["LD_LIBRARY_PATH"] = str(library_path)
    return run_fi_ffi(*args, **extra)


def python(code: str, library_path: Path | None = None) -> subprocess.CompletedProcess[str]:
    extra = {"LD_LIBRARY_PATH": str(library_path)} if library_path is not None else {}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=subprocess_env(**extra)
    )


def test_driver_versions_read_as_cuda_versions() -> None:
    assert requirements.version_text(12080) == "12.8" and requirements.version_text(13000) == "13.0"
    assert requirements.MIN_DRIVER[13].startswith("580.") and requirements.MIN_DRIVER[12].startswith("525.")


@no_driver_here
def test_no_driver_is_named_so_in_smoke_and_doctor() -> None:
    smoke = fi_ffi("smoke")
    assert smoke.returncode == 1 and "Traceback" not in smoke.stderr
    first = smoke.stdout.splitlines()[0]
    # the runtime's own words ("driver version is insufficient") would send the user looking for an upgrade
    assert "no NVIDIA driver found (libcuda.so.1" in first and "version is insufficient" not in first, first
    assert "Install the NVIDIA driver (>= 580 for the CUDA 13 kernels" in first
    doctor = fi_ffi("doctor")
    assert doctor.returncode == 0
    assert "NVIDIA driver:  not found: no NVIDIA driver found" in doctor.stdout
    assert "CUDA builds:    no driver to run them; the lock selects CUDA " in doctor.stdout
    assert re.search(r"  PROBLEM:      no NVIDIA driver found .*Install the NVIDIA driver", doctor.stdout)


@no_driver_here
def test_doctor_and_smoke_say_the_no_driver_message_once() -> None:
    # the ~400-character message (cause and fix) was printed three times by doctor and four by smoke
    for command in ("doctor", "smoke"):
        out = fi_ffi(command).stdout
        assert out.count("Install the NVIDIA driver") == 1, out
        assert out.count("no NVIDIA driver found (the fix: above)") == (1 if command == "doctor" else 2), out
    doctor = fi_ffi("doctor").stdout
    assert "NVIDIA driver:  not found: no NVIDIA driver found (libcuda.so.1" in doctor  # the cause, short
    assert "GPUs:           none (cudaGetDeviceCount failed: " in doctor


@no_driver_here
def test_no_driver_is_named_so_by_the_device_queries_and_the_driver_calls() -> None:
    done = python(
        "from fi_ffi.cuda import device, runtime\n"
        "from fi_ffi.errors import UnsupportedDeviceError\n"
        "try:\n    device.properties(0)\nexcept UnsupportedDeviceError as exc:\n    print('DEVICE', exc)\n"
        "print('DRIVER', runtime.no_driver('cuEventRecord'))\n"
    )
    assert done.returncode == 0, done.stderr
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines())
    assert "no NVIDIA driver found" in lines["DEVICE"] and "Install the NVIDIA driver" in lines["DEVICE"]
    assert lines["DRIVER"].startswith("cuEventRecord failed: no NVIDIA driver found (libcuda.so.1")


@needs_gcc
def test_a_driver_older_than_the_runtime_says_both_versions_and_the_driver_needed(tmp_path: Path) -> None:
    # CUDA 11.8: older than cuda-bindings' runtime whatever its release (12.9 in the lowest-versions run, 13.x else)
    major = bindings_major()
    smoke = fi_ffi("smoke", library_path=old_driver(tmp_path, 11080))
    first = smoke.stdout.splitlines()[0]
    assert smoke.returncode == 1 and "Traceback" not in smoke.stderr
    assert "cudaErrorInsufficientDriver: the NVIDIA driver (CUDA 11.8) is older than this runtime" in first, first
    assert "runs CUDA up to 11.8 (cuDriverGetVersion 11080)" in first
    minimum = requirements.MIN_DRIVER[major].split(".")[0]
    assert f"needs CUDA {major}, that is a driver >= {minimum}. Upgrade the driver to {minimum} or newer" in first
    assert "use the CUDA 12 build" not in first  # a CUDA 11 driver runs neither build


@needs_gcc
def test_a_cuda_12_driver_is_shown_the_cuda_12_build(tmp_path: Path) -> None:
    if bindings_major() < 13:
        pytest.skip("cuda-bindings 12.x here: its runtime runs on a CUDA 12.8 driver")
    folder = old_driver(tmp_path, 12080)
    smoke = fi_ffi("smoke", library_path=folder)
    first = smoke.stdout.splitlines()[0]
    assert "runs CUDA up to 12.8 (cuDriverGetVersion 12080)" in first and "driver >= 580" in first, first
    arch = "aarch64" if "aarch64" in first else "x86_64"
    wheel = f"flashinfer_jit_cache-0.6.3+cu129-cp39-abi3-manylinux_2_28_{arch}.whl"
    assert f"`fi-ffi lock {wheel} > cu12.lock` and `export FI_FFI_LOCK=$PWD/cu12.lock`" in first
    assert "`pip install 'cuda-bindings>=12.9,<13' nvidia-cuda-runtime-cu12`" in first
    doctor = fi_ffi("doctor", library_path=folder).stdout
    assert "NVIDIA driver:  runs CUDA builds up to 12.8 (cuDriverGetVersion 12080)" in doctor
    assert re.search(r"CUDA builds:    the driver runs CUDA <= 12\.8; the lock selects CUDA 13\.\d kernels", doctor)
    problems = [line for line in doctor.splitlines() if line.startswith("  PROBLEM:      ")]
    assert any("the selected CUDA 13." in p and "use the CUDA 12 build" in p for p in problems), problems
    assert any("cuda-bindings 13." in p for p in problems), problems


@needs_gcc
def test_with_the_cuda_12_lock_only_cuda_bindings_is_left_to_change(tmp_path: Path) -> None:
    wheel = find_wheel_cu12()
    if wheel is None:
        pytest.skip("needs ../shared/wheels-cu12")
    if bindings_major() < 13:
        pytest.skip("cuda-bindings 12.x here: nothing is left to change")
    lock = tmp_path / "cu12.lock"
    made = fi_ffi("lock", str(wheel))
    assert made.returncode == 0, made.stderr
    lock.write_text(made.stdout)
    doctor = fi_ffi("doctor", library_path=old_driver(tmp_path, 12080), FI_FFI_LOCK=str(lock)).stdout
    assert "the lock selects CUDA 12.4 kernels (libcudart.so.12: the lock " in doctor, doctor
    problems = [line for line in doctor.splitlines() if line.startswith("  PROBLEM:      ")]
    # the CUDA 12.4 kernels run on the 12.8 driver; cuda-bindings 13's runtime does not: its way out only
    assert len(problems) == 1 and "cuda-bindings 13." in problems[0], problems
    assert "`pip install 'cuda-bindings>=12.9,<13'` (the lock already selects CUDA 12 kernels)" in problems[0]
    assert "fi-ffi lock" not in problems[0]
