
// Linear layers with e4m3 weights and 16-bit activations (W8A16): the weights are read as stored (one byte each)
// and turned into float32 in registers; x, y and the float32 sums as gemv.cu's.
#include "convert.cuh"  // h2f, b2f, f2h, f2b, tof, fromf

#include "fp8_decode.cuh"  // e4m3x16, widen16, add_partial16 (they use h2f, of convert.cuh)
#include "griddep.cuh"  // griddep_wait, griddep_launch_dependents
#include "load_weights.cuh"  // load_weights: past L1
#include "fp8_one_row.cuh"  // gemv8_one_row (uses load_weights and griddep_wait, above)
#include "rms_rows.cuh"  // rows_rcp (norm_fold.cuh's)
#include "norm_fold.cuh"  // NormFold, fold_out: the o and down GEMVs' side of the folded norm

#define COLS 4   // output columns per block: each x vector loaded and widened once serves all of them
#define SPLITS 4 // warps per block, each summing every SPLITS-th run of 32 weight vectors of the block's columns
#include "fp8_rows.cuh"  // GEMV8_SUMS (uses SPLITS, load_weights, griddep_wait and fp8_decode.cuh)

// y[r, j] = sum_c x[r, c] * w[j, c] * scale(j, c) for r < rows <= R: x [rows, k] 16-bit (row stride x_ld), w [n, k]
// e4m3 (row-major), y [rows, n] 16-bit or float32 (row stride y_ld). BLOCK false: scale(j, c) = scale[j], applied
// to the whole sum; BLOCK true: scale[(j / bn) * s_ld + (c >> (4 + shift))] (blocks of bn rows and 16 << shift
// columns), applied to each 16-element partial sum. Each block of SPLITS warps serves COLS consecutive columns:
// lane l of warp v takes the 16-byte weight vectors 32 v + l, 32 (v + SPLITS) + l, ... of each column (the next
// ones loading while these are summed), a butterfly sums each warp's lanes and warp 0 the warps' sums. Float32
// sums of exact products (the weights exact as float32); y rounded once. k a multiple of 16; x, w and x_ld
// 16-byte aligned (the caller checks).
template <bool BF16, bool F32OUT, bool BLOCK, int R>
__device__ __forceinline__ void gemv8_rows(const unsigned short* __restrict__ x, const unsigned char* __restrict__ w,
                                           void* __restrict__ y, int rows, int n, int k, long long x_ld,
                                           long long y_ld, const float* __restrict__ scale, long long s_ld, int bn,
                                           int shift) {
    __shared__ float part[SPLITS][COLS][R];
    griddep_launch_dependents();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int j0 = blockIdx.x * COLS;
    const uint4* wv[COLS];
    const float* srow[COLS];
#pragma unroll
    for (int i = 0; i < COLS; ++i) {
        const int j = min(j0 + i, n - 1);  // a last partial group repeats its last column (not stored)
        wv[i] = reinterpret_cast<const uint4*>(w + (long long)j * k);
        srow[i] = BLOCK ? scale + (long long)(j / bn) * s_ld : scale + j;
    }
    GEMV8_SUMS(BF16, BLOCK, R, x, wv, srow, rows, k, x_ld, shift, part, lane, warp);
    // warp 0: lane i * R + r adds the warps' sums of column j0 + i, row r, and stores it
    const int i = lane / R, r = lane % R;
    if (warp == 0 && lane < COLS * R && r < rows && j0 + i < n) {
        float v = 0.f;
#pragma unroll
        for (int p = 0; p < SPLITS; ++p) v += part[p][i][r];
        if (!BLOCK) v *= __ldg(srow[0] + i);
        const int j = j0 + i;
        if (F32OUT) reinterpret_cast<float*>(y)[r * y_ld + j] = v;
        else reinterpret_cast<unsigned short*>(y)[r * y_ld + j] = fromf<BF16>(v);
    }
}

