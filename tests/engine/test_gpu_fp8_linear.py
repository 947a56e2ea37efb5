"""``Dense.linear`` on e4m3 weights (``QuantizedWeights.add_fp8_weight``, :mod:`fi_engine.kernels.fp8_linear`), on a GPU
(FI_FFI_RUN_GPU_TESTS=1; CuPy; torch only to decode e4m3, independently of the engine's integer decoding).

Against the float32 reference ``y = x @ (e4m3(w) * scale).T`` computed in numpy (float64 sums of the float32
products), per-row and 128x128-block scales, bfloat16 and float16 activations, 16-bit and float32 outputs:

- the GEMV (1 to 8 rows, the prepared launch too): float32 sums of exact products, so per output ``|y - ref| <=
  sum_c |x_c w_c| * 2**-20 + |ref| * ulp_out`` (2**-20: float32 rounding over k <= 4096 terms with room; ulp_out
  2**-8 bfloat16, 2**-11 float16, 0 for float32 out);
- more rows (16 and 40) with the W8A16 path (``QuantizedWeights.fp8_w8a8`` off): each weight dequantized to the 16-bit
  type first (one rounding, relative ``ulp_w`` = 2**-8 bfloat16 / 2**-11 float16), then the 16-bit GEMM: ``|y - ref| <=
  sum_c |x_c w_c| * (ulp_w + 2**-20) + |ref| * ulp_out``;
- 1 to 200 rows with the W8A8 path (the default above ``QuantizedWeights.fp8_gemv_max_rows`` rows, which the test sets
  to 0: activations quantized to e4m3 per row, or per row and 128 columns for 128x128-block weights, then cuBLASLt's FP8
  GEMM; multiples of 4 rows served whole by it): against the same product computed in numpy on the activations quantized
  exactly as the engine specifies (amax, scale = amax / 448, RNE e4m3 of x * (448 / amax) in float32), ``|y - ref_q| <=
  sum_c |xq_c w_c| * 2**-12 + |ref_q| * ulp_out`` (2**-12: Hopper's FP8 tensor cores keep fewer bits than float32
  between cuBLASLt's promotions to float32); rows cuBLASLt does not take (the last few of a count it refuses, or all of
  at most 8 rows) go through the FP8 GEMV and meet the GEMV's bound instead;
- the fused decode step's GEMVs over e4m3 weights (``FusedGemvs.linear`` with a norm, add-norm or SiLU
  prologue): their output against the plain FP8 GEMV applied to the prologue's rows (which the 16-bit fused
  kernel yields exactly through an identity weight), within 2**-20 of the magnitude sum (the same sums in the same
  order; only the module's flush-to-zero of tiny products may differ), and the new residual bit for bit;
- the FP8 decode step's GEMVs with an epilogue (``QuantizedWeights.prepared_fp8_silu``: SiLU of the gate and up outputs;
  ``QuantizedWeights.prepared_fp8_qkv_rope``: RoPE and the KV append) against the widening FP8 GEMV then FlashInfer's
  ``silu_and_mul`` / ``apply_rope_pos_ids`` and ``append_paged_kv_cache``: bit for bit, 1 to 4 rows;
- the tensor-core GEMV (from 3 rows by default) against the widening one at every row count 1-8;
- the one-row widening GEMV and its SiLU form (``gemv8_one_row``: each block walks several groups of columns when
  ``Fp8Linears.one_row_blocks_per_sm`` leaves fewer blocks than groups) against the same launches with a block per
  group and against the first row of a two-row launch (the kernels of 2 to 4 rows: the same sums in the same
  order), bit for bit;
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

from fi_engine.kernels.dense import CUDA_R_16BF, CUDA_R_16F, CUDA_R_32F, Dense  # noqa: E402
from fi_engine.kernels.fp8_linear import FP8_GEMV_MAX_ROWS  # noqa: E402
from fi_engine.kernels.fused_args import ADD_NORM, NORM, SILU  # noqa: E402

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
    dense.quantized.fp8_w8a8 = False  # the W8A16 path for every row count (the W8A8 one: the next test)
    rng = np.random.default_rng(7)
    n, k = 392, 1088  # n and k not multiples of 128: partial blocks on both axes
    bits, scales, w = random_weight(rng, n, k, block)
    dw, ds = cp.asarray(bits), cp.asarray(scales)
    dense.quantized.add_fp8_weight(dw.data.ptr, n, k, ds.data.ptr, block)
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


def quantize_rows(x: np.ndarray, group: int) -> tuple[np.ndarray, np.ndarray]:
    """The engine's dynamic e4m3 quantization of activations x [rows, k] (float32) in groups of ``group`` columns:
    the dequantized values and, per element, its group's scale."""
    k = x.shape[1]
    xq, sx = np.zeros_like(x), np.zeros_like(x)
    for c in range(0, k, group):
        part = x[:, c : c + group]
        amax = np.maximum(np.abs(part).max(axis=1, keepdims=True), np.float32(1e-12)).astype(np.float32)
        inv = (np.float32(448.0) / amax).astype(np.float32)
        scaled = np.clip((part * inv).astype(np.float32), -448, 448)
        q = torch.from_numpy(scaled).to(torch.float8_e4m3fn).float().numpy()  # round to nearest even
        xq[:, c : c + group] = q
        sx[:, c : c + group] = (amax / np.float32(448.0)).astype(np.float32)
    return xq, sx


