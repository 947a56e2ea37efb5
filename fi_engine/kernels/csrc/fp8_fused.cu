#define GEMV_DEVICE_FUNCTIONS_ONLY  // fused_gemv.cu's prologue and epilogues, none of its 16-bit kernels
#include "fused_gemv.cu"  // its prologue (stage), epilogues and device functions, no kernels
#include "fp8_decode.cuh"  // e4m3x16, widen16, add_partial16
#include "fp8_one_row.cuh"  // gemv8_one_row, for gemv8_pair_one
#include "norm_fold.cuh"  // NormFold, fold_block, fold_factors: gemv8_pair_one's side of the folded norm

#define COLS 4   // output columns per group of warps, as gemv8_rows
#define SPLITS 4 // warps per group, each summing every SPLITS-th run of 32 weight vectors
#include "fp8_rows.cuh"  // GEMV8_SUMS (uses SPLITS, load_weights, griddep_wait and fp8_decode.cuh)

// gemv_fused's prologue (MODE 1 norm, 2 add-norm, 3 silu: the input rows into shared memory, rounded as
// FlashInfer rounds) followed by gemv8_rows' sums over e4m3 weights (its scales, its order of sums) for rows <= 4.
// 8 warps a block: two groups of SPLITS warps, each group serving COLS columns per pass of a grid-stride loop
// (both groups take the same number of passes, so the block's barriers are met by all its threads).
template <bool BF16, bool F32OUT, int MODE, bool BLOCK>
__device__ __forceinline__ void gemv8_fused(const unsigned short* __restrict__ x, const unsigned char* __restrict__ w,
                                            void* __restrict__ y, int rows, int n, int k, long long x_ld,
                                            long long y_ld, const unsigned short* __restrict__ h,
                                            const unsigned short* __restrict__ nw, unsigned short* __restrict__ h_out,
                                            long long h_ld, float eps, const float* __restrict__ scale,
                                            long long s_ld, int bn, int shift) {
    extern __shared__ uint4 sx[];  // the input rows, [rows, k / 8] vectors of 8 16-bit values
    __shared__ float part[2][SPLITS][COLS][4];
    griddep_launch_dependents();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int group = warp / SPLITS, split = warp % SPLITS;
    const int groups = (n + COLS - 1) / COLS;
    const int vecs = k >> 4, row_vecs = k >> 3;
    // the first pass's first weight vectors load before the wait for the previous kernel and the prologue (the
    // weights are constants), as gemv_fused's do: most blocks make one pass, so this hides the prologue
    uint4 a[COLS];
    bool loaded = false;
    {
        const int g = blockIdx.x * 2 + group;
        const int c = split * 32 + lane;
        if (g < groups && c < vecs) {
#pragma unroll
            for (int i = 0; i < COLS; ++i)
                a[i] = load_weights(reinterpret_cast<const uint4*>(w + (long long)min(g * COLS + i, n - 1) * k) + c);
            loaded = true;
        }
    }
    griddep_wait();
    stage<BF16, MODE>(sx, x, rows, k, x_ld, h, nw, h_out, h_ld, eps);
    for (int base = blockIdx.x * 2; base < groups; base += gridDim.x * 2) {
        const int g = base + group;
        const int j0 = g * COLS;
        float acc[COLS][4];
#pragma unroll
        for (int i = 0; i < COLS; ++i)
#pragma unroll
            for (int r = 0; r < 4; ++r) acc[i][r] = 0.f;
        const float* srow[COLS];
        if (g < groups) {
            const uint4* wv[COLS];
#pragma unroll
            for (int i = 0; i < COLS; ++i) {
                const int j = min(j0 + i, n - 1);
                wv[i] = reinterpret_cast<const uint4*>(w + (long long)j * k);
                srow[i] = BLOCK ? scale + (long long)(j / bn) * s_ld : scale + j;
            }
            int c = split * 32 + lane;
            if (c < vecs && !loaded) {
#pragma unroll
                for (int i = 0; i < COLS; ++i) a[i] = load_weights(wv[i] + c);
            }
            loaded = false;  // later passes load their own first vectors
            while (c < vecs) {
                float wf[COLS][16];
                float s[COLS];
#pragma unroll
                for (int i = 0; i < COLS; ++i) {
                    e4m3x16(a[i], wf[i]);
                    s[i] = BLOCK ? __ldg(srow[i] + (c >> shift)) : 1.f;
                }
                const int next = c + 32 * SPLITS;
                if (next < vecs) {
#pragma unroll
                    for (int i = 0; i < COLS; ++i) a[i] = load_weights(wv[i] + next);
                }
#pragma unroll
                for (int r = 0; r < 4; ++r) {
                    if (r < rows) {
                        float xf[16];
                        widen8<BF16>(sx[r * row_vecs + 2 * c], xf);
                        widen8<BF16>(sx[r * row_vecs + 2 * c + 1], xf + 8);
#pragma unroll
                        for (int i = 0; i < COLS; ++i) acc[i][r] = add_partial16<BLOCK>(acc[i][r], wf[i], xf, s[i]);
                    }
                }
                c = next;
            }
        }
#pragma unroll
        for (int i = 0; i < COLS; ++i)
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                float v = acc[i][r];
                for (int off = 16; off; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
                if (lane == 0) part[group][split][i][r] = v;
            }
        __syncthreads();
        const int i = lane >> 2, r = lane & 3;
        if (split == 0 && g < groups && lane < COLS * 4 && r < rows && j0 + i < n) {
            float v = 0.f;
#pragma unroll
            for (int p = 0; p < SPLITS; ++p) v += part[group][p][i][r];
            if (!BLOCK) v *= __ldg(srow[i]);
            const int j = j0 + i;
            if (F32OUT) reinterpret_cast<float*>(y)[r * y_ld + j] = v;
            else reinterpret_cast<unsigned short*>(y)[r * y_ld + j] = fromf<BF16>(v);
        }
        __syncthreads();  // part is written again by the next pass
    }
}

