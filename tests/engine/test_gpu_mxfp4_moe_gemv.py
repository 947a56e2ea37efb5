"""The MXFP4 grouped GEMV (fi_engine.kernels.mxfp4_moe_gemv) and a MoE layer of MXFP4 experts read as stored, on a
GPU (FI_FFI_RUN_GPU_TESTS=1; CuPy; no torch).

- The kernel: random MXFP4 experts (8 of them, top-2; every code, scales 2**-9 .. 2**-4; k = 352, not a multiple of
  the 128-column chunk: the padded tail), in bfloat16 and float16, at 1, 3, 8 and 13 tokens (13: more than the 8
  rows of one pass), plain, with a bias, SiLU-gated and gpt-oss's clamped SwiGLU with a bias (the down
  projection's activation made as its rows are staged), against a float64 reference over the exact weight values.
  Bound per output: half an ulp of the 16-bit output (``2**-9`` / ``2**-12`` relative) twice over, plus ``2**-16
  sum |x| |w|`` (float32 sums of exact products; the inputs are staged as float16, exact for these bfloat16 values),
  plus, gated, ``sum |w| |act| 2**-10`` (each staged activation rounded to float16, the kernel's ``__expf``).
- Its 16-bit copy (``dequantize``): bit-equal to :func:`~fi_engine.checkpoint.mxfp4_weights.dequantize_mxfp4`.
- The layer: ``MoELayer(mxfp4_experts=..., biases=..., activation=ClampedSwiGLU(...))`` (gpt-oss's) against the same
  layer over the 16-bit experts (the same values): the grouped-GEMV steps (1-16 tokens) within the layer tolerance of
  test_gpu_moe.py, the host and dense paths **bit-equal** (they read the 16-bit copy, written before each use), and a
  captured CUDA graph of a GEMV step replays new inputs to the eager result.

Run on the GPU machine: ``bash tools/gpu_run.sh python3 -m pytest -q -s tests/engine/test_gpu_mxfp4_moe_gemv.py``.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pytest

if os.environ.get("FI_FFI_RUN_GPU_TESTS") != "1":
    pytest.skip("GPU tests run only with FI_FFI_RUN_GPU_TESTS=1 on a CUDA machine", allow_module_level=True)

cupy = pytest.importorskip("cupy", reason="the engine needs CuPy (python -m pip install '.[engine]')")

from helpers.stored_experts import check_against_16bit_twin, from16, to16  # noqa: E402

from fi_engine.checkpoint.mxfp4_weights import dequantize_mxfp4  # noqa: E402
from fi_engine.kernels.mxfp4_moe_gemv import Mxfp4Experts, Mxfp4GroupedGemv, tiled_mxfp4  # noqa: E402
from fi_engine.layers.moe import ClampedSwiGLU, MoEBiases, MoELayer, MoEWeights  # noqa: E402

pytestmark = pytest.mark.gpu

EXPERTS, TOP_K = 8, 2
OUT_ULP = {"bfloat16": 2.0**-8, "float16": 2.0**-11}  # an ulp, relative
ALPHA, LIMIT = 1.702, 7.0  # gpt-oss's


def random_mxfp4(rng: np.random.Generator, n: int, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(blocks [E, n, k/32, 16], scales [E, n, k/32], values [E, n, k] float32)``: every code, scales 2**-9 ..
    2**-4 (outputs of magnitude ~1 for N(0, 1) inputs)."""
    blocks = rng.integers(0, 256, (EXPERTS, n, k // 32, 16), dtype=np.uint8)
    scales = rng.integers(118, 124, (EXPERTS, n, k // 32), dtype=np.uint8)
    values = (dequantize_mxfp4(blocks, scales).astype(np.uint32) << 16).view(np.float32)
    return blocks, scales, values


def clamped_swiglu(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    g = np.minimum(gate, LIMIT)
    return (np.clip(up, -LIMIT, LIMIT) + 1) * g / (1 + np.exp(-ALPHA * g))


N, K = 96, 352  # k: 11 blocks of 32, 2.75 chunks of 128


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("mode", ["plain", "bias", "silu", "swiglu"])
def test_the_mxfp4_grouped_gemv_matches_float64(dtype: str, mode: str) -> None:
    rng = np.random.default_rng(21)
    stream = cupy.cuda.Stream(non_blocking=True)
    g = Mxfp4GroupedGemv(dtype, stream)
    blocks, scales, values = random_mxfp4(rng, N, K)
    codes, tiled_scales = tiled_mxfp4(blocks, scales)
    w, s = cupy.asarray(codes), cupy.asarray(tiled_scales)
    g.add(int(w.data.ptr), int(s.data.ptr), EXPERTS, N, K)
    bias = (rng.standard_normal((EXPERTS, N)) * 0.5).astype(np.float32) if mode in ("bias", "swiglu") else None
    gated = mode in ("silu", "swiglu")
    ulp = OUT_ULP[dtype]
    for tokens in (1, 3, 8, 13):
        assert g.fits(tokens, TOP_K, N, K), (g.tensor_cores, g.rows_per_pass(tokens, K))
        rows = tokens * TOP_K if gated else tokens  # gated: the input rows are the assignments' [gate | up]
        x = rng.standard_normal((rows, 2 * K if gated else K)).astype(np.float32) * (3.0 if gated else 1.0)
        x16 = to16(x, dtype)
        chosen = np.stack([rng.choice(EXPERTS, TOP_K, replace=False) for _ in range(tokens)]).astype(np.int32)
        if tokens == 13:
            chosen[:, 0] = 3  # 13 assignments of expert 3: two passes
        y = cupy.zeros((tokens * TOP_K, N), np.float16 if dtype == "float16" else np.uint16)
        kw: dict[str, Any] = {}
        if bias is not None:
            kw = {"bias": cupy.asarray(bias), "act": "swiglu" if gated else "none", "alpha": ALPHA, "limit": LIMIT}
        g(cupy.asarray(x16), 1 if gated else TOP_K, cupy.asarray(chosen.reshape(-1)), tokens, TOP_K, w, EXPERTS, N,
          K, y, gated, **kw)  # fmt: skip
        stream.synchronize()
        got = from16(cupy.asnumpy(y), dtype)
        xf = from16(x16, dtype).astype(np.float64)
        worst = 0.0
        for a, e in enumerate(chosen.reshape(-1)):
            if gated:
                gate, up = xf[a, :K], xf[a, K:]
                act = clamped_swiglu(gate, up) if mode == "swiglu" else gate / (1 + np.exp(-gate)) * up
                slack = 2.0**-10 * (np.abs(values[e]) @ np.abs(act))
            else:
                act, slack = xf[a // TOP_K], 0.0
            ref = values[e].astype(np.float64) @ act + (bias[e] if bias is not None else 0.0)
            bound = 2.0**-16 * (np.abs(values[e]) @ np.abs(act)) + ulp * np.abs(ref) + slack + 1e-30
            err = np.abs(got[a] - ref)
            assert (err <= bound).all(), f"tokens {tokens}, assignment {a} (expert {e}): {err.max()} > bound"
            worst = max(worst, float((err / bound).max()))
        print(f"{dtype} {mode} {tokens} tokens: worst {worst:.2f} of the bound")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_the_16bit_copy_is_the_dequantization(dtype: str) -> None:
    rng = np.random.default_rng(22)
    g = Mxfp4GroupedGemv(dtype, cupy.cuda.Stream(non_blocking=True))
    for n, k in ((N, K), (32, 512)):
        blocks, scales, values = random_mxfp4(rng, n, k)
        codes, tiled_scales = tiled_mxfp4(cupy.asarray(blocks), cupy.asarray(scales))  # laid out on the GPU
        g.add(int(codes.data.ptr), int(tiled_scales.data.ptr), EXPERTS, n, k)
        out = cupy.zeros((EXPERTS, n, k), np.float16 if dtype == "float16" else np.uint16)
        g.dequantize(codes, out)
        g.stream.synchronize()
        assert np.array_equal(from16(cupy.asnumpy(out), dtype), values.astype(np.float16).astype(np.float32)
                              if dtype == "float16" else values), (n, k)  # fmt: skip


def mxfp4_layer_pair(rng: np.random.Generator, dtype: str) -> tuple[MoELayer, MoELayer, Any, int]:
    """(gpt-oss's layer of MXFP4 experts with biases and the clamped SwiGLU, the same over 16-bit experts of the same
    values, the stream, hidden)."""
    h, i, cap = 256, 352, 16
    stream = cupy.cuda.Stream(non_blocking=True)
    gu_blocks, gu_scales, gu_values = random_mxfp4(rng, 2 * i, h)
    dn_blocks, dn_scales, dn_values = random_mxfp4(rng, h, i)
    router = cupy.asarray(to16((rng.standard_normal((EXPERTS, h)) / h**0.5).astype(np.float32), dtype))
    weights16 = MoEWeights(router, cupy.asarray(to16(gu_values, dtype)), cupy.asarray(to16(dn_values, dtype)))
    copy = MoEWeights(router, cupy.zeros_like(weights16.gate_up), cupy.zeros_like(weights16.down))
    (gu_c, gu_s), (dn_c, dn_s) = tiled_mxfp4(gu_blocks, gu_scales), tiled_mxfp4(dn_blocks, dn_scales)
    mx = Mxfp4Experts(*(cupy.asarray(a) for a in (gu_c, gu_s, dn_c, dn_s)), h, i)
    biases = MoEBiases(*(cupy.asarray((rng.standard_normal(s) * 0.3).astype(np.float32))
                         for s in ((EXPERTS,), (EXPERTS, 2 * i), (EXPERTS, h))))  # fmt: skip
    common = dict(dtype=dtype, top_k=TOP_K, max_tokens=64, stream=stream, capacity=cap, dense_rows=cap,
                  biases=biases, activation=ClampedSwiGLU(ALPHA, LIMIT))  # fmt: skip
    return MoELayer(copy, mxfp4_experts=mx, **common), MoELayer(weights16, **common), stream, h  # type: ignore[arg-type]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_layer_of_mxfp4_experts_matches_the_16bit_layer(dtype: str) -> None:
    rng = np.random.default_rng(23)
    layer, ref, stream, h = mxfp4_layer_pair(rng, dtype)
    check_against_16bit_twin(layer, ref, stream, h, dtype, rng, dtype)
