"""The GPU tests of MoE layers whose experts are kept quantized as stored (e4m3: test_gpu_fp8_moe_gemv.py; MXFP4:
test_gpu_mxfp4_moe_gemv.py): values in and out of the engine's 16-bit storage, and the one comparison both make of
such a layer against its twin over the 16-bit experts of the same values. CuPy is imported where it is used."""

from __future__ import annotations

from typing import Any

import numpy as np

from helpers.random_llama import bf16_bits

LAYER_TOL = {"float16": 2e-2, "bfloat16": 5e-2}  # test_gpu_moe.py's layer tolerance (atol = rtol)


def to16(a: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values as the engine stores them: float16, or bfloat16 bits (uint16)."""
    return a.astype(np.float16) if dtype == "float16" else bf16_bits(a.astype(np.float32))


def from16(a: np.ndarray, dtype: str) -> np.ndarray:
    """The engine's 16-bit storage as float32."""
    if dtype == "float16":
        return a.astype(np.float32)
    return (a.astype(np.uint32) << 16).view(np.float32)


def check_against_16bit_twin(layer: Any, ref: Any, stream: Any, h: int, dtype: str, rng: Any, label: str) -> None:
    """``layer`` (experts as stored) against ``ref`` (the same layer over 16-bit experts of the same values): the
    grouped-GEMV steps of 1-16 tokens within :data:`LAYER_TOL`, the host and dense paths **bit-equal** (they read
    the 16-bit copy, written before each use), and a captured CUDA graph of a GEMV step replays new inputs to the
    eager result. Closes both layers."""
    import cupy

    storage = np.float16 if dtype == "float16" else np.uint16
    tol = LAYER_TOL[dtype]
    try:
        for tokens in (1, 2, 5, 8, 16):
            assert layer._gemv_serves(tokens)  # every step up to the capacity: the GEMV reads the experts as stored
            x = cupy.asarray(to16(rng.standard_normal((tokens, h)).astype(np.float32), dtype))
            outs = {name: cupy.zeros((tokens, h), storage) for name in ("gemv", "gemv16", "host", "host16", "d", "d16")}
            layer.forward_static(x, outs["gemv"])
            ref.forward_static(x, outs["gemv16"])
            layer.forward(x, outs["host"])
            ref.forward(x, outs["host16"])
            layer.forward_dense(x, outs["d"])
            ref.forward_dense(x, outs["d16"])
            stream.synchronize()
            got = {name: from16(cupy.asnumpy(a), dtype) for name, a in outs.items()}
            np.testing.assert_allclose(got["gemv"], got["gemv16"], atol=tol, rtol=tol)
            assert np.array_equal(got["host"], got["host16"]), tokens  # the 16-bit copy, written first
            assert np.array_equal(got["d"], got["d16"]), tokens
            print(f"{label} {tokens} tokens: max |GEMV - 16-bit| {np.abs(got['gemv'] - got['gemv16']).max():.4f}")
        x_buf = cupy.asarray(to16(rng.standard_normal((8, h)).astype(np.float32), dtype))
        out_buf = cupy.zeros_like(x_buf)
        layer.forward_static(x_buf, out_buf)
        stream.synchronize()
        stream.begin_capture()
        layer.forward_static(x_buf, out_buf)
        graph = stream.end_capture()
        x_buf[...] = cupy.asarray(to16(rng.standard_normal((8, h)).astype(np.float32), dtype))
        cupy.cuda.Device().synchronize()
        graph.launch(stream)
        eager = cupy.zeros_like(x_buf)
        layer.forward_static(x_buf, eager)
        stream.synchronize()
        assert np.array_equal(cupy.asnumpy(out_buf), cupy.asnumpy(eager))
    finally:
        layer.close()
        ref.close()
