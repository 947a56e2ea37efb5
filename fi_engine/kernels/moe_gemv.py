"""The grouped GEMV of a mixture-of-experts decode step: each chosen expert's weights read once, at HBM bandwidth,
for the few tokens that chose it (:class:`GroupedGemv`; CUDA C in :data:`GROUPED_GEMV_SOURCE`, compiled with NVRTC
through CuPy).

A decode step of ``T`` tokens with ``k`` experts each makes ``A = T * k`` assignments; assignment ``a`` is token
``a // k``'s ``a % k``-th choice, of expert ``experts[a]`` (the device routing's output). For experts' weights
``W [E, N, K]`` (row-major: ``E`` stacked Linear weights), one launch computes

    ``y[a, j] = sum_c in[a // div, c] * W[experts[a], j, c]``   for ``a < A``, ``j < N``

(``div = k`` for the gate/up projection, whose input rows are the tokens; ``div = 1`` for the down projection,
whose input rows are the assignments' activations). The grid has one row of blocks per expert: a block first
lists the assignments of its expert (an expert no token chose returns at once, its weights unread), stages up to
``R`` of their input rows in shared memory, then streams its share of the expert's ``N`` weight rows (one warp per
row, 4 16-byte loads in flight per lane, past L1, as the dense GEMV of :mod:`~fi_engine.kernels.cuda_sources`) and keeps
``R`` float32 sums per row; more than ``R`` assignments of one expert take further passes over its weights. ``y``
is rounded once to the 16-bit type. Nothing is read back to the host: a CUDA graph can capture it.

The fixed-capacity grouped GEMM (FlashInfer's ``segment_gemm``, :mod:`~fi_engine.layers.moe`) pads every expert's rows
to tensor-core tiles; at 1-8 rows per expert this reads the same weights in fewer, fuller streams
(benchmarks/RESULTS.md).
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["GROUPED_GEMV_SOURCE", "GroupedGemv"]

GROUPED_GEMV_SOURCE = r"""
__device__ __forceinline__ float h2f(unsigned short u) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(u));
    return f;
}
__device__ __forceinline__ float b2f(unsigned short u) { return __int_as_float(((unsigned)u) << 16); }
__device__ __forceinline__ unsigned short f2h(float f) {
    unsigned short u;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(u) : "f"(f));
    return u;
}
__device__ __forceinline__ unsigned short f2b(float f) {
    unsigned short u;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(u) : "f"(f));
    return u;
}
__device__ __forceinline__ uint4 load_weights(const uint4* p) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}
#define UNROLL 4
#define MAX_ASSIGN 1024

template <bool BF16, int R>
__device__ __forceinline__ void dot_vec(uint4 a, const uint4* sx, int vecs, int rows, int c, float acc[R]) {
    const unsigned short* av = reinterpret_cast<const unsigned short*>(&a);
    float wf[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) wf[e] = BF16 ? b2f(av[e]) : h2f(av[e]);
#pragma unroll
    for (int r = 0; r < R; ++r) {
        if (r < rows) {
            uint4 b = sx[r * vecs + c];
            const unsigned short* bv = reinterpret_cast<const unsigned short*>(&b);
#pragma unroll
            for (int e = 0; e < 8; ++e) acc[r] += wf[e] * (BF16 ? b2f(bv[e]) : h2f(bv[e]));
        }
    }
}

