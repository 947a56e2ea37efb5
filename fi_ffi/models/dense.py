"""Dense math of the engine on CuPy: cuBLAS GEMMs and two tiny kernels (row gather, argmax).

Why cuBLAS through CuPy's bindings (``cupy_backends.cuda.libs.cublas.gemmEx``) rather than ``cupy.matmul``:
``matmul`` has no bfloat16 (numpy has no such dtype), may allocate temporaries, and resets the handle's stream
on every call; ``gemmEx`` on a handle of our own takes raw pointers and data types, writes into our buffers,
and is safe to capture in a CUDA graph. The two kernels are compiled once with NVRTC (``cupy.RawModule``) and
never allocate, so the whole decode step can be captured.

Every launch goes to CuPy's *current* stream (kernels) or the handle's stream (GEMMs); the engine makes its
stream current and gives it to the handle, so they are the same.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["CUDA_R_16BF", "CUDA_R_16F", "CUDA_R_32F", "Dense", "data_type"]

# cudaDataType_t values (library_types.h, a stable ABI).
CUDA_R_32F = 0
CUDA_R_16F = 2
CUDA_R_16BF = 14


def data_type(dtype: str) -> int:
    """The cudaDataType_t of an fi_ffi dtype name."""
    try:
        return {"float16": CUDA_R_16F, "bfloat16": CUDA_R_16BF, "float32": CUDA_R_32F}[dtype]
    except KeyError:
        raise ValueError(f"dtype: expected float16, bfloat16 or float32, got {dtype!r}") from None


_SOURCE = r"""
#define NEG_INF __int_as_float((int)0xff800000u)

// dst[r, :width] = src[rows[r], :width] for 16-bit elements; one block per output row.
extern "C" __global__ void gather_rows16(const unsigned short* __restrict__ src, const int* __restrict__ rows,
                                         unsigned short* __restrict__ dst, long long width, long long src_ld,
                                         long long dst_ld) {
    const unsigned short* a = src + (long long)rows[blockIdx.x] * src_ld;
    unsigned short* b = dst + (long long)blockIdx.x * dst_ld;
    for (long long c = threadIdx.x; c < width; c += blockDim.x) b[c] = a[c];
}

__device__ __forceinline__ void keep_first_max(float& best, int& idx, float ob, int oi) {
    if (ob > best || (ob == best && oi < idx)) { best = ob; idx = oi; }
}

// out[r] = the first index of the largest of x[r, :n] (NaN never wins; a row of NaN/-inf gives 0).
extern "C" __global__ void argmax_rows(const float* __restrict__ x, long long n, long long ld,
                                       int* __restrict__ out) {
    const float* row = x + (long long)blockIdx.x * ld;
    float best = NEG_INF;
    int idx = 0x7fffffff;
    for (long long i = threadIdx.x; i < n; i += blockDim.x) {
        float v = row[i];
        if (v > best) { best = v; idx = (int)i; }  // a thread's indices ascend: '>' keeps its first max
    }
    for (int off = 16; off; off >>= 1)
        keep_first_max(best, idx, __shfl_down_sync(0xffffffffu, best, off), __shfl_down_sync(0xffffffffu, idx, off));
    __shared__ float sb[32];
    __shared__ int si[32];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) { sb[warp] = best; si[warp] = idx; }
    __syncthreads();
    if (warp == 0) {
        int warps = (blockDim.x + 31) >> 5;
        best = lane < warps ? sb[lane] : NEG_INF;
        idx = lane < warps ? si[lane] : 0x7fffffff;
        for (int off = 16; off; off >>= 1)
            keep_first_max(best, idx, __shfl_down_sync(0xffffffffu, best, off),
                           __shfl_down_sync(0xffffffffu, idx, off));
        if (lane == 0) out[blockIdx.x] = idx == 0x7fffffff ? 0 : idx;
    }
}
"""


class Dense:
    """A cuBLAS handle bound to ``stream`` plus the gather/argmax kernels (compiled on construction).

    Args:
        stream: the engine's ``cupy.cuda.Stream``; kernels launch on CuPy's current stream, which the engine
            keeps equal to it.
    """

    def __init__(self, stream: Any) -> None:
        import cupy
        from cupy_backends.cuda.libs import cublas

        self._cublas = cublas
        self._gemm = cublas.gemmEx
        self._op_n, self._op_t = cublas.CUBLAS_OP_N, cublas.CUBLAS_OP_T
        self._compute = cublas.CUBLAS_COMPUTE_32F  # float32 accumulation, as torch's f16/bf16 matmul
        self._algo = cublas.CUBLAS_GEMM_DEFAULT
        self.handle = cublas.create()
        cublas.setStream(self.handle, stream.ptr)
        self._scalars = np.array([1.0, 0.0], np.float32)  # alpha, beta (host pointer mode)
        self._alpha = self._scalars.ctypes.data
        self._beta = self._alpha + 4
        module = cupy.RawModule(code=_SOURCE)
        self._gather_fn = module.get_function("gather_rows16")
        self._argmax_fn = module.get_function("argmax_rows")

    def linear(self, rows: int, x: int, x_ld: int, w: int, n: int, k: int, y: int, y_ld: int, ab_type: int,
               c_type: int) -> None:
        """``y[:rows, :n] = x[:rows, :k] @ w.T`` with ``w`` a row-major ``[n, k]`` matrix (a PyTorch-style
        Linear weight); pointers as ints, leading dimensions (row strides) in elements; ``ab_type``/``c_type``:
        cudaDataType_t of x and w / of y."""
        # Column-major view: y^T (n x rows, ld y_ld) = op_T(w as k x n, ld k) . x^T (k x rows, ld x_ld).
        self._gemm(self.handle, self._op_t, self._op_n, n, rows, k, self._alpha, w, ab_type, k, x, ab_type, x_ld,
                   self._beta, y, c_type, y_ld, self._compute, self._algo)

    def gather_rows(self, rows: int, src: int, src_ld: int, index: int, dst: int, dst_ld: int, width: int) -> None:
        """``dst[r, :width] = src[index[r], :width]`` for ``r < rows`` (16-bit elements; ``index`` int32)."""
        self._gather_fn((rows,), (256,), (src, index, dst, width, src_ld, dst_ld))

    def argmax(self, rows: int, x: int, n: int, ld: int, out: int) -> None:
        """``out[r] = argmax(x[r, :n])`` (float32 ``x``, int32 ``out``; ties: the first index)."""
        self._argmax_fn((rows,), (1024,), (x, n, ld, out))

    def close(self) -> None:
        if self.handle:
            self._cublas.destroy(self.handle)
            self.handle = 0
