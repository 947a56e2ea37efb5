"""RMSNorm family on a real GPU against a float32 numpy reference (gated by FI_FFI_RUN_GPU_TESTS=1).

Tolerances (absolute and relative, on outputs of magnitude ~1-4): float16 5e-3, bfloat16 3e-2 (8-bit mantissa,
the output is rounded once to bf16 and the weight was rounded on input); the same for 2-D rows and for the 3-D
QK RMSNorm (one row per head, contiguous or strided views of a fused QKV buffer).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from helpers.gpu import require_torch

if os.environ.get("FI_FFI_RUN_GPU_TESTS") != "1":
    pytest.skip("GPU tests run only with FI_FFI_RUN_GPU_TESTS=1 on a CUDA machine", allow_module_level=True)

import fi_ffi
from fi_ffi.tensor.descriptor import Tensor

torch = require_torch()

pytestmark = pytest.mark.gpu

TOL = {torch.float16: 5e-3, torch.bfloat16: 3e-2}


def reference(x: np.ndarray, w: np.ndarray, eps: float, gemma: bool = False) -> np.ndarray:
    x = x.astype(np.float32)
    w = w.astype(np.float32)
    rms = np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    return x / rms * ((1.0 + w) if gemma else w)


def to_np(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 128), (7, 4096), (33, 1000), (3, 96)])
@pytest.mark.parametrize("gemma", [False, True])
def test_rmsnorm_matches_reference(dtype: torch.dtype, shape: tuple[int, int], gemma: bool) -> None:
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=dtype, device="cuda")
    w = torch.randn(shape[1], dtype=dtype, device="cuda")
    out = torch.empty_like(x)
    op = fi_ffi.gemma_rmsnorm if gemma else fi_ffi.rmsnorm
    assert op(x, w, 1e-6, out=out) is out  # flashinfer's order: eps third, out by keyword
    torch.cuda.synchronize()
    tol = TOL[dtype]
    np.testing.assert_allclose(to_np(out), reference(to_np(x), to_np(w), 1e-6, gemma), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rmsnorm_with_non_contiguous_row_stride(dtype: torch.dtype) -> None:
    big = torch.randn(5, 512 + 64, dtype=dtype, device="cuda")
    x = big[:, :512]  # row stride 576 elements
    out_big = torch.zeros(5, 512 + 32, dtype=dtype, device="cuda")
    out = out_big[:, :512]
    w = torch.randn(512, dtype=dtype, device="cuda")
    fi_ffi.rmsnorm(x, w, out=out, eps=1e-5)
    torch.cuda.synchronize()
    tol = TOL[dtype]
    np.testing.assert_allclose(to_np(out), reference(to_np(x), to_np(w), 1e-5), atol=tol, rtol=tol)
    assert torch.count_nonzero(out_big[:, 512:]) == 0  # nothing written past the row


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_qk_rmsnorm_on_a_strided_slice_of_fused_qkv(dtype: torch.dtype) -> None:
    b, h, d = 6, 8, 128
    qkv = torch.randn(b, 3, h, d, dtype=dtype, device="cuda")
    q = qkv[:, 0]  # strides (3*h*d, d, 1)
    w = torch.randn(d, dtype=dtype, device="cuda")
    out = torch.empty(b, h, d, dtype=dtype, device="cuda")
    fi_ffi.qk_rmsnorm(q, w, out=out)
    torch.cuda.synchronize()
    tol = TOL[dtype]
    np.testing.assert_allclose(to_np(out), reference(to_np(q), to_np(w), 1e-6), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("b", "h", "d"), [(1, 1, 64), (6, 8, 128), (33, 4, 256), (5, 32, 64)])
def test_rmsnorm_on_3d_qk_input_matches_reference(dtype: torch.dtype, b: int, h: int, d: int) -> None:
    # flashinfer's rmsnorm on [B, H, D] (QK RMSNorm, as Qwen3 / Gemma 3 normalize q and k per head), in
    # flashinfer's positional order; contiguous input, float32 reference, TOL as the 2-D case
    torch.manual_seed(1)
    x = torch.randn(b, h, d, dtype=dtype, device="cuda")
    w = torch.randn(d, dtype=dtype, device="cuda")
    out = torch.empty_like(x)
    assert fi_ffi.rmsnorm(x, w, 1e-5, out=out) is out
    torch.cuda.synchronize()
    tol = TOL[dtype]
    np.testing.assert_allclose(to_np(out), reference(to_np(x), to_np(w), 1e-5), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("which", ["q", "k"])
def test_rmsnorm_on_strided_q_and_k_views_of_fused_qkv_in_place(dtype: torch.dtype, which: str) -> None:
    # the engine's case: q (8 heads) or k (2 heads) of one fused QKV row [B, (8 + 2 + 2) * D], normalized in
    # place through the strided view; the other heads' memory stays as it was
    b, hq, hk, d = 7, 8, 2, 128
    qkv = torch.randn(b, (hq + 2 * hk) * d, dtype=dtype, device="cuda")
    before = qkv.clone()
    start, heads = (0, hq) if which == "q" else (hq * d, hk)
    view = qkv[:, start : start + heads * d].view(b, heads, d)
    assert view.stride() == ((hq + 2 * hk) * d, d, 1)
    w = torch.randn(d, dtype=dtype, device="cuda")
    expected = reference(to_np(view), to_np(w), 1e-6)
    fi_ffi.rmsnorm(view, w, out=view)
    torch.cuda.synchronize()
    tol = TOL[dtype]
    np.testing.assert_allclose(to_np(view), expected, atol=tol, rtol=tol)
    untouched = torch.ones_like(qkv, dtype=torch.bool)
    untouched[:, start : start + heads * d] = False
    assert torch.equal(qkv[untouched], before[untouched])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rmsnorm_3d_into_a_strided_out_matches_qk_rmsnorm(dtype: torch.dtype) -> None:
    # out strided too (a slice of a larger buffer): rmsnorm and qk_rmsnorm launch the same kernel, bit for bit
    b, h, d = 4, 6, 128
    x = torch.randn(b, 2, h, d, dtype=dtype, device="cuda")[:, 1]  # strides (2 h d, d, 1)
    w = torch.randn(d, dtype=dtype, device="cuda")
    out_big = torch.zeros(b, h + 1, d, dtype=dtype, device="cuda")
    out = out_big[:, 1:]  # strides ((h + 1) d, d, 1)
    fi_ffi.rmsnorm(x, w, out=out)
    again = torch.empty(b, h, d, dtype=dtype, device="cuda")
    fi_ffi.qk_rmsnorm(x, w, out=again)
    torch.cuda.synchronize()
    tol = TOL[dtype]
    np.testing.assert_allclose(to_np(out), reference(to_np(x), to_np(w), 1e-6), atol=tol, rtol=tol)
    assert torch.equal(out, again)
    assert torch.count_nonzero(out_big[:, 0]) == 0  # nothing written outside the view


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("gemma", [False, True])
def test_fused_add_rmsnorm_in_place(dtype: torch.dtype, gemma: bool) -> None:
    x = torch.randn(9, 2048, dtype=dtype, device="cuda")
    r = torch.randn(9, 2048, dtype=dtype, device="cuda")
    w = torch.randn(2048, dtype=dtype, device="cuda")
    x0, r0 = to_np(x), to_np(r)
    op = fi_ffi.gemma_fused_add_rmsnorm if gemma else fi_ffi.fused_add_rmsnorm
    assert op(x, r, w, eps=1e-6) is None
    torch.cuda.synchronize()
    tol = TOL[dtype]
    summed = x0 + r0
    np.testing.assert_allclose(to_np(r), summed, atol=tol * 4, rtol=tol)
    np.testing.assert_allclose(to_np(x), reference(to_np(r), to_np(w), 1e-6, gemma), atol=tol * 2, rtol=tol * 2)


def test_raw_cuda_python_allocations_on_a_cuda_core_stream() -> None:
    from cuda.bindings import runtime as rt
    from cuda.core import Device

    dev = Device(0)
    dev.set_current()
    stream = dev.create_stream()
    b, d = 4, 256
    rng = np.random.default_rng(1)
    xh = rng.standard_normal((b, d)).astype(np.float16)
    wh = rng.standard_normal(d).astype(np.float16)
    ptrs = []
    for nbytes in (xh.nbytes, wh.nbytes, xh.nbytes):
        err, ptr = rt.cudaMalloc(nbytes)
        assert err == rt.cudaError_t.cudaSuccess
        ptrs.append(int(ptr))
    try:
        for ptr, host in ((ptrs[0], xh), (ptrs[1], wh)):
            (err,) = rt.cudaMemcpy(ptr, host.ctypes.data, host.nbytes, rt.cudaMemcpyKind.cudaMemcpyHostToDevice)
            assert err == rt.cudaError_t.cudaSuccess
        x = Tensor.from_pointer(ptrs[0], (b, d), "float16", 0)
        w = Tensor.from_pointer(ptrs[1], (d,), "float16", 0)
        out = Tensor.from_pointer(ptrs[2], (b, d), "float16", 0)
        fi_ffi.rmsnorm(x, w, out=out, stream=stream)
        stream.sync()
        oh = np.empty_like(xh)
        (err,) = rt.cudaMemcpy(oh.ctypes.data, ptrs[2], oh.nbytes, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost)
        assert err == rt.cudaError_t.cudaSuccess
        np.testing.assert_allclose(oh.astype(np.float32), reference(xh, wh, 1e-6), atol=5e-3, rtol=5e-3)
    finally:
        for ptr in ptrs:
            rt.cudaFree(ptr)
        stream.close()


def test_cupy_arrays_and_cupy_stream() -> None:
    cp = pytest.importorskip("cupy")
    x = cp.random.standard_normal((16, 512)).astype(cp.float16)
    w = cp.random.standard_normal(512).astype(cp.float16)
    out = cp.empty_like(x)
    s = cp.cuda.Stream(non_blocking=True)
    fi_ffi.rmsnorm(x, w, out=out, stream=s)
    s.synchronize()
    np.testing.assert_allclose(
        cp.asnumpy(out).astype(np.float32), reference(cp.asnumpy(x), cp.asnumpy(w), 1e-6), atol=5e-3, rtol=5e-3
    )


def test_the_stream_argument_decides_where_the_kernel_runs() -> None:
    # Park stream s behind a long GPU spin, launch rmsnorm on s, and look at `out` from another stream
    # before s drains: it must still be untouched; after s drains it holds the result. Had the kernel run on
    # any other stream, `out` would already be written when we look.
    x = torch.randn(4, 1024, dtype=torch.float16, device="cuda")
    w = torch.randn(1024, dtype=torch.float16, device="cuda")
    out = torch.zeros_like(x)
    s, probe = torch.cuda.Stream(), torch.cuda.Stream()
    torch.cuda.synchronize()
    with torch.cuda.stream(s):
        torch.cuda._sleep(2_000_000_000)  # about a second of GPU cycles on s
    fi_ffi.rmsnorm(x, w, out=out, stream=s)
    with torch.cuda.stream(probe):
        early = out.clone()
    probe.synchronize()
    assert not s.query(), "stream s drained too early for the test to mean anything"
    assert torch.count_nonzero(early) == 0
    s.synchronize()
    np.testing.assert_allclose(to_np(out), reference(to_np(x), to_np(w), 1e-6), atol=5e-3, rtol=5e-3)


def test_stream_none_on_the_default_streams_leaves_tvm_ffi_state_alone() -> None:
    # stream=None with torch tensors on torch's default stream: the legacy default stream, TVM-FFI's current
    # stream too, so nothing is set; TVM-FFI's state stays as it was.
    from fi_ffi.abi.runtime import api

    assert api().TVMFFIEnvGetStream(2, 0) == 0
    x = torch.randn(2, 256, dtype=torch.float16, device="cuda")
    w = torch.randn(256, dtype=torch.float16, device="cuda")
    out = torch.empty_like(x)
    fi_ffi.rmsnorm(x, w, out=out)  # legacy default stream
    torch.cuda.synchronize()
    np.testing.assert_allclose(to_np(out), reference(to_np(x), to_np(w), 1e-6), atol=5e-3, rtol=5e-3)
    assert api().TVMFFIEnvGetStream(2, 0) == 0


def test_managed_memory_is_accepted_and_computed() -> None:
    # Managed memory is presented to the kernel as CUDA memory (the kernels check for kDLCUDA exactly).
    from cuda.bindings import runtime as rt

    b, d = 2, 128
    rng = np.random.default_rng(3)
    xh = rng.standard_normal((b, d)).astype(np.float16)
    wh = rng.standard_normal(d).astype(np.float16)
    ptrs = []
    for nbytes in (xh.nbytes, wh.nbytes, xh.nbytes):
        err, ptr = rt.cudaMallocManaged(nbytes, rt.cudaMemAttachGlobal)
        assert err == rt.cudaError_t.cudaSuccess
        ptrs.append(int(ptr))
    try:
        for ptr, host in ((ptrs[0], xh), (ptrs[1], wh)):
            (err,) = rt.cudaMemcpy(ptr, host.ctypes.data, host.nbytes, rt.cudaMemcpyKind.cudaMemcpyDefault)
            assert err == rt.cudaError_t.cudaSuccess
        managed = fi_ffi.Device(fi_ffi.dtypes.CUDA_MANAGED, 0)
        shapes = ((b, d), (d,), (b, d))
        x, w, out = (Tensor.from_pointer(p, s, "float16", managed) for p, s in zip(ptrs, shapes, strict=True))
        fi_ffi.rmsnorm(x, w, out=out)
        (err,) = rt.cudaDeviceSynchronize()
        assert err == rt.cudaError_t.cudaSuccess
        oh = np.empty_like(xh)
        rt.cudaMemcpy(oh.ctypes.data, ptrs[2], oh.nbytes, rt.cudaMemcpyKind.cudaMemcpyDefault)
        np.testing.assert_allclose(oh.astype(np.float32), reference(xh, wh, 1e-6), atol=5e-3, rtol=5e-3)
    finally:
        for ptr in ptrs:
            rt.cudaFree(ptr)


def test_prepared_call_relaunches_with_current_data() -> None:
    x = torch.randn(3, 256, dtype=torch.float16, device="cuda")
    w = torch.randn(256, dtype=torch.float16, device="cuda")
    out = torch.empty_like(x)
    s = torch.cuda.Stream()
    call = fi_ffi.prepare(fi_ffi.rmsnorm, x, w, 1e-6, out=out, stream=s)
    for _ in range(3):
        x.normal_()  # same buffer, new contents: the prepared call reads them at launch
        s.wait_stream(torch.cuda.current_stream())
        call()
        s.synchronize()
        np.testing.assert_allclose(to_np(out), reference(to_np(x), to_np(w), 1e-6), atol=5e-3, rtol=5e-3)
