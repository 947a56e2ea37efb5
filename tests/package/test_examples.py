"""The examples as a new user runs them (subprocess): the CPU example works on any machine, and each GPU example
says what it needs and exits 2 on a machine without a GPU (or torch), never with a traceback."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.env import REPO, subprocess_env

from fi_ffi.cuda import system

EXAMPLES = sorted((REPO / "examples").glob("*.py"))
NO_GPU = pytest.mark.skipif(bool(system.gpus()[0]), reason="needs a machine without a GPU (CI has none)")


def run(name: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(REPO / "examples" / name)],
        capture_output=True,
        text=True,
        timeout=300,
        env=subprocess_env(),
    )


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_each_example_says_what_it_needs(path) -> None:  # type: ignore[no-untyped-def]
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    assert "Needs:" in doc, f"{path.name}: the docstring does not say what the example needs"


def test_the_cpu_example_refuses_every_bad_call_by_name() -> None:
    done = run("argument_checks_cpu.py")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "7 of 7 bad calls refused before any kernel was looked for" in done.stdout
    assert "weight: expected shape (128,)" in done.stdout and "out: data pointer is NULL" in done.stdout
    assert "Traceback" not in done.stderr


@NO_GPU
@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("rmsnorm_cuda_python.py", "needs an NVIDIA GPU and its driver"),
        ("decode_loop_cuda_python.py", "needs an NVIDIA GPU and its driver"),
        ("rmsnorm_torch.py", "needs torch"),
    ],
)
def test_gpu_examples_say_what_is_missing(name: str, message: str) -> None:
    done = run(name)
    assert done.returncode == 2, done.stdout + done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr
    from fi_ffi.cuda import driver

    if name.endswith("_cuda_python.py") and not driver.probe().found:  # the driver's absence named, with the fix
        assert "no NVIDIA driver found (libcuda.so.1" in done.stderr and "Install the NVIDIA driver" in done.stderr
    if name.endswith("_cuda_python.py"):  # short lines, `fi-ffi doctor` named once (it was twice on one long line)
        assert all(len(line) <= 100 for line in done.stderr.splitlines()), done.stderr
        assert done.stderr.count("fi-ffi doctor") == 1, done.stderr


def doc_section(path: str, heading: str, next_heading: str) -> str:
    """The text of the repository file ``path`` from ``heading`` to the next ``next_heading``."""
    return (REPO / path).read_text().split(heading, 1)[1].split(next_heading, 1)[0]


def run_first_block(section: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """The first ```python block of ``section`` run as a script, with a cache of its own under ``tmp_path``."""
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env=subprocess_env(FI_FFI_CACHE_DIR=str(tmp_path / "cache")),
    )


def test_the_porting_guides_cpu_check_of_a_plan_runs_as_written(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # docs/porting.md, "Checking a port on a machine without a GPU": the plan's own check refuses the bad call, and
    # the good one goes as far as a machine without a driver lets it (it said nothing of from_buffers before)
    section = doc_section("docs/porting.md", "## Checking a port on a machine without a GPU", "\n## ")
    assert "Workspace.from_buffers" in section and "Workspace.allocate" in section
    done = run_first_block(section, tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "ValueError num_qo_heads: num_qo_heads must be a multiple of num_kv_heads (7), got 32"
    from fi_ffi.cuda import driver

    if not driver.probe().found:
        assert lines[1].startswith("CudaError choosing an attention module failed: no NVIDIA driver found"), lines


def test_the_readmes_raw_pointer_example_says_what_is_missing_without_a_gpu(tmp_path: Path) -> None:
    # README.md, "Raw pointers and cuda-python", run as written on a machine without a driver: it says that it needs
    # a GPU, why there is none and the fix, and exits 2 as the examples do (it ended in a traceback from its own
    # check() at the first CUDA call before)
    if system.gpus()[0]:
        pytest.skip("needs a machine without a GPU (CI has none)")
    done = run_first_block(doc_section("README.md", "### Raw pointers and cuda-python", "\n### "), tmp_path)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""
    lines = done.stderr.splitlines()
    assert lines[0] == "this example needs an NVIDIA GPU and its driver, and none is usable here:", lines
    assert all(len(line) <= 100 for line in lines), lines  # wrapped, not one long line
    assert done.stderr.count("fi-ffi doctor") == 1, done.stderr  # said once


def test_the_readmes_serve_snippet_waits_for_the_server_before_querying_it() -> None:
    # README.md, "Serving it": the server starts in the background, so a request right after it would meet a port
    # nobody listens on yet (the model takes seconds to load); the snippet waits on /health first
    block = doc_section("README.md", "### Serving it", "\n## ").split("```bash\n", 1)[1].split("```", 1)[0]
    lines = block.splitlines()
    started = next(i for i, line in enumerate(lines) if "fi-engine serve" in line)
    assert lines[started].rstrip().endswith("&"), lines[started]
    waits = next(i for i, line in enumerate(lines) if "/health" in line)
    assert "--retry-connrefused" in lines[waits] or lines[waits].startswith("until "), lines[waits]
    first_query = next(i for i, line in enumerate(lines) if "/v1/" in line)
    assert started < waits < first_query, block
