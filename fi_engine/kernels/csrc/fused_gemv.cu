
// The GEMV of gemv.cu (same column loop, same float32 sums in the same order, same output rounding) with its
// input rows computed in a prologue into shared memory, so that the launch producing them goes away:
//   MODE 0 (plain):    in = x[:, :k] as it is                    (rows made by another launch: a tensor-parallel
//                      rank's, normalized by its fused all-reduce + residual + RMSNorm, before the RoPE or SiLU
//                      epilogue; lora_fused.cu's o and down GEMVs, before the adapters' expand)
//   MODE 1 (norm):     in = rmsnorm(h) * nw                     (FlashInfer's rmsnorm of h)
//   MODE 2 (add-norm): s = h + x; h_out = s; in = rmsnorm(s) * nw (FlashInfer's fused_add_rmsnorm with input x,
//                      residual h, written into h_out instead of in place: every block reads h while block 0
//                      writes h_out, so the two are different buffers the caller alternates)
//   MODE 3 (silu):     in = silu(x[:, :k]) * x[:, k:2k]           (FlashInfer's silu_and_mul of x)
// The prologue rounds where those kernels round (h_out and in to the 16-bit type, nothing else) and sums the
// squares in FlashInfer's order (rms_rows.cuh's rows_rcp). The module is compiled with --use_fast_math, as FlashInfer's modules are (its divisions and
// __expf). Each block recomputes the prologue (rows <= 4 rows of k elements, from L2) and then serves a
// grid-stride set of output columns, one warp each. k a multiple of 8; x, h, h_out, nw and the row strides 16-byte
// aligned (the caller checks).
#include "convert.cuh"  // h2f, b2f, f2h, f2b, tof, fromf
#include "rms_rows.cuh"  // rsqrt_approx, row_vec, rows_rcp: the norm's factor in FlashInfer's order
#include "silu_mul.cuh"  // silu_mul_vec: the SiLU prologue's 8 elements, as FlashInfer's silu_and_mul

// The prologue: the input rows into sx (shared), every thread of the block taking part; ends with a barrier. The
// block numbered 0 (`block`: blockIdx.x, or a LoRA GEMV's number among its GEMV blocks) writes h_out.
template <bool BF16, int MODE>
__device__ __forceinline__ void stage_block(uint4* sx, const unsigned short* __restrict__ x, int rows, int k,
                                            long long x_ld, const unsigned short* __restrict__ h,
                                            const unsigned short* __restrict__ nw, unsigned short* __restrict__ h_out,
                                            long long h_ld, float eps, unsigned block) {
    __shared__ float rcp[4];
    const int vecs = k >> 3;
    if (MODE == 0) {  // (rows made by another launch: copied as they are)
        for (int r = 0; r < rows; ++r)
            for (int c = threadIdx.x; c < vecs; c += blockDim.x)
                sx[r * vecs + c] = *(reinterpret_cast<const uint4*>(x + r * x_ld) + c);
    } else if (MODE == 3) {
        for (int r = 0; r < rows; ++r)
            for (int c = threadIdx.x; c < vecs; c += blockDim.x) {
                uint4 g = *(reinterpret_cast<const uint4*>(x + r * x_ld) + c);
                uint4 u = *(reinterpret_cast<const uint4*>(x + r * x_ld + k) + c);
                sx[r * vecs + c] = silu_mul_vec<BF16>(g, u);
            }
    } else {
        rows_rcp<BF16, MODE, 4>(h, x, rows, k, h_ld, x_ld, eps, rcp);  // FlashInfer's sum (see above)
        const bool write_h = MODE == 2 && h_out != nullptr && block == 0;
        for (int r = 0; r < rows; ++r)
            for (int c = threadIdx.x; c < vecs; c += blockDim.x) {
                float v[8];
                row_vec<BF16, MODE>(h, x, r, c, h_ld, x_ld, v);
                uint4 g = *(reinterpret_cast<const uint4*>(nw) + c);
                const unsigned short* gv = reinterpret_cast<const unsigned short*>(&g);
                uint4 o, s;
                unsigned short* ov = reinterpret_cast<unsigned short*>(&o);
                unsigned short* sv = reinterpret_cast<unsigned short*>(&s);
#pragma unroll
                for (int e = 0; e < 8; ++e) {
                    ov[e] = fromf<BF16>(v[e] * rcp[r] * tof<BF16>(gv[e]));
                    sv[e] = fromf<BF16>(v[e]);
                }
                sx[r * vecs + c] = o;
                if (write_h) *(reinterpret_cast<uint4*>(h_out + r * h_ld) + c) = s;
            }
    }
    __syncthreads();
}
template <bool BF16, int MODE>
__device__ __forceinline__ void stage(uint4* sx, const unsigned short* __restrict__ x, int rows, int k, long long x_ld,
                                      const unsigned short* __restrict__ h, const unsigned short* __restrict__ nw,
                                      unsigned short* __restrict__ h_out, long long h_ld, float eps) {
    stage_block<BF16, MODE>(sx, x, rows, k, x_ld, h, nw, h_out, h_ld, eps, blockIdx.x);
}