@pytest.mark.parametrize("block", [None, (128, 128)], ids=["row", "block"])
@pytest.mark.parametrize("ab", [CUDA_R_16BF, CUDA_R_16F], ids=["bf16", "f16"])
@pytest.mark.parametrize("out_f32", [False, True], ids=["out16", "out32"])
def test_fp8_tensor_core_gemm_against_the_quantized_product(dense, block, ab, out_f32) -> None:  # type: ignore[no-untyped-def]
    dense.quantized.fp8_gemv_max_rows = 0  # the FP8 GEMM for few rows too, where cuBLASLt takes them (else the GEMV)
    rng = np.random.default_rng(9)
    n, k = 640, 1152  # multiples of 128 (cuBLASLt's block scales); 9 scale columns: the padded copy
    bits, scales, w = random_weight(rng, n, k, block)
    dw, ds = cp.asarray(bits), cp.asarray(scales)
    dense.quantized.add_fp8_weight(dw.data.ptr, n, k, ds.data.ptr, block)
    c = CUDA_R_32F if out_f32 else ab
    w64 = w.astype(np.float64)
    for rows in (1, 4, 6, 8, 9, 16, 20, 37, 64, 200):
        x = (rng.standard_normal((rows, k)) * rng.uniform(0.1, 10, (rows, 1))).astype(np.float32)
        dx = to16(x, ab)
        x = from16(dx, ab)
        dy = cp.zeros((rows, n), cp.float32 if out_f32 else cp.int16)
        dense.linear(rows, dx.data.ptr, k, dw.data.ptr, n, k, dy.data.ptr, n, ab, c)
        cp.cuda.get_current_stream().synchronize()
        got = cp.asnumpy(dy) if out_f32 else from16(dy, ab)
        xq, sx = quantize_rows(x, k if block is None else 128)
        xd = xq.astype(np.float64) * sx
        ref_q = xd @ w64.T
        bound_q = (np.abs(xd) @ np.abs(w64).T) * 2.0**-12 + np.abs(ref_q) * ULP[c] + 1e-6
        ref = x.astype(np.float64) @ w64.T  # the W8A16 GEMV's, for rows cuBLASLt left to it
        bound = (np.abs(x).astype(np.float64) @ np.abs(w64).T) * 2.0**-20 + np.abs(ref) * ULP[c] + 1e-6
        tensor_core = (np.abs(got - ref_q) <= bound_q).all(axis=1)
        gemv = (np.abs(got - ref) <= bound).all(axis=1)
        print(f"rows={rows} block={block}: {int(tensor_core.sum())} rows the W8A8 product, {int(gemv.sum())} the W8A16")
        print(
            "  w8a8 plans:", [bool(p) for p in dense.quantized.fp8._w8a8_plans.values()], dense.quantized.fp8.w8a8_error
        )
        assert (tensor_core | gemv).all(), f"rows={rows}: rows {np.nonzero(~(tensor_core | gemv))[0]} match neither"
        if rows % 4 == 0:  # cuBLASLt serves these counts whole (measured): no row left to the GEMV
            assert tensor_core.all(), f"rows={rows}: the FP8 tensor-core GEMM did not serve every row"
    # accumulate (y += x @ w.T): cuBLASLt's beta = 1
    rows = 32
    x = to16(rng.standard_normal((rows, k)).astype(np.float32), ab)
    y1 = cp.zeros((rows, n), cp.float32 if out_f32 else cp.int16)
    dense.linear(rows, x.data.ptr, k, dw.data.ptr, n, k, y1.data.ptr, n, ab, c)
    y2 = y1.copy()
    dense.linear(rows, x.data.ptr, k, dw.data.ptr, n, k, y2.data.ptr, n, ab, c, accumulate=True)
    cp.cuda.get_current_stream().synchronize()
    once = cp.asnumpy(y1) if out_f32 else from16(y1, ab)
    twice = cp.asnumpy(y2) if out_f32 else from16(y2, ab)
    # float32 out: the same sums again, so exactly twice; 16-bit out: two roundings of the product apart
    atol = 1e-6 if out_f32 else 1e-3 * float(np.abs(once).max())
    assert np.allclose(twice, 2 * once, rtol=4 * ULP[c] + 1e-6, atol=atol), "accumulate: y + x @ w.T differs"


