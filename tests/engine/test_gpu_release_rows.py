"""The engine's own residual-add RMSNorm and SiLU-and-mul that release the next launch at their start
(:class:`~fi_engine.kernels.release_rows.ReleasingRows`, ``ModelRunner.release_rows``), on a GPU
(FI_FFI_RUN_GPU_TESTS=1; CuPy only).

1. The add-norm, float16 and bfloat16, 5 and 32 rows, k = 576 (one pass of FlashInfer's norm block), 4096 and 12288
   (1,024 threads, two passes): both outputs, the new residual (``round(h + x)``) and the normalized rows, equal
   FlashInfer's ``fused_add_rmsnorm``'s bit for bit (the same sums in the same order, the same fast-math build); the
   normalized rows are also within ``2 ulp |v| + 1e-6`` of a float64 reference of ``s * rsqrt(mean(s^2) + eps) * w``.
2. SiLU-and-mul, the same types and rows, inter = 1000 (a last block of idle threads) and 14336: equal to
   FlashInfer's ``silu_and_mul`` bit for bit, and within ``2 ulp |v| + 1e-6`` of a float64 reference.
3. Bad arguments raise ValueError naming them (a misaligned address, a stride short of a row; the rest of the
   checks: tests/engine/test_release_rows.py on the CPU).
4. The engine with ``release_rows`` on and off, greedy decoding of 8 prompts (decode steps of 5-8 rows: the separate
   launches) on a random bfloat16 checkpoint and a float16 one: with it on, both kinds of launch were packed, and the
   tokens and every step's logits equal those with it off bit for bit, eager and in the decode graphs.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

if os.environ.get("FI_FFI_RUN_GPU_TESTS") != "1":
    pytest.skip("GPU tests run only with FI_FFI_RUN_GPU_TESTS=1 on a CUDA machine", allow_module_level=True)

cp = pytest.importorskip("cupy", reason="the engine needs CuPy (python -m pip install '.[engine]')")

from helpers.launch_choices import pin_launch_choices  # noqa: E402
from helpers.random_llama import EPS, bf16_bits  # noqa: E402
from helpers.random_llama import save_random_llama as make_checkpoint  # noqa: E402

from fi_engine.kernels import flashinfer as kernels  # noqa: E402
from fi_engine.kernels.dense import Dense  # noqa: E402
from fi_engine.kernels.release_rows import ReleasingRows  # noqa: E402
from fi_engine.models.llama import LlamaEngine  # noqa: E402
from fi_engine.runtime.worker.model_runner import ModelRunner  # noqa: E402

pytestmark = pytest.mark.gpu

ULP = {"float16": 2.0**-10, "bfloat16": 2.0**-7}


def to16(x32: np.ndarray, dtype: str) -> np.ndarray:
    return x32.astype(np.float16) if dtype == "float16" else bf16_bits(x32)


def from16(x: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "float16":
        return x.view(np.float16).astype(np.float32)
    return (x.view(np.uint16).astype(np.uint32) << 16).view(np.float32)


@pytest.fixture(scope="module")
def release():
    stream = cp.cuda.Stream(non_blocking=True)
    d = Dense(stream)
    with stream:
        yield ReleasingRows(d.launcher), stream
    d.close()


def desc(a, dtype):
    return kernels.descriptor(a.data.ptr, a.shape, dtype, cp.cuda.Device().id, owner=a)


@pytest.mark.parametrize("rows", [5, 32])
@pytest.mark.parametrize("k", [576, 4096, 12288])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_the_add_norm_matches_flashinfers_and_float64(release, dtype, k, rows):
    rr, stream = release
    rng = np.random.default_rng(k + rows)
    h16 = to16(rng.standard_normal((rows, k)).astype(np.float32) * 2, dtype)
    x16 = to16(rng.standard_normal((rows, k)).astype(np.float32), dtype)
    w16 = to16(1 + 0.2 * rng.standard_normal(k).astype(np.float32), dtype)
    x_ours, h_ours, x_fi, h_fi, wd = (cp.asarray(a) for a in (x16, h16, x16, h16, w16))
    call = rr.prepared_add_rmsnorm(
        rows, x_ours.data.ptr, h_ours.data.ptr, wd.data.ptr, k, k, k, EPS, dtype == "bfloat16"
    )
    call()
    kernels.fused_add_rmsnorm(desc(x_fi, dtype), desc(h_fi, dtype), desc(wd, dtype), EPS, stream.ptr)
    stream.synchronize()
    assert np.array_equal(h_ours.get(), h_fi.get())  # round(h + x), both
    s = from16(h16, dtype).astype(np.float64) + from16(x16, dtype)
    assert np.array_equal(h_ours.get(), to16(s.astype(np.float32), dtype))
    got = from16(x_ours.get(), dtype)
    assert np.array_equal(x_ours.get(), x_fi.get())
    ref = s / np.sqrt((s**2).mean(axis=1, keepdims=True) + EPS) * from16(w16, dtype)
    assert np.all(np.abs(got - ref) <= 2 * ULP[dtype] * np.abs(ref) + 1e-6)


@pytest.mark.parametrize("rows", [5, 32])
@pytest.mark.parametrize("inter", [1000, 14336])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_silu_and_mul_matches_flashinfers_and_float64(release, dtype, inter, rows):
    rr, stream = release
    rng = np.random.default_rng(inter + rows)
    gu16 = to16(rng.standard_normal((rows, 2 * inter)).astype(np.float32) * 3, dtype)
    gu = cp.asarray(gu16)
    ours, theirs = cp.zeros((rows, inter), gu16.dtype), cp.zeros((rows, inter), gu16.dtype)
    rr.prepared_silu_mul(rows, gu.data.ptr, ours.data.ptr, inter, 2 * inter, inter, dtype == "bfloat16")()
    kernels.silu_and_mul(desc(gu, dtype), desc(theirs, dtype), stream.ptr)
    stream.synchronize()
    got = from16(ours.get(), dtype)
    assert np.array_equal(ours.get(), theirs.get())
    g = from16(gu16, dtype).astype(np.float64)
    ref = g[:, :inter] / (1 + np.exp(-g[:, :inter])) * g[:, inter:]
    assert np.all(np.abs(got - ref) <= 2 * ULP[dtype] * np.abs(ref) + 1e-6)


def test_bad_arguments_name_themselves(release):
    rr, _ = release
    a = cp.zeros((8, 4096), cp.uint16)
    with pytest.raises(ValueError, match="x: 0x"):
        rr.prepared_add_rmsnorm(8, a.data.ptr + 2, a.data.ptr, a.data.ptr, 512, 512, 512, EPS, True)
    with pytest.raises(ValueError, match="h_ld"):
        rr.prepared_add_rmsnorm(8, a.data.ptr, a.data.ptr, a.data.ptr, 512, 512, 256, EPS, True)
    with pytest.raises(ValueError, match="inter"):
        rr.prepared_silu_mul(8, a.data.ptr, a.data.ptr, 1001, 2002, 1001, True)
    with pytest.raises(ValueError, match="gu_ld"):
        rr.prepared_silu_mul(8, a.data.ptr, a.data.ptr, 1024, 1024, 1024, True)


MODELS = {  # (dtype, head_dim, (q heads, kv heads), hidden, intermediate, Llama 3.1 RoPE)
    "bf16-d128-llama31": ("bfloat16", 128, (8, 2), 1024, 2816, True),
    "f16-smollm2-like": ("float16", 64, (9, 3), 576, 1536, False),
}


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph"])
def test_the_engine_decodes_the_same_logits_with_release_rows(tmp_path, monkeypatch, graph, model):
    path = make_checkpoint(tmp_path, *MODELS[model])
    prompts = [[(7 * j + 5 * i) % 4000 + 3 for j in range(n)] for i, n in enumerate((4, 17, 33, 9, 12, 5, 21, 8))]
    runs = {}
    # both engines serve each GEMM shape with the same launch: timed at warm-up, two engines could pick different
    # launches of near-equal times, whose roundings differ (the graph case's tokens parted at a near tie that way)
    pin_launch_choices(monkeypatch)
    for on in (False, True):
        monkeypatch.setattr(ModelRunner, "release_rows", on)
        with LlamaEngine(path, max_batch=8, page_size=16, cuda_graph=graph) as engine:
            logits: list[np.ndarray] = []
            original = engine.sampler.pick

            def pick(v, rows, sampling, logits=logits, original=original, engine=engine):
                logits.append(engine.runner.buffers.logits[:rows].get())
                original(v, rows, sampling)

            engine.sampler.pick = pick
            r = engine.generate(prompts, [12] * 8, eos_token_ids=())
            if on:  # the engine's own launches served the decode steps' add-norms and SiLU
                released = engine.runner.releasing_rows()
                assert released is not None, engine.runner.release_rows_error
                assert released.packed["add_rmsnorm"] > 0 and released.packed["silu_mul"] > 0, released.packed
            runs[on] = (r.tokens, logits)
    (tok_on, log_on), (tok_off, log_off) = runs[True], runs[False]
    assert tok_on == tok_off
    assert len(log_on) == len(log_off) > 0
    assert all(np.array_equal(a, b) for a, b in zip(log_on, log_off, strict=True))