// (at most 128 registers a thread, so that two blocks share an SM: one alone keeps too few loads in flight)
#define FUSED8(name, bf16, f32out, mode, block)                                                                    \
    extern "C" __global__ void __launch_bounds__(256, 2)                                                           \
        name(const unsigned short* x, const unsigned char* w, void* y, int rows, int n, int k, long long x_ld,     \
             long long y_ld, const unsigned short* h, const unsigned short* nw, unsigned short* h_out,             \
             long long h_ld, float eps, const float* scale, long long s_ld, int bn, int shift) {                   \
        gemv8_fused<bf16, f32out, mode, block>(x, w, y, rows, n, k, x_ld, y_ld, h, nw, h_out, h_ld, eps, scale,     \
                                               s_ld, bn, shift);                                                    \
    }
// FUSED8 for one type pair in each prologue (1 NORM, 2 ADD_NORM, 3 SILU) and scale layout (per row, per block): the
// names prefix_<norm|addnorm|silu>_<row|block> that Fp8Linears.fused_fn loads
#define FUSED8_EACH(prefix, bf16, f32out)                                                                          \
    FUSED8(prefix##_norm_row, bf16, f32out, 1, false)                                                              \
    FUSED8(prefix##_norm_block, bf16, f32out, 1, true)                                                             \
    FUSED8(prefix##_addnorm_row, bf16, f32out, 2, false)                                                           \
    FUSED8(prefix##_addnorm_block, bf16, f32out, 2, true)                                                          \
    FUSED8(prefix##_silu_row, bf16, f32out, 3, false)                                                              \
    FUSED8(prefix##_silu_block, bf16, f32out, 3, true)
FUSED8_EACH(gemv8_bf16_bf16, true, false)
FUSED8_EACH(gemv8_bf16_f32, true, true)
FUSED8_EACH(gemv8_f16_f16, false, false)
FUSED8_EACH(gemv8_f16_f32, false, true)

// The end of one pair of output columns and one row (gemv8_pairs, gemv8_tc_pairs): its two float32 sums va and vb
// (pair p: columns ja and jb as gemv8_pairs maps them) times their per-row scales (not BLOCK), rounded as the GEMV's
// output, then the epilogue EPI
template <bool BF16, bool BLOCK, int EPI>
__device__ __forceinline__ void finish_pair(
        float va, float vb, int p, int r, unsigned short* __restrict__ y, long long y_ld, int pairs,
        const float* __restrict__ scale, int hq, int hk, unsigned d, float rcp_theta, float rcp_scale, float smooth_a,
        float smooth_b, const int* __restrict__ positions, const int* __restrict__ batch_indices,
        const int* __restrict__ kv_indptr, const int* __restrict__ kv_indices, unsigned short* __restrict__ k_cache,
        unsigned short* __restrict__ v_cache, int page_size, long long stride_page, long long stride_n,
        long long stride_h) {
    const unsigned half = EPI == 2 ? d >> 1 : 1u;
    const int head = p / (int)half;
    const unsigned i = p - head * (int)half;
    const long long ja = EPI == 1 ? p : (long long)head * d + i;
    const long long jb = EPI == 1 ? (long long)p + pairs : ja + half;
    if (!BLOCK) {
        va *= __ldg(scale + ja);
        vb *= __ldg(scale + jb);
    }
    const unsigned short q0 = fromf<BF16>(va), q1 = fromf<BF16>(vb);
    if (EPI == 1) {
        const float g = tof<BF16>(q0);
        y[r * y_ld + p] = fromf<BF16>(g / (1.0f + __expf(-g)) * tof<BF16>(q1));
        return;
    }
    rope_store_append<BF16>(q0, q1, head, i, rope_freq(i, d, rcp_theta, rcp_scale, smooth_a, smooth_b), r, y, y_ld,
                            ja, hq, hk, d, positions, batch_indices, kv_indptr, kv_indices, k_cache, v_cache,
                            page_size, stride_page, stride_n, stride_h);
}

// The parameters of gemv8_pairs and gemv8_tc_pairs (the kernels' PAIRS8_PARAMS, the pointers restrict)
#define PAIRS8_DEVICE_PARAMS                                                                                       \
    const unsigned short *__restrict__ x, const unsigned char *__restrict__ w, unsigned short *__restrict__ y,      \
        int rows, int pairs, int k, long long x_ld, long long y_ld, const float *__restrict__ scale, long long s_ld, \
        int bn, int shift, int hq, int hk, unsigned d, float rcp_theta, float rcp_scale, float smooth_a,            \
        float smooth_b, const int *__restrict__ positions, const int *__restrict__ batch_indices,                    \
        const int *__restrict__ kv_indptr, const int *__restrict__ kv_indices, unsigned short *__restrict__ k_cache, \
        unsigned short *__restrict__ v_cache, int page_size, long long stride_page, long long stride_n,             \
        long long stride_h

// The FP8 GEMV of a decode step whose outputs pair up in an epilogue, so that the launch after it goes away. A
// block of SPLITS warps computes two pairs (a, b) of output columns, four e4m3 weight rows, each with gemv8_rows'
// sums in gemv8_rows' order (so each output has the plain FP8 GEMV's bits, up to this module's flush-to-zero of
// subnormal products), rounds them to the 16-bit type as that GEMV's output is rounded, then per pair and row:
//   EPI 1 (SiLU): w [2 pairs, k] holds the gate rows, then the up rows; pair o is (o, o + pairs) and writes
//                 y [rows, pairs] at column o: round(silu(gate) * up), FlashInfer's silu_and_mul of the two rounded
//                 outputs (its arithmetic, as the fused SILU prologue computes it)
//   EPI 2 (RoPE and the KV append): y = qkv [rows, (hq + 2 hk) d]; pair p of head p / (d / 2), element i = p % (d /
//                 2) is (head d + i, head d + i + d / 2): gemv_rope_append's epilogue (q and k heads rotated, k and
//                 v heads also written into page kv_indices[kv_indptr[b] + pos / page_size] of the caches)
// Rows <= R <= 4; k a multiple of 16; x, w and x_ld 16-byte aligned (the caller checks).
template <bool BF16, bool BLOCK, int R, int EPI>
__device__ __forceinline__ void gemv8_pairs(PAIRS8_DEVICE_PARAMS) {
    __shared__ float part[SPLITS][4][R];
    griddep_launch_dependents();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const unsigned half = EPI == 2 ? d >> 1 : 1u;
    const uint4* wv[4];
    const float* srow[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {  // weight row i: pair i & 1 of the block, its member i >> 1
        const int p = min((int)blockIdx.x * 2 + (i & 1), pairs - 1);  // a last odd pair repeats (not stored)
        const int j = EPI == 1 ? p + (i >> 1) * pairs
                               : (p / (int)half) * (int)d + p % (int)half + (i >> 1) * (int)half;
        wv[i] = reinterpret_cast<const uint4*>(w + (long long)j * k);
        srow[i] = BLOCK ? scale + (long long)(j / bn) * s_ld : scale + j;
    }
    GEMV8_SUMS(BF16, BLOCK, R, x, wv, srow, rows, k, x_ld, shift, part, lane, warp);  // gemv8_rows' sums
    // warp 0: lane q * R + r finishes pair q of the block for row r
    const int q = lane / R, r = lane % R;
    const int p = (int)blockIdx.x * 2 + q;
    if (warp != 0 || lane >= 2 * R || r >= rows || p >= pairs) return;
    float va = 0.f, vb = 0.f;
#pragma unroll
    for (int sp = 0; sp < SPLITS; ++sp) {
        va += part[sp][q][r];
        vb += part[sp][q + 2][r];
    }
    finish_pair<BF16, BLOCK, EPI>(va, vb, p, r, y, y_ld, pairs, scale, hq, hk, d, rcp_theta, rcp_scale, smooth_a,
                                  smooth_b, positions, batch_indices, kv_indptr, kv_indices, k_cache, v_cache,
                                  page_size, stride_page, stride_n, stride_h);
}

// gemv8_pairs' sums and epilogue for one x row (gemv8_one_row: one pair a group, weight rows its two members;
// the same bits as gemv8_pairs at one row, on the one-row schedule). FOLD_IN (norm_fold.cuh): x is the fold's xn,
// each sum times the row's factor before the epilogue; block 0 computes the factor (f: h and y of the first GEMV,
// the counters, the factor, eps), the GEMV blocks are 1, 2, ...
template <bool BF16, bool BLOCK, int EPI, int FOLD = FOLD_NONE>
__device__ __forceinline__ void gemv8_pair_one(
        const unsigned short* __restrict__ x, const unsigned char* __restrict__ w, unsigned short* __restrict__ y,
        int pairs, int k, long long y_ld, const float* __restrict__ scale, long long s_ld, int bn, int shift, int hq,
        int hk, unsigned d, float rcp_theta, float rcp_scale, float smooth_a, float smooth_b,
        const int* __restrict__ positions, const int* __restrict__ batch_indices, const int* __restrict__ kv_indptr,
        const int* __restrict__ kv_indices, unsigned short* __restrict__ k_cache, unsigned short* __restrict__ v_cache,
        int page_size, long long stride_page, long long stride_n, long long stride_h, NormFold f = NormFold()) {
    static_assert(FOLD != FOLD_OUT, "the fold's second GEMV");
    const int half = EPI == 2 ? (int)(d >> 1) : 1;
    const auto row_of = [=](int p, int i) {
        return EPI == 1 ? p + i * pairs : (p / half) * (int)d + p % half + i * half;
    };
    const auto finish = [=](int p, float va, float vb) {
        finish_pair<BF16, BLOCK, EPI>(va, vb, p, 0, y, y_ld, pairs, scale, hq, hk, d, rcp_theta, rcp_scale, smooth_a,
                                      smooth_b, positions, batch_indices, kv_indptr, kv_indices, k_cache, v_cache,
                                      page_size, stride_page, stride_n, stride_h);
    };
    if constexpr (FOLD == FOLD_NONE) {
        gemv8_one_row<BF16, BLOCK>(x, w, pairs, k, scale, s_ld, bn, shift, row_of, finish, blockIdx.x, gridDim.x,
                                   [] {});
    } else {
        if (blockIdx.x == 0) {
            griddep_launch_dependents();
            fold_block<BF16, 1>(f, 1, k, 0);  // (one row: no row stride)
            return;
        }
        const unsigned long long ticket = fold_ticket(f);
        __shared__ float rcp[1];  // the row's factor
        float* factor = rcp;
        gemv8_one_row<BF16, BLOCK>(
            x, w, pairs, k, scale, s_ld, bn, shift, row_of,
            [=](int p, float va, float vb) { finish(p, va * factor[0], vb * factor[0]); }, blockIdx.x - 1,
            gridDim.x - 1, [=] { fold_factors<BF16, 1>(f, ticket, 1, k, 0, factor); });
    }
}

// The kernels' parameters, shared by the one-row (gemv8_pair_one), the up-to-4-rows (gemv8_pairs) and the tensor-core
// (gemv8_tc_pairs) forms, and the arguments the last two pass on
#define PAIRS8_PARAMS                                                                                              \
    const unsigned short *x, const unsigned char *w, unsigned short *y, int rows, int pairs, int k, long long x_ld, \
        long long y_ld, const float *scale, long long s_ld, int bn, int shift, int hq, int hk, unsigned d,          \
        float rcp_theta, float rcp_scale, float smooth_a, float smooth_b, const int *positions,                     \
        const int *batch_indices, const int *kv_indptr, const int *kv_indices, unsigned short *k_cache,             \
        unsigned short *v_cache, int page_size, long long stride_page, long long stride_n, long long stride_h
#define PAIRS8_ARGS                                                                                                \
    x, w, y, rows, pairs, k, x_ld, y_ld, scale, s_ld, bn, shift, hq, hk, d, rcp_theta, rcp_scale, smooth_a,        \
        smooth_b, positions, batch_indices, kv_indptr, kv_indices, k_cache, v_cache, page_size, stride_page,      \
        stride_n, stride_h
#define PAIRS8ONE(name, bf16, block, epi)                                                                          \
    extern "C" __global__ void __launch_bounds__(128, 8) name(PAIRS8_PARAMS) {                                    \
        gemv8_pair_one<bf16, block, epi>(x, w, y, pairs, k, y_ld, scale, s_ld, bn, shift, hq, hk, d, rcp_theta,    \
                                         rcp_scale, smooth_a, smooth_b, positions, batch_indices, kv_indptr,        \
                                         kv_indices, k_cache, v_cache, page_size, stride_page, stride_n, stride_h); \
    }
// The one-row kernel as the second GEMV of a folded norm (norm_fold.cuh): one block more than PAIRS8ONE's
#define PAIRS8ONE_FOLD(name, bf16, block, epi)                                                                     \
    extern "C" __global__ void __launch_bounds__(128, 8) name(PAIRS8_PARAMS, NORM_FOLD_PARAMS) {                  \
        gemv8_pair_one<bf16, block, epi, FOLD_IN>(x, w, y, pairs, k, y_ld, scale, s_ld, bn, shift, hq, hk, d,       \
                                                  rcp_theta, rcp_scale, smooth_a, smooth_b, positions,             \
                                                  batch_indices, kv_indptr, kv_indices, k_cache, v_cache,          \
                                                  page_size, stride_page, stride_n, stride_h, NORM_FOLD_ARGS);     \
    }
#define PAIRS8(name, bf16, block, r, epi)                                                                          \
    extern "C" __global__ void __launch_bounds__(32 * SPLITS) name(PAIRS8_PARAMS) {                               \
        gemv8_pairs<bf16, block, r, epi>(PAIRS8_ARGS);                                                             \
    }
#include "fp8_tensor_cores.cuh"  // tc_sums and its decoding and mma, for gemv8_tc_pairs below

// gemv8_pairs on tensor cores, for 3 rows and more (as gemv8_tc serves them: SM 8.0+, an empty kernel below): a
// block's 16 mma rows are the two members of 8 pairs, lane (g, t) reading the weights of pair p = 8 blockIdx + g's
// first column (mma row g) and second (row g + 8), so that its accumulators hold both members of its pair for x rows
// 2 t and 2 t + 1, and finish_pair runs in the lane. Each column's sum is gemv8_tc's, in gemv8_tc's order (the same
// chunks per warp for the same warps a block: the caller launches as gemv8_tc would be launched over the weight),
// each chunk times its own column's block scale. BLOCK needs (16 << shift) a multiple of 128 (the caller checks).
template <bool BF16, bool BLOCK, int EPI>
__device__ __forceinline__ void gemv8_tc_pairs(PAIRS8_DEVICE_PARAMS) {
#if __CUDA_ARCH__ >= 800
    __shared__ float part[8][32][4];
    griddep_launch_dependents();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const unsigned half = EPI == 2 ? d >> 1 : 1u;
    const int p = min((int)blockIdx.x * 8 + g, pairs - 1);  // a last partial tile repeats its last pair (not stored)
    const long long ja = EPI == 1 ? p : (long long)(p / (int)half) * d + p % (int)half;
    const long long jb = EPI == 1 ? (long long)p + pairs : ja + half;
    const unsigned char* wa = w + ja * k + 16 * t;
    const unsigned char* wb = w + jb * k + 16 * t;
    const unsigned short* xr = x + (long long)min(g, rows - 1) * x_ld + 16 * t;  // B's column g: x's row g
    const float* sa = BLOCK ? scale + (ja / bn) * s_ld : scale;
    const float* sb = BLOCK ? scale + (jb / bn) * s_ld : scale;
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    tc_sums<BF16, BLOCK, false>(acc, wa, wb, xr, sa, sb, warp, warps, g, t, rows, k, shift);  // gemv8_tc's sums
#pragma unroll
    for (int i = 0; i < 4; ++i) part[warp][lane][i] = acc[i];
    __syncthreads();
    const int pair = (int)blockIdx.x * 8 + g;
    if (warp != 0 || pair >= pairs) return;
    // accumulator i: the pair's first column (i < 2) or second, x row 2 t + (i & 1)
    float v[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        v[i] = 0.f;
        for (int q = 0; q < warps; ++q) v[i] += part[q][lane][i];
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int r = 2 * t + h;
        if (r < rows)
            finish_pair<BF16, BLOCK, EPI>(v[h], v[2 + h], pair, r, y, y_ld, pairs, scale, hq, hk, d, rcp_theta,
                                          rcp_scale, smooth_a, smooth_b, positions, batch_indices, kv_indptr,
                                          kv_indices, k_cache, v_cache, page_size, stride_page, stride_n, stride_h);
    }
#endif
}

#define PAIRS8TC(name, bf16, block, epi)                                                                           \
    extern "C" __global__ void __launch_bounds__(256) name(PAIRS8_PARAMS) {                                       \
        gemv8_tc_pairs<bf16, block, epi>(PAIRS8_ARGS);                                                             \
    }
// The kernels of one type, epilogue and scale layout: gemv8_<type>_<epi>_<layout>_1 (one row; _1_fold_in its folded
// norm's form), _4 (up to 4 rows) and gemv8tc_<type>_<epi>_<layout> (tensor cores), the names Fp8Linears loads
#define PAIRS8_KERNELS(type, epi_name, layout, bf16, block, epi)                                                   \
    PAIRS8ONE(gemv8_##type##_##epi_name##_##layout##_1, bf16, block, epi)                                          \
    PAIRS8ONE_FOLD(gemv8_##type##_##epi_name##_##layout##_1_fold_in, bf16, block, epi)                             \
    PAIRS8(gemv8_##type##_##epi_name##_##layout##_4, bf16, block, 4, epi)                                          \
    PAIRS8TC(gemv8tc_##type##_##epi_name##_##layout, bf16, block, epi)
PAIRS8_KERNELS(bf16, silu, row, true, false, 1)
PAIRS8_KERNELS(bf16, silu, block, true, true, 1)
PAIRS8_KERNELS(bf16, rope, row, true, false, 2)
PAIRS8_KERNELS(bf16, rope, block, true, true, 2)
PAIRS8_KERNELS(f16, silu, row, false, false, 1)
PAIRS8_KERNELS(f16, silu, block, false, true, 1)
PAIRS8_KERNELS(f16, rope, row, false, false, 2)
PAIRS8_KERNELS(f16, rope, block, false, true, 2)
