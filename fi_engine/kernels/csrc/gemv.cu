
// y[r, j] = sum_c x[r, c] * w[j, c] for r < rows <= 4 (float32 sums; 16-bit x and w, 16-bit or float32 y): the
// GEMM of a decode step with few rows. One warp per output column j reads w's row j once in 16-byte vectors and
// keeps one sum per x row; k a multiple of 8, x, w and x_ld 16-byte aligned (the caller checks). Conversions by
// PTX (convert.cuh): float16 via cvt, bfloat16 as the high half of a float32, rounded to nearest even on output.
#include "convert.cuh"  // h2f, b2f, f2h, f2b, tof, fromf

#include "griddep.cuh"  // griddep_wait, griddep_launch_dependents
#include "load_weights.cuh"  // load_weights: past L1
#ifndef GEMV_UNROLL  // weight vectors in flight per lane (GemvSettings.gemv_unroll passes it)
#define GEMV_UNROLL 4
#endif
#define UNROLL GEMV_UNROLL
#include "row_counts.cuh"  // ROWS, EACH_ROW_COUNT and the GEMV_* settings Dense passes
#include "gemv_column.cuh"  // EACH_WEIGHT_VECTOR, store_column
// acc[r] += the 8 products of weight vector a with x's vector c of row r, r < ROWS(R, rows), in order.
template <bool BF16, int R>
__device__ __forceinline__ void gemv_vec(uint4 a, const unsigned short* __restrict__ x, long long x_ld, int rows, int c,
                                         float acc[4]) {
    const unsigned short* av = reinterpret_cast<const unsigned short*>(&a);
    float wf[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) wf[e] = BF16 ? b2f(av[e]) : h2f(av[e]);
#pragma unroll
    for (int r = 0; r < 4; ++r) {
        if (r < ROWS(R, rows)) {
            uint4 b = __ldg(reinterpret_cast<const uint4*>(x + r * x_ld) + c);
            const unsigned short* bv = reinterpret_cast<const unsigned short*>(&b);
#pragma unroll
            for (int e = 0; e < 8; ++e) acc[r] += wf[e] * (BF16 ? b2f(bv[e]) : h2f(bv[e]));
        }
    }
}

template <bool BF16, bool F32OUT, int R>
__device__ __forceinline__ void gemv_rows(const unsigned short* __restrict__ x, const unsigned short* __restrict__ w,
                                          void* __restrict__ y, int rows, int n, int k, long long x_ld,
                                          long long y_ld) {
    griddep_launch_dependents();
    const int lane = threadIdx.x & 31;
    const int j = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (j >= n) return;
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    const uint4* wv = reinterpret_cast<const uint4*>(w + (long long)j * k);
    const int vecs = k >> 3;
    int c = lane;
    // UNROLL weight vectors loaded before any is used (more bytes in flight per warp; each_weight_vector says how
    // they are summed); the first UNROLL before waiting for the previous kernel (weights are constants)
    uint4 a[UNROLL];
    bool more = c + 32 * (UNROLL - 1) < vecs;
    if (more) {
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) a[u] = load_weights(wv + c + 32 * u);
    }
    griddep_wait();
#define GEMV_SUM(v, col) gemv_vec<BF16, R>(v, x, x_ld, rows, col, acc)
    EACH_WEIGHT_VECTOR(wv, vecs, c, a, more, GEMV_SUM);
#undef GEMV_SUM
    store_column<BF16, F32OUT, R>(acc, lane, rows, y, y_ld, j);
}

#define GEMV(R, name, bf16, f32out)                                                                                 \
    extern "C" __global__ void name##_r##R(const unsigned short* x, const unsigned short* w, void* y, int rows,      \
                                           int n, int k, long long x_ld, long long y_ld) {                          \
        gemv_rows<bf16, f32out, R>(x, w, y, rows, n, k, x_ld, y_ld);                                                \
    }
EACH_ROW_COUNT(GEMV, gemv_f16_f16, false, false)
EACH_ROW_COUNT(GEMV, gemv_f16_f32, false, true)
EACH_ROW_COUNT(GEMV, gemv_bf16_bf16, true, false)
EACH_ROW_COUNT(GEMV, gemv_bf16_f32, true, true)
