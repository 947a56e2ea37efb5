"""``Dense.linear`` on int4 weights (``QuantizedWeights.add_int4_weight``, :mod:`fi_engine.kernels.int4_linear`), on a
GPU (FI_FFI_RUN_GPU_TESTS=1; CuPy; torch only to round to and from the 16-bit types).

Random int4 matrices (codes 0..15, zeros 0..16, float16 scales) in the GEMV's layout
(:meth:`~fi_engine.checkpoint.int4_weights.Int4Matrix.gemv_layout`), against the float32 reference ``y = x @ W.T``
with ``W = (code - zero) * scale`` (numpy, float64 sums), groups of 64 and 128 inputs and one group a row, bfloat16
and float16 activations, 16-bit and float32 outputs:

- the GEMV (1 to 32 rows: one, two and four groups of 8 rows a launch; the prepared launch too): float32 sums of
  exact products of the exact integers ``code + M`` with x (M = 128 for bfloat16, 1024 for float16), less ``(M +
  zero)`` times x's float32 sum over each 64 inputs, times the group's scale, so per output ``|y - ref| <= sum_c
  |x_c W_c| * 2**-20 + sum_c |x_c| (M + 16) s_c * 2**-18 + |ref| * ulp_out`` (2**-20: float32 rounding over k <=
  4096 terms with room; the second term the float32 rounding of the two sums that cancel, with room for tensor cores
  that keep fewer bits between their additions; ulp_out 2**-8 bfloat16, 2**-11 float16, 0 for float32 out);
- more rows (33 and 80): the weight dequantized to the 16-bit type (one rounding of each exact product, relative
  ``ulp_w``) and the 16-bit GEMM: ``|y - ref| <= sum_c |x_c W_c| * (ulp_w + 2**-20) + |ref| * ulp_out``; and the
  dequantized scratch itself equal to numpy's rounding of ``W``, bit for bit;
- the number of warps a block gets (``Int4Linears.warps_per_sm``: 1 to 16 warps) changes only the order of the
  warps' sums: within the GEMV's bound of each other;
- a gate/up weight interleaved by 8 rows: its outputs come out in order, and its SiLU form is ``silu_and_mul`` of
  them (within one 16-bit ulp of numpy's float32 arithmetic);
- the lean loop (``Int4Linears.lean_loop``): the plain loop's bits, the GEMV's and its SiLU form's, up to 16 rows;
- bad calls: a shape that differs from the registration, float32 activations, a misaligned or NULL address, a
  group size the GEMV does not take: ValueError naming the argument.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from helpers.gpu import require_torch

if os.environ.get("FI_FFI_RUN_GPU_TESTS") != "1":
    pytest.skip("GPU tests run only with FI_FFI_RUN_GPU_TESTS=1 on a CUDA machine", allow_module_level=True)

cp = pytest.importorskip("cupy", reason="the engine needs CuPy")
torch = require_torch()

from fi_engine.checkpoint.int4_weights import Int4Matrix, decode_gemv_layout  # noqa: E402
from fi_engine.kernels.dense import CUDA_R_16BF, CUDA_R_16F, CUDA_R_32F, Dense  # noqa: E402
from fi_engine.kernels.fused_args import NORM  # noqa: E402
from fi_engine.kernels.int4_linear import Int4Linears  # noqa: E402

pytestmark = pytest.mark.gpu

ULP = {CUDA_R_16BF: 2.0**-8, CUDA_R_16F: 2.0**-11, CUDA_R_32F: 0.0}
SUM_ERR = 2.0**-20


def to16(x: np.ndarray, ab: int) -> cp.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(x, np.float32)).to(torch.bfloat16 if ab == CUDA_R_16BF else torch.float16)
    return cp.asarray(t.view(torch.int16).numpy())


def from16(buf: cp.ndarray, ab: int) -> np.ndarray:
    t = torch.from_numpy(cp.asnumpy(buf)).view(torch.bfloat16 if ab == CUDA_R_16BF else torch.float16)
    return t.float().numpy()


@pytest.fixture
def dense():  # type: ignore[no-untyped-def]  # one per test: its int4 registrations die with it
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        d = Dense(stream)
        yield d
        d.close()


def random_int4(n: int, k: int, group_size: int, seed: int) -> Int4Matrix:
    rng = np.random.default_rng(seed)
    groups = k // group_size
    scales = (rng.uniform(0.5, 2.0, (groups, n)) * 0.02).astype(np.float16).astype(np.float32)
    return Int4Matrix(
        rng.integers(0, 16, (n, k)).astype(np.uint8), rng.integers(0, 17, (groups, n)).astype(np.uint8), scales,
        group_size,
    )  # fmt: skip


def register(dense: Dense, m: Int4Matrix) -> tuple[int, np.ndarray, list]:
    """Upload ``m`` in the GEMV layout, register it; (its address, the float32 weight it stands for, the arrays)."""
    weights, records = m.gemv_layout()
    w, r = cp.asarray(weights), cp.asarray(records)
    n, k = m.codes.shape
    dense.quantized.add_int4_weight(int(w.data.ptr), n, k, int(r.data.ptr), m.group_size)
    return int(w.data.ptr), decode_gemv_layout(weights, records, k), [w, r]


def input_scales(m: Int4Matrix) -> np.ndarray:
    """float64 ``[n, k]``: each weight's group scale."""
    k = m.codes.shape[1]
    return np.repeat(m.scales.T.astype(np.float64), k // m.scales.shape[0], axis=1)


def check(y: np.ndarray, x: np.ndarray, w: np.ndarray, out: int, ulp_w: float = 0.0, gemv: tuple | None = None) -> None:
    """``y`` against ``x @ w.T`` within the module docstring's bound (``gemv``: ``(scales [n, k], M)`` for the
    GEMV's cancellation term)."""
    ref = x.astype(np.float64) @ w.astype(np.float64).T
    mag = np.abs(x).astype(np.float64) @ np.abs(w).astype(np.float64).T
    bound = mag * (ulp_w + SUM_ERR) + np.abs(ref) * ULP[out] + 1e-30
    if gemv is not None:
        scales, big_m = gemv
        bound += (np.abs(x).astype(np.float64) @ scales.T) * (big_m + 16) * 2.0**-18
    err = np.abs(y - ref)
    worst = np.unravel_index(np.argmax(err / bound), err.shape)
    assert (err <= bound).all(), f"worst at {worst}: |{y[worst]} - {ref[worst]}| > {bound[worst]}"


@pytest.mark.parametrize("ab", [CUDA_R_16BF, CUDA_R_16F], ids=["bf16", "f16"])
@pytest.mark.parametrize("f32", [False, True], ids=["out16", "out32"])
@pytest.mark.parametrize(("n", "k", "group_size"), [(272, 512, 128), (96, 1024, 64), (40, 384, 384)])
def test_the_gemv_meets_the_float32_reference(dense, ab: int, f32: bool, n: int, k: int, group_size: int) -> None:
    m = random_int4(n, k, group_size, seed=n + k)
    w, wf, keep = register(dense, m)
    out = CUDA_R_32F if f32 else ab
    rng = np.random.default_rng(3)
    for rows in (1, 2, 3, 7, 8, 9, 16, 17, 31, 32):
        x16 = to16(rng.standard_normal((rows, k)), ab)
        x = from16(x16, ab)
        y = cp.zeros((rows, n), cp.float32 if f32 else cp.int16)
        dense.linear(rows, int(x16.data.ptr), k, w, n, k, int(y.data.ptr), n, ab, out)
        cp.cuda.get_current_stream().synchronize()
        got = cp.asnumpy(y) if f32 else from16(y, ab)
        check(got, x, wf, out, gemv=(input_scales(m), 128 if ab == CUDA_R_16BF else 1024))
        if rows in (1, 4, 9, 32):  # the prepared launch (the decode step's): the same launch, the same bits
            y2 = cp.zeros_like(y)
            dense.prepared_linear(rows, int(x16.data.ptr), k, w, n, k, int(y2.data.ptr), n, ab, out)()
            cp.cuda.get_current_stream().synchronize()
            assert cp.array_equal(y, y2), rows
    del keep


@pytest.mark.parametrize("ab", [CUDA_R_16BF, CUDA_R_16F], ids=["bf16", "f16"])
def test_more_rows_dequantize_into_the_16_bit_gemm(dense, ab: int) -> None:
    n, k = 256, 768
    m = random_int4(n, k, 128, seed=9)
    w, wf, keep = register(dense, m)
    rng = np.random.default_rng(4)
    for rows in (33, 80):
        x16 = to16(rng.standard_normal((rows, k)), ab)
        y = cp.zeros((rows, n), cp.int16)
        dense.linear(rows, int(x16.data.ptr), k, w, n, k, int(y.data.ptr), n, ab, ab)
        cp.cuda.get_current_stream().synchronize()
        check(from16(y, ab), from16(x16, ab), wf, ab, ulp_w=ULP[ab])
    # the scratch the GEMM read: numpy's rounding of each exact product, bit for bit
    scratch = dense.quantized.int4.dequantize(dense.quantized.int4.weights[w], ab == CUDA_R_16BF, dense.launcher.null)
    cp.cuda.get_current_stream().synchronize()
    got = cp.ndarray((n, k), cp.int16, cp.cuda.MemoryPointer(cp.cuda.UnownedMemory(scratch, n * k * 2, None), 0))
    assert np.array_equal(cp.asnumpy(got), cp.asnumpy(to16(wf, ab)))
    del keep


def test_the_warps_a_block_gets_change_only_the_order_of_the_sums(dense) -> None:
    n, k = 64, 2048
    m = random_int4(n, k, 128, seed=5)
    w, wf, keep = register(dense, m)
    x16 = to16(np.random.default_rng(6).standard_normal((5, k)), CUDA_R_16BF)
    try:
        for per_sm in (1, 4, 64, 1024):
            Int4Linears.warps_per_sm = (per_sm, per_sm, per_sm)
            dense.quantized.int4._packed.clear()
            y = cp.zeros((5, n), cp.float32)
            dense.linear(5, int(x16.data.ptr), k, w, n, k, int(y.data.ptr), n, CUDA_R_16BF, CUDA_R_32F)
            cp.cuda.get_current_stream().synchronize()
            check(cp.asnumpy(y), from16(x16, CUDA_R_16BF), wf, CUDA_R_32F, gemv=(input_scales(m), 128))
    finally:
        Int4Linears.warps_per_sm = (32, 16, 8)
    del keep


# (11 tiles: a tile a warp; 35: 16 warps a block at every row count here, warps 0-2 summing three tiles, the others
# two, so runs end on either set of registers)
@pytest.mark.parametrize("k", [1408, 4480])
@pytest.mark.parametrize("group_size", [128, 64])
@pytest.mark.parametrize("ab", [CUDA_R_16BF, CUDA_R_16F], ids=["bf16", "f16"])
def test_the_lean_loop_gives_the_plain_loops_bits(monkeypatch, ab: int, group_size: int, k: int) -> None:  # type: ignore[no-untyped-def]
    """``Int4Linears.lean_loop`` changes how a warp's runs are held and looped, not a sum: the GEMV (1-16 rows, 16-bit
    and float32 outputs) and its SiLU form give the plain loop's bits, each compiled by a Dense of its own (shapes
    whose launches get the same warps a block from either kernel's registers); and both within the float32
    reference's bound (above)."""
    half = 136
    gate, up = random_int4(half, k, group_size, seed=31), random_int4(half, k, group_size, seed=32)
    pairs = Int4Matrix.interleaved(gate, up)
    weights, records = pairs.gemv_layout()
    wf = decode_gemv_layout(weights, records, k)
    rng = np.random.default_rng(33)
    xs = [to16(rng.standard_normal((rows, k)), ab) for rows in (1, 5, 8, 9, 16)]
    got: dict[bool, list] = {}
    for lean in (False, True):
        monkeypatch.setattr(Int4Linears, "lean_loop", lean)
        stream = cp.cuda.Stream(non_blocking=True)
        with stream:
            d = Dense(stream)
            w_dev, r_dev = cp.asarray(weights), cp.asarray(records)
            w = int(w_dev.data.ptr)
            d.quantized.add_int4_weight(w, 2 * half, k, int(r_dev.data.ptr), group_size, interleaved=True)
            outs = []
            for x16 in xs:
                rows = x16.shape[0]
                for out in (ab, CUDA_R_32F):
                    y = cp.zeros((rows, 2 * half), cp.float32 if out == CUDA_R_32F else cp.int16)
                    d.linear(rows, int(x16.data.ptr), k, w, 2 * half, k, int(y.data.ptr), 2 * half, ab, out)
                    outs.append(y)
                act = cp.zeros((rows, half), cp.int16)
                d.quantized.prepared_int4_silu(rows, int(x16.data.ptr), k, w, k, int(act.data.ptr), half, ab)()
                outs.append(act)
            stream.synchronize()
            got[lean] = [cp.asnumpy(y) for y in outs]
            d.close()
            del w_dev, r_dev
    scales = np.repeat(pairs.scales.T.astype(np.float64), group_size, axis=1)
    for i, (a, b) in enumerate(zip(got[False], got[True], strict=True)):
        assert np.array_equal(a, b), f"output {i}: the lean loop's bits differ"
    for j, x16 in enumerate(xs):  # (the float32 outputs, against the reference)
        # (each stored row's output: the interleaved order, as the SiLU test above reads it)
        y = got[True][3 * j + 1]
        order = np.arange(2 * half)
        order = (order >> 4) * 8 + (order & 7) + ((order >> 3) & 1) * half
        w_out = np.empty_like(wf)
        w_out[order] = wf
        s_out = np.empty_like(scales)
        s_out[order] = scales
        check(y, from16(x16, ab), w_out, CUDA_R_32F, gemv=(s_out, 128 if ab == CUDA_R_16BF else 1024))


def test_bad_calls_name_the_argument(dense) -> None:
    m = random_int4(64, 256, 128, seed=1)
    w, _, keep = register(dense, m)
    x = cp.zeros((2, 256), cp.int16)
    y = cp.zeros((2, 64), cp.int16)
    with pytest.raises(ValueError, match=r"n, k: the int4 weight .* is \[64, 256\], the call says \[64, 128\]"):
        dense.linear(2, int(x.data.ptr), 256, w, 64, 128, int(y.data.ptr), 64, CUDA_R_16BF, CUDA_R_16BF)
    with pytest.raises(ValueError, match="ab_type, c_type: int4 weights take bfloat16 or float16"):
        dense.linear(2, int(x.data.ptr), 256, w, 64, 256, int(y.data.ptr), 64, CUDA_R_32F, CUDA_R_32F)
    records = int(keep[1].data.ptr)
    for args, match in (
        ((w + 8, 64, 256, records, 128), "w: expected a non-NULL device address aligned to 16 bytes"),
        ((0, 64, 256, records, 128), "w: expected a non-NULL device address"),
        ((w, 64, 256, records + 2, 128), "records: expected a non-NULL device address aligned to 4 bytes"),
        ((w, 64, 200, records, 128), "k: the int4 GEMV reads 128-input tiles"),
        ((w, 64, 256, records, 32), "group_size: expected k .* or a power of two >= 64"),
        ((w, 0, 256, records, 128), r"n: expected an int in \[1, "),
        ((w, 64, 256, records + 4, 64), "records: groups of 64 are read two at a time: expected 8-byte alignment"),
    ):
        with pytest.raises(ValueError, match=match):
            dense.quantized.add_int4_weight(*args)
    with pytest.raises(ValueError, match="y: 0x[0-9a-f]+ must be aligned to 2 bytes"):  # (before any launch)
        dense.linear(2, int(x.data.ptr), 256, w, 64, 256, int(y.data.ptr) + 1, 64, CUDA_R_16BF, CUDA_R_16BF)
    with pytest.raises(ValueError, match="registered as int4"):
        dense.fused.prepared(NORM, 1, int(x.data.ptr), 256, w, 64, 256, int(y.data.ptr), 64, CUDA_R_16BF, CUDA_R_16BF,
                             int(x.data.ptr), 256, int(x.data.ptr), 0, 1e-5)  # fmt: skip
    del keep


@pytest.mark.parametrize("ab", [CUDA_R_16BF, CUDA_R_16F], ids=["bf16", "f16"])
def test_gate_and_up_interleaved_come_out_in_order_and_the_silu_form_is_silu_and_mul(dense, ab: int) -> None:
    """A gate/up weight stored interleaved by 8 rows (``Int4Matrix.interleaved``, ``add_int4_weight(...,
    interleaved=True)``): the GEMV (1 to 32 rows) and the dequantizing path (40 rows) give the bits of the same
    weights stacked in order, and ``QuantizedWeights.prepared_int4_silu`` gives ``silu(g) * u`` of those rounded outputs
    within one 16-bit ulp of numpy's float32 ``g / (1 + exp(-g)) * u`` (the kernel's ``__expf`` and fast division
    against numpy's)."""
    half, k = 256, 512
    gate, up = random_int4(half, k, 128, seed=21), random_int4(half, k, 128, seed=22)
    stacked, _, keep_s = register(dense, Int4Matrix.stacked([gate, up]))
    pairs = Int4Matrix.interleaved(gate, up)
    weights, records = pairs.gemv_layout()
    w_dev, r_dev = cp.asarray(weights), cp.asarray(records)
    dense.quantized.add_int4_weight(int(w_dev.data.ptr), 2 * half, k, int(r_dev.data.ptr), 128, interleaved=True)
    inter = int(w_dev.data.ptr)
    assert dense.quantized.has_int4_silu(inter) and not dense.quantized.has_int4_silu(stacked)
    rng = np.random.default_rng(8)
    for rows in (1, 3, 8, 16, 32, 40):
        x16 = to16(rng.standard_normal((rows, k)), ab)
        ys = [cp.zeros((rows, 2 * half), cp.int16) for _ in range(2)]
        for w, y in zip((stacked, inter), ys, strict=True):
            dense.linear(rows, int(x16.data.ptr), k, w, 2 * half, k, int(y.data.ptr), 2 * half, ab, ab)
        cp.cuda.get_current_stream().synchronize()
        assert cp.array_equal(ys[0], ys[1]), rows
        if rows > 32:
            continue
        act = cp.zeros((rows, half), cp.int16)
        dense.quantized.prepared_int4_silu(rows, int(x16.data.ptr), k, inter, k, int(act.data.ptr), half, ab)()
        cp.cuda.get_current_stream().synchronize()
        gu = from16(ys[0], ab).astype(np.float32)
        g, u = gu[:, :half], gu[:, half:]
        want = from16(to16(g / (1 + np.exp(-g)) * u, ab), ab)
        got = from16(act, ab)
        assert np.all(np.abs(got - want) <= np.abs(want) * ULP[ab] + 1e-6), rows
    with pytest.raises(ValueError, match="is no int4 weight registered interleaved"):
        dense.quantized.prepared_int4_silu(1, int(x16.data.ptr), k, stacked, k, int(act.data.ptr), half, ab)
    dense.quantized.remove_weight(inter)
    del keep_s, w_dev, r_dev


def _descriptor(buf: cp.ndarray, shape: tuple[int, ...], ab: int, strides: tuple[int, ...] | None = None, at: int = 0):  # type: ignore[no-untyped-def]
    from fi_engine.kernels import flashinfer as kernels

    dtype = "bfloat16" if ab == CUDA_R_16BF else "float16"
    return kernels.descriptor(buf.data.ptr + 2 * at, shape, dtype, cp.cuda.Device().id, strides, owner=buf)


# Int4Linears.warps_per_sm: 16 warps a plain block (the RoPE form's 32, its most), or, on a 132-SM GPU, 9 (an odd count:
# 18) for each head dim's n (64 blocks at d 128, 32 at d 64)
WARPS = {"16-warps": {128: (32, 16, 8), 64: (32, 16, 8)}, "odd-warps": {128: (4, 4, 4), 64: (2, 2, 2)}}


@pytest.mark.parametrize("loop", ["plain-loop", "lean-loop"])
@pytest.mark.parametrize("warps", list(WARPS))
@pytest.mark.parametrize(("ab", "d", "llama3"), [(CUDA_R_16BF, 128, True), (CUDA_R_16F, 64, False)],
                         ids=["bf16-d128-llama31", "f16-d64-rope"])  # fmt: skip
def test_the_rope_form_is_the_gemv_then_rope_and_append(monkeypatch, dense, ab, d, llama3, warps, loop) -> None:  # type: ignore[no-untyped-def]
    """``QuantizedWeights.prepared_int4_qkv_rope`` (the int4 QKV GEMV with FlashInfer's RoPE, plain or Llama 3.1, and
    the KV append as its epilogue), 1 to 8 rows at positions up to 300 on shuffled pages, against the int4 GEMV into
    qkv (``Dense.linear``) then ``apply_rope_pos_ids`` in place and ``append_paged_kv_cache`` through fi_ffi: qkv and
    both caches bit for bit (the RoPE form's two halves of warps each sum as the plain launch's warps do). Plain
    launches of 16 warps a block (the RoPE form's 32: its most) and of 9 on a 132-SM GPU (an odd count: 18); both
    compiled with the plain loop and with the lean one (``Int4Linears.lean_loop``)."""
    from helpers.decode_pages import decode_page_table, rope_append, rope_config

    from fi_engine.kernels import flashinfer as kernels

    monkeypatch.setattr(Int4Linears, "warps_per_sm", WARPS[warps][d])
    monkeypatch.setattr(Int4Linears, "lean_loop", loop == "lean-loop")  # (read at the Dense's first int4 compile)
    rng = np.random.default_rng(41 + d)
    hq, hk, k, ps, pages = 4, 2, 2048, 16, 64  # (8 requests take 60 pages)
    n = (hq + 2 * hk) * d
    w, _, keep = register(dense, random_int4(n, k, 128, seed=d))
    if warps == "odd-warps":  # (the registers' rule would round 9 warps up to 16: the table's warps alone)
        monkeypatch.setattr(dense.quantized.int4, "_regs", {})
    assert dense.quantized.has_int4_rope(w)
    rope = rope_config(llama3)
    stream = cp.cuda.get_current_stream()
    for rows in (1, 2, 5, 8):
        x = to16(rng.standard_normal((rows, k)).astype(np.float32), ab)
        meta = decode_page_table(rng, rows, ps, pages)
        start = to16(rng.standard_normal((2, pages, ps, hk, d)).astype(np.float32), ab)
        caches = {f: start.copy() for f in ("fused", "sep")}
        qkv = {f: cp.zeros((rows, n), cp.int16) for f in ("fused", "sep")}
        epilogue = rope_append(meta, rope, hq, hk, d, caches["fused"], pages)
        dense.quantized.prepared_int4_qkv_rope(rows, x.data.ptr, k, w, k, qkv["fused"].data.ptr, n, ab, epilogue)()
        y = qkv["sep"]
        dense.linear(rows, x.data.ptr, k, w, n, k, y.data.ptr, n, ab, ab)
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
        what = f"d={d} rows={rows} warps={warps}"
        np.testing.assert_array_equal(qkv["fused"].get(), y.get(), err_msg=f"{what}: qkv")
        np.testing.assert_array_equal(caches["fused"].get(), sep.get(), err_msg=f"{what}: caches")
        assert not np.array_equal(caches["fused"].get(), start.get()), f"{what}: nothing appended"
        assert np.abs(from16(y, ab)).max() > 0, f"{what}: no product"
    # refused by name: 9 rows, an interleaved weight, a head layout that is not the weight's
    with pytest.raises(ValueError, match="^rows"):
        dense.quantized.prepared_int4_qkv_rope(9, x.data.ptr, k, w, k, y.data.ptr, n, ab, epilogue)
    bad = rope_append(meta, rope, hq + 1, hk, d, caches["fused"], pages)
    with pytest.raises(ValueError, match="^n, k: the int4 weight"):
        dense.quantized.prepared_int4_qkv_rope(1, x.data.ptr, k, w, k, y.data.ptr, n + d, ab, bad)
    del keep