@pytest.mark.parametrize("mode", [NORM, ADD_NORM, SILU], ids=["norm", "addnorm", "silu"])
@pytest.mark.parametrize("block", [None, (128, 128)], ids=["row", "block"])
def test_fused_fp8_gemv_is_its_prologue_then_the_fp8_gemv(dense, mode, block) -> None:  # type: ignore[no-untyped-def]
    dense.quantized.fp8_gemv_max_rows = FP8_GEMV_MAX_ROWS  # the reference: the plain FP8 GEMV for each row count
    rng = np.random.default_rng(11)
    n, k, ab = 392, 1024, CUDA_R_16BF
    bits, scales, w = random_weight(rng, n, k, block)
    dw, ds = cp.asarray(bits), cp.asarray(scales)
    dense.quantized.add_fp8_weight(dw.data.ptr, n, k, ds.data.ptr, block)
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
            dense.fused.linear(
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


@pytest.mark.parametrize("block", [None, (128, 128), (128, 64)], ids=["row", "block", "block-bk64"])
@pytest.mark.parametrize("ab", [CUDA_R_16BF, CUDA_R_16F], ids=["bf16", "f16"])
def test_tensor_core_gemv_against_the_widening_one(monkeypatch, dense, block, ab) -> None:  # type: ignore[no-untyped-def]
    """Every row count 1-8 through the tensor-core GEMV (``Fp8Linears.tensor_core_rows`` 1) and through the widening
    one (9: never tensor cores), float32 out: both are float32 sums of exact products, so they agree within
    ``2 * 2**-20`` of the magnitude sum (each within 2**-20 of the reference, the first test's bound). 64-column
    blocks are not the tensor-core kernel's (a chunk of 128 would span two scales): both runs take the widening one
    and agree bit for bit."""
    from fi_engine.kernels.fp8_linear import Fp8Linears

    rng = np.random.default_rng(5)
    n, k = 200, 1040  # a partial tile of 16 columns, a partial chunk of 128
    bits, scales, w = random_weight(rng, n, k, block)
    dw, ds = cp.asarray(bits), cp.asarray(scales)
    dense.quantized.add_fp8_weight(dw.data.ptr, n, k, ds.data.ptr, block)
    for rows in range(1, 9):
        x = to16(rng.standard_normal((rows, k)).astype(np.float32), ab)
        outs = []
        for tc_rows in (1, 9):
            monkeypatch.setattr(Fp8Linears, "tensor_core_rows", tc_rows)
            dense.quantized.fp8._packed.clear()  # packed call sites keep the kernel they were packed with
            y = cp.zeros((rows, n), cp.float32)
            dense.linear(rows, x.data.ptr, k, dw.data.ptr, n, k, y.data.ptr, n, ab, CUDA_R_32F)
            cp.cuda.get_current_stream().synchronize()
            outs.append(cp.asnumpy(y))
        mag = np.abs(from16(x, ab)).astype(np.float64) @ np.abs(w).astype(np.float64).T
        diff = np.abs(outs[0].astype(np.float64) - outs[1])
        if block == (128, 64):
            assert np.array_equal(outs[0], outs[1]), f"rows={rows}: the widening GEMV differs from itself"
        else:
            assert (diff <= mag * 2.0**-19 + 1e-30).all(), f"rows={rows}: {float((diff / mag).max())} of the magnitude"
        assert np.isfinite(outs[0]).all() and np.abs(outs[0]).max() > 0, f"rows={rows}: no product"


@pytest.mark.parametrize("rows", [1, 8, 16])
def test_every_e4m3_code_decodes_exactly(dense, rows) -> None:  # type: ignore[no-untyped-def]
    """One-hot rows of x pick single weights: y[r, j] = e4m3(w[j, c]) * 1 exactly (float32 out; the dequantized
    path rounds to bfloat16, which holds every e4m3 value), for the 254 codes that are not NaN, subnormals
    included."""
    dense.quantized.fp8_w8a8 = False  # the W8A16 path (the W8A8 one rounds the activations' scale 1 / 448)
    codes = np.array([c for c in range(256) if c & 0x7F != 0x7F], np.uint8)  # 254
    n, k = 32, 256
    bits = np.zeros((n, k), np.uint8)
    for j in range(n):
        bits[j, : codes.size] = np.roll(codes, 7 * j)
    dw, ds = cp.asarray(bits), cp.ones(n, cp.float32)
    dense.quantized.add_fp8_weight(dw.data.ptr, n, k, ds.data.ptr, None)
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
    dense.quantized.add_fp8_weight(bits.data.ptr, 64, 256, scales.data.ptr, None)
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
            dense.quantized.add_fp8_weight(*args)


@pytest.mark.parametrize("block", [None, (128, 128)], ids=["row", "block"])
@pytest.mark.parametrize("ab", [CUDA_R_16BF, CUDA_R_16F], ids=["bf16", "f16"])
@pytest.mark.parametrize("k", [1088, 4112], ids=["k1088", "k4112"])
def test_one_row_gemv_walking_its_groups_gives_the_same_bits(monkeypatch, dense, block, ab, k) -> None:  # type: ignore[no-untyped-def]
    """The one-row widening GEMV (``gemv8_*_1``) and its SiLU form with one block an SM (``one_row_blocks_per_sm``
    1: each block walks 3 to 4 groups of columns, loading the next group's weights while it sums this one's) against
    a block per group (16 an SM exceeds the groups here) and against row 0 of a two-row launch of x's row twice (the
    kernels of 2 to 4 rows, another schedule of the same sums): bit for bit. An odd column count (a last group
    repeats its column), k a multiple of 128 vectors plus 1 (lanes with unequal counts of vectors) and k under 128
    vectors (lanes with none)."""
    from fi_engine.kernels.fp8_linear import Fp8Linears

    rng = np.random.default_rng(41)
    n = 2 * 132 * 3 + 1  # 397 groups of 2 columns over 132 blocks (an H100's SMs), the last one odd
    m = n // 2  # the SiLU form's pairs (gate row o, up row o + m): 396 groups
    bits, scales, _ = random_weight(rng, n, k, block)
    dw, ds = cp.asarray(bits), cp.asarray(scales)
    dense.quantized.add_fp8_weight(dw.data.ptr, n, k, ds.data.ptr, block)
    bits2, scales2, _ = random_weight(rng, 2 * m, k, block)
    dg, dgs = cp.asarray(bits2), cp.asarray(scales2)
    dense.quantized.add_fp8_weight(dg.data.ptr, 2 * m, k, dgs.data.ptr, block)
    x = to16(rng.standard_normal((1, k)).astype(np.float32), ab)
    x2 = cp.concatenate([x, x])
    stream = cp.cuda.get_current_stream()
    outs = {}
    for per_sm in (1, 16):
        monkeypatch.setattr(Fp8Linears, "one_row_blocks_per_sm", per_sm)
        y, act = cp.zeros((1, n), cp.int16), cp.zeros((1, m), cp.int16)
        dense.prepared_linear(1, x.data.ptr, k, dw.data.ptr, n, k, y.data.ptr, n, ab, ab)()
        dense.quantized.prepared_fp8_silu(1, x.data.ptr, k, dg.data.ptr, k, act.data.ptr, m, ab)()
        outs[per_sm] = (y, act)
    y2, act2 = cp.zeros((2, n), cp.int16), cp.zeros((2, m), cp.int16)
    dense.prepared_linear(2, x2.data.ptr, k, dw.data.ptr, n, k, y2.data.ptr, n, ab, ab)()
    dense.quantized.prepared_fp8_silu(2, x2.data.ptr, k, dg.data.ptr, k, act2.data.ptr, m, ab)()
    stream.synchronize()
    y, act = outs[1]
    assert np.isfinite(from16(y, ab)).all() and np.abs(from16(y, ab)).max() > 0, "no product"
    for name, (got, want) in {
        "gemv, one block a group": (y, outs[16][0]),
        "gemv, two rows' first": (y[0], y2[0]),
        "silu, one block a group": (act, outs[16][1]),
        "silu, two rows' first": (act[0], act2[0]),
    }.items():
        np.testing.assert_array_equal(got.get(), want.get(), err_msg=name)


def _descriptor(buf: cp.ndarray, shape: tuple[int, ...], ab: int, strides: tuple[int, ...] | None = None, at: int = 0):  # type: ignore[no-untyped-def]
    from fi_engine.kernels import flashinfer as kernels

    dtype = "bfloat16" if ab == CUDA_R_16BF else "float16"
    return kernels.descriptor(buf.data.ptr + 2 * at, shape, dtype, cp.cuda.Device().id, strides, owner=buf)


# (8 chunks of 128 over 8 warps a block: one a warp; 19: warps 0-2 three, the others two, so runs end on either set)
@pytest.mark.parametrize("k", [1024, 2432])
@pytest.mark.parametrize("block", [None, (128, 128)], ids=["row", "block"])
@pytest.mark.parametrize("ab", [CUDA_R_16BF, CUDA_R_16F], ids=["bf16", "f16"])
def test_the_lean_loop_gives_the_plain_loops_bits(monkeypatch, block, ab, k) -> None:  # type: ignore[no-untyped-def]
    """``Fp8Linears.lean_loop`` (k a multiple of 128) changes how the tensor-core GEMV's chunks are loaded and held,
    not a sum: at 3-8 rows, 16-bit and float32 outputs, and its SiLU form at 3 and 4 rows, the plain loop's bits,
    each compiled by a Dense of its own (n 200: a partial tile of 16 columns)."""
    from fi_engine.kernels.fp8_linear import Fp8Linears

    rng = np.random.default_rng(51)
    n = 200
    bits, scales, _ = random_weight(rng, n, k, block)
    xs = [to16(rng.standard_normal((rows, k)).astype(np.float32), ab) for rows in range(3, 9)]
    got: dict[bool, list] = {}
    monkeypatch.setattr(Fp8Linears, "tensor_core_rows", 3)
    for lean in (False, True):
        monkeypatch.setattr(Fp8Linears, "lean_loop", lean)
        stream = cp.cuda.Stream(non_blocking=True)
        with stream:
            d = Dense(stream)
            dw, ds = cp.asarray(bits), cp.asarray(scales)
            d.quantized.add_fp8_weight(dw.data.ptr, n, k, ds.data.ptr, block)
            assert d.quantized.fp8 is not None and d.quantized.fp8._pairs_tc, "the SiLU form on tensor cores"
            outs = []
            for x in xs:
                rows = x.shape[0]
                for out in (ab, CUDA_R_32F):
                    y = cp.zeros((rows, n), cp.float32 if out == CUDA_R_32F else cp.int16)
                    d.linear(rows, x.data.ptr, k, dw.data.ptr, n, k, y.data.ptr, n, ab, out)
                    outs.append(y)
                if rows <= 4:  # (the SiLU form's rows: gate and up the weight's halves)
                    act = cp.zeros((rows, n // 2), cp.int16)
                    d.quantized.prepared_fp8_silu(rows, x.data.ptr, k, dw.data.ptr, k, act.data.ptr, n // 2, ab)()
                    outs.append(act)
            stream.synchronize()
            got[lean] = [cp.asnumpy(y) for y in outs]
            d.close()
            del dw, ds
    assert len(got[True]) == len(got[False]) == 2 * 6 + 2
    for i, (a, b) in enumerate(zip(got[False], got[True], strict=True)):
        if a.dtype == np.float32:
            assert np.isfinite(a).all() and np.abs(a).max() > 0, f"output {i}: no product"
        assert np.array_equal(a, b), f"output {i}: the lean loop's bits differ"


@pytest.mark.parametrize("tc_rows", [9, 3], ids=["widening", "tensor-cores-from-3"])
@pytest.mark.parametrize("block", [None, (128, 128)], ids=["row", "block"])
@pytest.mark.parametrize("ab", [CUDA_R_16BF, CUDA_R_16F], ids=["bf16", "f16"])
def test_fp8_silu_epilogue_is_the_fp8_gemv_then_silu_and_mul(monkeypatch, dense, block, ab, tc_rows) -> None:  # type: ignore[no-untyped-def]
    """``QuantizedWeights.prepared_fp8_silu`` (the gate/up GEMV of the FP8 decode step with SiLU as its epilogue), 1 to
    4 rows, against the launches it replaces: the FP8 GEMV into ``[rows, 2 m]``, then FlashInfer's ``silu_and_mul``. Bit
    for bit: the epilogue's sums are the GEMV's (the widening one, or on tensor cores from ``tensor_core_rows`` rows in
    both), rounded as its output, then FlashInfer's arithmetic. A last odd pair of columns (m = 201: a partial tile of
    the tensor-core form too) and a partial chunk of k."""
    from fi_engine.kernels import flashinfer as kernels
    from fi_engine.kernels.fp8_linear import Fp8Linears

    monkeypatch.setattr(Fp8Linears, "tensor_core_rows", tc_rows)
    rng = np.random.default_rng(21)
    m, k = 201, 1040
    bits, scales, _ = random_weight(rng, 2 * m, k, block)
    dw, ds = cp.asarray(bits), cp.asarray(scales)
    dense.quantized.add_fp8_weight(dw.data.ptr, 2 * m, k, ds.data.ptr, block)
    stream = cp.cuda.get_current_stream()
    for rows in (1, 2, 3, 4):
        x = to16(rng.standard_normal((rows, k)).astype(np.float32), ab)
        gu, got = cp.zeros((rows, 2 * m), cp.int16), cp.full((rows, m + 1), 7, cp.int16)  # (the last: never written)
        dense.linear(rows, x.data.ptr, k, dw.data.ptr, 2 * m, k, gu.data.ptr, 2 * m, ab, ab)
        # FlashInfer's silu_and_mul takes widths of whole 16-byte vectors: gate and up each padded to 208 columns
        padded, want = cp.zeros((rows, 2, 208), cp.int16), cp.zeros((rows, 208), cp.int16)
        padded[:, 0, :m], padded[:, 1, :m] = gu[:, :m], gu[:, m:]
        kernels.silu_and_mul(_descriptor(padded, (rows, 416), ab), _descriptor(want, (rows, 208), ab), stream.ptr)
        want = want[:, :m]
        dense.quantized.prepared_fp8_silu(rows, x.data.ptr, k, dw.data.ptr, k, got.data.ptr, m + 1, ab)()
        stream.synchronize()
        a, b = from16(got[:, :m], ab), from16(want, ab)
        assert np.isfinite(b).all() and np.abs(b).max() > 0, f"rows={rows}: no product"
        np.testing.assert_array_equal(got[:, :m].get(), want.get(), err_msg=f"rows={rows}: {np.abs(a - b).max()}")
        assert (got[:, m].get() == 7).all(), f"rows={rows}: a column past y was written"


@pytest.mark.parametrize("one_row_blocks", [16, 1], ids=["block-a-group", "blocks-walk-groups"])
@pytest.mark.parametrize(("tc_rows", "lean"), [(9, False), (3, False), (3, True)],
                         ids=["widening", "tensor-cores-from-3", "tensor-cores-lean-loop"])  # fmt: skip
@pytest.mark.parametrize("llama3", [False, True], ids=["rope", "llama31"])
@pytest.mark.parametrize("block", [None, (128, 128)], ids=["row", "block"])
def test_fp8_rope_epilogue_is_the_fp8_gemv_then_rope_and_append(  # type: ignore[no-untyped-def]
    monkeypatch, dense, block, llama3, tc_rows, lean, one_row_blocks
) -> None:
    """``QuantizedWeights.prepared_fp8_qkv_rope`` (the QKV GEMV of the FP8 decode step with FlashInfer's RoPE, plain or
    Llama 3.1, and the KV append as its epilogue), bfloat16, head dim 128, 1 to 4 rows at positions up to 300 on
    shuffled pages, against the FP8 GEMV into qkv (the widening one, or on tensor cores from ``tensor_core_rows`` rows
    in both: the epilogue shares its sums), then ``apply_rope_pos_ids`` in place and ``append_paged_kv_cache`` through
    fi_ffi: qkv and both caches bit for bit. One row with a block per pair and with fewer blocks than pairs (each walks
    several: ``Fp8Linears.one_row_blocks_per_sm`` 1). On tensor cores with the lean loop too (``Fp8Linears.lean_loop``,
    k a multiple of 128 here), compiled at the weight's registration."""
    from helpers.decode_pages import decode_page_table, rope_append, rope_config

    from fi_engine.kernels import flashinfer as kernels
    from fi_engine.kernels.fp8_linear import Fp8Linears

    monkeypatch.setattr(Fp8Linears, "lean_loop", lean)
    monkeypatch.setattr(Fp8Linears, "tensor_core_rows", tc_rows)
    monkeypatch.setattr(Fp8Linears, "one_row_blocks_per_sm", one_row_blocks)  # 1: 132 blocks over 512 pairs
    rng = np.random.default_rng(31 + llama3)
    ab, d, hq, hk, k, ps, pages = CUDA_R_16BF, 128, 4, 2, 512, 16, 40
    n = (hq + 2 * hk) * d
    bits, scales, _ = random_weight(rng, n, k, block)
    dw, ds = cp.asarray(bits), cp.asarray(scales)
    dense.quantized.add_fp8_weight(dw.data.ptr, n, k, ds.data.ptr, block)
    rope = rope_config(llama3)
    stream = cp.cuda.get_current_stream()
    for rows in (1, 2, 3, 4):
        x = to16(rng.standard_normal((rows, k)).astype(np.float32), ab)
        meta = decode_page_table(rng, rows, ps, pages)
        start = to16(rng.standard_normal((2, pages, ps, hk, d)).astype(np.float32), ab)
        caches = {f: start.copy() for f in ("fused", "sep")}
        qkv = {f: cp.zeros((rows, n), cp.int16) for f in ("fused", "sep")}
        kv = caches["fused"]
        epilogue = rope_append(meta, rope, hq, hk, d, kv, pages)
        dense.quantized.prepared_fp8_qkv_rope(
            rows, x.data.ptr, k, dw.data.ptr, k, qkv["fused"].data.ptr, n, ab, epilogue
        )()
        y = qkv["sep"]
        dense.linear(rows, x.data.ptr, k, dw.data.ptr, n, k, y.data.ptr, n, ab, ab)
        q_v = _descriptor(y, (rows, hq, d), ab, (n, d, 1))
        k_v = _descriptor(y, (rows, hk, d), ab, (n, d, 1), at=hq * d)
        v_v = _descriptor(y, (rows, hk, d), ab, (n, d, 1), at=(hq + hk) * d)
        dev = cp.cuda.Device().id
        ints = {name: kernels.descriptor(a.data.ptr, a.shape, "int32", dev, owner=a) for name, a in meta.items()}
        kernels.rope_inplace(q_v, k_v, ints["positions"], rope, stream.ptr)
        sep = caches["sep"]
        kernels.append_kv(
            k_v, v_v, ints["batch_indices"], ints["positions"], _descriptor(sep[0], (pages, ps, hk, d), ab),
            _descriptor(sep[1], (pages, ps, hk, d), ab), ints["kv_indices"], ints["kv_indptr"], ints["last"],
            stream.ptr,
        )  # fmt: skip
        stream.synchronize()
        what = f"{'llama31' if llama3 else 'rope'} block={block} rows={rows}"
        np.testing.assert_array_equal(qkv["fused"].get(), y.get(), err_msg=f"{what}: qkv")
        np.testing.assert_array_equal(caches["fused"].get(), sep.get(), err_msg=f"{what}: caches")
        assert not np.array_equal(caches["fused"].get(), start.get()), f"{what}: nothing appended"
        assert np.abs(from16(y, ab)).max() > 0, f"{what}: no product"


def test_fp8_epilogue_gemvs_refuse_bad_calls(dense) -> None:  # type: ignore[no-untyped-def]
    """``prepared_fp8_silu`` / ``prepared_fp8_qkv_rope``: a weight not registered as FP8, an odd gate/up row count,
    more than 4 rows, a misaligned x, y over x, a shape unlike the registration, a head dim the RoPE does not serve:
    ValueError naming the argument, nothing launched."""
    from fi_engine.kernels.fused_args import RopeAppend

    k = 256
    gate_up, odd, w16 = cp.zeros((64, k), cp.uint8), cp.zeros((63, k), cp.uint8), cp.zeros((64, k), cp.int16)
    scales = cp.ones(64, cp.float32)
    x, y = cp.zeros((4, 2 * k), cp.int16), cp.zeros((4, 64), cp.int16)
    dense.quantized.add_fp8_weight(gate_up.data.ptr, 64, k, scales.data.ptr, None)
    dense.quantized.add_fp8_weight(odd.data.ptr, 63, k, scales.data.ptr, None)
    silu = dense.quantized.prepared_fp8_silu
    good = (1, x.data.ptr, k, gate_up.data.ptr, k, y.data.ptr, 32, CUDA_R_16BF)
    for args, name in (
        ((1, x.data.ptr, k, w16.data.ptr, k, y.data.ptr, 32, CUDA_R_16BF), "w"),
        ((1, x.data.ptr, k, odd.data.ptr, k, y.data.ptr, 32, CUDA_R_16BF), "w"),
        ((5, *good[1:]), "rows"),
        ((1, x.data.ptr + 8, *good[2:]), "x"),
        ((2, x.data.ptr, k + 4, *good[3:]), "x_ld"),
        ((1, x.data.ptr, k, gate_up.data.ptr, k, x.data.ptr + 256, 32, CUDA_R_16BF), "y"),  # x's row's 2nd half
        ((1, x.data.ptr, k, gate_up.data.ptr, 128, y.data.ptr, 32, CUDA_R_16BF), "n, k"),
        ((1, *good[1:7], CUDA_R_32F), "ab_type, c_type"),
    ):
        with pytest.raises(ValueError, match=f"^{name}:"):
            silu(*args)
    silu(*good)()  # the good call launches
    caches = cp.zeros((2, 4, 16, 1, 96), cp.int16)
    index = cp.zeros(8, cp.int32)
    rope = RopeAppend(
        hq=1, hk=1, d=96, theta=1e4, scale=1.0, llama3=False, low_freq_factor=1.0, high_freq_factor=4.0,
        old_context_len=8192.0, positions=index.data.ptr, batch_indices=index.data.ptr, kv_indptr=index.data.ptr,
        kv_indices=index.data.ptr, k_cache=caches[0].data.ptr, v_cache=caches[1].data.ptr, page_size=16,
        num_pages=4, stride_page=16 * 96, stride_n=96, stride_h=96,
    )  # fmt: skip
    with pytest.raises(ValueError, match="^rope.d:"):
        dense.quantized.prepared_fp8_qkv_rope(1, x.data.ptr, k, gate_up.data.ptr, k, y.data.ptr, 64, CUDA_R_16BF, rope)
    with pytest.raises(TypeError, match="^rope:"):
        dense.quantized.prepared_fp8_qkv_rope(1, x.data.ptr, k, gate_up.data.ptr, k, y.data.ptr, 64, CUDA_R_16BF, None)
    cp.cuda.get_current_stream().synchronize()