#include "griddep.cuh"  // griddep_wait, griddep_launch_dependents
#include "lora_shrink.cuh"  // dot8, block_sum: the LoRA GEMVs' shrink blocks (lora_fused.cu's kernels)
#include "load_weights.cuh"  // load_weights: past L1
// UNROLL weight vectors in flight per lane: as the plain GEMV (gemv.cu).
#ifndef GEMV_UNROLL  // weight vectors in flight per lane (GemvSettings.gemv_unroll passes it)
#define GEMV_UNROLL 4
#endif
#define UNROLL GEMV_UNROLL
#include "row_counts.cuh"  // ROWS, EACH_ROW_COUNT, FUSED_BOUNDS_* and the GEMV_* settings
#include "gemv_column.cuh"  // EACH_WEIGHT_VECTOR, store_column: as the plain GEMV
// The statements SUM (the last arguments) for each staged row r < ROWS(R, rows) and element e < 8 of its input vector
// c, bv[e] (16-bit): the products of staged_vec and pair_vec. A macro, not a function: its loops compile in their
// place, into the instructions each had when it wrote them out.
#define EACH_STAGED_ELEMENT(R, rows, sx, vecs, c, ...)                                                             \
    _Pragma("unroll") for (int r = 0; r < 4; ++r) {                                                                \
        if (r < ROWS(R, rows)) {                                                                                   \
            uint4 b = sx[r * vecs + c];                                                                            \
            const unsigned short* bv = reinterpret_cast<const unsigned short*>(&b);                                \
            _Pragma("unroll") for (int e = 0; e < 8; ++e) {                                                        \
                __VA_ARGS__                                                                                        \
            }                                                                                                      \
        }                                                                                                          \
    }

// acc[r] += the 8 products of weight vector a with the staged input vector c of row r, for r < ROWS(R, rows).
template <bool BF16, int R>
__device__ __forceinline__ void staged_vec(uint4 a, const uint4* sx, int vecs, int rows, int c, float acc[4]) {
    const unsigned short* av = reinterpret_cast<const unsigned short*>(&a);
    float wf[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) wf[e] = tof<BF16>(av[e]);
    EACH_STAGED_ELEMENT(R, rows, sx, vecs, c, acc[r] += wf[e] * tof<BF16>(bv[e]);)
}

// A LoRA adapter's expand as a GEMV's epilogue (lora_fused.cu's kernels; the others pass LORA_NONE): output
// column j of row r gets += sum_i t[r, p(j) rank + i] * Bt_s[i, j] before it is rounded, s = slots[r] the row's GPU
// slot, p(j) = (j >= n0) + (j >= n1) the column's part, t the shrink's float32 output (the slot's scale applied), Bt_s
// at bt + s b_slot elements ([rank, n] 16-bit, n the GEMV's columns: lora_bgmv.cu's layout). A row whose slot is < 0
// or whose adapter leaves the projection alone (bit `bit` of targets[s] clear) gets nothing.
//
// LORA_EXPAND: t was written by a shrink launched before the GEMV. LORA_IN_GRID: by the GEMV's own grid, whose first
// `width` blocks (in the order they start) are shrink blocks, t[r, j] = scale[s] * A_s[j] . in[r] for j < width (A_s
// at a + s a_slot elements, [width, k]; in the GEMV's staged input rows, made as its GEMV blocks make them), and
// whose GEMV blocks wait for them before their first expand: no launch of its own, and its sums run while the GEMV
// blocks stream their weights. sync: the launch's two counters (lora_ticket, lora_wait).
#define LORA_NONE 0
#define LORA_EXPAND 1
#define LORA_IN_GRID 2
struct LoraEpi {
    const float* t;
    long long t_ld;
    const int* slots;
    const int* targets;
    int bit;
    const unsigned short* bt;
    long long b_slot;
    int rank, n0, n1;
    // LORA_IN_GRID only
    const unsigned short* a;
    long long a_slot;
    const float* scale;
    int width;
    unsigned long long* sync;
};

