"""The engine's fused decode step (``ModelRunner.fused``, :mod:`fi_engine.runtime.worker.fused_decode`) and its GEMV
variants (``FusedGemvs.linear``), on a GPU (FI_FFI_RUN_GPU_TESTS=1; CuPy only, no torch or transformers).

1. Each variant (RMSNorm prologue, add + RMSNorm prologue with the new residual written out, SiLU-gated input) for
   float16 / bfloat16 in, 16-bit / float32 out, 1 to 4 rows, k = 576 (one pass of FlashInfer's norm block) and
   k = 12288 (two passes; more shared memory than 48 KiB, so the opt-in):
   - against the float32 numpy reference of the same formula, rounded where FlashInfer rounds (the normalized or
     gated input to the 16-bit type, then the product once): every input element may land one unit in the last
     place (ulp) away from the reference's (rsqrt.approx, __expf), so the bound per output is
     ``sum_c |w_jc| |in_c| * ulp + |y_j| * ulp_out + 1e-3`` (ulp 2**-10 float16, 2**-7 bfloat16; ulp_out the same
     for 16-bit outputs, 0 for float32);
   - against the separate launches it replaces (FlashInfer's ``rmsnorm`` / ``fused_add_rmsnorm`` /
     ``silu_and_mul`` through fi_ffi, then the plain GEMV): within the same bound, and the share of bitwise-equal
     outputs is printed (the prologue sums in FlashInfer's order: equal unless its build rounds differently);
   - the new residual ``h_out`` equals ``round(h + x)`` exactly.
2. The QKV GEMV with FlashInfer's RoPE (plain and Llama 3.1) and KV append as its epilogue: q, k, v and both
   caches equal to the separate launches' bit for bit.
   The gate/up GEMV with SiLU-and-mul as its epilogue (``FusedGemvs.prepared_gate_up_silu``) and the plain down GEMV
   after it: equal bit for bit to the fused GEMV into both halves and the down GEMV with the SiLU prologue; its
   activation within one 16-bit ulp of FlashInfer's ``silu_and_mul``.
3. The engine: greedy decoding of four prompts (1 to 4 rows: every step fused) with ``fused_decode`` on and off on
   a random SmolLM2-like float16 checkpoint, a bfloat16 one with Llama 3.1 RoPE and a bfloat16 Mixtral-like one
   (its MoE layers' add + norm and routing in the router GEMV's launch, then the grouped GEMV's): the tokens equal, and
   the logits of every step are within the engine tests' tolerance (``helpers.yardstick.LOGIT_TOL``: float16
   0.02, bfloat16 0.08) with the bitwise share printed. The unfused path is the one tests/engine/test_gpu_llama.py
   checks against transformers.
4. Bad pointers: a misaligned GEMV output, a misaligned or overlapping fused argument give ValueError naming it.
5. ``ModelRunner.packed_attention`` (the fused step's attention runs packed once per view, ``prepare_decode_run``):
   on and off, the same greedy decoding gives the same tokens and bit-equal logits at every step (the same kernel
   on the same arguments; tests/ops/attention/test_prepared_decode_run.py proves the frames equal on the CPU).
6. The Mixtral-like model's one-row decode graph captures the fused step: one request's tokens through it are its
   own greedy choice (teacher forcing with the engine's prefill logits).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

if os.environ.get("FI_FFI_RUN_GPU_TESTS") != "1":
    pytest.skip("GPU tests run only with FI_FFI_RUN_GPU_TESTS=1 on a CUDA machine", allow_module_level=True)

cp = pytest.importorskip("cupy", reason="the engine needs CuPy (python -m pip install '.[engine]')")

from helpers.random_llama import EPS, bf16_bits  # noqa: E402
from helpers.random_llama import save_random_llama as make_checkpoint  # noqa: E402
from helpers.yardstick import LOGIT_TOL  # noqa: E402

from fi_engine.kernels import flashinfer as kernels  # noqa: E402
from fi_engine.kernels.dense import CUDA_R_16BF, CUDA_R_16F, CUDA_R_32F, Dense  # noqa: E402
from fi_engine.kernels.fused_args import ADD_NORM, NORM, PLAIN, SILU  # noqa: E402
from fi_engine.models.llama import LlamaEngine  # noqa: E402
from fi_engine.runtime.worker.model_runner import ModelRunner  # noqa: E402

pytestmark = pytest.mark.gpu


def from_bf16_bits(b: np.ndarray) -> np.ndarray:
    return (b.astype(np.uint32) << 16).view(np.float32)


def to16(x32: np.ndarray, dtype: str) -> np.ndarray:
    """float32 -> the 16-bit storage (float16 array, or bfloat16 bits as uint16), rounded to nearest even."""
    return x32.astype(np.float16) if dtype == "float16" else bf16_bits(x32)


def from16(x: np.ndarray, dtype: str) -> np.ndarray:
    return x.view(np.float16).astype(np.float32) if dtype == "float16" else from_bf16_bits(x.view(np.uint16))


@pytest.fixture(scope="module")
def dense():
    stream = cp.cuda.Stream(non_blocking=True)
    d = Dense(stream)
    with stream:
        yield d, stream
    d.close()


def reference_input(mode: int, h: np.ndarray, x: np.ndarray, nw: np.ndarray, dtype: str, k: int) -> np.ndarray:
    """The GEMV's input rows in float32 numpy, rounded to the 16-bit type where FlashInfer rounds."""
    if mode == SILU:
        g, u = x[:, :k], x[:, k : 2 * k]
        return from16(to16(g / (1.0 + np.exp(-g)) * u, dtype), dtype)
    s = h + x if mode == ADD_NORM else h
    s = s.astype(np.float32)
    rcp = (1.0 / np.sqrt((s.astype(np.float64) ** 2).mean(axis=1, keepdims=True) + EPS)).astype(np.float32)
    return from16(to16(s * rcp * nw, dtype), dtype)


