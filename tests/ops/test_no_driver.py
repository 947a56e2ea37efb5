"""Every op family and plan says "no NVIDIA driver found" on a machine without a driver, before any download.

Each call runs in a child process, where the driver check of :mod:`fi_ffi.launch.kernels` is not passed (the test
session passes it so that the other CPU tests reach the real modules): once with no ``libcuda.so.1`` at all, once
with ``../shared/stubs/libcuda.so.1`` loaded first (a stand-in that loads but answers neither
``cuDriverGetVersion`` nor ``cuInit``), each with the session's lock of the shared test wheels and with no lock
at all (a plain clone: the packaged lock's upstream wheels, nothing cached, offline). Before the check, the
first gave a network error (the download of the upstream wheel) or, with the wheels at hand, the module's own
"cudaErrorInsufficientDriver".
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.env import REPO, subprocess_env

from fi_ffi.cuda import driver

STUB = REPO.parent / "shared" / "stubs" / "libcuda.so.1"

pytestmark = [
    pytest.mark.cpu_only,
    pytest.mark.skipif(driver.probe().found, reason="needs a machine without an NVIDIA driver"),
]

# One call per family, with valid arguments over fake cuda:0 descriptors: each stops at the driver check.
CALLS = {
    "norm": "fi_ffi.rmsnorm(f16(4, 128), f16(128), 1e-6, out=f16(4, 128))",
    "activation": "fi_ffi.silu_and_mul(f16(4, 256), out=f16(4, 128))",
    "rope": "fi_ffi.apply_rope_pos_ids(f16(4, 8, 64), f16(4, 2, 64), i32(4), q_rope=f16(4, 8, 64), "
    "k_rope=f16(4, 2, 64))",
    "sampling": "fi_ffi.sampling_from_probs(fake_cuda((4, 64), 'float32'), out=i32(4))",
    "cascade": "fi_ffi.merge_state(f16(4, 8, 128), f32(4, 8), f16(4, 8, 128), f32(4, 8), v_merged=f16(4, 8, 128), "
    "s_merged=f32(4, 8))",
    "decode plan": "fi_ffi.batch_decode_plan(host([0, 1]), host([0]), host([1]), 32, 8, 128, 16, "
    "workspace=workspace())",
    "prefill plan": "fi_ffi.batch_prefill_paged_plan(host([0, 1]), host([0, 1]), host([0]), host([1]), 32, 8, 128, "
    "16, workspace=workspace())",
    "single prefill": "fi_ffi.single_prefill(f16(4, 32, 128), f16(4, 8, 128), f16(4, 8, 128), out=f16(4, 32, 128))",
    "topk": "fi_ffi.top_k(f32(4, 256), 8, values=f32(4, 8), indices=i32(4, 8), row_states_buffer=u8(1 << 20))",
    "mla plan": "fi_ffi.batch_mla_plan(host([0, 1]), host([0, 1]), host([0]), host([1]), 16, 512, 64, 1, True, 0.1, "
    "workspace=workspace())",
    "fp8 gemm (cuBLASLt)": "fi_ffi.bmm_fp8(fake_cuda((1, 16, 32), 'float8_e4m3fn'), fake_cuda((1, 32, 16), "
    "'float8_e4m3fn', strides=(512, 1, 32)), f32(1), f32(1), 'bfloat16', bf16(1, 16, 16), "
    "workspace_buffer=u8(1 << 22))",
    "gemm": "fi_ffi.segment_gemm(workspace=workspace(), x=bf16(11, 64), weights=bf16(4, 128, 64), batch_size=5, "
    "weight_column_major=True, out=bf16(11, 128), seg_indptr=host([0, 3, 3, 10, 11, 11]), "
    "weight_indices=[0, 1, 2, 3, 0])",
}

CHILD = """
import sys
from fi_ffi.loader import libraries
if {stub!r}:
    libraries.load_library({stub!r}, global_symbols=True)  # before anything asks for libcuda.so.1
import fi_ffi
from helpers.attention_plans import host, workspace
from helpers.fakes import fake_cuda
def f16(*shape): return fake_cuda(shape, 'float16')
def bf16(*shape): return fake_cuda(shape, 'bfloat16')
def f32(*shape): return fake_cuda(shape, 'float32')
def i32(*shape): return fake_cuda(shape, 'int32')
def u8(*shape): return fake_cuda(shape, 'uint8')
for name, call in {calls!r}.items():
    try:
        eval(call)
    except Exception as exc:
        print(name, '|', type(exc).__name__, '|', exc)
    else:
        print(name, '| returned')
"""


def run_calls(stub: Path | None, lock: bool, cache: Path) -> dict[str, str]:
    env = subprocess_env(FI_FFI_CACHE_DIR=str(cache), FI_FFI_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "tests"), env["PYTHONPATH"]])
    if not lock:  # a plain clone: the packaged lock and nothing at hand
        for name in ("FI_FFI_LOCK", "FI_FFI_WHEELHOUSE"):
            env.pop(name, None)
    code = CHILD.format(stub=str(stub) if stub else "", calls=CALLS)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = dict(line.split(" | ", 1) for line in done.stdout.splitlines() if " | " in line)
    assert set(lines) == set(CALLS), done.stdout
    return lines


@pytest.mark.parametrize("lock", [True, False], ids=["shared-wheels", "plain-clone"])
@pytest.mark.parametrize("stand_in", [False, True], ids=["no-libcuda", "stand-in-libcuda"])
def test_every_op_family_says_no_driver_before_any_download(stand_in: bool, lock: bool, tmp_path: Path) -> None:
    if stand_in and not STUB.is_file():
        pytest.skip(f"needs the stand-in driver library {STUB} (../shared/stubs)")
    if lock and not os.environ.get("FI_FFI_LOCK"):
        pytest.skip("needs the session lock of the shared test wheels (../shared/wheels)")
    cache = tmp_path / "cache"
    lines = run_calls(STUB if stand_in else None, lock, cache)
    cause = "a stand-in library, not the driver" if stand_in else "libcuda.so.1: cannot open shared object file"
    for name, text in lines.items():
        assert "no NVIDIA driver found (" in text and cause in text, f"{name}: {text}"
        assert "Install the NVIDIA driver (>= 580" in text, f"{name}: {text}"
        assert "CudaError" in text or "UnsupportedDeviceError" in text, f"{name}: {text}"
        assert "insufficient" not in text.replace("cudaErrorInsufficientDriver", ""), f"{name}: {text}"
        for other in ("FetchError", "offline", "network", "download"):
            assert other not in text, f"{name}: {text}"
    # nothing fetched or extracted on the way: the cache holds no wheel and no module
    assert not [p for p in cache.rglob("*") if p.suffix in (".whl", ".so")]


def test_the_driver_check_costs_nothing_once_a_driver_was_found(monkeypatch: pytest.MonkeyPatch) -> None:
    from fi_ffi.errors import CudaError
    from fi_ffi.launch import kernels

    monkeypatch.setattr(kernels, "_driver_found", False)
    with pytest.raises(CudaError, match=r"^norm\.rmsnorm failed: no NVIDIA driver found"):
        kernels.require_driver("norm.rmsnorm")
    monkeypatch.setattr(kernels, "_driver_found", True)  # as after a first call on a GPU machine
    kernels.require_driver("norm.rmsnorm")  # the flag alone answers: no probe, no error