// The sum above for one row and column, every lane of the warp taking part (lane l the ranks l, l + 32, ...,
// then a butterfly): the warp's value. The branch is the whole warp's (one row). t is read from L2 (__ldcg): an
// in-grid shrink wrote it during this launch.
template <bool BF16>
__device__ __forceinline__ float lora_column(const LoraEpi& e, int r, long long j, int n, int lane) {
    const int s = e.slots[r];
    if (s < 0 || !(e.targets[s] & e.bit)) return 0.f;
    const float* t = e.t + r * e.t_ld + ((j >= e.n0) + (j >= e.n1)) * e.rank;
    const unsigned short* b = e.bt + s * e.b_slot + j;
    float acc = 0.f;
    for (int i = lane; i < e.rank; i += 32) acc += __ldcg(t + i) * tof<BF16>(b[(long long)i * n]);
    for (int off = 16; off; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
    return acc;
}

// A block's place in a LORA_IN_GRID launch, from a ticket taken as it starts (an atomic add on sync[0]): the launch's
// first `width` tickets (ticket % grid) are its shrink blocks, so a GEMV block waiting for them waits only on blocks
// already started (a block numbered by blockIdx could wait on shrink blocks not yet scheduled, behind it). The
// counters only grow: a launch's epoch (ticket / grid) says how many shrink blocks (sync[1]) its GEMV blocks wait
// for, and nothing sets them back, which holds while every launch over one pair of counters has the same grid and
// width (the host gives each call site its own pair: LoraFusedGemvs).
__device__ __forceinline__ int lora_ticket(const LoraEpi& e, unsigned long long& epoch) {
    __shared__ unsigned long long ticket;
    if (threadIdx.x == 0) ticket = atomicAdd(e.sync, 1ull);
    __syncthreads();
    const unsigned long long t = ticket;
    epoch = t / gridDim.x;
    return (int)(t - epoch * gridDim.x);
}

// A GEMV warp's wait, before its first expand, for its launch's `width` shrink blocks (epoch: lora_ticket's); each
// lane then acquires their count itself, so its reads of t come after their writes.
__device__ __forceinline__ void lora_wait(const LoraEpi& e, unsigned long long epoch, int lane) {
    const unsigned long long want = (epoch + 1) * (unsigned long long)e.width;
    if (lane == 0)
        while (load_acquire(e.sync + 1) < want) __nanosleep(64);
    __syncwarp();
    (void)load_acquire(e.sync + 1);
}

// A shrink block of a LORA_IN_GRID launch: entry j of t for each of the launch's rows that an adapter of this
// projection takes, its input staged as the GEMV blocks stage it (no h_out written: a GEMV block writes it), summed
// as lora_bgmv.cu's shrink sums (dot8 by each of the 256 threads, block_sum: lora_fused.cu's separate normed shrink
// gives the same float32 value), then counted as finished in sync[1] after a fence.
template <bool BF16, int MODE, int R>
__device__ __forceinline__ void lora_shrink_block(const LoraEpi& e, int j, uint4* sx,
                                                  const unsigned short* __restrict__ x, int rows, int k,
                                                  long long x_ld, const unsigned short* __restrict__ h,
                                                  const unsigned short* __restrict__ nw, long long h_ld, float eps) {
    __shared__ float warp_sums[32];
    griddep_wait();
    const int n_rows = ROWS(R, rows), vecs = k >> 3;
    stage_block<BF16, MODE>(sx, x, n_rows, k, x_ld, h, nw, nullptr, h_ld, eps, 1u);
    for (int r = 0; r < n_rows; ++r) {
        const int s = e.slots[r];
        if (s < 0 || !(e.targets[s] & e.bit)) continue;  // (the whole block: one row)
        const uint4* av = reinterpret_cast<const uint4*>(e.a + s * e.a_slot + (long long)j * k);
        float acc = 0.f;
        for (int c = threadIdx.x; c < vecs; c += blockDim.x) acc = dot8<BF16>(__ldg(av + c), sx[r * vecs + c], acc);
        const float sum = block_sum(acc, warp_sums);
        if (threadIdx.x == 0) const_cast<float*>(e.t)[r * e.t_ld + j] = e.scale[s] * sum;
        __syncthreads();  // (warp_sums: the next row's block_sum)
    }
    if (threadIdx.x == 0) {
        __threadfence();
        atomicAdd(e.sync + 1, 1ull);
    }
}

// A LORA_IN_GRID block's place (lora_ticket): true where it is one of its launch's shrink blocks, which has then
// done its shrink (the caller returns); else false, with its number among the GEMV blocks (block) and their count.
template <bool BF16, int MODE, int R>
__device__ __forceinline__ bool lora_shrank(const LoraEpi& e, uint4* sx, const unsigned short* __restrict__ x,
                                            int rows, int k, long long x_ld, const unsigned short* __restrict__ h,
                                            const unsigned short* __restrict__ nw, long long h_ld, float eps,
                                            unsigned& block, unsigned& blocks, unsigned long long& epoch) {
    const int role = lora_ticket(e, epoch);
    if (role < e.width) {
        lora_shrink_block<BF16, MODE, R>(e, role, sx, x, rows, k, x_ld, h, nw, h_ld, eps);
        return true;
    }
    block = role - e.width, blocks = gridDim.x - e.width;
    return false;
}

template <bool BF16, bool F32OUT, int MODE, int R, int LORA = LORA_NONE>
__device__ __forceinline__ void gemv_fused(const unsigned short* __restrict__ x, const unsigned short* __restrict__ w,
                                           void* __restrict__ y, int rows, int n, int k, long long x_ld,
                                           long long y_ld, const unsigned short* __restrict__ h,
                                           const unsigned short* __restrict__ nw, unsigned short* __restrict__ h_out,
                                           long long h_ld, float eps, LoraEpi lora = LoraEpi()) {
    extern __shared__ uint4 sx[];  // the input rows, [rows, k / 8] vectors of 8 16-bit values
    griddep_launch_dependents();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    const int vecs = k >> 3;
    // a LORA_IN_GRID launch's GEMV blocks: those past its shrinks (the others read blockIdx and gridDim where they
    // use them, as they did before the LoRA forms came: the same machine code)
    unsigned block = blockIdx.x, blocks = gridDim.x;
    unsigned long long epoch = 0;
    if (LORA == LORA_IN_GRID && lora_shrank<BF16, MODE, R>(lora, sx, x, rows, k, x_ld, h, nw, h_ld, eps, block, blocks,
                                                           epoch))
        return;
    bool waited = LORA != LORA_IN_GRID;
    // the first column's first UNROLL weight vectors are loaded before the wait for the previous kernel, whose
    // output the prologue reads (weights are constants)
    int j = (LORA == LORA_IN_GRID ? block : blockIdx.x) * warps + warp;
    uint4 a[UNROLL];
    bool more = j < n && lane + 32 * (UNROLL - 1) < vecs;
    if (more) {
        const uint4* wv = reinterpret_cast<const uint4*>(w + (long long)j * k);
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) a[u] = load_weights(wv + lane + 32 * u);
    }
    griddep_wait();
    stage_block<BF16, MODE>(sx, x, ROWS(R, rows), k, x_ld, h, nw, h_out, h_ld, eps,
                            LORA == LORA_IN_GRID ? block : blockIdx.x);
    for (; j < n; j += (LORA == LORA_IN_GRID ? blocks : gridDim.x) * warps) {
        float acc[4] = {0.f, 0.f, 0.f, 0.f};
        const uint4* wv = reinterpret_cast<const uint4*>(w + (long long)j * k);
        int c = lane;
        if (!more) {  // a later column: its first vectors are loaded here
            more = c + 32 * (UNROLL - 1) < vecs;
            if (more) {
#pragma unroll
                for (int u = 0; u < UNROLL; ++u) a[u] = load_weights(wv + c + 32 * u);
            }
        }
#define STAGED_SUM(v, col) staged_vec<BF16, R>(v, sx, vecs, rows, col, acc)
        EACH_WEIGHT_VECTOR(wv, vecs, c, a, more, STAGED_SUM);
#undef STAGED_SUM
        if (!waited) {  // (LORA_IN_GRID: the launch's shrink blocks, before this warp's first expand)
            lora_wait(lora, epoch, lane);
            waited = true;
        }
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            float v = acc[r];
            for (int off = 16; off; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
            if (LORA != LORA_NONE && r < ROWS(R, rows)) v += lora_column<BF16>(lora, r, j, n, lane);
            if (lane == 0 && r < ROWS(R, rows)) {
                if (F32OUT) reinterpret_cast<float*>(y)[r * y_ld + j] = v;
                else reinterpret_cast<unsigned short*>(y)[r * y_ld + j] = fromf<BF16>(v);
            }
        }
    }
}

