"""The CPU proxies of the host time (benchmarks/bench_step_cpu.py, bench_op_calls_cpu.py,
bench_serving_host_cpu.py) still run on a machine without a GPU: each script, a few calls a round, prints its rows
with a positive time. Nothing here is timed; the figures come from the scripts run by hand (benchmarks/RESULTS.md).
Without this, a check added to the ops (the attention ops' "no NVIDIA driver" test, say) or a change of the engine's
parts could stop a proxy and nobody would know until the next measurement.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_benchmark(shared_wheel: Path, script: str, *args: str) -> str:
    """The script's output; fails the test with its stderr where it exits non-zero."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FI_FFI_")}  # the script names its own lock
    env |= {"FI_FFI_TEST_WHEELS": str(shared_wheel.parent), "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def microseconds(output: str, row: str) -> float:
    found = re.search(rf"^\s*{re.escape(row)}\s+([0-9.]+)", output, re.MULTILINE)
    assert found, f"no row {row!r} in:\n{output}"
    return float(found.group(1))


@pytest.mark.usefixtures("kernel_modules")
def test_the_decode_step_proxy_runs_without_a_gpu(shared_wheel: Path) -> None:
    # best of 5 rounds: the run rows are a step's runs less a plan timed apart, which one round under load can make
    # negative (a CI run printed -0.25 us for prepared run(plan))
    out = run_benchmark(shared_wheel, "bench_step_cpu.py", "--steps", "2", "--rounds", "5")
    for row in ("this tree", "floor", "packed run", "packed", "batch_decode_run", "prepared run(plan)"):
        assert microseconds(out, row) > 0


@pytest.mark.usefixtures("kernel_modules")
def test_the_single_call_proxy_runs_without_a_gpu(shared_wheel: Path) -> None:
    out = run_benchmark(shared_wheel, "bench_op_calls_cpu.py", "--calls", "20", "--rounds", "1")
    for row in ("rmsnorm", "fused_add_rmsnorm", "append_paged_kv_cache", "prepared rmsnorm", "prepared append"):
        assert microseconds(out, row) > 0


def test_the_serving_step_proxy_runs_without_a_gpu(shared_wheel: Path) -> None:
    # (more steps than one request's tokens: requests end and are replaced in it)
    out = run_benchmark(shared_wheel, "bench_serving_host_cpu.py", "--batch", "4", "--steps", "40", "--rounds", "1",
                        "--max-tokens", "8", "--prompt-len", "20")  # fmt: skip
    for row in ("this step()", "this sync to launch"):
        assert microseconds(out, row) > 0
