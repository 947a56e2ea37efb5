"""The engine's releasing add-norm and SiLU-and-mul (:mod:`fi_engine.kernels.release_rows`) on the CPU.

- The add-norm's block is FlashInfer's (``norm_threads``): 32 times ``ceil(min(1024, k / 8) / 32)`` threads, so
  ``rows_rcp`` sums in FlashInfer's partition.
- With NVRTC installed (skipped, saying so, without it): each kernel, compiled as the engine compiles it
  (``--use_fast_math``, sm_90), releases the next launch (``griddepcontrol.launch_dependents``) before it waits for
  the one before (``griddepcontrol.wait``), and reads nothing of its rows before that wait: the PTX's first global
  load comes after it.
- ``ModelRunner.release_rows`` is on by default (the step measured it faster; the GPU tests prove the values).
- Packing, over a real ``Launcher`` whose ``cuLaunchKernel`` records (fake kernel handles): a good call launches the
  add-norm on one block a row of FlashInfer's threads and the SiLU on blocks of 256 threads, 2,048 columns each, with
  the arguments in the kernel's order (``eps`` as its float32 bits); every bad argument raises TypeError/ValueError
  naming it (no int, out of range, NULL, misaligned, a stride short of a row, rows past the address space, operands
  that overlap, ``bf16`` no bool, ``eps`` no finite float) and launches nothing.
- The runner falls back to FlashInfer's launches (``releasing_rows`` None) where the launcher has no programmatic
  dependent launch, and where the kernels do not compile (saying why, trying once).
"""

from __future__ import annotations

import re
import struct
from types import SimpleNamespace
from typing import Any

import pytest

from fi_engine.kernels import release_rows
from fi_engine.kernels.cuda_sources import source
from fi_engine.kernels.launch import Launcher
from fi_engine.kernels.release_rows import RELEASE_KERNELS, ReleasingRows, norm_threads
from fi_engine.runtime.worker.model_runner import ModelRunner
from fi_ffi.cuda import driver

BASE = 1 << 40  # fake device addresses, never dereferenced


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


def fake_rows() -> tuple[ReleasingRows, list[tuple[Any, ...]]]:
    """A ReleasingRows over a real Launcher whose cuLaunchKernel records its calls (fake kernel handles: the add-norm
    0x100 + bf16, the SiLU 0x200 + bf16), and the record."""
    launches: list[tuple[Any, ...]] = []

    def launch(*args: Any) -> int:
        launches.append(args)
        return 0

    rr = ReleasingRows.__new__(ReleasingRows)
    rr._launcher = Launcher(0x77, launch, None, driver.ffi())
    rr.packed = {"add_rmsnorm": 0, "silu_mul": 0}
    rr._fns = {bf16: (0x100 + bf16, 0x200 + bf16) for bf16 in (False, True)}
    return rr, launches


def launched_args(call: tuple[Any, ...], count: int) -> list[int]:
    """The first ``count`` kernel arguments of a recorded ``cuLaunchKernel`` call, each its 8-byte slot."""
    params = call[9]
    ffi = driver.ffi()
    return [int(ffi.cast("uint64_t *", params[i])[0]) for i in range(count)]


def test_a_good_call_launches_the_kernels_on_their_grids_with_their_arguments() -> None:
    rr, launches = fake_rows()
    norm = rr.prepared_add_rmsnorm(32, BASE, BASE + (1 << 30), BASE + (2 << 30), 4096, 4096, 4096, 1e-5, True)
    norm()  # (kept: the packed arguments live as long as the launch)
    fn, gx, gy, gz, bx, by, bz, smem, stream = launches[-1][:9]
    assert (fn, gx, gy, gz, bx, by, bz, smem, stream) == (0x101, 32, 1, 1, 512, 1, 1, 0, 0x77)
    eps_bits = struct.unpack("<I", struct.pack("<f", 1e-5))[0]
    assert launched_args(launches[-1], 7) == [BASE, BASE + (1 << 30), BASE + (2 << 30), 4096, 4096, 4096, eps_bits]
    silu = rr.prepared_silu_mul(5, BASE, BASE + (1 << 30), 14336, 28672, 14336, False)
    silu()
    assert launches[-1][:7] == (0x200, 5, 7, 1, 256, 1, 1)  # (14,336 columns: 7 blocks of 2,048)
    assert launched_args(launches[-1], 5) == [BASE, BASE + (1 << 30), 14336, 28672, 14336]
    assert rr.packed == {"add_rmsnorm": 1, "silu_mul": 1}


