"""The skinny GEMM's GPU test cases (tests/engine/test_gpu_skinny_gemm.py): random weights in each format with
their float32 values, the float32 reference's error bound, and a plan launched into a fresh output that proves it
wrote nothing past ``[rows, n]``. Imported by GPU tests only (CuPy)."""

from __future__ import annotations

from typing import Any

import cupy
import numpy as np

from fi_engine.checkpoint.fp8_weights import E4M3, quantize_e4m3
from fi_engine.kernels.skinny_gemm import E4M3_ROW, W16

from .random_llama import bf16_bits

OUT_ULP = {"bfloat16": 2.0**-8, "float16": 2.0**-11}  # half an ulp, relative
SENTINEL = 0x7BCD  # a 16-bit pattern the kernels never write where they must not write


def to16(a: np.ndarray, dtype: str) -> np.ndarray:
    return a.astype(np.float16).view(np.uint16) if dtype == "float16" else bf16_bits(a.astype(np.float32))


def from16(a: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "float16":
        return a.view(np.float16).astype(np.float32)
    return (a.astype(np.uint32) << 16).view(np.float32)


def weights(rng: np.random.Generator, fmt: int, n: int, k: int, dtype: str) -> tuple[Any, Any, np.ndarray, Any]:
    """``(w on the GPU, scales on the GPU or None, its values float32 [n, k], block)``."""
    if fmt == W16:
        w16 = to16(rng.standard_normal((n, k)).astype(np.float32), dtype)
        return cupy.asarray(w16), None, from16(w16, dtype), None
    codes = quantize_e4m3(rng.standard_normal((n, k)) * 2.0)
    if fmt == E4M3_ROW:
        scales = rng.uniform(0.5, 2.0, n).astype(np.float32) / 16
        return cupy.asarray(codes), cupy.asarray(scales), E4M3[codes] * scales[:, None], None
    scales = rng.uniform(0.5, 2.0, (-(-n // 128), -(-k // 128))).astype(np.float32) / 16
    full = np.repeat(np.repeat(scales, 128, 0), 128, 1)[:n, :k]
    return cupy.asarray(codes), cupy.asarray(scales), E4M3[codes] * full, (128, 128)


def check(got: np.ndarray, x: np.ndarray, values: np.ndarray, rows: int, dtype: str, f32: bool) -> float:
    """The worst error over its bound (asserting it is at most 1)."""
    xf = x[:rows].astype(np.float64)
    ref = xf @ values.T.astype(np.float64)
    k = values.shape[1]
    bound = k * 2.0**-24 * (np.abs(xf) @ np.abs(values.T)) + (0 if f32 else OUT_ULP[dtype]) * np.abs(ref) + 1e-30
    err = np.abs(got - ref)
    assert np.isfinite(got).all() and (err <= bound).all(), f"{float((err / bound).max()):.2f} of the bound"
    return float((err / bound).max())


def check_int4(got: np.ndarray, x: np.ndarray, values: np.ndarray, scales: np.ndarray, dtype: str, f32: bool) -> None:
    """An int4 plan's outputs ``got [rows, n]`` against the float32 reference over ``values [n, k]`` (the int4 GEMV's
    bound, tests/engine/test_gpu_int4_linear.py: float32 sums of the exact integers code + M -- 128 bfloat16, 1024
    float16 -- less (M + zero) times x's float32 sum a half tile, times the group's scale ``scales [n, k]``)."""
    xd = x[: got.shape[0]].astype(np.float64)
    ref = xd @ values.T
    big_m = 128 if dtype == "bfloat16" else 1024
    bound = (np.abs(xd) @ np.abs(values.T)) * 2.0**-20 + (np.abs(xd) @ scales.T) * (big_m + 16) * 2.0**-18
    bound += (0 if f32 else OUT_ULP[dtype]) * np.abs(ref) + 1e-30
    err = np.abs(got - ref)
    assert np.isfinite(got).all() and (err <= bound).all(), f"{float((err / bound).max()):.2f} of the bound"


def outputs(dense: Any, plan: Any, rows: int, n: int, ld: int, dtype: str, f32: bool) -> np.ndarray:
    """``plan`` launched into a fresh y of ``ld`` columns filled with a sentinel: its ``[rows, n]`` outputs as float32,
    asserting that nothing past them was written."""
    y = cupy.full((33, ld), SENTINEL, np.uint32 if f32 else np.uint16)
    args = (plan.args[0], plan.args[1], int(y.data.ptr), *plan.args[3:])
    dense.launcher.prepared_kernel(plan.function, plan.grid, plan.threads, plan.smem, args, "skinny")()
    cupy.cuda.get_current_stream().synchronize()
    out = cupy.asnumpy(y)
    assert (out[rows:] == SENTINEL).all() and (out[:, n:] == SENTINEL).all(), "wrote past its output"
    return out[:rows, :n].view(np.float32) if f32 else from16(out[:rows, :n], dtype)


def int4_weight(rng: np.random.Generator, n: int, k: int, group_size: int, interleaved: bool) -> tuple[Any, ...]:
    """``(weights, records on the GPU, the float32 weight [n, k] in output order, scales [n, k], half_n)``: random
    AWQ-style codes, zeros and float16 scales in the int4 GEMV's layout; ``interleaved``: two halves stored
    interleaved by 8 rows (a gate/up weight), their outputs in order."""
    from fi_engine.checkpoint.int4_weights import Int4Matrix, decode_gemv_layout

    def matrix(rows: int) -> Int4Matrix:
        groups = k // group_size
        scales = (rng.uniform(0.5, 2.0, (groups, rows)) * 0.02).astype(np.float16).astype(np.float32)
        codes = rng.integers(0, 16, (rows, k)).astype(np.uint8)
        return Int4Matrix(codes, rng.integers(0, 17, (groups, rows)).astype(np.uint8), scales, group_size)

    m = Int4Matrix.interleaved(matrix(n // 2), matrix(n // 2)) if interleaved else matrix(n)
    weights, records = m.gemv_layout()
    stored = decode_gemv_layout(weights, records, k)  # rows as stored
    scales = np.repeat(m.scales.T.astype(np.float64), group_size, axis=1)
    half_n = n // 2 if interleaved else 0
    order = np.arange(n)
    if half_n:  # stored row j holds output column (j // 16) * 8 + j % 8 (+ half_n for the second 8 of each 16)
        order = (order >> 4) * 8 + (order & 7) + ((order >> 3) & 1) * half_n
    out_w, out_s = np.empty_like(stored), np.empty_like(scales)
    out_w[order], out_s[order] = stored, scales
    return cupy.asarray(weights), cupy.asarray(records), out_w, out_s, half_n
