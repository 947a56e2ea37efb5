"""The engine's releasing add-norm and SiLU-and-mul (:mod:`fi_engine.kernels.release_rows`) on the CPU.

- The add-norm's block is FlashInfer's (``norm_threads``): 32 times ``ceil(min(1024, k / 8) / 32)`` threads, so
  ``rows_rcp`` sums in FlashInfer's partition.
- With NVRTC installed (skipped, saying so, without it): each kernel, compiled as the engine compiles it
  (``--use_fast_math``, sm_90), releases the next launch (``griddepcontrol.launch_dependents``) before it waits for
  the one before (``griddepcontrol.wait``), and reads nothing of its rows before that wait: the PTX's first global
  load comes after it.
- ``ModelRunner.release_rows`` is on by default (the step measured it faster; the GPU tests prove the values).
"""

from __future__ import annotations

import re

import pytest

from fi_engine.kernels.cuda_sources import source
from fi_engine.kernels.release_rows import RELEASE_KERNELS, norm_threads
from fi_engine.runtime.worker.model_runner import ModelRunner


def ptx(program: str, options: tuple[str, ...]) -> str | None:
    """``program`` compiled to PTX for sm_90 by NVRTC, or None where NVRTC is not installed."""
    try:
        from cuda.bindings import nvrtc
    except ImportError:
        return None
    try:
        err, prog = nvrtc.nvrtcCreateProgram(program.encode(), b"release_rows.cu", 0, [], [])
    except RuntimeError:  # (cuda-bindings without libnvrtc: "Failure finding libnvrtc.so")
        return None
    opts = [b"-arch=sm_90", b"-std=c++17", *(o.encode() for o in options)]
    (err,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
    assert err == nvrtc.nvrtcResult.NVRTC_SUCCESS, err
    _, size = nvrtc.nvrtcGetPTXSize(prog)
    text = b" " * size
    nvrtc.nvrtcGetPTX(prog, text)
    return text.decode().rstrip("\0 ")


@pytest.mark.parametrize(("k", "threads"), [(8, 32), (576, 96), (2048, 256), (4096, 512), (8192, 1024), (12288, 1024)])
def test_the_add_norms_block_is_flashinfers(k: int, threads: int) -> None:
    assert norm_threads(k) == threads


def test_each_kernel_releases_the_next_before_it_waits_and_reads_after() -> None:
    text = ptx(source("release_rows.cu"), ("--use_fast_math",))
    if text is None:
        pytest.skip("NVRTC is not installed (python -m pip install nvidia-cuda-nvrtc)")
    names = [n for pair in RELEASE_KERNELS.values() for n in pair]
    bodies = dict(re.findall(r"\.entry (\w+)\((.*?)\n}\n", text, re.DOTALL))
    assert sorted(bodies) == sorted(names)
    for name in names:
        body = bodies[name]
        release, wait = body.find("griddepcontrol.launch_dependents"), body.find("griddepcontrol.wait")
        first_load = body.find("ld.global")
        assert 0 <= release < wait, name
        assert first_load > wait, name


def test_the_runner_takes_the_releasing_launches_by_default() -> None:
    assert ModelRunner.release_rows is True
