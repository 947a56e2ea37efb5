"""Multi-GPU tests of fi_ffi.comm (FI_FFI_RUN_GPU_TESTS=1; 2 and 4 GPUs of one host, skipped with fewer).

Each test starts one process per GPU with ``fi-ffi launch`` (which also turns NVLink multicast off in every rank)
running tests/helpers/comm_worker.py, and passes when every rank exits 0. The ranks compare each kernel with NCCL's
all-reduce of the same data (bfloat16, float16, float32; 1 token of 4096 to 64 MiB; odd token counts), the fused
patterns with all-reduce + add + RMSNorm in float32, and replays of captured CUDA graphs. The ranks pin the comm
test wheel with a lock of their own (``FI_FFI_TEST_WHEELS_COMM``, ``../shared/wheels-comm`` or the
``flashinfer_jit_cache_comm-*.whl`` beside ``$FI_FFI_TEST_WHEELS``).
"""

from __future__ import annotations

import os
import re
import subprocess

import pytest
from helpers.subprocess_run import comm_wheel, gpu_count, launched, multicast_off, wheels_env, worker

multicast_off()

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(os.environ.get("FI_FFI_RUN_GPU_TESTS") != "1", reason="GPU tests need FI_FFI_RUN_GPU_TESTS=1"),
]


@pytest.fixture(scope="module")
def comm_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    wheel = comm_wheel()
    if wheel is None:
        pytest.skip("needs the comm test wheel flashinfer_jit_cache_comm-*.whl (FI_FFI_TEST_WHEELS_COMM)")
    return wheels_env(tmp_path_factory.mktemp("comm_lock") / "comm.lock", [wheel])


def _run(n: int, scenarios: list[str], env: dict[str, str], timeout: float = 540) -> str:
    if gpu_count() < n:
        pytest.skip(f"needs {n} GPUs, found {gpu_count()}")
    done = subprocess.run(
        launched(n, worker("comm_worker", *scenarios)),
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    # the ranks' FAIL lines (with their numbers) first: the tail alone is mostly kernel logging
    fails = [line for line in done.stdout.splitlines() if "FAIL" in line]
    out = "\n".join(fails)[:12000] + "\n...\n" + (done.stdout + done.stderr)[-4000:]
    assert done.returncode == 0, out
    oks = {int(rank) for rank in re.findall(r"rank (\d+) OK \d+ checks", done.stdout)}
    assert oks == set(range(n)), out
    assert not fails, out
    return done.stdout


@pytest.mark.parametrize("n", [2, 4])
def test_nccl_communicator(comm_env: dict[str, str], n: int) -> None:
    _run(n, ["nccl"], comm_env, timeout=180)


@pytest.mark.parametrize("n", [2, 4])
def test_custom_all_reduce_against_nccl_with_graph_replay(comm_env: dict[str, str], n: int) -> None:
    _run(n, ["custom"], comm_env)


@pytest.mark.parametrize("n", [2, 4])
def test_fused_all_reduce_patterns_against_float32_references(comm_env: dict[str, str], n: int) -> None:
    _run(n, ["fusion"], comm_env)


@pytest.mark.parametrize("n", [2, 4])
def test_moe_finalize_and_reduction_all_reduce(comm_env: dict[str, str], n: int) -> None:
    _run(n, ["moe_finalize", "moe_reduction"], comm_env, timeout=240)