def separate_launches(d, stream, mode, rows, dtype, k, hd, xd, nwd, ab, out):
    """What the fused launch replaces: FlashInfer's norm or activation through fi_ffi (on copies), its output."""
    dev = cp.cuda.Device().id
    desc = lambda a, shape: kernels.descriptor(a.data.ptr, shape, dtype, dev, owner=a)  # noqa: E731
    inp = cp.empty((rows, k), hd.dtype)
    if mode == SILU:
        kernels.silu_and_mul(desc(xd[:rows], (rows, 2 * k)), desc(inp, (rows, k)), stream.ptr)
    elif mode == NORM:
        kernels.rmsnorm(desc(hd[:rows], (rows, k)), desc(nwd, (k,)), desc(inp, (rows, k)), EPS, stream.ptr)
    else:
        res = hd[:rows].copy()
        inp[...] = xd[:rows, :k]
        kernels.fused_add_rmsnorm(desc(inp, (rows, k)), desc(res, (rows, k)), desc(nwd, (k,)), EPS, stream.ptr)
    return inp


@pytest.mark.parametrize("k", [576, 12288])
@pytest.mark.parametrize("out32", [False, True], ids=["out16", "out32"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_fused_gemv_variants_match_float32_and_the_separate_launches(dense, dtype, out32, k):
    d, stream = dense
    assert d.gemv and d.fused.fits(4, k), d.gemv_error
    rng = np.random.default_rng(k + out32)
    n = 1001  # a last block with idle warps
    ab = CUDA_R_16F if dtype == "float16" else CUDA_R_16BF
    c_type = CUDA_R_32F if out32 else ab
    ulp = 2.0**-10 if dtype == "float16" else 2.0**-7
    h16 = to16(rng.standard_normal((4, k)).astype(np.float32) * 2, dtype)
    x16 = to16(rng.standard_normal((4, 2 * k)).astype(np.float32), dtype)  # the delta, or gate | up
    nw16 = to16(1 + 0.2 * rng.standard_normal(k).astype(np.float32), dtype)
    w16 = to16(rng.standard_normal((n, k)).astype(np.float32) * 0.05, dtype)
    h32, x32, nw32, w32 = (from16(a, dtype) for a in (h16, x16, nw16, w16))
    hd, xd, nwd, wd = (cp.asarray(a) for a in (h16, x16, nw16, w16))
    h_out = cp.zeros((4, k), h16.dtype)
    cp.cuda.Device().synchronize()
    for mode in (NORM, ADD_NORM, SILU):
        for rows in (1, 2, 3, 4):
            y = cp.zeros((rows, n), np.float32 if out32 else h16.dtype)
            h_out.fill(0)
            x_ld = 2 * k
            d.fused.linear(
                mode, rows, xd.data.ptr, x_ld, wd.data.ptr, n, k, y.data.ptr, n, ab, c_type,
                hd.data.ptr, k, nwd.data.ptr, h_out.data.ptr if mode == ADD_NORM else 0, EPS,
            )  # fmt: skip
            inp = separate_launches(d, stream, mode, rows, dtype, k, hd, xd, nwd, ab, c_type)
            y_sep = cp.zeros_like(y)
            d.linear(rows, inp.data.ptr, k, wd.data.ptr, n, k, y_sep.data.ptr, n, ab, c_type)
            stream.synchronize()
            got, sep = y.get(), y_sep.get()
            if not out32:
                got, sep = from16(got, dtype), from16(sep, dtype)
            ref_in = reference_input(mode, h32[:rows], x32[:rows, :k] if mode != SILU else x32[:rows], nw32, dtype, k)
            want = ref_in.astype(np.float64) @ w32.T.astype(np.float64)
            bound = np.abs(ref_in) @ np.abs(w32).T * ulp + np.abs(want) * (0 if out32 else ulp) + 1e-3
            what = f"mode {mode}, rows {rows}"
            assert np.all(np.abs(got - want) <= bound), (
                f"{what}: vs float32, worst {np.max(np.abs(got - want) / bound):.2f}x the bound"
            )
            assert np.all(np.abs(got - sep) <= bound), (
                f"{what}: vs the separate launches, worst {np.max(np.abs(got - sep) / bound):.2f}x the bound"
            )
            equal = float(np.mean(got == sep))
            print(
                f"{dtype} {'out32' if out32 else 'out16'} k={k} {what}: {equal:.2%} bitwise equal to separate launches"
            )
            if mode == ADD_NORM:
                new_h = from16(h_out.get()[:rows], dtype)
                np.testing.assert_array_equal(new_h, from16(to16(h32[:rows] + x32[:rows, :k], dtype), dtype))


@pytest.mark.parametrize("llama3", [False, True], ids=["rope", "llama31"])
@pytest.mark.parametrize(("dtype", "d"), [("float16", 64), ("bfloat16", 128)])
def test_qkv_gemv_with_rope_and_append_equals_the_separate_launches(dense, dtype, d, llama3):
    """FusedGemvs.prepared_qkv_rope (NORM, ADD_NORM and PLAIN prologues, 1 to 4 rows at positions up to 300) against the
    launches it replaces: the fused GEMV into qkv (PLAIN: the engine's plain GEMV of x, a tensor-parallel rank's), then
    FlashInfer's apply_rope_pos_ids (or the Llama 3.1 form) in place and append_paged_kv_cache through fi_ffi. qkv
    (rotated q and k, plain v) and both caches must be equal bit for bit (the epilogue repeats FlashInfer's arithmetic),
    and the rest of the caches untouched."""
    from helpers.decode_pages import decode_page_table, rope_append, rope_config

    d_, stream = dense
    dev = cp.cuda.Device().id
    rng = np.random.default_rng(d + llama3)
    hq, hk, k, ps, pages = 4, 2, 512, 16, 40  # 28 pages in use at most
    n = (hq + 2 * hk) * d
    ab = CUDA_R_16F if dtype == "float16" else CUDA_R_16BF
    assert d_.fused.has_qkv_rope(ab, d) and d_.fused.has_qkv_rope(ab, d, PLAIN)
    rope = rope_config(llama3)
    h16 = to16(rng.standard_normal((4, k)).astype(np.float32), dtype)
    x16 = to16(rng.standard_normal((4, k)).astype(np.float32), dtype)
    nw16 = to16(1 + 0.2 * rng.standard_normal(k).astype(np.float32), dtype)
    w16 = to16(rng.standard_normal((n, k)).astype(np.float32) * 0.1, dtype)
    hd, xd, nwd, wd = (cp.asarray(a) for a in (h16, x16, nw16, w16))
    desc = lambda a, shape, dt=dtype, strides=None: kernels.descriptor(a.data.ptr, shape, dt, dev, strides, owner=a)  # noqa: E731
    for mode in (NORM, ADD_NORM, PLAIN):
        for rows in (1, 2, 3, 4):
            meta = decode_page_table(rng, rows, ps, pages)
            start = rng.standard_normal((2, pages, ps, hk, d)).astype(np.float32)
            caches = {f: cp.asarray(to16(start, dtype)) for f in ("fused", "sep")}
            qkv = {f: cp.zeros((rows, n), h16.dtype) for f in ("fused", "sep")}
            h_out = cp.zeros((4, k), h16.dtype)
            cp.cuda.Device().synchronize()
            kv = caches["fused"]
            epilogue = rope_append(meta, rope, hq, hk, d, kv, pages)
            args = (rows, xd.data.ptr, k, wd.data.ptr, n, k, qkv["fused"].data.ptr, n, ab, ab, hd.data.ptr, k)
            h_out_at = h_out.data.ptr if mode == ADD_NORM else 0
            call = d_.fused.prepared_qkv_rope(epilogue, mode, *args, nwd.data.ptr, h_out_at, EPS)
            call()
            # the separate launches: fused GEMV, RoPE in place, append
            y = qkv["sep"]
            if mode == PLAIN:  # (an eager Dense: the GEMV serves 1 to 4 rows)
                d_.linear(rows, xd.data.ptr, k, wd.data.ptr, n, k, y.data.ptr, n, ab, ab)
            else:
                d_.fused.linear(
                    mode, rows, xd.data.ptr, k, wd.data.ptr, n, k, y.data.ptr, n, ab, ab, hd.data.ptr, k,
                    nwd.data.ptr, h_out.data.ptr if mode == ADD_NORM else 0, EPS,
                )  # fmt: skip
            q_v = desc(y, (rows, hq, d), strides=(n, d, 1))
            k_v = kernels.descriptor(y.data.ptr + 2 * hq * d, (rows, hk, d), dtype, dev, (n, d, 1), owner=y)
            v_v = kernels.descriptor(y.data.ptr + 2 * (hq + hk) * d, (rows, hk, d), dtype, dev, (n, d, 1), owner=y)
            pos = desc(meta["positions"], (rows,), "int32")
            kernels.rope_inplace(q_v, k_v, pos, rope, stream.ptr)
            sep = caches["sep"]
            kernels.append_kv(
                k_v, v_v, desc(meta["batch_indices"], (rows,), "int32"), pos,
                desc(sep[0], (pages, ps, hk, d)), desc(sep[1], (pages, ps, hk, d)),
                desc(meta["kv_indices"], meta["kv_indices"].shape, "int32"),
                desc(meta["kv_indptr"], (rows + 1,), "int32"),
                desc(meta["last"], (rows,), "int32"), stream.ptr,
            )  # fmt: skip
            stream.synchronize()
            what = f"{dtype} d={d} {'llama31' if llama3 else 'rope'} mode {mode} rows {rows}"
            a, b = qkv["fused"].get(), qkv["sep"].get()
            same = float((caches["fused"] == sep).astype(np.float32).mean())
            print(f"{what}: qkv {np.mean(a == b):.2%} equal, caches {same:.4%} equal")
            np.testing.assert_array_equal(a, b, err_msg=f"{what}: qkv")
            np.testing.assert_array_equal(caches["fused"].get(), sep.get(), err_msg=f"{what}: caches")
            assert not np.array_equal(caches["fused"].get(), to16(start, dtype)), what  # something was appended


@pytest.mark.parametrize("k", [576, 4096])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_gate_up_gemv_with_silu_equals_the_silu_prologue(dense, dtype, k):
    """FusedGemvs.prepared_gate_up_silu (NORM, ADD_NORM and PLAIN prologues, 1 to 4 rows, m = 1000 gate and up rows: the
    down GEMV's k, a multiple of 8) then the plain GEMV of a down weight over its output, against the path it replaces:
    the fused GEMV into [rows, 2 m], then the fused GEMV whose SiLU prologue makes silu(g) * u in each block. The down
    outputs and the new residual must be equal bit for bit (the epilogue computes the activation as the prologue does,
    in the same module). The activation itself against FlashInfer's silu_and_mul (through fi_ffi): within one unit in
    the last place of the 16-bit type (its module's division and exp may round differently), the share of bitwise-equal
    values printed."""
    d_, stream = dense
    dev = cp.cuda.Device().id
    rng = np.random.default_rng(k)
    m, n_down = 1000, 520
    ab = CUDA_R_16F if dtype == "float16" else CUDA_R_16BF
    ulp = 2.0**-10 if dtype == "float16" else 2.0**-7
    assert d_.fused.has_gate_up_silu(ab) and d_.fused.has_gate_up_silu(ab, PLAIN)
    h16 = to16(rng.standard_normal((4, k)).astype(np.float32), dtype)
    x16 = to16(rng.standard_normal((4, k)).astype(np.float32), dtype)
    nw16 = to16(1 + 0.2 * rng.standard_normal(k).astype(np.float32), dtype)
    w16 = to16(rng.standard_normal((2 * m, k)).astype(np.float32) * 0.1, dtype)
    wd16 = to16(rng.standard_normal((n_down, m)).astype(np.float32) * 0.1, dtype)
    hd, xd, nwd, wd, wdd = (cp.asarray(a) for a in (h16, x16, nw16, w16, wd16))
    desc = lambda a, shape: kernels.descriptor(a.data.ptr, shape, dtype, dev, owner=a)  # noqa: E731
    for mode in (NORM, ADD_NORM, PLAIN):
        for rows in (1, 2, 3, 4):
            act, gu = cp.zeros((rows, m), h16.dtype), cp.zeros((rows, 2 * m), h16.dtype)
            act_fi = cp.zeros((rows, m), h16.dtype)
            y, y_old = cp.zeros((rows, n_down), h16.dtype), cp.zeros((rows, n_down), h16.dtype)
            h_out, h_out_old = cp.zeros((4, k), h16.dtype), cp.zeros((4, k), h16.dtype)
            cp.cuda.Device().synchronize()
            args = (rows, xd.data.ptr, k, wd.data.ptr, 2 * m, k, act.data.ptr, m, ab, ab, hd.data.ptr, k, nwd.data.ptr)
            d_.fused.prepared_gate_up_silu(mode, *args, h_out.data.ptr if mode == ADD_NORM else 0, EPS)()
            d_.linear(rows, act.data.ptr, m, wdd.data.ptr, n_down, m, y.data.ptr, n_down, ab, ab)
            if mode == PLAIN:  # the engine's plain GEMV of x (an eager Dense: the GEMV)
                d_.linear(rows, xd.data.ptr, k, wd.data.ptr, 2 * m, k, gu.data.ptr, 2 * m, ab, ab)
            else:
                d_.fused.linear(
                    mode, rows, xd.data.ptr, k, wd.data.ptr, 2 * m, k, gu.data.ptr, 2 * m, ab, ab, hd.data.ptr, k,
                    nwd.data.ptr, h_out_old.data.ptr if mode == ADD_NORM else 0, EPS,
                )  # fmt: skip
            d_.fused.linear(SILU, rows, gu.data.ptr, 2 * m, wdd.data.ptr, n_down, m, y_old.data.ptr, n_down, ab, ab)
            kernels.silu_and_mul(desc(gu, (rows, 2 * m)), desc(act_fi, (rows, m)), stream.ptr)
            stream.synchronize()
            what = f"{dtype} k={k} mode {mode} rows {rows}"
            np.testing.assert_array_equal(y.get(), y_old.get(), err_msg=f"{what}: the down GEMV's output")
            np.testing.assert_array_equal(h_out.get(), h_out_old.get(), err_msg=f"{what}: h_out")
            got, want = from16(act.get(), dtype), from16(act_fi.get(), dtype)
            assert np.count_nonzero(got) > m // 2, what  # something was computed
            assert np.all(np.abs(got - want) <= np.abs(want) * ulp + 1e-6), f"{what}: vs silu_and_mul"
            print(f"{what}: activation {np.mean(got == want):.2%} bitwise equal to silu_and_mul")


def test_gemv_and_fused_gemv_refuse_bad_pointers(dense):
    """A GEMV output not aligned to its element, a fused argument not 16-byte aligned, and a new residual written
    over the one every block reads: ValueError naming the argument (before any launch)."""
    d, stream = dense
    k, n = 64, 32
    x, w = cp.zeros((1, 2 * k), np.float16), cp.zeros((n, k), np.float16)
    h, h2, nw = cp.zeros((1, k), np.float16), cp.zeros((1, k), np.float16), cp.zeros(k, np.float16)
    y16, y32 = cp.zeros((1, n + 8), np.float16), cp.zeros((1, n + 8), np.float32)
    cp.cuda.Device().synchronize()
    with pytest.raises(ValueError, match="^y: "):
        d.linear(1, x.data.ptr, k, w.data.ptr, n, k, y16.data.ptr + 1, n, CUDA_R_16F, CUDA_R_16F)
    with pytest.raises(ValueError, match="^y: "):
        d.linear(1, x.data.ptr, k, w.data.ptr, n, k, y32.data.ptr + 2, n, CUDA_R_16F, CUDA_R_32F)
    args = (x.data.ptr, k, w.data.ptr, n, k, y16.data.ptr, n, CUDA_R_16F, CUDA_R_16F)
    with pytest.raises(ValueError, match="^h: "):
        d.fused.linear(NORM, 1, *args, h.data.ptr + 2, k, nw.data.ptr, 0, EPS)
    with pytest.raises(ValueError, match="^norm_weight: "):
        d.fused.linear(NORM, 1, *args, h.data.ptr, k, nw.data.ptr + 8, 0, EPS)
    with pytest.raises(ValueError, match="^h_out: "):
        d.fused.linear(ADD_NORM, 1, *args, h.data.ptr, k, nw.data.ptr, h.data.ptr, EPS)
    with pytest.raises(ValueError, match="^y: "):
        d.fused.linear(ADD_NORM, 1, *args[:5], h.data.ptr, n, *args[7:], h.data.ptr, k, nw.data.ptr, h2.data.ptr, EPS)
    with pytest.raises(ValueError, match="^rows, k: "):
        d.fused.linear(NORM, 5, *args, h.data.ptr, k, nw.data.ptr, 0, EPS)
    d.fused.linear(ADD_NORM, 1, *args, h.data.ptr, k, nw.data.ptr, h2.data.ptr, EPS)  # the same call, good pointers
    stream.synchronize()


MODELS = {  # (dtype, head_dim, (q heads, kv heads), hidden, intermediate, Llama 3.1 RoPE[, (experts, top-k)])
    "f16-smollm2-like": ("float16", 64, (9, 3), 576, 1536, False),
    "bf16-d128-llama31": ("bfloat16", 128, (8, 2), 1024, 2816, True),
    # a Mixtral: its MoE layers' add + norm and routing in the router GEMV's launch (MoELayer.prepared_normed_step),
    # then the grouped GEMV's packed launches
    "bf16-mixtral-like": ("bfloat16", 128, (8, 2), 1024, 1024, False, (8, 2)),
}


@pytest.mark.parametrize("model", list(MODELS))
def test_fused_decode_step_matches_the_separate_launches(tmp_path, model):
    dtype = MODELS[model][0]
    path = make_checkpoint(tmp_path, *MODELS[model])
    ps = [[(5 * j + 3 * i) % 4000 + 3 for j in range(n)] for i, n in enumerate((3, 16, 29, 50))]
    runs = {}
    with LlamaEngine(path, max_batch=4, page_size=16) as engine:
        assert all(engine.runner.fuses(r) for r in (1, 2, 3, 4)), engine.runner.dense.gemv_error
        original = engine.sampler.pick
        for fused in (True, False):
            engine.fused_decode = fused
            logits: list[np.ndarray] = []

            def pick(v, rows, sampling, logits=logits):
                logits.append(engine.runner.buffers.logits[:rows].get())  # this step's logits, before the argmax
                original(v, rows, sampling)

            engine.sampler.pick = pick
            calls = []
            step = engine.runner.fused.step
            engine.runner.fused.step = lambda v, rows, calls=calls, step=step: (calls.append(rows), step(v, rows))[1]
            try:
                r = engine.generate(ps, [24, 13, 24, 7], eos_token_ids=())
            finally:
                del engine.runner.fused.step
                del engine.sampler.pick
            assert len(calls) == (r.decode_steps if fused else 0)  # every decode step fused exactly when on
            runs[fused] = (r.tokens, logits)  # the prefill's too (never fused: equal in both runs)
    (tok_f, log_f), (tok_u, log_u) = runs[True], runs[False]
    assert tok_f == tok_u
    worst, equal, total = 0.0, 0, 0
    for a, b in zip(log_f, log_u, strict=True):
        worst = max(worst, float(np.abs(a - b).max()))
        equal += int((a == b).sum())
        total += a.size
    print(f"{model}: {len(log_f)} steps, max |logit difference| {worst:.2e}, {equal / total:.2%} bitwise equal")
    assert worst <= LOGIT_TOL[dtype]


@pytest.mark.parametrize("model", [m for m in MODELS if len(MODELS[m]) == 6])
def test_packed_attention_runs_give_bit_equal_logits(tmp_path, model):
    path = make_checkpoint(tmp_path, *MODELS[model])
    ps = [[(7 * j + 5 * i) % 4000 + 3 for j in range(n)] for i, n in enumerate((4, 17, 33, 9))]
    runs = {}
    with LlamaEngine(path, max_batch=4, page_size=16) as engine:
        assert all(engine.runner.fuses(r) for r in (1, 2, 3, 4)), engine.runner.dense.gemv_error
        original = engine.sampler.pick
        for packed in (False, True):
            engine.packed_attention = packed
            logits: list[np.ndarray] = []

            def pick(v, rows, sampling, logits=logits):
                logits.append(engine.runner.buffers.logits[:rows].get())
                original(v, rows, sampling)

            engine.sampler.pick = pick
            try:
                r = engine.generate(ps, [20, 12, 26, 5], eos_token_ids=())
            finally:
                del engine.sampler.pick
                engine.packed_attention = ModelRunner.packed_attention
            runs[packed] = (r.tokens, logits, r.decode_steps)
        # the packed runs were made (one per layer, per decode view the packed pass met)
        packed_views = [v for v in engine.runner.io._views.values() if "attention runs" in v.prepared]
        assert packed_views and all(len(v.prepared["attention runs"][1]) == 4 for v in packed_views)
    (tok_p, log_p, steps), (tok_u, log_u, _) = runs[True], runs[False]
    assert steps > 0
    assert tok_p == tok_u
    assert len(log_p) == len(log_u)
    for i, (a, b) in enumerate(zip(log_p, log_u, strict=True)):
        assert np.array_equal(a, b), f"{model}: step {i}: logits differ (max {float(np.abs(a - b).max()):.2e})"


def test_a_moe_models_one_row_graph_captures_the_fused_step(tmp_path):
    """The decode graph of one row (the ladder's smallest) captures the fused step over MoE layers too: a single
    request's tokens through that graph are its greedy choice at every position (teacher forcing with the
    engine's own prefill logits, near ties within the bfloat16 tolerance), and every decode step replays it."""
    dtype, *_ = MODELS["bf16-mixtral-like"]
    path = make_checkpoint(tmp_path, *MODELS["bf16-mixtral-like"])
    prompt = [(11 * j) % 4000 + 3 for j in range(21)]
    with LlamaEngine(path, max_batch=4, page_size=16, cuda_graph=True) as engine:
        assert engine.runner.fuses(1) and sorted(engine.runner.graphs) == [1, 2, 4]
        replays = []
        one = engine.runner.graphs[1]
        one.launch = lambda launch=one.launch: (replays.append(1), launch())[1]
        try:
            out = engine.generate([prompt], 24, eos_token_ids=()).tokens[0]
        finally:
            del one.launch
        assert replays == [1] * 23
        logits = engine.prefill_logits([prompt + out[:-1]])[0]
    for t, tok in enumerate(out):
        row = logits[len(prompt) - 1 + t]
        assert row[tok] >= float(row.max()) - LOGIT_TOL[dtype], (t, tok, int(row.argmax()))
