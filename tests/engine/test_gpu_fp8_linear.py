"""``Dense.linear`` on e4m3 weights (``Dense.add_fp8_weight``, :mod:`fi_engine.fp8_linear`), on a GPU
(FI_FFI_RUN_GPU_TESTS=1; CuPy; torch only to decode e4m3, independently of the engine's integer decoding).

Against the float32 reference ``y = x @ (e4m3(w) * scale).T`` computed in numpy (float64 sums of the float32
products), per-row and 128x128-block scales, bfloat16 and float16 activations, 16-bit and float32 outputs:

- the GEMV (1 to 8 rows, the prepared launch too): float32 sums of exact products, so per output ``|y - ref| <=
  sum_c |x_c w_c| * 2**-20 + |ref| * ulp_out`` (2**-20: float32 rounding over k <= 4096 terms with room; ulp_out
  2**-8 bfloat16, 2**-11 float16, 0 for float32 out);
- more rows (16 and 40): each weight dequantized to the 16-bit type first (one rounding, relative ``ulp_w`` =
  2**-8 bfloat16 / 2**-11 float16), then the 16-bit GEMM: ``|y - ref| <= sum_c |x_c w_c| * (ulp_w + 2**-20) + |ref|
  * ulp_out``;
- the fused decode step's GEMVs over e4m3 weights (``Dense.fused_linear`` with a norm, add-norm or SiLU
  prologue): their output against the plain FP8 GEMV applied to the prologue's rows (which the 16-bit fused
  kernel yields exactly through an identity weight), within 2**-20 of the magnitude sum (the same sums in the same
  order; only the module's flush-to-zero of tiny products may differ), and the new residual bit for bit;
- bad calls: a shape that differs from the registration, an e4m3 weight with float32 activations, a misaligned
  or NULL address, a block that is no power-of-two columns: ValueError naming the argument.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from helpers.gpu import require_torch

if os.environ.get("FI_FFI_RUN_GPU_TESTS") != "1":
    pytest.skip("GPU tests run only with FI_FFI_RUN_GPU_TESTS=1 on a CUDA machine", allow_module_level=True)

cp = pytest.importorskip("cupy", reason="the engine needs CuPy")
torch = require_torch()  # the e4m3 reference decodes through torch.float8_e4m3fn

from fi_engine.dense import ADD_NORM, CUDA_R_16BF, CUDA_R_16F, CUDA_R_32F, NORM, SILU, Dense  # noqa: E402

pytestmark = pytest.mark.gpu

ULP = {CUDA_R_16BF: 2.0**-8, CUDA_R_16F: 2.0**-11, CUDA_R_32F: 0.0}


def e4m3_values(bits: np.ndarray) -> np.ndarray:
    return torch.from_numpy(bits).view(torch.float8_e4m3fn).float().numpy()


def to16(x: np.ndarray, ab: int) -> cp.ndarray:
    t = torch.from_numpy(x).to(torch.bfloat16 if ab == CUDA_R_16BF else torch.float16)
    return cp.asarray(t.view(torch.int16).numpy())


def from16(buf: cp.ndarray, ab: int) -> np.ndarray:
    t = torch.from_numpy(cp.asnumpy(buf)).view(torch.bfloat16 if ab == CUDA_R_16BF else torch.float16)
    return t.float().numpy()


@pytest.fixture
def dense():  # type: ignore[no-untyped-def]  # one per test: its FP8 registrations die with it
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        d = Dense(stream)
        yield d
        d.close()


def random_weight(rng: np.random.Generator, n: int, k: int, block: tuple[int, int] | None):  # type: ignore[no-untyped-def]
    bits = rng.integers(0, 256, (n, k), dtype=np.uint8)
    bits[(bits & 0x7F) == 0x7F] = 0x3C  # no NaN codes (0x7f, 0xff): 1.5 in their place
    bits[0, :16] = np.arange(16, dtype=np.uint8)  # zero and the subnormals, +-, in the first rows
    bits[1, :16] = np.arange(16, dtype=np.uint8) | 0x80
    if block is None:
        scales = rng.uniform(0.5, 2.0, n).astype(np.float32) / 64
        full = np.repeat(scales[:, None], k, axis=1)
    else:
        bn, bk = block
        scales = rng.uniform(0.5, 2.0, (-(-n // bn), -(-k // bk))).astype(np.float32) / 64
        full = np.repeat(np.repeat(scales, bn, axis=0), bk, axis=1)[:n, :k]
    return bits, scales, e4m3_values(bits) * full


@pytest.mark.parametrize("block", [None, (128, 128)], ids=["row", "block"])
@pytest.mark.parametrize("ab", [CUDA_R_16BF, CUDA_R_16F], ids=["bf16", "f16"])
@pytest.mark.parametrize("out_f32", [False, True], ids=["out16", "out32"])
def test_fp8_linear_against_float32(dense, block, ab, out_f32) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(7)
    n, k = 392, 1088  # n and k not multiples of 128: partial blocks on both axes
    bits, scales, w = random_weight(rng, n, k, block)
    dw, ds = cp.asarray(bits), cp.asarray(scales)
    dense.add_fp8_weight(dw.data.ptr, n, k, ds.data.ptr, block)
    c = CUDA_R_32F if out_f32 else ab
    for rows in (1, 2, 3, 4, 5, 8, 16, 40):
        x = rng.standard_normal((rows, k)).astype(np.float32)
        dx = to16(x, ab)
        x = from16(dx, ab)  # the rounded activations are the reference's input
        dy = cp.zeros((rows, n), cp.float32 if out_f32 else cp.int16)
        dense.linear(rows, dx.data.ptr, k, dw.data.ptr, n, k, dy.data.ptr, n, ab, c)
        if rows <= 8:  # the prepared launch (a decode graph's) gives the same
            dy2 = cp.zeros_like(dy)
            dense.prepared_linear(rows, dx.data.ptr, k, dw.data.ptr, n, k, dy2.data.ptr, n, ab, c)()
            cp.cuda.get_current_stream().synchronize()
            assert cp.array_equal(dy, dy2), f"rows={rows}: the prepared launch differs"
        cp.cuda.get_current_stream().synchronize()
        got = cp.asnumpy(dy) if out_f32 else from16(dy, ab)
        ref = (x.astype(np.float64) @ w.astype(np.float64).T).astype(np.float64)
        mag = np.abs(x).astype(np.float64) @ np.abs(w).astype(np.float64).T
        weight_ulp = 0.0 if rows <= 8 else ULP[ab]
        bound = mag * (weight_ulp + 2.0**-20) + np.abs(ref) * ULP[c] + 1e-6
        err = np.abs(got - ref)
        worst = float((err / bound).max())
        print(f"rows={rows} block={block} max err {err.max():.3g} (worst share of the bound {worst:.3f})")
        assert worst <= 1.0, f"rows={rows}: error {err.max()} over the bound"


@pytest.mark.parametrize("mode", [NORM, ADD_NORM, SILU], ids=["norm", "addnorm", "silu"])
@pytest.mark.parametrize("block", [None, (128, 128)], ids=["row", "block"])
def test_fused_fp8_gemv_is_its_prologue_then_the_fp8_gemv(dense, mode, block) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(11)
    n, k, ab = 392, 1024, CUDA_R_16BF
    bits, scales, w = random_weight(rng, n, k, block)
    dw, ds = cp.asarray(bits), cp.asarray(scales)
    dense.add_fp8_weight(dw.data.ptr, n, k, ds.data.ptr, block)
    eye = to16(np.eye(k, dtype=np.float32), ab)  # in @ I.T = in, exactly (one product per sum)
    for rows in (1, 2, 3, 4):
        xw = 2 * k if mode == SILU else k
        x = to16(rng.standard_normal((rows, xw)).astype(np.float32), ab)
        h = to16(rng.standard_normal((rows, k)).astype(np.float32), ab)
        nw = to16(rng.uniform(0.5, 1.5, k).astype(np.float32), ab)
        outs = {}
        for name, weight, width in (("in", eye, k), ("fp8", dw, n)):
            y = cp.zeros((rows, width), cp.int16)
            h_out = cp.zeros((rows, k), cp.int16)
            dense.fused_linear(
                mode, rows, x.data.ptr, xw, weight.data.ptr, width, k, y.data.ptr, width, ab, ab,
                h.data.ptr, k, nw.data.ptr, h_out.data.ptr if mode == ADD_NORM else 0, 1e-5,
            )  # fmt: skip
            outs[name] = (y, h_out)
        y_ref = cp.zeros((rows, n), cp.int16)
        dense.linear(rows, outs["in"][0].data.ptr, k, dw.data.ptr, n, k, y_ref.data.ptr, n, ab, ab)
        cp.cuda.get_current_stream().synchronize()
        got, want = from16(outs["fp8"][0], ab), from16(y_ref, ab)
        mag = np.abs(from16(outs["in"][0], ab)).astype(np.float64) @ np.abs(w).astype(np.float64).T
        bound = mag * 2.0**-20 + np.abs(want) * 2.0**-8
        assert (np.abs(got - want) <= bound).all(), f"rows={rows}: {np.abs(got - want).max()}"
        print(f"mode={mode} rows={rows}: {100 * float((got == want).mean()):.1f} % bitwise equal")
        if mode == ADD_NORM:
            assert cp.array_equal(outs["fp8"][1], outs["in"][1]), "the new residual differs"


@pytest.mark.parametrize("rows", [1, 8, 16])
def test_every_e4m3_code_decodes_exactly(dense, rows) -> None:  # type: ignore[no-untyped-def]
    """One-hot rows of x pick single weights: y[r, j] = e4m3(w[j, c]) * 1 exactly (float32 out; the dequantized
    path rounds to bfloat16, which holds every e4m3 value), for the 254 codes that are not NaN, subnormals
    included."""
    codes = np.array([c for c in range(256) if c & 0x7F != 0x7F], np.uint8)  # 254
    n, k = 32, 256
    bits = np.zeros((n, k), np.uint8)
    for j in range(n):
        bits[j, : codes.size] = np.roll(codes, 7 * j)
    dw, ds = cp.asarray(bits), cp.ones(n, cp.float32)
    dense.add_fp8_weight(dw.data.ptr, n, k, ds.data.ptr, None)
    want = e4m3_values(bits)
    for first in range(0, codes.size, rows):
        x = np.zeros((rows, k), np.float32)
        for r in range(rows):
            x[r, min(first + r, k - 1)] = 1.0
        dx = to16(x, CUDA_R_16BF)
        dy = cp.zeros((rows, n), cp.float32)
        dense.linear(rows, dx.data.ptr, k, dw.data.ptr, n, k, dy.data.ptr, n, CUDA_R_16BF, CUDA_R_32F)
        got = cp.asnumpy(dy)
        for r in range(rows):
            c = min(first + r, k - 1)
            assert np.array_equal(got[r], want[:, c]), f"column {c}: {got[r][:4]} != {want[:4, c]}"


def test_bad_fp8_calls_name_the_argument(dense) -> None:  # type: ignore[no-untyped-def]
    bits = cp.zeros((64, 256), cp.uint8)
    scales = cp.ones(64, cp.float32)
    x = cp.zeros((1, 256), cp.int16)
    y = cp.zeros((1, 64), cp.int16)
    dense.add_fp8_weight(bits.data.ptr, 64, 256, scales.data.ptr, None)
    with pytest.raises(ValueError, match="n, k"):
        dense.linear(1, x.data.ptr, 256, bits.data.ptr, 32, 256, y.data.ptr, 64, CUDA_R_16BF, CUDA_R_16BF)
    with pytest.raises(ValueError, match="ab_type, c_type"):
        dense.linear(1, x.data.ptr, 256, bits.data.ptr, 64, 256, y.data.ptr, 64, CUDA_R_32F, CUDA_R_32F)
    for args, name in (
        ((bits.data.ptr + 1, 64, 256, scales.data.ptr, None), "w"),
        ((0, 64, 256, scales.data.ptr, None), "w"),
        ((bits.data.ptr, 64, 256, scales.data.ptr + 2, None), "scales"),
        ((bits.data.ptr, 64, 250, scales.data.ptr, None), "k"),
        ((bits.data.ptr, 64, 256, scales.data.ptr, (128, 96)), "block"),
        ((bits.data.ptr, 0, 256, scales.data.ptr, None), "n"),
    ):
        with pytest.raises(ValueError, match=f"^{name}:"):
            dense.add_fp8_weight(*args)
