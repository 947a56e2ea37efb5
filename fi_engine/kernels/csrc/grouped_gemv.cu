
#include "convert.cuh"  // h2f, b2f, f2h, f2b, tof, fromf
#include "load_weights.cuh"  // load_weights: past L1
#include "stage_rows.cuh"  // stage_rows, list_assignments (use convert.cuh, above)
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
    const int c_all = list_assignments(experts, A, list, &count);
    if (c_all == 0) return;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    const int vecs = k >> 3;
    const uint4* we = reinterpret_cast<const uint4*>(w + (long long)expert * n * k);
    for (int base = 0; base < c_all; base += R) {
        const int rows = min(R, c_all - base);
        if (base) __syncthreads();  // the last pass is done with the staged rows
        stage_rows<BF16, GATED>(sx, in, in_ld, div, list, base, rows, vecs);
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