// The parameters of the fused GEMV kernels (FUSED; lora_fused.cu's take them, then the adapters'), and their arguments
#define FUSED_PARAMS                                                                                               \
    const unsigned short *x, const unsigned short *w, void *y, int rows, int n, int k, long long x_ld, long long y_ld, \
        const unsigned short *h, const unsigned short *nw, unsigned short *h_out, long long h_ld, float eps
#define FUSED_ARGS x, w, y, rows, n, k, x_ld, y_ld, h, nw, h_out, h_ld, eps
#define FUSED(R, name, bf16, f32out, mode)                                                                         \
    extern "C" __global__ void FUSED_BOUNDS_##R name##_r##R(FUSED_PARAMS) {                                        \
        gemv_fused<bf16, f32out, mode, R>(FUSED_ARGS);                                                             \
    }
// FUSED for each type pair of one prologue (x 16-bit, y of x's type or float32): gemv_<x>_<y>_<prologue>_r<R>
#define FUSED_TYPES(prologue, mode)                                                                                \
    EACH_ROW_COUNT(FUSED, gemv_f16_f16_##prologue, false, false, mode)                                             \
    EACH_ROW_COUNT(FUSED, gemv_f16_f32_##prologue, false, true, mode)                                              \
    EACH_ROW_COUNT(FUSED, gemv_bf16_bf16_##prologue, true, false, mode)                                            \
    EACH_ROW_COUNT(FUSED, gemv_bf16_f32_##prologue, true, true, mode)
FUSED_TYPES(norm, 1)
FUSED_TYPES(addnorm, 2)
FUSED_TYPES(silu, 3)

#ifndef ROPE_UNROLL  // vectors of each column in flight per lane in the QKV + RoPE GEMV (FusedKernels.rope_unroll)
#define ROPE_UNROLL 4
#endif

// a0[r] / a1[r] += the 8 products of weight vectors u0 / u1 (columns j0, j1) with staged input vector c of row r
template <bool BF16, int R>
__device__ __forceinline__ void pair_vec(uint4 u0, uint4 u1, const uint4* sx, int vecs, int rows, int c, float a0[4],
                                         float a1[4]) {
    const unsigned short* v0 = reinterpret_cast<const unsigned short*>(&u0);
    const unsigned short* v1 = reinterpret_cast<const unsigned short*>(&u1);
    float f0[8], f1[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) {
        f0[e] = tof<BF16>(v0[e]);
        f1[e] = tof<BF16>(v1[e]);
    }
    EACH_STAGED_ELEMENT(R, rows, sx, vecs, c, a0[r] += f0[e] * tof<BF16>(bv[e]); a1[r] += f1[e] * tof<BF16>(bv[e]);)
}

// The next ROPE_UNROLL weight vectors of both columns of a pair (w0, w1), from vector c: b0, b1
__device__ __forceinline__ void load_pair(uint4 (&b0)[ROPE_UNROLL], uint4 (&b1)[ROPE_UNROLL], const uint4* w0,
                                          const uint4* w1, int c) {
#pragma unroll
    for (int u = 0; u < ROPE_UNROLL; ++u) {
        b0[u] = load_weights(w0 + c + 32 * u);
        b1[u] = load_weights(w1 + c + 32 * u);
    }
}

#include "rope_append.cuh"  // rope_freq, rope_store_append: the QKV GEMVs' RoPE + KV append epilogue

// The fused GEMVs whose warps each compute a pair of output columns, then an epilogue over the pair (EPI):
//
// EPI_ROPE: the QKV GEMV of a decode step with FlashInfer's apply_rope_pos_ids (in place, non-interleaved, all of
// d rotated) and append_paged_kv_cache (NHD) as its epilogue: y = qkv [rows, (hq + 2 hk) d], 16-bit. Each warp
// computes the columns i and i + d/2 of one head (each column's sum exactly as gemv_fused's), rounds them as the
// GEMV's output is rounded, rotates q and k heads with FlashInfer's arithmetic (its frequency and smoothing
// expressions, __powf and __sincosf under --use_fast_math, the rotation written as its kernel writes it; the host
// computes rcp_theta, rcp_scale, smooth_a and smooth_b as its launcher does), stores them back into y (attention
// reads q there) and writes k and v heads into page kv_indices[kv_indptr[b] + pos / page_size], entry
// pos % page_size of k_cache / v_cache (b = batch_indices[r], pos = positions[r]; strides in elements).
//
// EPI_SILU: the gate/up GEMV of a decode step (w [2 m, k]: the m gate rows, then the m up rows; n = 2 m) with
// FlashInfer's silu_and_mul as its epilogue: y [rows, m] = silu(g) * u, g and u the columns p and m + p rounded as
// the GEMV's output is, the activation as the SiLU prologue computes it. The RoPE arguments are unused.
#define EPI_ROPE 0
#define EPI_SILU 1
template <int EPI>
__device__ __forceinline__ void pair_columns(int p, int pairs, unsigned d, long long& j0, long long& j1) {
    if (EPI == EPI_SILU) {
        j0 = p;
        j1 = (long long)pairs + p;
    } else {
        const unsigned half = d >> 1;
        const int head = p / (int)half;
        j0 = (long long)head * d + (p - head * (int)half);
        j1 = j0 + half;
    }
}

template <bool BF16, int MODE, int R, int EPI, int LORA = LORA_NONE>
__device__ __forceinline__ void gemv_pairs(
        const unsigned short* __restrict__ x, const unsigned short* __restrict__ w, unsigned short* __restrict__ y,
        int rows, int n, int k, long long x_ld, long long y_ld, const unsigned short* __restrict__ h,
        const unsigned short* __restrict__ nw, unsigned short* __restrict__ h_out, long long h_ld, float eps, int hq,
        int hk, unsigned d, float rcp_theta, float rcp_scale, float smooth_a, float smooth_b,
        const int* __restrict__ positions, const int* __restrict__ batch_indices, const int* __restrict__ kv_indptr,
        const int* __restrict__ kv_indices, unsigned short* __restrict__ k_cache, unsigned short* __restrict__ v_cache,
        int page_size, long long stride_page, long long stride_n, long long stride_h, LoraEpi lora = LoraEpi()) {
    extern __shared__ uint4 sx[];
    griddep_launch_dependents();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    const int vecs = k >> 3;
    const int pairs = n >> 1;
    unsigned block = blockIdx.x, blocks = gridDim.x;  // (as gemv_fused)
    unsigned long long epoch = 0;
    if (LORA == LORA_IN_GRID && lora_shrank<BF16, MODE, R>(lora, sx, x, rows, k, x_ld, h, nw, h_ld, eps, block, blocks,
                                                           epoch))
        return;
    bool waited = LORA != LORA_IN_GRID;
    // As gemv_fused: ROPE_UNROLL vectors of each of the two columns in flight per lane (the first pair's loaded
    // before the wait for the previous kernel), summed in the order of the one-at-a-time tail loop
    int p = (LORA == LORA_IN_GRID ? block : blockIdx.x) * warps + warp;
    uint4 b0[ROPE_UNROLL], b1[ROPE_UNROLL];
    bool more = p < pairs && lane + 32 * (ROPE_UNROLL - 1) < vecs;
    if (more) {
        long long j0, j1;
        pair_columns<EPI>(p, pairs, d, j0, j1);
        const uint4* w0 = reinterpret_cast<const uint4*>(w + j0 * k);
        const uint4* w1 = reinterpret_cast<const uint4*>(w + j1 * k);
        load_pair(b0, b1, w0, w1, lane);
    }
    griddep_wait();
    stage_block<BF16, MODE>(sx, x, ROWS(R, rows), k, x_ld, h, nw, h_out, h_ld, eps,
                            LORA == LORA_IN_GRID ? block : blockIdx.x);
    for (; p < pairs; p += (LORA == LORA_IN_GRID ? blocks : gridDim.x) * warps) {
        long long j0, j1;
        pair_columns<EPI>(p, pairs, d, j0, j1);
        float a0[4] = {0.f, 0.f, 0.f, 0.f}, a1[4] = {0.f, 0.f, 0.f, 0.f};
        const uint4* w0 = reinterpret_cast<const uint4*>(w + j0 * k);
        const uint4* w1 = reinterpret_cast<const uint4*>(w + j1 * k);
        int c = lane;
        if (!more) {  // a later pair: its first vectors are loaded here
            more = c + 32 * (ROPE_UNROLL - 1) < vecs;
            if (more) {
                load_pair(b0, b1, w0, w1, c);
            }
        }
        while (more) {
#pragma unroll
            for (int u = 0; u < ROPE_UNROLL; ++u) pair_vec<BF16, R>(b0[u], b1[u], sx, vecs, rows, c + 32 * u, a0, a1);
            c += 32 * ROPE_UNROLL;
            more = c + 32 * (ROPE_UNROLL - 1) < vecs;
            if (more) {
                load_pair(b0, b1, w0, w1, c);
            }
        }
        for (; c < vecs; c += 32)
            pair_vec<BF16, R>(load_weights(w0 + c), load_weights(w1 + c), sx, vecs, rows, c, a0, a1);
#pragma unroll
        for (int r = 0; r < 4; ++r)
            for (int off = 16; off; off >>= 1) {
                a0[r] += __shfl_xor_sync(0xffffffffu, a0[r], off);
                a1[r] += __shfl_xor_sync(0xffffffffu, a1[r], off);
            }
        if (LORA != LORA_NONE) {  // the adapters' expand, before the rounding (and so before RoPE or SiLU)
            if (!waited) {
                lora_wait(lora, epoch, lane);
                waited = true;
            }
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                if (r >= ROWS(R, rows)) break;
                a0[r] += lora_column<BF16>(lora, r, j0, n, lane);
                a1[r] += lora_column<BF16>(lora, r, j1, n, lane);
            }
        }
        if (lane != 0) continue;
        if (EPI == EPI_SILU) {
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                if (r >= ROWS(R, rows)) break;
                const float g = tof<BF16>(fromf<BF16>(a0[r])), u = tof<BF16>(fromf<BF16>(a1[r]));
                y[r * y_ld + p] = fromf<BF16>(g / (1.0f + __expf(-g)) * u);
            }
            continue;
        }
        const unsigned half = d >> 1;
        const int head = p / (int)half;
        const unsigned i = p - head * (int)half;
        const float freq = rope_freq(i, d, rcp_theta, rcp_scale, smooth_a, smooth_b);
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            if (r >= ROWS(R, rows)) break;
            rope_store_append<BF16>(fromf<BF16>(a0[r]), fromf<BF16>(a1[r]), head, i, freq, r, y, y_ld, j0, hq, hk, d,
                                    positions, batch_indices, kv_indptr, kv_indices, k_cache, v_cache, page_size,
                                    stride_page, stride_n, stride_h);
        }
    }
}

// The parameters of the pair kernels (PAIRS; lora_fused.cu's take them, then the adapters'), and their arguments
#define PAIRS_PARAMS                                                                                               \
    const unsigned short *x, const unsigned short *w, unsigned short *y, int rows, int n, int k, long long x_ld,   \
        long long y_ld, const unsigned short *h, const unsigned short *nw, unsigned short *h_out, long long h_ld,   \
        float eps, int hq, int hk, unsigned d, float rcp_theta, float rcp_scale, float smooth_a, float smooth_b,    \
        const int *positions, const int *batch_indices, const int *kv_indptr, const int *kv_indices,               \
        unsigned short *k_cache, unsigned short *v_cache, int page_size, long long stride_page, long long stride_n, \
        long long stride_h
#define PAIRS_ARGS                                                                                                 \
    x, w, y, rows, n, k, x_ld, y_ld, h, nw, h_out, h_ld, eps, hq, hk, d, rcp_theta, rcp_scale, smooth_a, smooth_b, \
        positions, batch_indices, kv_indptr, kv_indices, k_cache, v_cache, page_size, stride_page, stride_n, stride_h
#define PAIRS(R, name, bf16, mode, epi)                                                                            \
    extern "C" __global__ void FUSED_BOUNDS_##R name##_r##R(PAIRS_PARAMS) {                                        \
        gemv_pairs<bf16, mode, R, epi>(PAIRS_ARGS);                                                                \
    }
