"""The skinny GEMM (fi_engine.kernels.skinny_gemm, ``csrc/skinny_gemm.cu``) on a GPU (FI_FFI_RUN_GPU_TESTS=1; CuPy,
no torch).

- Every plan :meth:`SkinnyGemm.plans` offers (each candidate geometry, split and not), for 16-bit weights (bfloat16
  and float16, 16-bit and float32 outputs) and e4m3 weights (128x128-block and per-row scales), at 1, 5, 8, 13, 24
  and 32 rows, on shapes with a last partial tile of weight rows and k ranges of unequal length, against a float32
  reference over the (dequantized) weights. Bound per output: ``k * 2**-24 * sum |x| |w|`` (float32 sums of exact
  products, in any order) plus half an ulp of a 16-bit output (``2**-8`` / ``2**-11`` relative). Every output row
  past ``rows`` and column past ``n`` is left as it was.
- On an SM 9.0, the W8A8 form (``E4M3_A8``: 128x128-block e4m3 weights times e4m3 x with a scale per row and 128
  inputs, Hopper's e4m3 ``wgmma``): every plan at the row counts above, bfloat16 and float16, 16-bit and float32
  outputs, against float32 over the e4m3 values of both operands. Bound: ``2**-10 * sum |x| |w|`` plus half an ulp
  of a 16-bit output. Hopper's FP8 products sum in the tensor cores with about 14 bits kept, which is why each
  tile of 128 inputs is added in float32 after its four products. A wrong operand layout errs by the products'
  size, far past this bound.
- The W8A8 form with x quantized in the kernel (``E4M3_A8Q``): each plan gives the bits of the same plan of
  ``E4M3_A8`` over x quantized by the engine's ``fp8_quant.cu`` (the same bytes and scales staged, the same sums).
- The W8A8 form through a Dense (``SkinnyLaunches.w8a8_on``), x quantized in the kernel or by the quantizer's launch
  (``w8a8_fused``, ``w8a8_quantizer``; each kind alone and both): over a registered 128x128-block FP8
  weight at 16 and 32 rows, each of its plans (the quantizer's:
  into the FP8 scratch filled with NaN codes first) multiplies within the bound above over the quantizer's x; the
  Dense times those plans among its launches; at 8 rows none is offered (x stays 16-bit there).
- On an SM 9.0, the W4A8 form (``INT4_A8Q``: int4 weights times x quantized to int8 in the kernel, Hopper's integer
  ``wgmma``): every plan at 1-32 rows, both 16-bit types and outputs, groups of 128, 256 and 512 (none offered for
  64), plain and gate/up-interleaved weights, against float64 over numpy's model of the kernel's quantization
  (``amax`` a row and 128 inputs, codes ``rint(x * float32(127 / amax))``, the exact product rounded once, scale
  ``amax / 127``): its sums are exact integers, so the bound is float32's adding of the tiles, ``2**-19 * sum |xq|
  |w|``, plus half an ulp of a 16-bit output. Against the unquantized x, within half a code a value (``0.501 * scale
  * sum |w|`` a group) more. At its edges: zeros of 255 against codes of 127 (the corrected sums near ``2**22``), and
  a NaN in one row of x, whose outputs all come out NaN while the other rows' stay right.
  Through a Dense (``SkinnyLaunches.w4a8_on``) at 8 and 32 rows: each W4A8 plan run by ``SkinnyLaunches.run``
  within that bound, and the Dense times them among its launches.
- A split launch gives the same bits twice and leaves its counters at zero; a CUDA graph of it replays new inputs
  to the eager result.
- Plans of one k range (each block writes y), their staged x over several passes with a shorter last one.
- The wave-fitted splits (``wave_split``) of every format on a gate/up-like grid, the two-block geometries (e4m3 at
  17-32 rows, int4 at 25-32) among the plans there and above; on an SM 9.0 the int4 warpgroup form's (17-32 rows).
- ``Dense.linear`` in a GPU-bound step (``bandwidth_bound``) over 16-bit and FP8 weights: whichever launch it times
  fastest (the skinny GEMM, cuBLASLt or the FP8 paths), the product within the bound, on the timing call and after;
  where that launch quantizes x to e4m3 (the W8A8 form, cuBLASLt's FP8 GEMM above 8 rows), the W8A8 bound over
  numpy's model of that x.
- The SiLU form (``SKINNY_SILU``): each of its plans against its plain plan (same geometry and split, so the same
  float32 sums) followed by ``silu_and_mul`` in float32 of the rounded outputs, within one 16-bit ulp (the GPU's
  ``__expf`` and division against numpy's); the plain outputs themselves within the bound above.
  ``Dense.gate_up_silu`` in a GPU-bound step, float16: every launch it timed (the GEMM then a SiLU, each plan of the
  form) set in turn, against float32 within the GEMM's bound carried through the SiLU (below).

Run on the GPU machine: ``FI_FFI_RUN_GPU_TESTS=1 python -m pytest -q tests/engine/test_gpu_skinny_gemm.py``.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

if os.environ.get("FI_FFI_RUN_GPU_TESTS") != "1":
    pytest.skip("GPU tests run only with FI_FFI_RUN_GPU_TESTS=1 on a CUDA machine", allow_module_level=True)

cupy = pytest.importorskip("cupy", reason="the engine needs CuPy (python -m pip install '.[engine]')")

from typing import Any  # noqa: E402

from helpers.skinny_cases import OUT_ULP, check, check_int4, from16, int4_weight, outputs, to16, weights  # noqa: E402

from fi_engine.checkpoint.fp8_weights import E4M3, quantize_e4m3  # noqa: E402
from fi_engine.kernels.dense import CUDA_R_16BF, CUDA_R_16F, CUDA_R_32F, Dense  # noqa: E402
from fi_engine.kernels.skinny_gemm import (  # noqa: E402
    E4M3_A8,
    E4M3_A8Q,
    E4M3_BLOCK,
    E4M3_ROW,
    INT4_A8Q,
    SPLIT_WAVES,
    W16,
    SkinnyGemm,
    SkinnyLaunches,
)
from fi_engine.kernels.skinny_gemm import INT4 as INT4_FMT  # noqa: E402

pytestmark = pytest.mark.gpu

ROWS = (1, 5, 8, 13, 24, 32)
# (n, k): a partial last tile of rows; k ranges of unequal length when split; whole runs of two tiles of 128 (the
# e4m3 warpgroup form's, on an SM 9.0), its last block's strips past n
SHAPES = ((200, 576), (1040, 1344), (272, 1024))


def types(dtype: str, f32: bool) -> tuple[int, int]:
    """A linear call's ``(ab_type, c_type)``: 16-bit ``dtype`` inputs, float32 outputs where ``f32``."""
    ab = CUDA_R_16BF if dtype == "bfloat16" else CUDA_R_16F
    return ab, CUDA_R_32F if f32 else ab


