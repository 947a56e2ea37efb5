"""The suite runs on FlashInfer's own prebuilt ``flashinfer-jit-cache`` wheel: ``FI_FFI_TEST_WHEELS``
may name that wheel (or its folder); the tests of the modules it holds run, and a test stopped by a module it lacks
is a skip naming the module. Proved on CPU with a stand-in: the shared wheel's ``norm`` module re-packed alone into a
wheel of the upstream file name and layout (``flashinfer_jit_cache/jit_cache/<uri>/<uri>.so``, the loader's default
prefix), then a real pytest run of the suite's norm and rope tests in a subprocess."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from helpers.env import REPO, subprocess_env
from helpers.wheels import build_wheel

from fi_ffi.loader.lockfile import DEFAULT_PREFIX

UPSTREAM_NAME = "flashinfer_jit_cache-0.6.3+cu130-cp39-abi3-manylinux_2_28_x86_64.whl"


# the child runs the norm module's CPU-only signature test, which skips on a GPU machine
pytestmark = pytest.mark.cpu_only


def repack(shared_wheel: Path, folder: Path, uris: list[str]) -> Path:
    """A wheel named as upstream's, holding ``uris`` of ``shared_wheel`` at the upstream layout."""
    with zipfile.ZipFile(shared_wheel) as zf:
        members = {f"{DEFAULT_PREFIX}/{u}/{u}.so": zf.read(f"{DEFAULT_PREFIX}/{u}/{u}.so") for u in uris}
    members["flashinfer_jit_cache/__init__.py"] = b'__version__ = "0.6.3"\n'
    return build_wheel(folder / UPSTREAM_NAME, members)


def run_suite(wheel_setting: str, tmp_path: Path, *tests: str) -> subprocess.CompletedProcess[str]:
    env = subprocess_env(
        FI_FFI_TEST_WHEELS=wheel_setting,
        FI_FFI_TEST_WHEELS_MODELS=str(tmp_path / "none"),
        FI_FFI_LOCK="",
        FI_FFI_WHEELHOUSE="",
    )
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *tests],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
        env=env,
    )


def test_a_jit_cache_wheel_serves_the_modules_it_holds_and_skips_the_rest(shared_wheel: Path, tmp_path: Path) -> None:
    wheel = repack(shared_wheel, tmp_path / "dl", ["norm"])
    (tmp_path / "dl" / "flashinfer_jit_cache_ext-0.6.3+cu130-cp39-abi3-linux_x86_64.whl").write_bytes(b"not read")
    done = run_suite(
        str(wheel),
        tmp_path,
        "tests/ops/test_norm.py::test_signature_of_real_module_matches_our_wire_layout",
        "tests/ops/test_rope.py::test_fused_qkv_slices_in_place_reach_the_kernel",
    )
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    if "libcudart is not available" in out:  # the norm tests need the CUDA runtime library to load the module
        assert "passed" not in out.splitlines()[-1]
        return
    assert " passed" in out.splitlines()[-1] and " skipped" in out.splitlines()[-1], out
    assert "the test wheel FI_FFI_TEST_WHEELS names holds no such module: no kernel module 'rope'" in out, out


def test_the_folder_of_a_jit_cache_wheel_serves_too(shared_wheel: Path, tmp_path: Path) -> None:
    repack(shared_wheel, tmp_path / "dl", ["norm"])
    done = run_suite(
        str(tmp_path / "dl"), tmp_path, "tests/ops/test_norm.py::test_signature_of_real_module_matches_our_wire_layout"
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "skipped" not in done.stdout.splitlines()[-1] or "libcudart" in done.stdout, done.stdout