// y[a, j] = in[a / div] . W[experts[a], j] for a < A (see the module docstring); grid (blocks per expert, E).
// GATED: the input row is silu(g) * u of a [gate | up] row of 2k elements (FlashInfer's silu_and_mul, rounded to
// the 16-bit type as it rounds, its __expf and division as the module's --use_fast_math compiles them), made while
// it is staged: the down projection reads the gate/up output directly, one launch instead of two.
template <bool BF16, int R, bool GATED>
__device__ __forceinline__ void grouped_gemv(const unsigned short* __restrict__ in, long long in_ld, int div,
                                             const int* __restrict__ experts, int A,
                                             const unsigned short* __restrict__ w, int n, int k,
                                             unsigned short* __restrict__ y, long long y_ld) {
    extern __shared__ uint4 sx[];  // R staged input rows of k / 8 vectors
    __shared__ int list[MAX_ASSIGN];
    __shared__ int count;
    const int expert = blockIdx.y;
    if (threadIdx.x == 0) count = 0;
    __syncthreads();
    for (int a = threadIdx.x; a < A; a += blockDim.x)
        if (experts[a] == expert) list[atomicAdd(&count, 1)] = a;  // each a's sums do not depend on its place
    __syncthreads();
    const int c_all = count;
    if (c_all == 0) return;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    const int vecs = k >> 3;
    const uint4* we = reinterpret_cast<const uint4*>(w + (long long)expert * n * k);
    for (int base = 0; base < c_all; base += R) {
        const int rows = min(R, c_all - base);
        if (base) __syncthreads();  // the last pass is done with the staged rows
        for (int r = 0; r < rows; ++r) {
            const uint4* src = reinterpret_cast<const uint4*>(in + (long long)(list[base + r] / div) * in_ld);
            for (int v = threadIdx.x; v < vecs; v += blockDim.x) {
                if (GATED) {
                    uint4 g = src[v], u = src[vecs + v], o;
                    const unsigned short* gv = reinterpret_cast<const unsigned short*>(&g);
                    const unsigned short* uv = reinterpret_cast<const unsigned short*>(&u);
                    unsigned short* ov = reinterpret_cast<unsigned short*>(&o);
#pragma unroll
                    for (int e = 0; e < 8; ++e) {
                        float a = BF16 ? b2f(gv[e]) : h2f(gv[e]);
                        float m = a / (1.0f + __expf(-a)) * (BF16 ? b2f(uv[e]) : h2f(uv[e]));
                        ov[e] = BF16 ? f2b(m) : f2h(m);
                    }
                    sx[r * vecs + v] = o;
                } else {
                    sx[r * vecs + v] = src[v];
                }
            }
        }
        __syncthreads();
        for (int j = blockIdx.x * warps + warp; j < n; j += gridDim.x * warps) {
            float acc[R];
#pragma unroll
            for (int r = 0; r < R; ++r) acc[r] = 0.f;
            const uint4* wv = we + (long long)j * vecs;
            int c = lane;
            for (; c + 32 * (UNROLL - 1) < vecs; c += 32 * UNROLL) {
                uint4 u[UNROLL];
#pragma unroll
                for (int q = 0; q < UNROLL; ++q) u[q] = load_weights(wv + c + 32 * q);
#pragma unroll
                for (int q = 0; q < UNROLL; ++q) dot_vec<BF16, R>(u[q], sx, vecs, rows, c + 32 * q, acc);
            }
            for (; c < vecs; c += 32) dot_vec<BF16, R>(load_weights(wv + c), sx, vecs, rows, c, acc);
#pragma unroll
            for (int r = 0; r < R; ++r) {
                float v = acc[r];
                for (int off = 16; off; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
                if (lane == 0 && r < rows) y[(long long)list[base + r] * y_ld + j] = BF16 ? f2b(v) : f2h(v);
            }
        }
    }
}

#define GROUPED(name, bf16, r, gated)                                                                              \
    extern "C" __global__ void name(const unsigned short* in, long long in_ld, int div, const int* experts, int A,  \
                                    const unsigned short* w, int n, int k, unsigned short* y, long long y_ld) {     \
        grouped_gemv<bf16, r, gated>(in, in_ld, div, experts, A, w, n, k, y, y_ld);                                 \
    }
GROUPED(grouped_gemv_f16_r1, false, 1, false)
GROUPED(grouped_gemv_bf16_r1, true, 1, false)
GROUPED(grouped_gemv_f16_r2, false, 2, false)
GROUPED(grouped_gemv_bf16_r2, true, 2, false)
GROUPED(grouped_gemv_f16_r4, false, 4, false)
GROUPED(grouped_gemv_bf16_r4, true, 4, false)
GROUPED(grouped_gemv_f16_r8, false, 8, false)
GROUPED(grouped_gemv_bf16_r8, true, 8, false)
GROUPED(grouped_gemv_f16_r1_silu, false, 1, true)
GROUPED(grouped_gemv_bf16_r1_silu, true, 1, true)
GROUPED(grouped_gemv_f16_r2_silu, false, 2, true)
GROUPED(grouped_gemv_bf16_r2_silu, true, 2, true)
GROUPED(grouped_gemv_f16_r4_silu, false, 4, true)
GROUPED(grouped_gemv_bf16_r4_silu, true, 4, true)
GROUPED(grouped_gemv_f16_r8_silu, false, 8, true)
GROUPED(grouped_gemv_bf16_r8_silu, true, 8, true)
"""

_WARPS = 8  # warps per block, unless shared memory holds too few blocks per SM (GroupedGemv.min_warps_per_sm)
_ROWS = (1, 2, 4, 8)  # the kernels' staged rows per pass
_MAX_ASSIGN = 1024  # assignments one launch takes (the block's list in shared memory)
_STATIC_SMEM = 4 * _MAX_ASSIGN + 64  # the list and the count


class GroupedGemv:
    """The grouped GEMV kernels compiled once for ``dtype`` (``"float16"`` or ``"bfloat16"``) on CuPy's current
    device, launched on ``stream`` (a ``cupy.cuda.Stream``). :meth:`fits` says whether a shape is served."""

    def __init__(self, dtype: str, stream: Any) -> None:
        if dtype not in ("float16", "bfloat16"):  # before CuPy: named the same with or without a GPU
            raise ValueError(f"dtype: expected 'float16' or 'bfloat16', got {dtype!r:.40}")
        import cupy

        self.stream = stream
        tag = "bf16" if dtype == "bfloat16" else "f16"
        # fast math as FlashInfer's activation modules compile (the gated staging's __expf and division)
        module = cupy.RawModule(code=GROUPED_GEMV_SOURCE, options=("--use_fast_math",))
        attrs = cupy.cuda.Device().attributes
        self._smem_limit = int(attrs.get("MaxSharedMemoryPerBlockOptin", 48 << 10)) - _STATIC_SMEM
        self._smem_per_sm = int(attrs.get("MaxSharedMemoryPerMultiprocessor", 0))
        self._sms = int(attrs.get("MultiProcessorCount", 132))
        self._fns = {}  # (rows per pass, gated) -> the kernel
        for r in _ROWS:
            for gated in (False, True):
                fn = module.get_function(f"grouped_gemv_{tag}_r{r}{'_silu' if gated else ''}")
                fn.max_dynamic_shared_size_bytes = self._smem_limit
                self._fns[r, gated] = fn
        # the most warps a block of every kernel may have (its registers per thread allow it)
        self._max_warps = min(32, *(int(fn.max_threads_per_block) // 32 for fn in self._fns.values()))
        self._module = module

    min_warps_per_sm = 32
    """A launch whose staged rows leave room for few blocks per SM (4 rows of the down projection's 14336
    elements: 115 KB, one block) gets more warps per block (up to 32), so that each SM still has about this many
    warps streaming weights; 8 warps a block otherwise. 0: always 8 (as before 2026-11-25). Read at each launch's
    packing; set it on the class to compare (``benchmarks/bench_mixtral.py --variants grouped-warps-8``)."""

    def warps_per_block(self, smem: int) -> int:
        """Warps per block for a launch of ``smem`` bytes of staged rows (see :attr:`min_warps_per_sm`)."""
        resident = min(8, self._smem_per_sm // (smem + _STATIC_SMEM + 1024)) if self._smem_per_sm else 8
        if self.min_warps_per_sm <= 0 or resident <= 0:
            return _WARPS
        return min(self._max_warps, max(_WARPS, -(-self.min_warps_per_sm // resident)))

    def rows_per_pass(self, tokens: int, k: int) -> int:
        """Input rows staged per pass for ``tokens`` tokens (an expert has at most one assignment per token) of
        ``k`` elements: the smallest of 1, 2, 4, 8 that holds them all, or fewer where shared memory is short
        (more passes); 0 where not even one row fits (the shape is not served)."""
        want = next((r for r in _ROWS if r >= tokens), _ROWS[-1])
        for r in reversed(_ROWS):
            if r <= want and r * k * 2 <= self._smem_limit:
                return r
        return 0

    def fits(self, tokens: int, top_k: int, n: int, k: int) -> bool:
        """Whether a launch for ``tokens`` tokens of ``top_k`` assignments over ``[E, n, k]`` weights is served
        (k a multiple of 8, at most 1024 assignments, one input row in shared memory)."""
        return 0 < tokens * top_k <= _MAX_ASSIGN and k % 8 == 0 and n > 0 and self.rows_per_pass(tokens, k) > 0

    def _geometry(self, assignments: int, num_experts: int, tokens: int, n: int, k: int) -> tuple[int, int, int]:
        """A launch's rows staged per pass, warps per block and blocks per expert: enough blocks for the active
        experts (at most ``min(E, assignments)``) to fill every SM 8 blocks deep, at most one column per warp."""
        r = self.rows_per_pass(tokens, k)
        warps = self.warps_per_block(r * k * 2)
        active = max(1, min(num_experts, assignments))
        return r, warps, max(1, min(-(-n // warps), -(-8 * self._sms // active)))

    def launch(
        self,
        x: int,
        x_ld: int,
        div: int,
        experts: int,
        tokens: int,
        top_k: int,
        w: int,
        num_experts: int,
        n: int,
        k: int,
        y: int,
        y_ld: int,
        gated: bool = False,
    ) -> tuple[int, tuple[int, int], int, int, list[int]]:
        """The launch :meth:`__call__` makes, for pointers given as ints: ``(function handle, grid, threads per
        block, shared bytes, arguments)``, for a caller that packs it once (``Dense.prepared_kernel``)."""
        assignments = tokens * top_k
        r, warps, blocks = self._geometry(assignments, num_experts, tokens, n, k)
        args = [x, x_ld, div, experts, assignments, w, n, k, y, y_ld]
        fn = self._fns[r, gated]
        function = getattr(fn, "kernel", fn)  # a CuPy RawKernel's compiled Function
        return int(function.ptr), (blocks, num_experts), 32 * warps, r * k * 2, args

    def __call__(
        self,
        x: Any,
        div: int,
        experts: Any,
        tokens: int,
        top_k: int,
        w: Any,
        num_experts: int,
        n: int,
        k: int,
        y: Any,
        gated: bool = False,
    ) -> None:
        """``y[a, :n] = x[a // div, :k] @ w[experts[a]].T`` for the ``a < tokens * top_k`` assignments (device
        arrays: ``x`` 16-bit rows with contiguous elements, ``experts`` int32, ``w [num_experts, n, k]``
        contiguous, ``y`` 16-bit rows); :meth:`fits` must hold. Blocks per expert: enough for the active experts
        (at most ``min(E, tokens * top_k)``) to fill every SM 8 blocks deep. ``gated``: ``x``'s rows are
        ``[gate | up]`` of ``2 k`` elements and the product reads ``silu(gate) * up`` in their place (the
        expert's SiLU-and-mul made as the rows are staged)."""
        assignments = tokens * top_k
        r, warps, blocks = self._geometry(assignments, num_experts, tokens, n, k)
        x_ld = x.strides[0] // x.itemsize
        y_ld = y.strides[0] // y.itemsize
        args = (x, np.int64(x_ld), np.int32(div), experts, np.int32(assignments), w, np.int32(n), np.int32(k), y,
                np.int64(y_ld))  # fmt: skip
        self._fns[r, gated]((blocks, num_experts), (32 * warps,), args, shared_mem=r * k * 2, stream=self.stream)