// PAIRS for both 16-bit types of one prologue and epilogue: gemv_<f16|bf16>_<name>_r<R>
#define PAIRS_TYPES(name, mode, epi)                                                                               \
    EACH_ROW_COUNT(PAIRS, gemv_f16_##name, false, mode, epi)                                                       \
    EACH_ROW_COUNT(PAIRS, gemv_bf16_##name, true, mode, epi)
PAIRS_TYPES(norm_rope, 1, EPI_ROPE)
PAIRS_TYPES(addnorm_rope, 2, EPI_ROPE)
PAIRS_TYPES(norm_gateup, 1, EPI_SILU)
PAIRS_TYPES(addnorm_gateup, 2, EPI_SILU)
// the plain prologue (MODE 0) before the two epilogues: a tensor-parallel rank's input rows, normalized already
PAIRS_TYPES(plain_rope, 0, EPI_ROPE)
PAIRS_TYPES(plain_gateup, 0, EPI_SILU)
#include "route.cuh"  // route_row, for gemv_route's epilogue (the MoE layer's module has it too)

// The router GEMV of a MoE decode step with the routing as its epilogue: the NORM / ADD_NORM fused GEMV into
// float32 logits y [rows, n] (n experts), block 0 also writing the staged input rows (the normalized rows the
// experts' GEMVs read) to `normed`; then the last block to finish (counted in `done`, which it sets back to 0 for
// the next launch: a CUDA graph replays it as is) routes each row as route_row does, into experts and weights
// [rows, top_k]. Every block fences its logits before it counts itself, so the last one reads them all.
template <bool BF16, int MODE, int R>
__device__ __forceinline__ void gemv_route(const unsigned short* __restrict__ x, const unsigned short* __restrict__ w,
                                           float* __restrict__ y, int rows, int n, int k, long long x_ld,
                                           long long y_ld, const unsigned short* __restrict__ h,
                                           const unsigned short* __restrict__ nw, unsigned short* __restrict__ h_out,
                                           long long h_ld, float eps, unsigned short* __restrict__ normed,
                                           long long normed_ld, int top_k, int renorm, int* __restrict__ experts,
                                           float* __restrict__ weights, unsigned int* __restrict__ done) {
    extern __shared__ uint4 sx[];  // the staged rows: gemv_fused leaves them in place
    __shared__ int last;
    gemv_fused<BF16, true, MODE, R>(x, w, y, rows, n, k, x_ld, y_ld, h, nw, h_out, h_ld, eps);
    const int vecs = k >> 3;
    if (blockIdx.x == 0)
        for (int r = 0; r < rows; ++r)
            for (int c = threadIdx.x; c < vecs; c += blockDim.x)
                reinterpret_cast<uint4*>(normed + r * normed_ld)[c] = sx[r * vecs + c];
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) last = atomicAdd(done, 1u) == gridDim.x - 1;
    __syncthreads();
    if (!last) return;
    __threadfence();
    for (int r = threadIdx.x; r < rows; r += blockDim.x)
        route_row(y + r * y_ld, n, top_k, renorm, experts + r * top_k, weights + r * top_k);
    if (threadIdx.x == 0) *done = 0u;
}

#define ROUTE(R, name, bf16, mode)                                                                                 \
    extern "C" __global__ void name##_r##R(const unsigned short* x, const unsigned short* w, float* y, int rows,     \
                                           int n, int k, long long x_ld, long long y_ld, const unsigned short* h,   \
                                           const unsigned short* nw, unsigned short* h_out, long long h_ld,         \
                                           float eps, unsigned short* normed, long long normed_ld, int top_k,       \
                                           int renorm, int* experts, float* weights, unsigned int* done) {          \
        gemv_route<bf16, mode, R>(x, w, y, rows, n, k, x_ld, y_ld, h, nw, h_out, h_ld, eps, normed, normed_ld,      \
                                  top_k, renorm, experts, weights, done);                                           \
    }
EACH_ROW_COUNT(ROUTE, gemv_f16_norm_route, false, 1)
EACH_ROW_COUNT(ROUTE, gemv_bf16_norm_route, true, 1)
EACH_ROW_COUNT(ROUTE, gemv_f16_addnorm_route, false, 2)
EACH_ROW_COUNT(ROUTE, gemv_bf16_addnorm_route, true, 2)
