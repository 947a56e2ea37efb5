"""fi_ffi and the tvm_ffi Python package in one process, in either import order, and the DLPack allocator
decision (no in-scope kernel allocates through TVM-FFI, so fi_ffi registers none)."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from helpers.env import subprocess_env

pytest.importorskip("tvm_ffi")

BOTH = r"""
import json, os, sys
order = sys.argv[1]
if order == "tvm_ffi_first":
    import tvm_ffi
import fi_ffi
from fi_ffi import loader
from fi_ffi.loader import dl
from fi_ffi.abi.call import Function
from fi_ffi.launch import kernels
from fi_ffi.launch.kernels import entry_point
kernels._driver_found = True  # no driver here: read the signatures as the test session does
lib = loader.runtime_library()
dl.open_library(os.path.join(os.path.dirname(lib), "libtvm_ffi_testing.so"), dl.RTLD_NOW | dl.RTLD_GLOBAL)
if order == "fi_ffi_first":
    import tvm_ffi
ours = Function.global_function("testing.echo")
theirs = tvm_ffi.get_global_func("testing.echo")
arr = Function.global_function("ffi.Array")(1, 2, 3)
norm_path = str(loader.module_path("norm"))
sig = entry_point("norm", "rmsnorm").signature_text()
try:
    tvm_ffi.load_module(norm_path).rmsnorm()
    theirs_sig = ""
except Exception as e:
    theirs_sig = str(e)
print(json.dumps({
    "ours": ours("fi_ffi"), "theirs": theirs("tvm_ffi"), "add_one": tvm_ffi.get_global_func("testing.add_one")(41),
    "array": arr.to_list(), "maps": dl.loaded_paths("libtvm_ffi.so"), "sig": sig, "theirs_sig": theirs_sig,
}))
"""


@pytest.mark.parametrize("order", ["tvm_ffi_first", "fi_ffi_first"])
def test_fi_ffi_and_tvm_ffi_work_side_by_side(order: str, kernel_modules: list[str]) -> None:
    done = subprocess.run(
        [sys.executable, "-c", BOTH, order], capture_output=True, text=True, timeout=120, env=subprocess_env()
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["ours"] == "fi_ffi" and out["theirs"] == "tvm_ffi" and out["add_one"] == 42
    assert out["array"] == [1, 2, 3]
    assert len(out["maps"]) == 1  # one libtvm_ffi.so in the process
    assert "rmsnorm(0: DLTensor*" in out["sig"]
    assert "rmsnorm(0: DLTensor*" in out["theirs_sig"]  # tvm_ffi calls the very module fi_ffi loaded


def test_no_in_scope_kernel_module_allocates_through_tvm_ffi(shared_wheel: Path) -> None:
    # A module that allocated output tensors would import TVMFFIEnvTensorAlloc, and fi_ffi would then have to
    # register a DLPack allocator. The symbol name would sit in the module's dynamic string table.
    with zipfile.ZipFile(shared_wheel) as wheel:
        modules = [n for n in wheel.namelist() if n.endswith(".so")]
        assert len(modules) == 21
        for name in modules:
            data = wheel.read(name)
            assert b"TVMFFIEnvGetStream" in data, name  # the check can see imports at all
            assert b"TVMFFIEnvTensorAlloc" not in data, name
