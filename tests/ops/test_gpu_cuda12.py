"""The CUDA 12 kernel wheel on a real GPU (gated by FI_FFI_RUN_GPU_TESTS=1): with only FlashInfer 0.6.3's CUDA 12.4
build pinned (``../shared/wheels-cu12``, staged as ``$FI_FFI_TEST_WHEELS_CU12``), fi_ffi loads ``libcudart.so.12``
(pip's ``nvidia-cuda-runtime-cu12``) instead of ``.so.13`` and every op the wheel holds (RMSNorm, fused add +
RMSNorm, paged KV append, single/batch decode, single prefill, FA2 batch prefill; f16, head_dim 128) matches a
float32 numpy reference within 5e-3.

Runs in a child process (:mod:`helpers.cuda12_worker`): the session's kernel modules use CUDA 13's runtime, and one
process maps one runtime for fi_ffi's modules. The GPU machine's driver runs CUDA 13, which also runs CUDA 12 builds.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.env import subprocess_env
from helpers.subprocess_run import worker
from helpers.wheels import CU12_MISSING, find_wheel_cu12

if os.environ.get("FI_FFI_RUN_GPU_TESTS") != "1":
    pytest.skip("GPU tests run only with FI_FFI_RUN_GPU_TESTS=1 on a CUDA machine", allow_module_level=True)

pytestmark = pytest.mark.gpu

MODULES = {
    "norm",
    "page",
    "single_decode_with_kv_cache_dtype_q_f16_dtype_kv_f16_dtype_o_f16_head_dim_qk_128_head_dim_vo_128_posenc_0"
    "_use_swa_False_use_logits_cap_False",
    "batch_decode_with_kv_cache_dtype_q_f16_dtype_kv_f16_dtype_o_f16_dtype_idx_i32_head_dim_qk_128_head_dim_vo_128"
    "_posenc_0_use_swa_False_use_logits_cap_False",
    "single_prefill_with_kv_cache_dtype_q_f16_dtype_kv_f16_dtype_o_f16_head_dim_qk_128_head_dim_vo_128_posenc_0"
    "_use_swa_False_use_logits_cap_False_f16qk_False",
    "batch_prefill_with_kv_cache_dtype_q_f16_dtype_kv_f16_dtype_o_f16_dtype_idx_i32_head_dim_qk_128_head_dim_vo_128"
    "_posenc_0_use_swa_False_use_logits_cap_False_f16qk_False",
}


def test_cuda_12_wheel_runs_every_op_it_holds_with_libcudart_12(tmp_path: Path) -> None:
    wheel = find_wheel_cu12()
    if wheel is None:
        pytest.skip(CU12_MISSING)
    made = subprocess.run(
        [sys.executable, "-m", "fi_ffi", "lock", str(wheel)],
        capture_output=True,
        text=True,
        timeout=120,
        env=subprocess_env(),
    )
    assert made.returncode == 0, made.stderr
    lock = tmp_path / "cu12.lock"
    lock.write_text(made.stdout)
    env = subprocess_env(
        FI_FFI_LOCK=str(lock),
        FI_FFI_WHEELHOUSE=str(wheel.parent),
        FI_FFI_CACHE_DIR=str(tmp_path / "cache"),
        FI_FFI_OFFLINE="1",
        FI_FFI_QUIET="1",
        FI_FFI_USE_INSTALLED="0",
        FI_FFI_CUDA_VERSION="",
    )
    done = subprocess.run(worker("cuda12_worker"), capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert re.search(r"/libcudart\.so\.12(\.[0-9.]+)?$", out["cudart"]), out["cudart"]
    assert out["mapped13"] == [], out["mapped13"]  # fi_ffi loaded CUDA 12's runtime only
    assert out["kernels"] == [[wheel.name, "12.4"]]
    assert set(out["modules"]) >= MODULES, sorted(MODULES - set(out["modules"]))
    for r in out["results"]:
        print(f"{'PASS' if r['passed'] else 'FAIL'}  {r['name']:55s} max|err| {r['max_error']:.2e}")
    assert len(out["results"]) == 7
    failed = [r for r in out["results"] if not r["passed"]]
    assert not failed, failed