@pytest.mark.parametrize("fmt", [W16, E4M3_BLOCK, E4M3_ROW], ids=["16bit", "e4m3-block", "e4m3-row"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("f32", [False, True], ids=["out16", "out32"])
def test_every_plan_matches_float32(fmt: int, dtype: str, f32: bool) -> None:
    rng = np.random.default_rng(21 + fmt)
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        dense, sk = Dense(stream), SkinnyGemm()
        assert sk.available
        for n, k in SHAPES:
            w, scales, values, block = weights(rng, fmt, n, k, dtype)
            x16 = to16(rng.standard_normal((32, k)).astype(np.float32), dtype)
            x = cupy.asarray(x16)
            ld = n + 8  # y's row stride: the columns past n must stay as they were
            for rows in ROWS:
                plans = sk.plans(
                    fmt, (rows, int(x.data.ptr), k, int(w.data.ptr), n, k, 0, ld, *types(dtype, f32)),
                    int(scales.data.ptr) if scales is not None else 0, -(-k // 128) if block else 0, block,
                )  # fmt: skip
                assert len(plans) >= 2, (n, k, rows)
                assert any(p.grid[1] > 1 for p in plans), "no split plan tested"
                if fmt != W16 and k % 256 == 0 and cupy.cuda.Device().compute_capability == "90":
                    assert any(p.kernel.startswith("skinnywg8") for p in plans), (rows, sk.warpgroups_error)
                for plan in plans:
                    check(outputs(dense, plan, rows, n, ld, dtype, f32), from16(x16, dtype), values, rows, dtype, f32)
                assert int(sk.done.sum()) == 0, "a split launch left a counter set"


def e4m3_x(rng: np.random.Generator, rows: int, k: int) -> tuple[Any, np.ndarray]:
    """Random x quantized as the W8A8 form reads it (fp8_quant.cu's ``quant_groups``: a scale per row and 128 inputs,
    ``amax / 448``): one GPU buffer of the e4m3 bytes ``[rows, k]`` then, 256-byte aligned, the float32 scales ``[k /
    128, rows]``; and the float32 values ``[rows, k]`` they stand for."""
    xf = rng.standard_normal((rows, k)) * rng.uniform(0.5, 4.0, (rows, 1))
    groups = k // 128
    amax = np.abs(xf.reshape(rows, groups, 128)).max(axis=2)
    scales = (amax / 448).astype(np.float32)  # [rows, groups]
    codes = quantize_e4m3(xf / np.repeat(scales, 128, 1))
    at = -(-rows * k // 256) * 256
    buf = np.zeros(at + 4 * rows * groups, np.uint8)
    buf[: rows * k] = codes.reshape(-1)
    buf[at:] = np.ascontiguousarray(scales.T).view(np.uint8).reshape(-1)
    return cupy.asarray(buf), E4M3[codes] * np.repeat(scales, 128, 1)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("f32", [False, True], ids=["out16", "out32"])
def test_every_w8a8_plan_matches_float32(dtype: str, f32: bool) -> None:
    if cupy.cuda.Device().compute_capability != "90":
        pytest.skip("the W8A8 form is Hopper's (SM 9.0) e4m3 wgmma")
    rng = np.random.default_rng(44)
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        dense, sk = Dense(stream), SkinnyGemm()
        for n, k in ((272, 1024), (200, 512), (1040, 1536)):
            w, scales, values, block = weights(rng, E4M3_BLOCK, n, k, dtype)
            ld = n + 8
            for rows in ROWS:
                xq, xv = e4m3_x(rng, rows, k)
                call = (rows, int(xq.data.ptr), k, int(w.data.ptr), n, k, 0, ld, *types(dtype, f32))
                plans = sk.plans(E4M3_A8, call, int(scales.data.ptr), k // 128, block)
                assert plans, (n, k, rows, sk.warpgroups_error)
                assert all(p.kernel.startswith("skinnywg8a") for p in plans)
                for plan in plans:
                    got = outputs(dense, plan, rows, n, ld, dtype, f32)
                    ref = xv @ values.T.astype(np.float64)
                    bound = 2.0**-10 * (np.abs(xv) @ np.abs(values.T)) + (0 if f32 else OUT_ULP[dtype]) * np.abs(ref)
                    err = np.abs(got - ref)
                    assert np.isfinite(got).all() and (err <= bound).all(), (
                        plan.kernel,
                        plan.grid,
                        rows,
                        f"{float((err / bound).max()):.2f} of the bound",
                    )
                assert int(sk.done.sum()) == 0, "a split launch left a counter set"


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("f32", [False, True], ids=["out16", "out32"])
def test_the_in_kernel_quantization_gives_the_quantizer_s_bits(dtype: str, f32: bool) -> None:
    """x at a row stride past k whose padding holds NaNs (read, they would poison a group's amax), rows of magnitudes
    1e-3 to 3, a group of zeros (the 1e-12 floor): the same bits as the quantizer's path, float32 sums included."""
    if cupy.cuda.Device().compute_capability != "90":
        pytest.skip("the W8A8 form is Hopper's (SM 9.0) e4m3 wgmma")
    from fi_engine.kernels.cuda_sources import source

    quant = cupy.RawModule(code=source("fp8_quant.cu")).get_function(
        "quant_groups_bf16" if dtype == "bfloat16" else "quant_groups_f16"
    )
    rng = np.random.default_rng(45)
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        dense, sk = Dense(stream), SkinnyGemm()
        for n, k in ((272, 1024), (1040, 1536)):
            w, scales, _, block = weights(rng, E4M3_BLOCK, n, k, dtype)
            ld = n + 8
            for rows in ROWS:
                x_ld = k + 64
                # (at most ~3 standard deviations of 3: float16 outputs stay finite)
                xf = rng.standard_normal((rows, x_ld)) * 10.0 ** rng.uniform(-3, 0.5, (rows, 1))
                xf[0, 128:256] = 0.0
                x16 = to16(xf.astype(np.float32), dtype)
                x16[:, k:] = 0x7FC0 if dtype == "bfloat16" else 0x7E00  # NaN past k
                x = cupy.asarray(x16)
                at, groups = -(-rows * k // 256) * 256, k // 128
                xq = cupy.zeros(at + 4 * rows * groups, cupy.uint8)
                quant(
                    (-(-rows * groups // 8),),
                    (256,),
                    (x, cupy.int64(x_ld), cupy.int32(rows), cupy.int32(k), xq, xq[at:], cupy.int64(rows)),
                )
                types_ = types(dtype, f32)
                by_bytes = sk.plans(
                    E4M3_A8, (rows, int(xq.data.ptr), k, int(w.data.ptr), n, k, 0, ld, *types_), int(scales.data.ptr),
                    k // 128, block,
                )  # fmt: skip
                in_kernel = sk.plans(
                    E4M3_A8Q, (rows, int(x.data.ptr), x_ld, int(w.data.ptr), n, k, 0, ld, *types_),
                    int(scales.data.ptr), k // 128, block,
                )  # fmt: skip
                assert in_kernel and len(in_kernel) == len(by_bytes), (rows, sk.warpgroups_error)
                for a, b in zip(by_bytes, in_kernel, strict=True):
                    assert a.grid == b.grid and a.kernel.split("_m", 1)[1] == b.kernel.split("_m", 1)[1]
                    want = outputs(dense, a, rows, n, ld, dtype, f32)
                    got = outputs(dense, b, rows, n, ld, dtype, f32)
                    assert np.isfinite(want).all()
                    assert np.array_equal(want.view(np.uint32), got.view(np.uint32)), (b.kernel, b.grid, rows)
                assert int(sk.done.sum()) == 0


@pytest.mark.parametrize("kinds", ["in-kernel", "quantizer", "both"])
@pytest.mark.parametrize("rows", [16, 32])
def test_the_w8a8_form_through_a_dense(monkeypatch, rows: int, kinds: str) -> None:  # type: ignore[no-untyped-def]
    if cupy.cuda.Device().compute_capability != "90":
        pytest.skip("the W8A8 form is Hopper's (SM 9.0) e4m3 wgmma")
    monkeypatch.setattr(SkinnyLaunches, "w8a8_on", True)
    monkeypatch.setattr(SkinnyLaunches, "w8a8_fused", kinds != "quantizer")
    monkeypatch.setattr(SkinnyLaunches, "w8a8_quantizer", kinds != "in-kernel")
    prefix = {"in-kernel": ("skinnywg8q",), "quantizer": ("skinnywg8a",), "both": ("skinnywg8q", "skinnywg8a")}[kinds]
    rng = np.random.default_rng(rows)
    n, k = 1152, 1536  # (n a multiple of 128: the blocks the engine quantizes x for)
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        dense = Dense(stream)
        w, scales, values, block = weights(rng, E4M3_BLOCK, n, k, "bfloat16")
        dense.quantized.add_fp8_weight(int(w.data.ptr), n, k, int(scales.data.ptr), block)
        wt = dense.quantized.fp8_weights[int(w.data.ptr)]
        x = cupy.asarray(to16(rng.standard_normal((rows, k)).astype(np.float32) * 3, "bfloat16"))
        y = cupy.zeros((rows, n), np.uint16)
        key = (rows, int(x.data.ptr), k, int(w.data.ptr), n, k, int(y.data.ptr), n, CUDA_R_16BF, CUDA_R_16BF)
        sk = SkinnyLaunches(dense.launcher, dense.quantized)
        plans = sk.plans(key, wt)
        a8 = [i for i, p in enumerate(plans) if p.kernel.startswith(prefix)]
        assert a8 and len(a8) < len(plans), [p.kernel for p in plans]
        assert {plans[i].kernel[:10] for i in a8} == set(prefix), "each kind offered"
        assert not any(p.kernel.startswith(("skinnywg8q", "skinnywg8a")) for i, p in enumerate(plans) if i not in a8)
        assert dense.quantized.fp8 is not None
        made = dense.quantized.fp8.x_quantizer(rows, int(x.data.ptr), k, k, True, dense.launcher.null)
        assert made is not None
        at, groups = -(-rows * k // 256) * 256, k // 128
        scratch = cupy.ndarray(
            (at + 4 * rows * groups,), cupy.uint8, cupy.cuda.MemoryPointer(cupy.cuda.UnownedMemory(made[0], 1, None), 0)
        )
        for i in a8:
            scratch.fill(0x7F)  # e4m3 NaN everywhere: the plan must quantize x itself
            y.fill(0)
            assert sk.run(key, i, wt)
            if plans[i].kernel.startswith("skinnywg8q"):  # (x quantized in the kernel: the quantizer's bytes, for
                made[1]()  # the reference only)
            stream.synchronize()
            codes = cupy.asnumpy(scratch[: rows * k]).reshape(rows, k)
            xs = cupy.asnumpy(scratch[at:]).view(np.float32).reshape(groups, rows)
            xv = E4M3[codes] * np.repeat(xs.T, 128, 1)
            got = from16(cupy.asnumpy(y), "bfloat16")
            ref = xv @ values.T.astype(np.float64)
            bound = 2.0**-10 * (np.abs(xv) @ np.abs(values.T)) + OUT_ULP["bfloat16"] * np.abs(ref)
            assert np.isfinite(got).all() and (np.abs(got - ref) <= bound).all(), (plans[i].kernel, plans[i].grid)
        eight = (8, *key[1:])
        assert not any(p.kernel.startswith(prefix) for p in sk.plans(eight, wt))
        dense.bandwidth_bound = True
        dense.linear(*key)  # (times the shape's launches)
        stream.synchronize()
        timed, _ = dense.timed_launches()[(rows, n, k, CUDA_R_16BF, CUDA_R_16BF, int(w.data.ptr))]
        assert set(a8) <= set(timed), timed
        dense.bandwidth_bound = False
        sk.close()
        dense.close()


@pytest.mark.parametrize("block", [(16, 256), (32, 512)], ids=["16x256", "32x512"])
def test_e4m3_block_plans_of_other_block_shapes_match_float32(block: tuple[int, int]) -> None:
    """e4m3 weights whose scale blocks are 16 or 32 rows by 256 or 512 inputs: each plan (on an SM 9.0 the warpgroup
    form's among them, a warp's two strips then in two blocks of scales, each tile within one block) against float32,
    bound as above, at 8, 24 and 32 rows."""
    rng = np.random.default_rng(block[0] + block[1])
    n, k, dtype = 272, 1024, "bfloat16"
    codes = quantize_e4m3(rng.standard_normal((n, k)) * 2.0)
    scales = rng.uniform(0.5, 2.0, (-(-n // block[0]), k // block[1])).astype(np.float32) / 16
    values = E4M3[codes] * np.repeat(np.repeat(scales, block[0], 0), block[1], 1)[:n, :k]
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        dense, sk = Dense(stream), SkinnyGemm()
        w, sc = cupy.asarray(codes), cupy.asarray(scales)
        x16 = to16(rng.standard_normal((32, k)).astype(np.float32), dtype)
        x = cupy.asarray(x16)
        ld = n + 8
        for rows in (8, 24, 32):
            call = (rows, int(x.data.ptr), k, int(w.data.ptr), n, k, 0, ld, *types(dtype, False))
            plans = sk.plans(E4M3_BLOCK, call, int(sc.data.ptr), k // block[1], block)
            assert plans
            if cupy.cuda.Device().compute_capability == "90":
                assert any(p.kernel.startswith("skinnywg8b") for p in plans), (rows, sk.warpgroups_error)
            for plan in plans:
                check(outputs(dense, plan, rows, n, ld, dtype, False), from16(x16, dtype), values, rows, dtype, False)


def test_a_split_launch_is_deterministic_and_replays_in_a_graph() -> None:
    rng = np.random.default_rng(5)
    stream = cupy.cuda.Stream(non_blocking=True)
    n, k, rows = 1040, 4096, 24
    with stream:
        dense, sk = Dense(stream), SkinnyGemm()
        w, _, values, _ = weights(rng, W16, n, k, "bfloat16")
        x = cupy.asarray(to16(rng.standard_normal((rows, k)).astype(np.float32), "bfloat16"))
        y = cupy.zeros((rows, n), np.uint16)
        call = (rows, int(x.data.ptr), k, int(w.data.ptr), n, k, int(y.data.ptr), n, *types("bfloat16", False))
        plans = [p for p in sk.plans(W16, call) if p.grid[1] > 1]
        assert plans
        for plan in plans:
            call = dense.launcher.prepared_kernel(
                plan.function, plan.grid, plan.threads, plan.smem, plan.args, "skinny"
            )
            call()
            stream.synchronize()
            first = cupy.asnumpy(y)
            y.fill(0)
            call()
            stream.synchronize()
            assert np.array_equal(cupy.asnumpy(y), first), "a split launch's bits depend on the run"
            stream.begin_capture()
            call()
            graph = stream.end_capture()
            fresh = to16(rng.standard_normal((rows, k)).astype(np.float32), "bfloat16")
            x.set(fresh)
            graph.launch(stream)
            stream.synchronize()
            check(from16(cupy.asnumpy(y), "bfloat16"), from16(fresh, "bfloat16"), values, rows, "bfloat16", False)
            assert int(sk.done.sum()) == 0


@pytest.mark.parametrize("fmt", [W16, E4M3_BLOCK], ids=["16bit", "e4m3-block"])
@pytest.mark.parametrize("rows", [8, 32])
def test_dense_linear_in_a_gpu_bound_step_stays_right(fmt: int, rows: int) -> None:
    rng = np.random.default_rng(7 + rows)
    stream = cupy.cuda.Stream(non_blocking=True)
    n, k = 4096, 4096
    with stream:
        dense = Dense(stream)
        w, scales, values, block = weights(rng, fmt, n, k, "bfloat16")
        if fmt != W16:
            dense.quantized.add_fp8_weight(int(w.data.ptr), n, k, int(scales.data.ptr), block)
        x16 = to16(rng.standard_normal((rows, k)).astype(np.float32), "bfloat16")
        x, y = cupy.asarray(x16), cupy.zeros((rows, n), np.uint16)
        key = (rows, int(x.data.ptr), k, int(w.data.ptr), n, k, int(y.data.ptr), n, CUDA_R_16BF, CUDA_R_16BF)
        dense.bandwidth_bound = True
        for _ in range(2):  # the first call times the launches, the second takes the chosen one
            y.fill(0)
            dense.linear(*key)
            stream.synchronize()
            got, xf = from16(cupy.asnumpy(y), "bfloat16"), from16(x16, "bfloat16")
            _, chosen = dense.timed_launches()[(rows, n, k, CUDA_R_16BF, CUDA_R_16BF, int(w.data.ptr) if fmt else 0)]
            if fmt != W16 and quantizes_x(dense, key, chosen):  # (W8A8: x rounded to e4m3 first)
                xv = e4m3_values(xf)
                ref = xv @ values.T.astype(np.float64)
                bound = 2.0**-10 * (np.abs(xv) @ np.abs(values.T)) + OUT_ULP["bfloat16"] * np.abs(ref)
                assert np.isfinite(got).all() and (np.abs(got - ref) <= bound).all(), chosen
            else:
                check(got, xf, values, rows, "bfloat16", False)
        dense.bandwidth_bound = False
        dense.close()


def quantizes_x(dense: Any, key: tuple[int, ...], chosen: int | None) -> bool:
    """Whether the launch ``chosen`` for the FP8 call ``key`` quantizes x to e4m3: the FP8 path (cuBLASLt's FP8 GEMM)
    above ``fp8_gemv_max_rows`` rows, or a W8A8 plan of the skinny GEMM."""
    if key[0] <= dense.quantized.fp8_gemv_max_rows or chosen is None or chosen == -1:
        return False
    if chosen == -2:
        return bool(dense.quantized.fp8_w8a8 and dense.quantized.fp8_w8a8_blocks)
    plan = dense._skinny.plans(key, dense.quantized.fp8_weights[key[3]])[chosen]
    return bool(plan.kernel.startswith(("skinnywg8a", "skinnywg8q")))


def e4m3_values(x: np.ndarray) -> np.ndarray:
    """float32 ``x [rows, k]`` as the engine quantizes it for W8A8 (fp8_quant.cu's ``quant_groups``: a scale per row
    and 128 inputs, ``amax / 448``), the values its e4m3 codes times their scales stand for, float64."""
    rows, k = x.shape
    amax = np.maximum(np.abs(x.reshape(rows, k // 128, 128)).max(axis=2), 1e-12)
    scales = np.repeat((amax / 448).astype(np.float32), 128, axis=1)
    return E4M3[quantize_e4m3(x / scales)] * scales.astype(np.float64)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("f32", [False, True], ids=["out16", "out32"])
@pytest.mark.parametrize(("k", "group_size"), [(512, 128), (1024, 64), (512, 512)])
@pytest.mark.parametrize("interleaved", [False, True], ids=["rows", "gate-up"])
def test_every_int4_plan_matches_float32(dtype: str, f32: bool, k: int, group_size: int, interleaved: bool) -> None:
    rng = np.random.default_rng(k + group_size)
    n = 272
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        dense, sk = Dense(stream), SkinnyGemm()
        w, rec, values, scales, half_n = int4_weight(rng, n, k, group_size, interleaved)
        x16 = to16(rng.standard_normal((32, k)).astype(np.float32), dtype)
        x, xf = cupy.asarray(x16), from16(x16, dtype)
        gshift = 31 if group_size == k else (group_size // 64).bit_length() - 1
        ld = n + 8
        for rows in (*ROWS, 28):  # (28: the warpgroup form's last row group part full)
            plans = sk.plans(INT4_FMT, (rows, int(x.data.ptr), k, int(w.data.ptr), n, k, 0, ld, *types(dtype, f32)),
                             int4=(int(rec.data.ptr), k // group_size, gshift, half_n))  # fmt: skip
            assert len(plans) >= 2, rows
            # on an SM 9.0 the warpgroup form serves 17-32 rows over groups of 128 or more (its sm_90a compiled)
            wanted = cupy.cuda.Device().compute_capability == "90" and rows >= 17 and group_size >= 128
            assert any(p.kernel.startswith("skinnywg4") for p in plans) == wanted, (rows, sk.warpgroups_error)
            # (and its two-strip form, weights in the ring and x staged through registers: 272 rows leave its last
            # block's strips past n)
            assert any(p.kernel.startswith("skinnywg4") and "_n2_" in p.kernel for p in plans) == wanted, rows
            for plan in plans:
                check_int4(outputs(dense, plan, rows, n, ld, dtype, f32), xf, values, scales, dtype, f32)
        assert int(sk.done.sum()) == 0, "a split launch left a counter set"


def int8_model(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The W4A8 form's quantization of x (float32 ``[rows, k]``, k a multiple of 128, finite), as the kernel's
    sk_xstorei8 does it: amax and ``127 / amax`` in float32, each code the exact product ``v * (127 / amax)`` rounded
    once to nearest even (the kernel's fma; float64 holds the product of two float32 exactly): ``(values [rows, k],
    the half code's size [rows, k])``, float64."""
    rows, k = x.shape
    groups = x.reshape(rows, k // 128, 128)
    amax = np.maximum(np.abs(groups).max(axis=2), np.float32(1e-12)).astype(np.float32)
    inv = (np.float32(127) / amax).astype(np.float32)
    codes = np.rint(groups.astype(np.float64) * inv[..., None].astype(np.float64))
    scale = (amax / np.float32(127)).astype(np.float64)
    values = (codes * scale[..., None]).reshape(rows, k)
    return values, np.repeat(scale * 0.501, 128, axis=1)


def check_w4a8(got: np.ndarray, x: np.ndarray, values: np.ndarray, f32: bool, dtype: str) -> None:
    """A W4A8 plan's outputs ``got [rows, n]`` over x (float32 ``[rows, k]``, the 16-bit values) and the int4
    weight's values ``[n, k]``: within float32's adding of exact tile sums of numpy's int8 model of x, and within half
    a code a value more of the unquantized product."""
    rows = got.shape[0]
    xq, half = int8_model(x[:rows])
    ref = xq @ values.T
    bound = 2.0**-19 * (np.abs(xq) @ np.abs(values.T)) + (0 if f32 else OUT_ULP[dtype]) * np.abs(ref) + 1e-30
    err = np.abs(got - ref)
    assert np.isfinite(got).all() and (err <= bound).all(), f"{float((err / bound).max()):.2f} of the bound"
    exact = x[:rows].astype(np.float64) @ values.T
    assert (np.abs(got - exact) <= bound + half @ np.abs(values.T)).all(), "further from x @ W.T than half a code"


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("f32", [False, True], ids=["out16", "out32"])
def test_every_w4a8_plan_matches_its_int8_model(dtype: str, f32: bool) -> None:
    if cupy.cuda.Device().compute_capability != "90":
        pytest.skip("the W4A8 form is Hopper's (SM 9.0) integer wgmma")
    rng = np.random.default_rng(48)
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        dense, sk = Dense(stream), SkinnyGemm()
        # (k 640: five tiles, which only the geometry of one tile a run serves; 272 rows leave the two-strip form's
        # last block's strips past n)
        for n, k, group_size, interleaved in ((272, 512, 128, False), (272, 1024, 256, True), (208, 640, 128, False),
                                              (272, 512, 512, True), (272, 1024, 64, False)):  # fmt: skip
            w, rec, values, _, half_n = int4_weight(rng, n, k, group_size, interleaved)
            # rows of magnitudes 1e-3 .. 3, one group of zeros
            xf = rng.standard_normal((32, k)) * np.exp(rng.uniform(np.log(1e-3), np.log(3.0), (32, 1)))
            xf[3, 128:256] = 0
            x16 = to16(xf.astype(np.float32), dtype)
            x, xv = cupy.asarray(x16), from16(x16, dtype)
            gshift = 31 if group_size == k else (group_size // 64).bit_length() - 1
            ld = n + 8
            for rows in (*ROWS, 28):
                call = (rows, int(x.data.ptr), k, int(w.data.ptr), n, k, 0, ld, *types(dtype, f32))
                plans = sk.plans(INT4_A8Q, call, int4=(int(rec.data.ptr), k // group_size, gshift, half_n))
                if group_size < 128:
                    assert plans == [], "two records a tile: the form does not read them"
                    continue
                assert plans and all(p.kernel.startswith("skinnywg4q") for p in plans), (rows, sk.warpgroups_error)
                if k % 256 == 0:
                    assert any("_u2_" in p.kernel for p in plans) and any(p.grid[1] > 1 for p in plans)
                for plan in plans:
                    try:
                        check_w4a8(outputs(dense, plan, rows, n, ld, dtype, f32), xv, values, f32, dtype)
                    except AssertionError as exc:
                        raise AssertionError(f"{plan.kernel} {plan.grid} rows {rows} n {n} k {k}: {exc}") from exc
        assert int(sk.done.sum()) == 0, "a split launch left a counter set"


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_the_w4a8_form_at_its_edges(dtype: str) -> None:
    """Every W4A8 plan at a zero of 255 (the records' largest) against x at its largest codes: each tile's int32 sum
    less the zero times x's sum of codes comes to -(255 - code) 127 128, within 2^22 of zero, where the kernel's
    conversion to float32 is exact (sk_i2f); the outputs within check_w4a8's bounds of numpy's model. And a NaN in one
    row of x: that row's outputs all NaN (its scale NaN: max.NaN), every other row's as without it."""
    from fi_engine.checkpoint.int4_weights import Int4Matrix, decode_gemv_layout

    if cupy.cuda.Device().compute_capability != "90":
        pytest.skip("the W4A8 form is Hopper's (SM 9.0) integer wgmma")
    rng = np.random.default_rng(255)
    n, k, groups, nan_row = 272, 512, 4, 5
    m = Int4Matrix(rng.integers(0, 16, (n, k)).astype(np.uint8), np.full((groups, n), 255, np.uint8),
                   np.full((groups, n), 0.02, np.float32), 128)  # fmt: skip
    w_host, rec_host = m.gemv_layout()
    values = decode_gemv_layout(w_host, rec_host, k).astype(np.float64)
    # every value of a row the same magnitude and sign (codes of 127, or -127), rows of either sign
    xf = np.repeat(np.where(rng.random((32, 1)) < 0.5, -3.0, 3.0), k, axis=1).astype(np.float32)
    xf[:, 128:256] *= 0.25  # (a group of smaller values: its own scale, codes 127 still)
    xf[nan_row, 7] = np.nan
    x16 = to16(xf, dtype)
    xv = from16(x16, dtype)
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        dense, sk = Dense(stream), SkinnyGemm()
        w, rec, x = cupy.asarray(w_host), cupy.asarray(rec_host), cupy.asarray(x16)
        ld = n + 8
        for rows in (*ROWS, 28):
            for f32 in (False, True):
                call = (rows, int(x.data.ptr), k, int(w.data.ptr), n, k, 0, ld, *types(dtype, f32))
                plans = sk.plans(INT4_A8Q, call, int4=(int(rec.data.ptr), groups, 1, 0))
                assert plans, (rows, sk.warpgroups_error)
                finite = [r for r in range(rows) if r != nan_row]
                for plan in plans:
                    got = outputs(dense, plan, rows, n, ld, dtype, f32)
                    where = f"{plan.kernel} {plan.grid} rows {rows}"
                    if nan_row < rows:
                        assert np.isnan(got[nan_row]).all(), f"{where}: the NaN row's outputs not all NaN"
                    try:
                        check_w4a8(got[finite], xv[finite], values, f32, dtype)
                    except AssertionError as exc:
                        raise AssertionError(f"{where}: {exc}") from exc
        assert int(sk.done.sum()) == 0, "a split launch left a counter set"
        dense.close()


@pytest.mark.parametrize("rows", [8, 32])
def test_the_w4a8_form_through_a_dense(monkeypatch, rows: int) -> None:  # type: ignore[no-untyped-def]
    if cupy.cuda.Device().compute_capability != "90":
        pytest.skip("the W4A8 form is Hopper's (SM 9.0) integer wgmma")
    monkeypatch.setattr(SkinnyLaunches, "w4a8_on", True)
    rng = np.random.default_rng(rows + 1)
    n, k = 1152, 1536
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        dense = Dense(stream)
        w, rec, values, _, _ = int4_weight(rng, n, k, 128, False)
        dense.quantized.add_int4_weight(int(w.data.ptr), n, k, int(rec.data.ptr), 128)
        wt = dense.quantized.int4.weights[int(w.data.ptr)]
        x16 = to16(rng.standard_normal((rows, k)).astype(np.float32) * 3, "bfloat16")
        x, y = cupy.asarray(x16), cupy.zeros((rows, n), np.uint16)
        key = (rows, int(x.data.ptr), k, int(w.data.ptr), n, k, int(y.data.ptr), n, CUDA_R_16BF, CUDA_R_16BF)
        sk = SkinnyLaunches(dense.launcher, dense.quantized)
        plans = sk.plans(key, wt)
        a8 = [i for i, p in enumerate(plans) if p.kernel.startswith("skinnywg4q")]
        assert a8 and len(a8) < len(plans), [p.kernel for p in plans]
        for i in a8:
            y.fill(0)
            assert sk.run(key, i, wt)
            stream.synchronize()
            check_w4a8(from16(cupy.asnumpy(y), "bfloat16"), from16(x16, "bfloat16"), values, False, "bfloat16")
        dense.bandwidth_bound = True
        dense.linear(*key)  # (times the shape's launches)
        stream.synchronize()
        timed, _ = dense.timed_launches()[(rows, n, k, CUDA_R_16BF, CUDA_R_16BF, int(w.data.ptr))]
        assert set(a8) <= set(timed), timed
        dense.bandwidth_bound = False
        sk.close()
        dense.close()


@pytest.mark.parametrize("fmt", [W16, E4M3_BLOCK, INT4_FMT], ids=["16bit", "e4m3-block", "int4"])
@pytest.mark.parametrize("rows", [8, 32])
def test_one_range_plans_stage_x_over_several_passes(fmt: int, rows: int) -> None:
    """Plans of one k range (as the gate/up shape of an 8B model takes), reached by telling the SkinnyGemm its GPU
    has one SM (its wave-fitted splits left out): each block writes y itself, and the staged geometry stages x over
    three passes of 512 inputs, the last one shorter (16-bit k 1376, e4m3 1344, int4 1536), through both of its
    buffers. Bounds as above."""
    rng = np.random.default_rng(31 + fmt + rows)
    stream = cupy.cuda.Stream(non_blocking=True)
    n, dtype = 272, "bfloat16"
    k = {W16: 1376, E4M3_BLOCK: 1344, INT4_FMT: 1536}[fmt]
    with stream:
        dense, sk = Dense(stream), SkinnyGemm()
        sk.sms = 1  # the split rule then keeps one range
        x16 = to16(rng.standard_normal((32, k)).astype(np.float32), dtype)
        x = cupy.asarray(x16)
        ld = n + 8
        if fmt == INT4_FMT:
            w, rec, values, scales, _ = int4_weight(rng, n, k, 128, False)
            plans = sk.plans(fmt, (rows, int(x.data.ptr), k, int(w.data.ptr), n, k, 0, ld, *types(dtype, False)),
                             int4=(int(rec.data.ptr), k // 128, 1, 0))  # fmt: skip
        else:
            w, sc, values, block = weights(rng, fmt, n, k, dtype)
            plans = sk.plans(
                fmt, (rows, int(x.data.ptr), k, int(w.data.ptr), n, k, 0, ld, *types(dtype, False)),
                int(sc.data.ptr) if sc is not None else 0, -(-k // 128) if block else 0, block,
            )  # fmt: skip
        # (one SM holding two blocks of a kernel makes a wave-fitted split of 2 ranges: the test below covers those)
        plans = [p for p in plans if p.split != SPLIT_WAVES]
        assert plans and all(p.grid[1] == 1 for p in plans), [p.grid for p in plans]
        assert any(p.smem for p in plans), "no staged plan"
        xf = from16(x16, dtype)
        for plan in plans:
            got = outputs(dense, plan, rows, n, ld, dtype, False)
            if fmt != INT4_FMT:
                check(got, xf, values, rows, dtype, False)
            else:
                check_int4(got, xf, values, scales, dtype, False)


@pytest.mark.parametrize("fmt", [W16, E4M3_BLOCK, E4M3_ROW, INT4_FMT], ids=["16bit", "e4m3-block", "e4m3-row", "int4"])
def test_the_wave_fitted_plans_match_float32(fmt: int) -> None:
    """Every plan, the wave-fitted splits among them, of a quarter of the 8B gate/up weight (7168 x 1024) on a
    SkinnyGemm told its GPU has 33 SMs (a quarter of an H100's or H200's 132): the 8-warp geometries' 56 column
    blocks then fill 2 waves 85 % full by rule, and the wave-fitted split (4 ranges at one block an SM, 7 or 8 at
    two) is offered as on the full weight and device. Bounds as above."""
    rng = np.random.default_rng(41 + fmt)
    stream = cupy.cuda.Stream(non_blocking=True)
    n, k, dtype = 7168, 1024, "bfloat16"
    with stream:
        dense, sk = Dense(stream), SkinnyGemm()
        sk.sms = 33
        x16 = to16(rng.standard_normal((32, k)).astype(np.float32), dtype)
        x, xf = cupy.asarray(x16), from16(x16, dtype)
        ld = n + 8
        if fmt == INT4_FMT:
            w, rec, values, scales, _ = int4_weight(rng, n, k, 128, False)
        else:
            w, sc, values, block = weights(rng, fmt, n, k, dtype)
        waves = 0
        for rows in (8, 16, 24, 32):
            call = (rows, int(x.data.ptr), k, int(w.data.ptr), n, k, 0, ld, *types(dtype, False))
            if fmt == INT4_FMT:
                plans = sk.plans(fmt, call, int4=(int(rec.data.ptr), k // 128, 1, 0))
            else:
                plans = sk.plans(fmt, call, int(sc.data.ptr) if sc is not None else 0, k // 128 if block else 0, block)
            waves += sum(p.split == SPLIT_WAVES for p in plans)
            for plan in plans:
                got = outputs(dense, plan, rows, n, ld, dtype, False)
                if fmt == INT4_FMT:
                    check_int4(got, xf, values, scales, dtype, False)
                else:
                    check(got, xf, values, rows, dtype, False)
        assert waves, "no wave-fitted plan offered"
        assert int(sk.done.sum()) == 0, "a split launch left a counter set"


def silu32(g: np.ndarray, u: np.ndarray) -> np.ndarray:
    """FlashInfer's ``silu_and_mul`` of gate and up values, in float32: ``g / (1 + exp(-g)) * u``."""
    g, u = g.astype(np.float32), u.astype(np.float32)
    return g / (np.float32(1) + np.exp(-g)) * u


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_every_silu_plan_is_its_plain_plan_then_silu_and_mul(dtype: str) -> None:
    rng = np.random.default_rng(51)
    stream = cupy.cuda.Stream(non_blocking=True)
    ulp = 4 * OUT_ULP[dtype]  # (one ulp, relative, at the bottom of a binade: twice half an ulp, doubled)
    with stream:
        dense, sk = Dense(stream), SkinnyGemm()
        for n, k in ((400, 576), (2080, 1344)):  # gate/up of 200 and 1040 outputs: a partial last tile of outputs
            m = n // 2
            w, _, values, _ = weights(rng, W16, n, k, dtype)
            x16 = to16(rng.standard_normal((32, k)).astype(np.float32), dtype)
            x, xf = cupy.asarray(x16), from16(x16, dtype)
            for rows in ROWS:
                call = (rows, int(x.data.ptr), k, int(w.data.ptr), n, k, 0, n + 8, *types(dtype, False))
                plain = sk.plans(W16, call)
                silu = sk.plans(W16, (*call[:7], m + 8, *call[8:]), silu=True)
                assert len(silu) == len(plain) >= 2 and any(p.grid[1] > 1 for p in silu), (n, rows)
                for p, q in zip(silu, plain, strict=True):
                    gu = outputs(dense, q, rows, n, n + 8, dtype, False)
                    check(gu, xf, values, rows, dtype, False)
                    want = from16(to16(silu32(gu[:, :m], gu[:, m:]), dtype), dtype)
                    got = outputs(dense, p, rows, m, m + 8, dtype, False)
                    bad = np.abs(got - want) > ulp * np.abs(want) + 1e-30
                    assert not bad.any(), f"{p.kernel} grid {p.grid}: {int(bad.sum())} outputs past one ulp"
        assert int(sk.done.sum()) == 0, "a split launch left a counter set"


@pytest.mark.parametrize("rows", [5, 8, 32])
def test_dense_gate_up_silu_serves_every_launch_it_timed_within_the_bound(monkeypatch, rows: int) -> None:  # type: ignore[no-untyped-def]
    """float16 (CuPy's own elementwise SiLU stands in for FlashInfer's as the separate launch). Bound per output:
    the GEMM's bound on gate and up (``check``'s: float32 sums plus half an ulp) carried through ``silu(g) * u``
    (``|silu'| <= 1.1``), plus one ulp of the output."""
    from fi_engine.kernels.skinny_gemm import SkinnyLaunches

    monkeypatch.setattr(SkinnyLaunches, "silu_on", True)  # (off by default)
    rng = np.random.default_rng(61 + rows)
    stream = cupy.cuda.Stream(non_blocking=True)
    m, k, dtype = 2048, 2048, "float16"
    n = 2 * m
    with stream:
        dense = Dense(stream)
        w, _, values, _ = weights(rng, W16, n, k, dtype)
        x16 = to16(rng.standard_normal((rows, k)).astype(np.float32), dtype)
        x, gu, act = cupy.asarray(x16), cupy.zeros((rows, n), np.uint16), cupy.zeros((rows, m), np.uint16)
        gu16, act16 = gu.view(np.float16), act.view(np.float16)

        def silu() -> None:  # the separate launch: act = silu(gate) * up of gu
            g = gu16[:, :m].astype(np.float32)
            act16[...] = (g / (1 + cupy.exp(-g)) * gu16[:, m:].astype(np.float32)).astype(np.float16)

        xf = from16(x16, dtype).astype(np.float64)
        ref = xf @ values.T.astype(np.float64)
        bound = k * 2.0**-24 * (np.abs(xf) @ np.abs(values.T.astype(np.float64))) + OUT_ULP[dtype] * np.abs(ref)
        g, u, bg, bu = ref[:, :m], ref[:, m:], bound[:, :m], bound[:, m:]
        sg = g / (1 + np.exp(-g))
        want = sg * u
        allowed = 1.1 * bg * (np.abs(u) + bu) + np.abs(sg) * bu + 4 * OUT_ULP[dtype] * np.abs(want) + 1e-6
        args = (rows, int(x.data.ptr), k, int(w.data.ptr), n, k, int(gu.data.ptr), n, int(act.data.ptr), m)
        dense.bandwidth_bound = True
        dense.gate_up_silu(*args, CUDA_R_16F, silu)  # times the launches
        key = (rows, n, k, CUDA_R_16F, CUDA_R_16F, 0, 1)
        labels = sorted(dense.timed_launches()[key][0])
        assert -2 in labels and len(labels) >= 3, labels  # the GEMM then its SiLU, and the form's plans
        for label in labels:
            dense.set_choices((key,), (label,))
            act.fill(0)
            dense.gate_up_silu(*args, CUDA_R_16F, silu)
            stream.synchronize()
            got = cupy.asnumpy(act16).astype(np.float64)
            err = np.abs(got - want)
            assert np.isfinite(got).all() and (err <= allowed).all(), (label, float((err / allowed).max()))
        dense.bandwidth_bound = False
        dense.close()