// One x row (gemv8_one_row): y[j] = the sum of weight row j (times scale[j] where not BLOCK), rounded once; the
// arguments as gemv8_rows takes them (rows, x_ld and y_ld unused: one row). FOLD_OUT: h_out and xn stored with y
// (norm_fold.cuh's fold_out; f: h, nw, h_out, xn).
template <bool BF16, bool F32OUT, bool BLOCK, int FOLD = FOLD_NONE>
__device__ __forceinline__ void gemv8_one(const unsigned short* __restrict__ x, const unsigned char* __restrict__ w,
                                          void* __restrict__ y, int n, int k, const float* __restrict__ scale,
                                          long long s_ld, int bn, int shift, NormFold f = NormFold()) {
    static_assert(FOLD != FOLD_IN && (FOLD == FOLD_NONE || !F32OUT), "the fold's first GEMV, 16-bit y");
    gemv8_one_row<BF16, BLOCK>(
        x, w, (n + 1) / 2, k, scale, s_ld, bn, shift, [n](int g, int i) { return min(2 * g + i, n - 1); },
        [=](int g, float va, float vb) {
            const float v[2] = {va, vb};
#pragma unroll
            for (int i = 0; i < 2; ++i) {
                const int j = 2 * g + i;  // (a last odd group's second row repeats its first: not stored)
                if (j < n) {
                    const float o = BLOCK ? v[i] : v[i] * __ldg(scale + j);
                    if (F32OUT) reinterpret_cast<float*>(y)[j] = o;
                    else if (FOLD == FOLD_OUT) reinterpret_cast<unsigned short*>(y)[j] = fold_out<BF16>(f, j, j, o);
                    else reinterpret_cast<unsigned short*>(y)[j] = fromf<BF16>(o);
                }
            }
        },
        blockIdx.x, gridDim.x, [] {});
}
// M(name, bf16, f32out, block) for each of the eight FP8 GEMVs of a kind: bfloat16 or float16 x, y of x's type or
// float32, per-row or block scales; name prefix_<x>_<y>_<row|block>suffix (the names Fp8Linears loads)
#define EACH_GEMV8_TYPE(M, prefix, suffix)                                                                         \
    M(prefix##_bf16_bf16_row##suffix, true, false, false)                                                          \
    M(prefix##_bf16_bf16_block##suffix, true, false, true)                                                         \
    M(prefix##_bf16_f32_row##suffix, true, true, false)                                                            \
    M(prefix##_bf16_f32_block##suffix, true, true, true)                                                           \
    M(prefix##_f16_f16_row##suffix, false, false, false)                                                           \
    M(prefix##_f16_f16_block##suffix, false, false, true)                                                          \
    M(prefix##_f16_f32_row##suffix, false, true, false)                                                            \
    M(prefix##_f16_f32_block##suffix, false, true, true)
#define GEMV8ONE(name, bf16, f32out, block)                                                                        \
    extern "C" __global__ void __launch_bounds__(128, 8)                                                           \
        name(const unsigned short* x, const unsigned char* w, void* y, int rows, int n, int k, long long x_ld,     \
             long long y_ld, const float* scale, long long s_ld, int bn, int shift) {                             \
        gemv8_one<bf16, f32out, block>(x, w, y, n, k, scale, s_ld, bn, shift);                                     \
    }
EACH_GEMV8_TYPE(GEMV8ONE, gemv8, _1)
// The one-row GEMV as the first GEMV of a folded norm (norm_fold.cuh): gemv8_<t>_<t>_<row|block>_1_fold_out
#define GEMV8ONE_FOLD(t, bf16, block, layout)                                                                      \
    extern "C" __global__ void __launch_bounds__(128, 8)                                                           \
        gemv8_##t##_##t##_##layout##_1_fold_out(const unsigned short* x, const unsigned char* w, void* y, int rows, \
                                                int n, int k, long long x_ld, long long y_ld, const float* scale,  \
                                                long long s_ld, int bn, int shift, NORM_FOLD_PARAMS) {             \
        gemv8_one<bf16, false, block, FOLD_OUT>(x, w, y, n, k, scale, s_ld, bn, shift, NORM_FOLD_ARGS);             \
    }
GEMV8ONE_FOLD(bf16, true, false, row)
GEMV8ONE_FOLD(bf16, true, true, block)
GEMV8ONE_FOLD(f16, false, false, row)
GEMV8ONE_FOLD(f16, false, true, block)

#define GEMV8(name, bf16, f32out, block, r)                                                                         \
    extern "C" __global__ void name(const unsigned short* x, const unsigned char* w, void* y, int rows, int n,       \
                                    int k, long long x_ld, long long y_ld, const float* scale, long long s_ld,       \
                                    int bn, int shift) {                                                             \
        gemv8_rows<bf16, f32out, block, r>(x, w, y, rows, n, k, x_ld, y_ld, scale, s_ld, bn, shift);                \
    }
GEMV8(gemv8_bf16_bf16_row_2, true, false, false, 2)
GEMV8(gemv8_bf16_bf16_block_2, true, false, true, 2)
GEMV8(gemv8_bf16_f32_row_2, true, true, false, 2)
GEMV8(gemv8_bf16_f32_block_2, true, true, true, 2)
GEMV8(gemv8_f16_f16_row_2, false, false, false, 2)
GEMV8(gemv8_f16_f16_block_2, false, false, true, 2)
GEMV8(gemv8_f16_f32_row_2, false, true, false, 2)
GEMV8(gemv8_f16_f32_block_2, false, true, true, 2)
GEMV8(gemv8_bf16_bf16_row_4, true, false, false, 4)
GEMV8(gemv8_bf16_bf16_block_4, true, false, true, 4)
GEMV8(gemv8_bf16_f32_row_4, true, true, false, 4)
GEMV8(gemv8_bf16_f32_block_4, true, true, true, 4)
GEMV8(gemv8_f16_f16_row_4, false, false, false, 4)
GEMV8(gemv8_f16_f16_block_4, false, false, true, 4)
GEMV8(gemv8_f16_f32_row_4, false, true, false, 4)
GEMV8(gemv8_f16_f32_block_4, false, true, true, 4)
GEMV8(gemv8_bf16_bf16_row_8, true, false, false, 8)
GEMV8(gemv8_bf16_bf16_block_8, true, false, true, 8)
GEMV8(gemv8_bf16_f32_row_8, true, true, false, 8)
GEMV8(gemv8_bf16_f32_block_8, true, true, true, 8)
GEMV8(gemv8_f16_f16_row_8, false, false, false, 8)
GEMV8(gemv8_f16_f16_block_8, false, false, true, 8)
GEMV8(gemv8_f16_f32_row_8, false, true, false, 8)
GEMV8(gemv8_f16_f32_block_8, false, true, true, 8)

// The same product on tensor cores (SM 8.0+; an empty kernel below): gemv8_rows' decoding is the step's cost once
// rows > 1 (each weight widened per row group), while here each weight is decoded once into a 16-bit pair and
// one mma.m16n8k16 multiplies 16 columns by 16 of k for all rows <= 8 (the mma's n). A block of W warps (blockDim
// / 32, at most 8) serves 16 consecutive columns j0..j0+15; warp v sums the chunks of 128 of k at 128 v, 128 (v +
// W), ...; lane (g = lane / 4, t = lane % 4) reads 16 weights of column j0 + g and of j0 + g + 8 at 16 t and at 64
// + 16 t of each chunk (a warp's load: 64 contiguous bytes of 8 columns), the next chunk loading while this one is
// summed. Decoding: e4m3's bits moved into a 16-bit float's places (bfloat16: the value times 2**-120, float16:
// times 2**-8, subnormals landing on subnormals) and one packed multiply by 2**120 / 2**8, exact. The mma sums
// k in an order of its own: the lane's physical k positions are paired as the decoding pairs them (bytes 0 and 2,
// 1 and 3 of each word), and x's values are paired alike (prmt), which the sum does not see. Sums: each chunk's
// products in the mma's float32 accumulator (fresh per chunk), added to the column's sum (times the chunk's block
// scale); the warps' sums in shared memory; y rounded once. BLOCK needs (16 << shift) a multiple of 128 (a chunk
// inside one scale block) and bn a multiple of 16 (the caller checks); k a multiple of 16; x, w, x_ld 16-byte
// aligned.
#include "fp8_tensor_cores.cuh"  // tc_sums and its decoding and mma, for gemv8_tc below
template <bool BF16, bool F32OUT, bool BLOCK>
__device__ __forceinline__ void gemv8_tc(const unsigned short* __restrict__ x, const unsigned char* __restrict__ w,
                                         void* __restrict__ y, int rows, int n, int k, long long x_ld,
                                         long long y_ld, const float* __restrict__ scale, long long s_ld, int bn,
                                         int shift) {
#if __CUDA_ARCH__ >= 800
    __shared__ float part[8][32][4];
    griddep_launch_dependents();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int j0 = blockIdx.x * 16;
    const unsigned char* wa = w + (long long)min(j0 + g, n - 1) * k + 16 * t;  // a last partial tile repeats
    const unsigned char* wb = w + (long long)min(j0 + g + 8, n - 1) * k + 16 * t;  // its last column (not stored)
    const unsigned short* xr = x + (long long)min(g, rows - 1) * x_ld + 16 * t;  // B's column g: x's row g
    const float* srow = BLOCK ? scale + (long long)(j0 / bn) * s_ld : scale;  // (the tile inside one scale block)
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    tc_sums<BF16, BLOCK, true>(acc, wa, wb, xr, srow, srow, warp, warps, g, t, rows, k, shift);
#pragma unroll
    for (int i = 0; i < 4; ++i) part[warp][lane][i] = acc[i];
    __syncthreads();
    if (warp == 0) {
        // accumulator i: column j0 + g (+ 8 for i >= 2), x row 2 t + (i & 1)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            float v = 0.f;
            for (int p = 0; p < warps; ++p) v += part[p][lane][i];
            const int j = j0 + g + (i >> 1) * 8, r = 2 * t + (i & 1);
            if (j < n && r < rows) {
                if (!BLOCK) v *= __ldg(scale + j);
                if (F32OUT) reinterpret_cast<float*>(y)[r * y_ld + j] = v;
                else reinterpret_cast<unsigned short*>(y)[r * y_ld + j] = fromf<BF16>(v);
            }
        }
    }
#endif
}

#define GEMV8TC(name, bf16, f32out, block)                                                                          \
    extern "C" __global__ void __launch_bounds__(256)                                                              \
        name(const unsigned short* x, const unsigned char* w, void* y, int rows, int n, int k, long long x_ld,     \
             long long y_ld, const float* scale, long long s_ld, int bn, int shift) {                             \
        gemv8_tc<bf16, f32out, block>(x, w, y, rows, n, k, x_ld, y_ld, scale, s_ld, bn, shift);                    \
    }
EACH_GEMV8_TYPE(GEMV8TC, gemv8tc, )

#include "fp8_dequant.cuh"  // dequant_rows (uses e4m3x16, fromf and load_weights, above)