NORM_OK = {"rows": 8, "x": BASE, "h": BASE + (1 << 30), "weight": BASE + (2 << 30), "k": 512, "x_ld": 512,
           "h_ld": 512, "eps": 1e-5, "bf16": True}  # fmt: skip
SILU_OK = {"rows": 8, "gu": BASE, "act": BASE + (1 << 30), "inter": 1024, "gu_ld": 2048, "act_ld": 1024, "bf16": True}


@pytest.mark.parametrize(
    ("kind", "change", "named"),
    [
        ("norm", {"rows": 0}, "rows"),
        ("norm", {"rows": 1 << 31}, "rows"),
        ("norm", {"rows": 2.0}, "rows"),
        ("norm", {"k": 4}, "k"),
        ("norm", {"k": 516}, "k"),
        ("norm", {"k": 1 << 24}, "k"),
        ("norm", {"x": 0}, "x"),
        ("norm", {"x": BASE + 8}, "x"),
        ("norm", {"h": -16}, "h"),
        ("norm", {"weight": "0x1000"}, "weight"),
        ("norm", {"x_ld": 256}, "x_ld"),
        ("norm", {"h_ld": 516}, "h_ld"),
        ("norm", {"x_ld": 1 << 40}, "x_ld"),
        ("norm", {"x": (1 << 64) - 4096}, "x"),
        ("norm", {"h": BASE + 4096}, "h"),
        ("norm", {"weight": BASE + 1024}, "weight"),
        ("norm", {"eps": float("nan")}, "eps"),
        ("norm", {"eps": "1e-5"}, "eps"),
        ("norm", {"bf16": 1}, "bf16"),
        ("silu", {"inter": 1001}, "inter"),
        ("silu", {"gu_ld": 1024}, "gu_ld"),
        ("silu", {"act_ld": 1000}, "act_ld"),
        ("silu", {"act": BASE + 2048}, "act"),
        ("silu", {"gu": BASE + 1}, "gu"),
        ("silu", {"bf16": None}, "bf16"),
    ],
)
def test_a_bad_argument_is_refused_by_name_and_launches_nothing(kind: str, change: dict[str, Any], named: str) -> None:
    rr, launches = fake_rows()
    if kind == "norm":
        args = NORM_OK | change
        with pytest.raises((TypeError, ValueError), match=rf"^{named}: "):
            rr.prepared_add_rmsnorm(**args)
    else:
        args = SILU_OK | change
        with pytest.raises((TypeError, ValueError), match=rf"^{named}: "):
            rr.prepared_silu_mul(**args)
    assert launches == [] and rr.packed == {"add_rmsnorm": 0, "silu_mul": 0}


def bare_runner(pdl: bool) -> ModelRunner:
    r = ModelRunner.__new__(ModelRunner)
    r.dense = SimpleNamespace(launcher=SimpleNamespace(launches_with_pdl=pdl))  # type: ignore[assignment]
    return r


def test_the_runner_keeps_flashinfers_launches_without_programmatic_dependent_launch() -> None:
    r = bare_runner(pdl=False)
    assert r.releasing_rows() is None and r._releasing is None  # (nothing compiled: no gain without PDL)


def test_kernels_that_do_not_compile_leave_flashinfers_launches_saying_why(monkeypatch) -> None:
    tried = []

    def refuse(self: ReleasingRows, launcher: Any) -> None:
        tried.append(launcher)
        raise RuntimeError("nvrtc: error: unknown option '--use_fast_math'")

    monkeypatch.setattr(release_rows.ReleasingRows, "__init__", refuse)
    r = bare_runner(pdl=True)
    assert r.releasing_rows() is None and r.releasing_rows() is None
    assert len(tried) == 1  # (tried once)
    assert r.release_rows_error == "RuntimeError: nvrtc: error: unknown option '--use_fast_math'"
