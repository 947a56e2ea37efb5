"""The skinny GEMM on warpgroup MMA (fi_engine.kernels.skinny_wgmma, ``csrc/skinny_wgmma.cu``) on an SM 9.0 GPU
(FI_FFI_RUN_GPU_TESTS=1; CuPy, no torch; skipped on other GPUs).

- Every plan :meth:`WgmmaGemm.plans` offers (each geometry, the rule's split and half of it, and one k range), for
  16-bit weights (bfloat16 and float16, 16-bit and float32 outputs), e4m3 weights (128x128-block and per-row
  scales) and int4 (AWQ groups of 128 and 64, rows in order and gate/up interleaved), at 9, 16, 17, 24 and 32 rows,
  on shapes with a last partial block of weight rows, several staged passes of x with a shorter last one and k
  ranges of unequal length, against a float32 reference over the dequantized weights. Bounds: 16-bit and e4m3
  ``k * 2**-24 * sum |x| |w|`` plus half an ulp of a 16-bit output (the skinny GEMM's); int4 the int4 GEMV's
  (exact integer codes less zeros times x, float32 sums, times the group's scale). Nothing past ``[rows, n]`` is
  written; a split launch leaves its counters at zero.
- A split and an unsplit plan captured in a CUDA graph replay new inputs to within the bound, and a split launch
  gives the same bits twice.

Run on an H100: ``FI_FFI_RUN_GPU_TESTS=1 python -m pytest -q tests/engine/test_gpu_skinny_wgmma.py``.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pytest

if os.environ.get("FI_FFI_RUN_GPU_TESTS") != "1":
    pytest.skip("GPU tests run only with FI_FFI_RUN_GPU_TESTS=1 on a CUDA machine", allow_module_level=True)

cupy = pytest.importorskip("cupy", reason="the engine needs CuPy (python -m pip install '.[engine]')")
if str(cupy.cuda.Device().compute_capability) != "90":
    pytest.skip("wgmma needs an SM 9.0 GPU (H100, H200)", allow_module_level=True)

from helpers.skinny_cases import OUT_ULP, check, from16, int4_weight, outputs, to16, weights  # noqa: E402

from fi_engine.kernels.dense import Dense  # noqa: E402
from fi_engine.kernels.skinny_gemm import E4M3_BLOCK, E4M3_ROW, INT4, W16, SkinnyGemm  # noqa: E402
from fi_engine.kernels.skinny_wgmma import WgmmaGemm  # noqa: E402

pytestmark = pytest.mark.gpu

ROWS = (9, 16, 17, 24, 32)
SHAPES = ((200, 1344), (1040, 2304))  # (n, k): a partial last block of rows; 3 and 5 passes of 512, the last shorter


def plans_of(wg: WgmmaGemm, fmt: int, rows: int, x: Any, k: int, w: Any, n: int, ld: int, bf16: bool, f32: bool,
             scales: Any = None, block: Any = None, int4: Any = None) -> list[Any]:  # fmt: skip
    """The plans of a call, and those of one k range (the grid told the GPU has one SM)."""
    if int4 is not None:
        call = dict(int4=int4)
    else:
        call = dict(scale=int(scales.data.ptr) if scales is not None else 0, s_ld=-(-k // 128) if block else 0,
                    block=block)  # fmt: skip
    out = wg.plans(fmt, rows, int(x.data.ptr), k, int(w.data.ptr), n, k, 0, ld, bf16, f32, **call)
    sms, wg.sms = wg.sms, 1
    try:
        out += wg.plans(fmt, rows, int(x.data.ptr), k, int(w.data.ptr), n, k, 0, ld, bf16, f32, **call)
    finally:
        wg.sms = sms
    return out


@pytest.mark.parametrize("fmt", [W16, E4M3_BLOCK, E4M3_ROW], ids=["16bit", "e4m3-block", "e4m3-row"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("f32", [False, True], ids=["out16", "out32"])
def test_every_plan_matches_float32(fmt: int, dtype: str, f32: bool) -> None:
    rng = np.random.default_rng(41 + fmt)
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        dense = Dense(stream)
        sk = SkinnyGemm()
        wg = WgmmaGemm(sk)
        assert wg.available
        for n, k in SHAPES:
            w, scales, values, block = weights(rng, fmt, n, k, dtype)
            x16 = to16(rng.standard_normal((32, k)).astype(np.float32), dtype)
            x = cupy.asarray(x16)
            ld = n + 8
            for rows in ROWS:
                plans = plans_of(wg, fmt, rows, x, k, w, n, ld, dtype == "bfloat16", f32, scales, block)
                assert any(p.grid[1] > 1 for p in plans) and any(p.grid[1] == 1 for p in plans), (n, k, rows)
                for plan in plans:
                    got = outputs(dense, plan, rows, n, ld, dtype, f32)
                    check(got, from16(x16, dtype), values, rows, dtype, f32)
                assert int(sk.done.sum()) == 0, "a split launch left a counter set"


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("group_size", [128, 64])
@pytest.mark.parametrize("interleaved", [False, True], ids=["rows", "gate-up"])
def test_every_int4_plan_matches_float32(dtype: str, group_size: int, interleaved: bool) -> None:
    rng = np.random.default_rng(group_size + interleaved)
    n, k = 272, 1408  # (3 passes of 512 inputs, the last 384)
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        dense = Dense(stream)
        sk = SkinnyGemm()
        wg = WgmmaGemm(sk)
        w, rec, values, scales, half_n = int4_weight(rng, n, k, group_size, interleaved)
        x16 = to16(rng.standard_normal((32, k)).astype(np.float32), dtype)
        x, xf = cupy.asarray(x16), from16(x16, dtype).astype(np.float64)
        big_m = 128 if dtype == "bfloat16" else 1024
        gshift = (group_size // 64).bit_length() - 1
        ld = n + 8
        for rows in ROWS:
            for f32 in (False, True):
                int4 = (int(rec.data.ptr), k // group_size, gshift, half_n)
                plans = plans_of(wg, INT4, rows, x, k, w, n, ld, dtype == "bfloat16", f32, int4=int4)
                assert plans
                for plan in plans:
                    got = outputs(dense, plan, rows, n, ld, dtype, f32)
                    ref = xf[:rows] @ values.T
                    bound = (np.abs(xf[:rows]) @ np.abs(values.T)) * 2.0**-20 + 1e-30
                    bound += (np.abs(xf[:rows]) @ scales.T) * (big_m + 16) * 2.0**-18
                    bound += (0 if f32 else OUT_ULP[dtype]) * np.abs(ref)
                    err = np.abs(got - ref)
                    assert np.isfinite(got).all() and (err <= bound).all(), (
                        rows,
                        plan.grid,
                        float((err / bound).max()),
                    )
        assert int(sk.done.sum()) == 0, "a split launch left a counter set"


@pytest.mark.parametrize("fmt", [W16, E4M3_BLOCK, INT4], ids=["16bit", "e4m3-block", "int4"])
@pytest.mark.parametrize("rows", [17, 24, 32])
def test_split_and_unsplit_plans_replay_in_a_graph(fmt: int, rows: int) -> None:
    rng = np.random.default_rng(7 + rows + fmt)
    n, k, dtype = 1040, 4096, "bfloat16"
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        dense = Dense(stream)
        sk = SkinnyGemm()
        wg = WgmmaGemm(sk)
        x16 = to16(rng.standard_normal((rows, k)).astype(np.float32), dtype)
        x = cupy.asarray(x16)
        y = cupy.zeros((rows, n), np.uint16)
        if fmt == INT4:
            w, rec, values, scales, _ = int4_weight(rng, n, k, 128, False)
            plans = plans_of(wg, fmt, rows, x, k, w, n, n, True, False, int4=(int(rec.data.ptr), k // 128, 1, 0))
        else:
            w, scales, values, block = weights(rng, fmt, n, k, dtype)
            plans = plans_of(wg, fmt, rows, x, k, w, n, n, True, False, scales, block)
        assert any(p.grid[1] > 1 for p in plans) and any(p.grid[1] == 1 for p in plans)
        for plan in plans:
            args = (plan.args[0], plan.args[1], int(y.data.ptr), *plan.args[3:])
            call = dense.launcher.prepared_kernel(plan.function, plan.grid, plan.threads, plan.smem, args, "wgmma")
            call()
            stream.synchronize()
            first = cupy.asnumpy(y)
            y.fill(0)
            call()
            stream.synchronize()
            assert np.array_equal(cupy.asnumpy(y), first), "a launch's bits depend on the run"
            stream.begin_capture()
            call()
            graph = stream.end_capture()
            fresh = to16(rng.standard_normal((rows, k)).astype(np.float32), dtype)
            x.set(fresh)
            graph.launch(stream)
            stream.synchronize()
            got, xf = from16(cupy.asnumpy(y), dtype), from16(fresh, dtype)
            if fmt != INT4:
                check(got, xf, values, rows, dtype, False)
            else:
                xd = xf.astype(np.float64)
                ref = xd @ values.T
                bound = (np.abs(xd) @ np.abs(values.T)) * 2.0**-20 + 1e-30
                bound += (np.abs(xd) @ scales.T) * (128 + 16) * 2.0**-18 + OUT_ULP[dtype] * np.abs(ref)
                assert (np.abs(got - ref) <= bound).all(), plan.grid
            x.set(x16)
            assert int(sk.done.sum()) == 0
