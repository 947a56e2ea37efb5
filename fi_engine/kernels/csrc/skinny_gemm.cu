// y[r, j] = sum_c x[r, c] * W[j, c] for r < rows <= 32 on tensor cores: the GEMMs of decode steps of a few to 32
// rows, which read every weight once and are bound by HBM bandwidth. x [rows, k] 16-bit (row stride x_ld; SK_E4M3_A8:
// e4m3, below), y [rows, n] 16-bit or float32 (row stride y_ld), float32 sums (SK_INT4_A8Q: int32 a tile, then
// float32). W [n, k] in one of seven formats (FMT), each with its quantization data in the last four arguments (q,
// q_ld, q_a, q_b):
//   SK_W16         16-bit (x's type), row-major (a Linear weight); q unused.
//   SK_E4M3_BLOCK  e4m3 bytes, row-major, times float32 scales, one per block of q_a rows and 64 << q_b inputs:
//                  scale q[(j / q_a) * q_ld + (c >> (6 + q_b))], applied to each step's sums.
//   SK_E4M3_ROW    e4m3 bytes times one float32 scale a row, q[j], applied to the whole sum.
//   SK_INT4        AWQ / GPTQ int4 in int4_decode.cuh's layout with a uint32 record (scale, zero) per row and group:
//                  q the records, q_ld groups a row, q_b log2 of the 64-input halves a group spans (31: one group);
//                  q_a > 0: gate and up interleaved by 8 rows, q_a rows each, whose outputs are put back in order.
//   SK_E4M3_A8     (the warpgroup form only) e4m3 weights with SK_E4M3_BLOCK's block scales times e4m3 x: x the
//                  bytes [rows, k] at row stride x_ld bytes, then (at x + rows x_ld rounded up to 256 bytes) float32
//                  scales [k / 128][rows], x ~= bytes * scale (fp8_quant.cu's quant_groups, s_ld = rows): W8A8 on
//                  Hopper's e4m3 wgmma, each tile of 128 inputs added in float32 times both operands' scales.
//   SK_E4M3_A8Q    (the warpgroup form only) SK_E4M3_A8 over 16-bit x (row stride x_ld elements), quantized by each
//                  block as it stages a pass (sk_xstoreq), to the bytes and scales fp8_quant.cu's quant_groups
//                  writes: no launch before it.
//   SK_INT4_A8Q    (the warpgroup form only) SK_INT4's weights and records (groups of 128 inputs or more) times 16-bit
//                  x quantized by each block to int8, a scale per row and 128 inputs (sk_xstorei8): W4A8 on Hopper's
//                  integer wgmma (the codes 0..15 as u8, x's as s8, exact int32 sums), each tile of 128 inputs less
//                  its zero times x's sum there, then added in float32 times the row's scale and x's.
// The SiLU form (SILU, 16-bit weights only: SKINNY_SILU): W is a gate/up weight as stored, [2 q_a, k] with the gate's
// q_a rows first, and y = silu(x @ gate.T) * (x @ up.T), [rows, q_a] 16-bit. Each tile of 16 rows takes 8 gate rows
// and the 8 up rows of the same outputs (tile rows g and g + 8: gate and up row c0 + g), so each lane holds both sums
// of its outputs and writes silu_and_mul of them, each sum first rounded to 16 bits as the GEMM's output would be.
//
// The mma (m16n8k16) takes 16 weight rows as its A operand and 8 rows of x as its B operand: a warp owns NT tiles of
// 16 weight rows and multiplies each with MT groups of 8 x rows (MT = ceil(rows / 8)), so each weight is read and
// decoded once for all rows. Lane (g, q) (g = lane / 4, q = lane % 4) loads one 16-byte vector of weight rows g and
// g + 8 a step (a quad reads 64 contiguous bytes of a row: a step is 32 inputs of 16-bit weights, 64 of e4m3, 128
// of int4), and x's values at the same inputs of x row g. A sum over k does not depend on which k goes to which of
// the mma's 16 slots as long as A and B agree. 16-bit: words 0-1 of the vectors go to one mma and words 2-3 to the
// next. e4m3: each word's bytes 0-1 and 2-3 are decoded exactly into two 16-bit pairs (fp8_tensor_cores.cuh's
// e4m3_pair), one mma a word. int4: the int4 GEMV's half-tile sums (int4_decode.cuh), each half meeting its
// group's scale and zero in float32.
//
// x reaches the lanes one of two ways (KX): read from global memory with the weights, each lane its own vectors (KX
// 0: warps independent, no barrier; x's rows are a few KB and stay in L1 and L2), or staged by the block's warps,
// which then share one range of k, in shared memory KX inputs at a time by asynchronous copies, the next KX while
// the warps sum these (two buffers; each row padded so that a quarter-warp's 16-byte reads fall in distinct banks).
// The grid's y dimension splits k into ranges of kc inputs (one range: each block writes y); with more, each block
// writes its float32 sums to `part` in the lanes' order, and the last block of a column block to finish (a uint32
// counter per column block at `done`, 0 between launches: that block sets it back) adds the ranges' sums in their
// order and writes y, so y does not depend on which block ends last. Weights and their quantization data are
// constants: a warp loads its first U steps before griddep_wait, and each next U steps before it sums the ones in
// hand. k and kc multiples of a step (and kc of a scale block's width); KX a multiple of U steps; x, W and x_ld
// 16-byte aligned (the caller checks).
#include "convert.cuh"  // fromf, tof
#include "griddep.cuh"  // griddep_wait, griddep_launch_dependents
#include "load_weights.cuh"  // load_weights: past L1
#include "fp8_tensor_cores.cuh"  // mma16816, e4m3_pair, prmt
#include "int4_decode.cuh"  // i4_half, i4_half_zsub, i4_record, i4_neg_zero

#define SK_W16 0         // FMT: 16-bit weights
#define SK_E4M3_BLOCK 1  // e4m3 weights, block scales
#define SK_E4M3_ROW 2    // e4m3 weights, a scale per row
#define SK_INT4 3        // int4 weights, a record per row and group
#define SK_E4M3_A8 4     // e4m3 weights, block scales, times e4m3 x (the warpgroup form only: skinny_wg's W8A8)
#define SK_E4M3_A8Q 5    // the same over 16-bit x, which each block quantizes as it stages it
#define SK_INT4_A8Q 6    // int4 weights, a record per row and group, times 16-bit x quantized to int8 as it is staged
#define SK_STEP(FMT) ((FMT) == SK_W16 ? 32 : (FMT) == SK_INT4 ? 128 : 64)  // inputs a step
#define SK_XV(FMT) ((FMT) == SK_W16 ? 1 : (FMT) == SK_INT4 ? 4 : 2)        // x vectors a lane reads a step
// 16-byte vectors from a lane's weights of a step to the next's: 64 bytes along a row, or int4's tile-major layout's
// kilobyte tiles (int4_decode.cuh)
#define SK_STEP_VECS(FMT) ((FMT) == SK_INT4 ? I4_TILE_VECS : 4)
// 16-bit elements of a staged x row: KX and padding such that a quarter-warp's 16-byte reads fall in distinct banks
// (16-bit weights: lanes q of rows g and g + 1 read 64 bytes of each row, so rows are 64 bytes apart modulo 128;
// e4m3 and int4: lane q reads bytes 32 q of each row, so rows are 16 bytes apart modulo 128)
#define SK_ROW(FMT, KX) ((KX) + ((FMT) == SK_W16 ? 32 : 8))

// the x vector e of a lane's step, from its first one (int4: two at the half tile's input 16 q, for each half)
template <int FMT> __device__ __forceinline__ int sk_xvec(int e) { return FMT == SK_INT4 ? (e & 1) + 8 * (e >> 1) : e; }

// x[:, k0 : k0 + len] into xs (8 MT rows of ROW_VECS vectors; zeros past rows) by asynchronous copies, every
// thread taking part: this thread's copies are one group (cp.async.commit_group), waited for by cp.async.wait_group
template <int MT, int ROW_VECS>
__device__ __forceinline__ void sk_stage(uint4* xs, const unsigned short* __restrict__ x, int rows, long long x_ld,
                                         int k0, int len) {
    const int vecs = len >> 3;
    for (int v = threadIdx.x; v < 8 * MT * vecs; v += blockDim.x) {
        const int r = v / vecs, c = v - r * vecs;
        const unsigned at = (unsigned)__cvta_generic_to_shared(xs + r * ROW_VECS + c);
        const unsigned short* from = x + (long long)min(r, rows - 1) * x_ld + k0 + 8 * c;
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(at), "l"(from), "r"(r < rows ? 16 : 0));
    }
    asm volatile("cp.async.commit_group;");
}

// acc = 0
template <int MT, int NT> __device__ __forceinline__ void sk_zero(float (&acc)[NT][MT][4]) {
#pragma unroll
    for (int t = 0; t < NT; ++t)
#pragma unroll
        for (int i = 0; i < MT; ++i)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[t][i][e] = 0.f;
}

// y from the sums (acc[t][i][e]: weight row j0 + 16 t + g (+ 8 for e >= 2), x row 8 i + 2 q + (e & 1)); half_n > 0:
// rows interleaved by 8 (gate, up) go to their columns in order. SILU: e < 2 holds output (j0 + 16 t) / 2 + g's gate
// sum and e + 2 its up sum; y [rows, half_n] gets silu(gate) * up of the two rounded to 16 bits (FlashInfer's
// silu_and_mul of the GEMM's output: x / (1 + exp(-x)) in float32, its __expf and division as FlashInfer's
// --use_fast_math build makes them)
template <bool BF16, bool F32OUT, int MT, int NT, bool SILU>
__device__ __forceinline__ void sk_store(const float (&acc)[NT][MT][4], void* __restrict__ y, int rows, int n,
                                         long long y_ld, int j0, int g, int q, int half_n) {
    if (SILU) {
#pragma unroll
        for (int t = 0; t < NT; ++t)
#pragma unroll
            for (int i = 0; i < MT; ++i)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int c = (j0 + 16 * t) / 2 + g, r = 8 * i + 2 * q + e;
                    if (c < half_n && r < rows) {
                        const float gate = tof<BF16>(fromf<BF16>(acc[t][i][e])), up = tof<BF16>(fromf<BF16>(acc[t][i][e + 2]));
                        reinterpret_cast<unsigned short*>(y)[r * y_ld + c] = fromf<BF16>(__fdividef(gate, 1.f + __expf(-gate)) * up);
                    }
                }
        return;
    }
#pragma unroll
    for (int t = 0; t < NT; ++t)
#pragma unroll
        for (int i = 0; i < MT; ++i)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int j = j0 + 16 * t + g + (e >= 2 ? 8 : 0), r = 8 * i + 2 * q + (e & 1);
                const int jo = half_n ? (j >> 4) * 8 + (j & 7) + ((j >> 3) & 1) * half_n : j;
                if (j < n && r < rows) {
                    if (F32OUT) reinterpret_cast<float*>(y)[r * y_ld + jo] = acc[t][i][e];
                    else reinterpret_cast<unsigned short*>(y)[r * y_ld + jo] = fromf<BF16>(acc[t][i][e]);
                }
            }
}

// each row's scale times its whole sum (e4m3 row scales; a split's partial sum: the same factor)
template <int MT, int NT>
__device__ __forceinline__ void sk_scale_rows(float (&acc)[NT][MT][4], const float* __restrict__ scale, int j0, int g,
                                              int n) {
#pragma unroll
    for (int t = 0; t < NT; ++t) {
        const float sa = __ldg(scale + min(j0 + 16 * t + g, n - 1)), sb = __ldg(scale + min(j0 + 16 * t + g + 8, n - 1));
#pragma unroll
        for (int i = 0; i < MT; ++i) acc[t][i][0] *= sa, acc[t][i][1] *= sa, acc[t][i][2] *= sb, acc[t][i][3] *= sb;
    }
}

// y from a block's sums: stored at once where the grid has one k range; else this block's sums go to `part` in the
// lanes' order, and the last block of the column block to finish (the counter at done[blockIdx.x]; `last`: a
// shared flag) adds every range's sums in their order and stores y. WARPS warps a block, warp `threadIdx.x / 32`
// owning rows j0 ...; half_n and SILU as sk_store's
template <bool BF16, bool F32OUT, int MT, int NT, int WARPS, bool SILU>
__device__ __forceinline__ void sk_finish(float (&acc)[NT][MT][4], void* __restrict__ y, float* __restrict__ part,
                                          unsigned* __restrict__ done, unsigned& last, int rows, int n, long long y_ld,
                                          int j0, int g, int q, int half_n) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (gridDim.y == 1) {
        sk_store<BF16, F32OUT, MT, NT, SILU>(acc, y, rows, n, y_ld, j0, g, q, half_n);
        return;
    }
    // split k: this block's sums in the lanes' order, then the last block of the column block adds them up
    constexpr int PER_WARP = NT * MT * 4 * 32;
    const long long slot = ((long long)blockIdx.y * gridDim.x + blockIdx.x) * WARPS + warp;
    float* mine = part + slot * PER_WARP + lane;
#pragma unroll
    for (int t = 0; t < NT; ++t)
#pragma unroll
        for (int i = 0; i < MT; ++i)
#pragma unroll
            for (int e = 0; e < 4; ++e) mine[((t * MT + i) * 4 + e) * 32] = acc[t][i][e];
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
        const unsigned before = atomicAdd(done + blockIdx.x, 1u);
        last = before == gridDim.y - 1;
        if (last) done[blockIdx.x] = 0u;  // every block of this launch has counted: ready for the next launch
    }
    __syncthreads();
    if (!last) return;
    __threadfence();
    sk_zero(acc);
    const long long stride = (long long)gridDim.x * WARPS * PER_WARP;  // from one range's sums to the next's
    const float* first = part + ((long long)blockIdx.x * WARPS + warp) * PER_WARP + lane;
    for (int s = 0; s < (int)gridDim.y; ++s)
#pragma unroll
        for (int t = 0; t < NT; ++t)
#pragma unroll
            for (int i = 0; i < MT; ++i)
#pragma unroll
                for (int e = 0; e < 4; ++e) acc[t][i][e] += __ldcg(first + s * stride + ((t * MT + i) * 4 + e) * 32);
    sk_store<BF16, F32OUT, MT, NT, SILU>(acc, y, rows, n, y_ld, j0, g, q, half_n);
}

// one step of the NT tiles against the MT groups of x rows (xv[i]: the lane's x vectors of row 8 i + g); s: the
// tiles' block scales of the step (e4m3 blocks), r: their records (int4: rows g and g + 8, halves 0 and 1)
template <bool BF16, int FMT, int MT, int NT, int XV>
__device__ __forceinline__ void sk_step(float (&acc)[NT][MT][4], const uint4 (&v)[NT][2], const float (&s)[NT],
                                        const unsigned (&r)[NT][4], const uint4 (&xv)[MT][XV]) {
#pragma unroll
    for (int t = 0; t < NT; ++t) {
        const uint4 a = v[t][0], b = v[t][1];
        const unsigned wa[4] = {a.x, a.y, a.z, a.w}, wb[4] = {b.x, b.y, b.z, b.w};
        if (FMT == SK_W16) {
#pragma unroll
            for (int i = 0; i < MT; ++i) {
                mma16816<BF16>(acc[t][i], a.x, b.x, a.y, b.y, xv[i][0].x, xv[i][0].y);
                mma16816<BF16>(acc[t][i], a.z, b.z, a.w, b.w, xv[i][0].z, xv[i][0].w);
            }
        } else if (FMT == SK_INT4) {
            float sa[2], oa[2], sb[2], ob[2];  // each half's scale and -scale (M + zero), rows g and g + 8
#pragma unroll
            for (int h = 0; h < 2; ++h) sa[h] = i4_record<BF16>(r[t][h], oa[h]), sb[h] = i4_record<BF16>(r[t][2 + h], ob[h]);
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                uint4 xq[MT][2];
#pragma unroll
                for (int i = 0; i < MT; ++i) xq[i][0] = xv[i][2 * h], xq[i][1] = xv[i][2 * h + 1];
                if (MT >= 4)  // four groups of x rows share each decoded pair: the zero subtracted from it
                    i4_half_zsub<BF16, MT>(acc[t], wa[2 * h], wa[2 * h + 1], wb[2 * h], wb[2 * h + 1], xq, sa[h],
                                           i4_neg_zero<BF16>(r[t][h]), sb[h], i4_neg_zero<BF16>(r[t][2 + h]));
                else
                    i4_half<BF16, MT>(acc[t], wa[2 * h], wa[2 * h + 1], wb[2 * h], wb[2 * h + 1], xq, sa[h], oa[h],
                                      sb[h], ob[h]);
            }
        } else {
            unsigned lo_a[4], hi_a[4], lo_b[4], hi_b[4];  // each word's bytes 0 and 1, then 2 and 3, as 16-bit pairs
#pragma unroll
            for (int m = 0; m < 4; ++m) {  // e4m3_pair decodes bytes 1 and 3: put the pair's bytes there first
                lo_a[m] = e4m3_pair<BF16>(prmt(wa[m], 0u, 0x1404u)), hi_a[m] = e4m3_pair<BF16>(prmt(wa[m], 0u, 0x3424u));
                lo_b[m] = e4m3_pair<BF16>(prmt(wb[m], 0u, 0x1404u)), hi_b[m] = e4m3_pair<BF16>(prmt(wb[m], 0u, 0x3424u));
            }
#pragma unroll
            for (int i = 0; i < MT; ++i) {
                const uint4 x0 = xv[i][0], x1 = xv[i][XV - 1];
                const unsigned xw[8] = {x0.x, x0.y, x0.z, x0.w, x1.x, x1.y, x1.z, x1.w};
                float c[4] = {0.f, 0.f, 0.f, 0.f};
                float* d = FMT == SK_E4M3_BLOCK ? c : acc[t][i];
#pragma unroll
                for (int m = 0; m < 4; ++m) mma16816<BF16>(d, lo_a[m], lo_b[m], hi_a[m], hi_b[m], xw[2 * m], xw[2 * m + 1]);
                if (FMT == SK_E4M3_BLOCK) {
#pragma unroll
                    for (int e = 0; e < 4; ++e) acc[t][i][e] = fmaf(s[t], c[e], acc[t][i][e]);
                }
            }
        }
    }
}

// one step's loads: the lane's 2 NT weight vectors, the tiles' block scales (e4m3 blocks) or records (int4) and,
// where x is read from global memory (XG), its x vectors (rows past `rows` read row rows - 1: their sums are never
// stored); tile_at: the step's first tile of 128 inputs (int4)
template <int FMT, int MT, int NT, int XV, bool XG>
__device__ __forceinline__ void sk_load1(uint4 (&v)[NT][2], float (&s)[NT], unsigned (&r)[NT][4], uint4 (&xv)[MT][XV],
                                         const uint4* const (&wr)[NT][2], const float* const (&sr)[NT],
                                         const unsigned* const (&rr)[NT][2], const uint4* const (&xr)[MT], int step,
                                         int tile_at, int q_b) {
#pragma unroll
    for (int t = 0; t < NT; ++t) {
#pragma unroll
        for (int h = 0; h < 2; ++h) v[t][h] = load_weights(wr[t][h] + SK_STEP_VECS(FMT) * step);
        if (FMT == SK_E4M3_BLOCK) s[t] = __ldg(sr[t] + (step >> q_b));
        if (FMT == SK_INT4) {
            const int half = 2 * (tile_at + step);
#pragma unroll
            for (int h = 0; h < 2; ++h) r[t][2 * h] = __ldg(rr[t][h] + (half >> q_b)), r[t][2 * h + 1] = __ldg(rr[t][h] + ((half + 1) >> q_b));
        }
    }
    if (XG) {
#pragma unroll
        for (int i = 0; i < MT; ++i)
#pragma unroll
            for (int e = 0; e < XV; ++e) xv[i][e] = __ldg(xr[i] + (SK_STEP(FMT) / 8) * step + sk_xvec<FMT>(e));
    }
}

template <bool BF16, bool F32OUT, int FMT, int MT, int NT, int U, int WARPS, int KX, bool XG, bool SILU>
__device__ __forceinline__ void skinny_gemm(const unsigned short* __restrict__ x, const void* __restrict__ w,
                                            void* __restrict__ y, float* __restrict__ part, unsigned* __restrict__ done,
                                            int rows, int n, int k, long long x_ld, long long y_ld, int kc,
                                            const void* __restrict__ qd, long long q_ld, int q_a, int q_b) {
    static_assert(FMT <= SK_INT4, "the W8A8 and W4A8 formats: the warpgroup form only (skinny_wg)");
#if __CUDA_ARCH__ >= 800
    extern __shared__ uint4 xs[];  // two passes of 8 MT rows of SK_ROW(FMT, KX) elements
    __shared__ unsigned last;
    griddep_launch_dependents();
    constexpr int ROW_VECS = SK_ROW(FMT, KX) / 8;
    constexpr int KSTEP = SK_STEP(FMT), XV = SK_XV(FMT);
    constexpr int PASS = KX / KSTEP;  // steps staged at a time
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, q = lane & 3;
    const int j0 = (blockIdx.x * WARPS + warp) * 16 * NT;
    const int k_lo = blockIdx.y * kc, k_hi = min(k, k_lo + kc);
    const int steps = max(0, (k_hi - k_lo) / KSTEP);
    // bytes of a weight row and of the range's first inputs: 2 or 1 an input (int4: tile-major, below)
    const long long row_bytes = FMT == SK_W16 ? 2ll * k : k;
    const long long lo_bytes = FMT == SK_W16 ? 2ll * k_lo : k_lo;
    const unsigned char* wb = reinterpret_cast<const unsigned char*>(w);
    const float* scale = reinterpret_cast<const float*>(qd);
    const unsigned* rec = reinterpret_cast<const unsigned*>(qd);
    const uint4* wr[NT][2];      // the lane's weight rows (a last partial tile repeats row n - 1) at input k_lo
    // (SILU: tile row g + 8 h is gate (h 0) or up (h 1) row c0 + g of output c0 = (j0 + 16 t) / 2; past the last
    // output, the last one's)
    const float* sr[NT];         // e4m3 blocks: each tile's row of scales at the block of input k_lo
    const unsigned* rr[NT][2];   // int4: the lane's rows of records
#pragma unroll
    for (int t = 0; t < NT; ++t) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const long long row = SILU ? min((j0 + 16 * t) / 2 + g, q_a - 1) + (long long)h * q_a
                                       : min(j0 + 16 * t + g + 8 * h, n - 1);
            if (FMT == SK_INT4) {  // row g + 8 h of strip (j0 + 16 t) / 16 (a tile past n: the last strip's)
                const long long strip = min(j0 + 16 * t, n - 1) >> 4;
                const long long tile = strip * (k >> 7) + (k_lo >> 7);
                wr[t][h] = reinterpret_cast<const uint4*>(wb + tile * (16 * I4_TILE_VECS) + 64 * (g + 8 * h)) + q;
            } else {
                wr[t][h] = reinterpret_cast<const uint4*>(wb + row * row_bytes + lo_bytes) + q;
            }
            rr[t][h] = rec + row * q_ld;
        }
        sr[t] = FMT == SK_E4M3_BLOCK ? scale + (long long)(min(j0 + 16 * t, n - 1) / q_a) * q_ld + (k_lo >> (6 + q_b))
                                     : scale;
    }
    float acc[NT][MT][4];
    sk_zero(acc);
    // U steps in hand and, while they are summed, the next U in flight
    const int tile_at = k_lo >> 7;  // int4: the range's first tile
    uint4 cur[U][NT][2], cx[U][MT][XV];
    float cs[U][NT];
    unsigned cr[U][NT][4];
    const uint4* xr[MT];  // XG: the lane's x rows at its first vector
#pragma unroll
    for (int i = 0; i < MT; ++i)
        xr[i] = reinterpret_cast<const uint4*>(x + (long long)min(8 * i + g, rows - 1) * x_ld + k_lo) + (FMT == SK_W16 ? q : 2 * q);
#pragma unroll
    for (int u = 0; u < U; ++u)
        if (u < steps) sk_load1<FMT, MT, NT, XV, false>(cur[u], cs[u], cr[u], cx[u], wr, sr, rr, xr, u, tile_at, q_b);
    griddep_wait();  // x may be the previous kernel's output, part and done its scratch; W and its data are constants
    if (XG) {
#pragma unroll
        for (int u = 0; u < U; ++u)
            if (u < steps)
#pragma unroll
                for (int i = 0; i < MT; ++i)
#pragma unroll
                    for (int e = 0; e < XV; ++e) cx[u][i][e] = __ldg(xr[i] + (KSTEP / 8) * u + sk_xvec<FMT>(e));
    }
    constexpr int BUF = 8 * MT * ROW_VECS;  // vectors of one staged pass
    const int passes = (k_hi - k_lo + KX - 1) / KX;
    if (!XG && steps > 0) sk_stage<MT, ROW_VECS>(xs, x, rows, x_ld, k_lo, min(KX, k_hi - k_lo));
    const int xo = g * ROW_VECS + (FMT == SK_W16 ? q : 2 * q);  // the lane's x row and vector in a staged pass
    for (int step = 0; step < steps; step += U) {
        uint4 nxt[U][NT][2], nx[U][MT][XV];
        float ns[U][NT];
        unsigned nr[U][NT][4];
#pragma unroll
        for (int u = 0; u < U; ++u)
            if (step + U + u < steps)
                sk_load1<FMT, MT, NT, XV, XG>(nxt[u], ns[u], nr[u], nx[u], wr, sr, rr, xr, step + U + u, tile_at, q_b);
        if (!XG && step % PASS == 0) {  // pass p's x staged (asked for a pass ago), pass p + 1's asked for now
            const int p = step / PASS;
            __syncthreads();  // every warp is done with the buffer pass p + 1 goes into (pass p - 1's)
            if (p + 1 < passes) {
                const int k0 = k_lo + (p + 1) * KX;
                sk_stage<MT, ROW_VECS>(xs + ((p + 1) & 1) * BUF, x, rows, x_ld, k0, min(KX, k_hi - k0));
            } else {
                asm volatile("cp.async.commit_group;");  // an empty group: the wait below counts as everywhere
            }
            asm volatile("cp.async.wait_group 1;" ::: "memory");  // this thread's copies of pass p
            __syncthreads();  // every thread's
        }
        const uint4* xl = xs + ((step / PASS) & 1) * BUF + xo;
#pragma unroll
        for (int u = 0; u < U; ++u) {
            if (step + u < steps) {
                if (!XG) {
#pragma unroll
                    for (int i = 0; i < MT; ++i)
#pragma unroll
                        for (int e = 0; e < XV; ++e)
                            cx[u][i][e] = xl[8 * i * ROW_VECS + ((step + u) % PASS) * (KSTEP / 8) + sk_xvec<FMT>(e)];
                }
                sk_step<BF16, FMT, MT, NT, XV>(acc, cur[u], cs[u], cr[u], cx[u]);
            }
        }
        if (step + U < steps) {
#pragma unroll
            for (int u = 0; u < U; ++u) {
#pragma unroll
                for (int t = 0; t < NT; ++t) {
                    cur[u][t][0] = nxt[u][t][0], cur[u][t][1] = nxt[u][t][1], cs[u][t] = ns[u][t];
#pragma unroll
                    for (int e = 0; e < 4; ++e) cr[u][t][e] = nr[u][t][e];
                }
                if (XG) {
#pragma unroll
                    for (int i = 0; i < MT; ++i)
#pragma unroll
                        for (int e = 0; e < XV; ++e) cx[u][i][e] = nx[u][i][e];
                }
            }
        }
    }
    asm volatile("cp.async.wait_all;" ::: "memory");  // none left in flight at exit
    if (FMT == SK_E4M3_ROW) sk_scale_rows(acc, scale, j0, g, n);
    sk_finish<BF16, F32OUT, MT, NT, WARPS, SILU>(acc, y, part, done, last, rows, n, y_ld, j0, g, q,
                                                 FMT == SK_INT4 || SILU ? q_a : 0);
#endif
}

// The warpgroup form of the int4 GEMM (sm_90a: Hopper's wgmma.mma_async; groups of 128 inputs or more; 17-32 rows;
// e4m3 weights too: skinny_wg below).
// At 25-32 rows the mma.sync form issues about 400 instructions a warp's 1 KB tile (Nsight Compute on an H200: 32 mma.sync,
// its x fragments read from shared memory, 8 KB a tile, and the decode), its schedulers busy 55 % of the cycles with
// the weights read at a fifth of the peak. Here each group of four warps multiplies its 64 weight rows by the block's
// staged x in one wgmma a k16 product: the A operand from the registers the decoded pairs are in (the mma.sync form's words in the same slots), x the B operand, read by the
// tensor cores from shared memory (8 MT rows: n = 8 MT), so no lane loads x and each x value is read once per four
// warps. Lane q's slots 2q, 2q + 1 and 2q + 8, 2q + 9 of product m' (0..7) of a tile hold its inputs 64 h + 16 q + 4 m
// + {0, 1} and + {2, 3} (h = m' / 4, m = m' % 4: int4_decode.cuh's pairs), so x is staged in that order: the 32-bit
// word q of k-chunk c (c = 16 t + 2 m' for slots 0-7 of tile t's product m', + 1 for slots 8-15) holds x's inputs
// 64 (c / 8) + 16 q + 2 (c % 8) and + 1; each chunk of 8 slots x 8 rows is a 128-byte core matrix of wgmma's
// unswizzled K-major layout, row group ng's chunks in a run (chunk c of row group ng at byte 128 (ng CP + c) of a pass
// of CP chunks). A tile's products start a second set of sums (scale-d false on its first),
// which, once they complete, are added times each row's scale (the zero already subtracted from each pair, as the
// int4 GEMV does): float32 as the mma.sync form's, a tile scaled at a time where that form scales each half, so the
// two agree within float32 rounding, not bit for bit.
// The 4-byte staging copies are what held this form next (Nsight Compute on an H200, 16-warp blocks: of ~10 cycles an
// instruction, 1.9 stalled on the copies' queue, 1.4 at the pass barriers, 0.5 on the L1 queue), so two more ways
// cut their cost a weight: NT strips a warp (each staged pass serves NT times the weight rows; the strips' weights
// then streamed through a ring of bulk copies in shared memory, for registers) and x staged through registers
// (XREG: coalesced 16-byte loads a pass ahead, each stored as four words of the layout, one barrier a pass).
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define SK_WG_ARCH 1
#elif defined(SK_WG_REQUIRED)
// (SkinnyGemm defines this for the module of the warpgroup form: a compilation without sm_90a's features fails here,
// which leaves the mma.sync form serving, instead of building kernels that trap)
#error "the warpgroup form needs sm_90a (wgmma): compile it with -arch=sm_90a"
#endif
// x[:, k0 : k0 + len] (len a multiple of 128, at most KX) into xw (a pass of CP = KX / 8 chunks) in the layout above,
// by 4-byte asynchronous copies, one commit group a thread. Lane (rr, q) of warp w copies word q of row rr of the
// chunks c = w + WARPS i of each row group: at shared word 32 (ng CP + c) + lane, from x's input 64 (c / 8) + 2 (c %
// 8) + 16 q, which for WARPS 4, 8 or 16 is the lane's first one plus a constant of i (the copies' offsets immediate).
// xr[ng]: the lane's x row 8 ng + rr at its first input (past the rows: row rows - 1), sz[ng] 4 or 0 past the rows.
template <int MT, int KX, int WARPS>
__device__ __forceinline__ void sk_stage_wg(unsigned* xw, const unsigned short* const (&xr)[MT], const int (&sz)[MT],
                                            int k0, int len) {
    constexpr int CP = KX / 8, PER = CP / WARPS;  // chunks of a pass; of a warp
    static_assert((WARPS == 4 || WARPS == 8 || WARPS == 16) && CP % WARPS == 0, "a warp's chunks a stride apart");
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const unsigned at = (unsigned)__cvta_generic_to_shared(xw + 32 * warp + lane);
    const unsigned short* from[MT];  // (the pass's rows once: each copy an immediate offset from one)
#pragma unroll
    for (int ng = 0; ng < MT; ++ng) from[ng] = xr[ng] + k0;
    // this warp's chunks of the pass (a last, shorter pass: those it has), each copy predicated on it rather than
    // branched around, which made ptxas rebuild the rows' addresses for every chunk
    const int mine = len == KX ? PER : (len / 8 - warp + WARPS - 1) / WARPS;
#pragma unroll
    for (int i = 0; i < PER; ++i) {
        const int c0 = WARPS * i;  // (warp 0's chunk: the others' inputs are theirs plus this one's)
        const int in = 64 * (c0 >> 3) + 2 * (c0 & 7);
#pragma unroll
        for (int ng = 0; ng < MT; ++ng)
            asm volatile("{\n.reg .pred p;\nsetp.lt.s32 p, %3, %4;\n@p cp.async.ca.shared.global [%0], [%1], 4, %2;\n}\n"
                         ::"r"(at + 4 * (32 * (ng * CP + c0))), "l"(from[ng] + in), "r"(sz[ng]), "r"(i), "r"(mine));
    }
    asm volatile("cp.async.commit_group;");
}
// The same layout filled through registers (XREG): each lane loads 16-byte vectors of x a pass ahead, coalesced
// where the 4-byte copies above touch eight rows' lines each, and at the pass boundary stores each vector's four
// words in their chunks. Lane (rr, q) of warp w takes inputs 64 b + 16 q + 8 hh .. + 7 of row 8 ng + rr, for b = w / 2
// + (WARPS / 2) j, hh = w % 2 (j < KX / (32 WARPS)), whose words v go to chunk 8 b + 4 hh + v at the lane's word: each
// store instruction 32 consecutive words. xr[ng]: the lane's row at its first input (sk_xrow_reg), len as above.
template <int MT, int KX, int WARPS, int J>
__device__ __forceinline__ void sk_xload(uint4 (&xv)[MT][J], const unsigned short* const (&xr)[MT], int k0, int len) {
    static_assert(J >= 1 && KX == 32 * WARPS * J, "whole vectors a warp: J = KX / (32 WARPS)");
    const int b0 = (threadIdx.x >> 5) >> 1;
#pragma unroll
    for (int ng = 0; ng < MT; ++ng)
#pragma unroll
        for (int j = 0; j < J; ++j)
            if (64 * (b0 + (WARPS / 2) * j) < len)
                xv[ng][j] = *reinterpret_cast<const uint4*>(xr[ng] + k0 + 32 * WARPS * j);
}
// (PAIRS02: the e4m3 form's A pairs, inputs 0 and 2 then 1 and 3 of each four: each vector's words w0 .. w3 stored as
// (w0, w1)'s low halves, their high halves, then w2 and w3's the same)
template <int MT, int KX, int WARPS, int J, bool PAIRS02 = false>
__device__ __forceinline__ void sk_xstore(unsigned buf, const uint4 (&xv)[MT][J], int len) {
    constexpr int CP = KX / 8;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, b0 = warp >> 1;
    const unsigned at = buf + 4 * (32 * (8 * b0 + 4 * (warp & 1)) + lane);
#pragma unroll
    for (int ng = 0; ng < MT; ++ng)
#pragma unroll
        for (int j = 0; j < J; ++j)
            if (64 * (b0 + (WARPS / 2) * j) < len) {
                const uint4 c = xv[ng][j];
                const unsigned w4[4] = {PAIRS02 ? prmt(c.x, c.y, 0x5410u) : c.x, PAIRS02 ? prmt(c.x, c.y, 0x7632u) : c.y,
                                        PAIRS02 ? prmt(c.z, c.w, 0x5410u) : c.z, PAIRS02 ? prmt(c.z, c.w, 0x7632u) : c.w};
#pragma unroll
                for (int v = 0; v < 4; ++v)
                    asm volatile("st.shared.b32 [%0], %1;" ::"r"(at + 4 * 32 * (ng * CP + 4 * WARPS * j + v)), "r"(w4[v])
                                 : "memory");
            }
}
// the shared-memory descriptor of the k16 product whose first core matrix is at shared address `at`: the next
// k-chunk's core matrix 128 bytes on (leading dimension), the next row group's CP * 128 (stride dimension)
template <int CP> __device__ __forceinline__ unsigned long long sk_wg_desc(unsigned at) {
    return (unsigned long long)((at & 0x3FFFFu) >> 4) | ((unsigned long long)(128 >> 4) << 16) |
           ((unsigned long long)(CP * 128 >> 4) << 32);
}
// d (the warpgroup's 64 x 8 MT float32 sums, laid out as the mma.sync form's acc[0][i][e]) = A B + (add ? d : 0),
// asynchronously (sk_wg_wait)
// the three wgmma wrappers' operands (sk_wgmma, sk_wgmma_i8, sk_wgmma8): an m64nN instruction's N / 2 sums a lane
// (d, float or int32), its four A registers and the descriptor of B, then the predicate's input (add)
#define SK_WG_OPS_8 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, %8"
#define SK_WG_OPS_16 "{%0,%1,%2,%3,%4,%5,%6,%7}, {%8,%9,%10,%11}, %12"
#define SK_WG_OPS_24 "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11}, {%12,%13,%14,%15}, %16"
#define SK_WG_OPS_32 "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15}, {%16,%17,%18,%19}, %20"
#define SK_WG_D(i) "+f"(d[i][0]), "+f"(d[i][1]), "+f"(d[i][2]), "+f"(d[i][3])
#define SK_WG_DI(i) "+r"(d[i][0]), "+r"(d[i][1]), "+r"(d[i][2]), "+r"(d[i][3])
#define SK_WG_IN "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(desc), "r"((unsigned)add)
template <bool BF16, int MT>
__device__ __forceinline__ void sk_wgmma(float (&d)[MT][4], unsigned a0, unsigned a1, unsigned a2, unsigned a3,
                                         unsigned long long desc, bool add) {
#ifdef SK_WG_ARCH
#define SK_WG_ASM(N, REGS, TYPE)                                                                                   \
    "{\n.reg .pred p;\nsetp.ne.b32 p, %" REGS ";\nwgmma.mma_async.sync.aligned.m64n" #N "k16.f32." TYPE "." TYPE \
    " " SK_WG_OPS_##N ", p, 1, 1, 0;\n}\n"
    if constexpr (MT == 1) {
        if (BF16) asm volatile(SK_WG_ASM(8, "9, 0", "bf16") : SK_WG_D(0) : SK_WG_IN);
        else asm volatile(SK_WG_ASM(8, "9, 0", "f16") : SK_WG_D(0) : SK_WG_IN);
    } else if constexpr (MT == 2) {
        if (BF16) asm volatile(SK_WG_ASM(16, "13, 0", "bf16") : SK_WG_D(0), SK_WG_D(1) : SK_WG_IN);
        else asm volatile(SK_WG_ASM(16, "13, 0", "f16") : SK_WG_D(0), SK_WG_D(1) : SK_WG_IN);
    } else if constexpr (MT == 3) {
        if (BF16) asm volatile(SK_WG_ASM(24, "17, 0", "bf16") : SK_WG_D(0), SK_WG_D(1), SK_WG_D(2) : SK_WG_IN);
        else asm volatile(SK_WG_ASM(24, "17, 0", "f16") : SK_WG_D(0), SK_WG_D(1), SK_WG_D(2) : SK_WG_IN);
    } else {
        if (BF16) asm volatile(SK_WG_ASM(32, "21, 0", "bf16") : SK_WG_D(0), SK_WG_D(1), SK_WG_D(2), SK_WG_D(3) : SK_WG_IN);
        else asm volatile(SK_WG_ASM(32, "21, 0", "f16") : SK_WG_D(0), SK_WG_D(1), SK_WG_D(2), SK_WG_D(3) : SK_WG_IN);
    }
#undef SK_WG_ASM
#endif
}
// the warpgroup's products committed before the last `PENDING` commits have completed; the compiler may not move
// reads or writes of d before this
template <int PENDING, int MT> __device__ __forceinline__ void sk_wg_wait(float (&d)[MT][4]) {
#ifdef SK_WG_ARCH
    asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(PENDING) : "memory");
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) asm volatile("" : "+f"(d[i][e])::"memory");
#endif
}
// the same for W4A8's int32 sums
template <int PENDING, int MT> __device__ __forceinline__ void sk_wg_wait(int (&d)[MT][4]) {
#ifdef SK_WG_ARCH
    asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(PENDING) : "memory");
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) asm volatile("" : "+r"(d[i][e])::"memory");
#endif
}
// o += a product's completed sums d, times sa (rows g: d[i][0], d[i][1]) and sb (rows g + 8: d[i][2], d[i][3])
template <int MT>
__device__ __forceinline__ void sk_add_scaled(float (&o)[MT][4], const float (&d)[MT][4], float sa, float sb) {
#pragma unroll
    for (int i = 0; i < MT; ++i) {
        o[i][0] = fmaf(sa, d[i][0], o[i][0]), o[i][1] = fmaf(sa, d[i][1], o[i][1]);
        o[i][2] = fmaf(sb, d[i][2], o[i][2]), o[i][3] = fmaf(sb, d[i][3], o[i][3]);
    }
}
// W8A8 (SK_E4M3_A8): x is e4m3, so a k32 product takes 16-byte core-matrix rows of 16 inputs. Lane (rr, q) of warp w
// loads row 8 ng + rr's bytes 64 b + 16 q .. + 15 for the pass's 64-input steps b = w + WARPS j (b < KX / 64, 64 b <
// len; warps past KX / 64 load none) and stores the vector's word v at word q of chunk 4 b + v of its row group: the
// k-chunks of product m = 2 s + h of tile t (chunks 8 t + 2 m and + 1) then hold, at word q, the inputs 64 (2 t + s) +
// 16 q + 8 h + {0..3} and + {4..7}, which are the weights' bytes sk_wg_raw8 puts in the A registers' slots 4 q .. 4 q
// + 3 and 16 + 4 q .. (CP = KX / 16 chunks a row group; the same core-matrix layout as the 16-bit x's above).
template <int MT, int KX, int WARPS, int J>
__device__ __forceinline__ void sk_xload8(uint4 (&xv)[MT][J], const unsigned char* const (&xr)[MT], int k0, int len) {
    const int warp = threadIdx.x >> 5;
#pragma unroll
    for (int ng = 0; ng < MT; ++ng)
#pragma unroll
        for (int j = 0; j < J; ++j) {
            const int b = warp + WARPS * j;
            if (b < KX / 64 && 64 * b < len)
                xv[ng][j] = *reinterpret_cast<const uint4*>(xr[ng] + k0 + 64 * WARPS * j);
        }
}
template <int MT, int KX, int WARPS, int J>
__device__ __forceinline__ void sk_xstore8(unsigned buf, const uint4 (&xv)[MT][J], int len) {
    constexpr int CP = KX / 16;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
#pragma unroll
    for (int ng = 0; ng < MT; ++ng)
#pragma unroll
        for (int j = 0; j < J; ++j) {
            const int b = warp + WARPS * j;
            if (b < KX / 64 && 64 * b < len) {
                const uint4 c = xv[ng][j];
                const unsigned w4[4] = {c.x, c.y, c.z, c.w};
#pragma unroll
                for (int v = 0; v < 4; ++v)
                    asm volatile("st.shared.b32 [%0], %1;" ::"r"(buf + 4 * (32 * (ng * CP + 4 * b + v) + lane)), "r"(w4[v])
                                 : "memory");
            }
        }
}
// the larger of a and b, NaN where either is (max.NaN; fmaxf returns the other operand)
__device__ __forceinline__ float sk_max_nan(float a, float b) {
    float d;
    asm("max.NaN.f32 %0, %1, %2;" : "=f"(d) : "f"(a), "f"(b));
    return d;
}
// a lane's 32 16-bit values of a (row, 128-input group) (sk_xloadq's four vectors) as float32, f[t][e] the value e of
// vector t, and the largest magnitude of the group's 128, taken across the quad that holds them (every lane calls it).
// NAN: a NaN among them gives NaN (max.NaN), else it is passed over (fmaxf)
template <bool BF16, bool NAN = false>
__device__ __forceinline__ float sk_quad_amax(const uint4 (&xv)[4], float (&f)[4][8]) {
    const auto mx = [](float a, float b) { return NAN ? sk_max_nan(a, b) : fmaxf(a, b); };
    float m = 0.f;
#pragma unroll
    for (int t = 0; t < 4; ++t) {
        const unsigned w[4] = {xv[t].x, xv[t].y, xv[t].z, xv[t].w};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            f[t][2 * i] = tof<BF16>((unsigned short)(w[i] & 0xffffu));
            f[t][2 * i + 1] = tof<BF16>((unsigned short)(w[i] >> 16));
            m = mx(m, mx(fabsf(f[t][2 * i]), fabsf(f[t][2 * i + 1])));
        }
    }
    m = mx(m, __shfl_xor_sync(0xffffffffu, m, 1));
    return mx(m, __shfl_xor_sync(0xffffffffu, m, 2));
}
// SK_E4M3_A8Q and SK_INT4_A8Q: x's 16-bit values of a pass, a quad to each (row, 128-input group): warp w takes the pass's row group
// ng and group gi of pair wp = w + WARPS j (ng = wp % MT, gi = wp / MT; MT PASS pairs), lane (rr, q) row 8 ng + rr
// (past the rows: the last) and its inputs 64 b + 16 q .. + 15 for b = 2 gi and 2 gi + 1 (two 16-byte vectors each:
// xv[j][2 h + e], inputs 64 (2 gi + h) + 16 q + 8 e ..), the 16 inputs whose bytes sk_xstore8's lane (rr, q) stores
template <int MT, int KX, int WARPS, int J>
__device__ __forceinline__ void sk_xloadq(uint4 (&xv)[J][4], const unsigned short* __restrict__ x, long long x_ld,
                                          int rows, int k0) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, rr = lane >> 2, q = lane & 3;
#pragma unroll
    for (int j = 0; j < J; ++j) {
        const int wp = warp + WARPS * j, ng = wp % MT, gi = wp / MT;
        if (wp < MT * (KX / 128)) {
            const unsigned short* at = x + (long long)min(8 * ng + rr, rows - 1) * x_ld + k0 + 128 * gi + 16 * q;
#pragma unroll
            for (int h = 0; h < 2; ++h)
#pragma unroll
                for (int e = 0; e < 2; ++e) xv[j][2 * h + e] = *reinterpret_cast<const uint4*>(at + 64 * h + 8 * e);
        }
    }
}
// ... quantized as quant_groups does (amax over the group's 128 values across the quad, at least 1e-12; bytes e4m3(v *
// (448 / amax)), rounded to nearest even and saturated; scale amax / 448) and stored where sk_xstore8 stores e4m3 x
// (word v of the lane's 16 inputs of step b at word q of chunk 4 b + v of its row: each store 32 consecutive words);
// the scale at float gi 8 MT + 8 ng + rr after the pass's bytes (as the W8A8 form's scales are staged). Every pass is
// whole (KX inputs: the pipelined form's k ranges are whole runs of KX = 128 U inputs), so no group is cut short.
template <bool BF16, int MT, int KX, int WARPS, int J>
__device__ __forceinline__ void sk_xstoreq(unsigned buf, const uint4 (&xv)[J][4]) {
    constexpr int CP = KX / 16;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, rr = lane >> 2;
#pragma unroll
    for (int j = 0; j < J; ++j) {
        const int wp = warp + WARPS * j, ng = wp % MT, gi = wp / MT;
        if (wp < MT * (KX / 128)) {  // (warp-uniform: the quad shuffles below have every lane)
            float f[4][8];
            const float m = sk_quad_amax<BF16>(xv[j], f);
            const float amax = fmaxf(m, 1e-12f), inv = 448.f / amax;
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int b = 2 * gi + h;
#pragma unroll
                for (int v = 0; v < 4; ++v) {  // (inputs 16 q + 4 v .. + 3 of step b: vector 2 h + v / 2, values 4 (v % 2) ..)
                    const float* g = f[2 * h + (v >> 1)] + 4 * (v & 1);
                    const unsigned word = e4m3x2(g[0] * inv, g[1] * inv) | ((unsigned)e4m3x2(g[2] * inv, g[3] * inv) << 16);
                    asm volatile("st.shared.b32 [%0], %1;" ::"r"(buf + 4 * (32 * (ng * CP + 4 * b + v) + lane)), "r"(word)
                                 : "memory");
                }
            }
            if ((lane & 3) == 0)
                asm volatile("st.shared.f32 [%0], %1;" ::"r"(buf + 8 * MT * KX + 4 * (gi * 8 * MT + 8 * ng + rr)),
                             "f"(amax / 448.f)
                             : "memory");
        }
    }
}
// the low bytes of four ints as one word's bytes 0..3
__device__ __forceinline__ unsigned sk_bytes4(int b0, int b1, int b2, int b3) {
    return __byte_perm(__byte_perm(b0, b1, 0x0040), __byte_perm(b2, b3, 0x0040), 0x5410);
}
// SK_INT4_A8Q: sk_xloadq's values, quantized to int8 a (row, 128-input group) at a time: amax over the group's 128
// values across the quad (at least 1e-12; NaN where one is NaN, so that the scale is and the row's outputs are NaN,
// where fmaxf would pass over it and its code would be garbage), codes v * (127 / amax) rounded once to nearest even
// by an fma that adds 1.5 2^23 (the code in the float's low bits: no float-to-int conversion; |code| <= 127 since
// |v| <= amax), scale amax / 127. Vector p = 2 h + e of the lane (inputs 128 gi + 64 h + 16 q + 8 e + {0..7}, values c0 ..
// c7) goes to word q of chunks 8 gi + 2 p, as bytes (c0, c4, c1, c5), and 8 gi + 2 p + 1, as (c2, c6, c3, c7): the
// k slots where sk_wg_raw4 puts the weights' codes of the same inputs. The scale at float gi 8 MT + 8 ng + rr after
// the pass's bytes (where the W8A8 form's are), the group's sum of codes (int32) PASS 8 MT words after it. Every
// pass whole, as sk_xstoreq's.
template <bool BF16, int MT, int KX, int WARPS, int J>
__device__ __forceinline__ void sk_xstorei8(unsigned buf, const uint4 (&xv)[J][4]) {
    constexpr int CP = KX / 16, PASS = KX / 128;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, rr = lane >> 2;
#pragma unroll
    for (int j = 0; j < J; ++j) {
        const int wp = warp + WARPS * j, ng = wp % MT, gi = wp / MT;
        if (wp < MT * PASS) {  // (warp-uniform: the quad shuffles below have every lane)
            float f[4][8];
            const float m = sk_quad_amax<BF16, true>(xv[j], f);
            const float amax = sk_max_nan(m, 1e-12f), inv = 127.f / amax;
            unsigned sum = 0;  // (unsigned: a NaN group's codes are garbage, and their sum must not overflow an int)
#pragma unroll
            for (int p = 0; p < 4; ++p) {
                int c[8];
#pragma unroll
                for (int e = 0; e < 8; ++e)
                    c[e] = __float_as_int(fmaf(f[p][e], inv, 12582912.f)) - 0x4B400000, sum += (unsigned)c[e];
                const unsigned at = buf + 4 * (32 * (ng * CP + 8 * gi + 2 * p) + lane);
                asm volatile("st.shared.b32 [%0], %1;" ::"r"(at), "r"(sk_bytes4(c[0], c[4], c[1], c[5])) : "memory");
                asm volatile("st.shared.b32 [%0], %1;" ::"r"(at + 128), "r"(sk_bytes4(c[2], c[6], c[3], c[7])) : "memory");
            }
            sum += __shfl_xor_sync(0xffffffffu, sum, 1);
            sum += __shfl_xor_sync(0xffffffffu, sum, 2);
            if ((lane & 3) == 0) {
                const unsigned at = buf + 8 * MT * KX + 4 * (gi * 8 * MT + 8 * ng + rr);
                asm volatile("st.shared.f32 [%0], %1;" ::"r"(at), "f"(amax / 127.f) : "memory");
                asm volatile("st.shared.b32 [%0], %1;" ::"r"(at + 4 * PASS * 8 * MT), "r"(sum) : "memory");
            }
        }
    }
}
// d = A B + (add ? d : 0) over k32 of u8 codes (A: sk_wg_raw4's registers) times s8 x (B: staged by sk_xstorei8),
// int32 sums, asynchronously (sk_wg_wait)
template <int MT>
__device__ __forceinline__ void sk_wgmma_i8(int (&d)[MT][4], unsigned a0, unsigned a1, unsigned a2, unsigned a3,
                                            unsigned long long desc, bool add) {
#ifdef SK_WG_ARCH
#define SK_WGI_ASM(N, REGS)                                                                                        \
    "{\n.reg .pred p;\nsetp.ne.b32 p, %" REGS ";\nwgmma.mma_async.sync.aligned.m64n" #N "k32.s32.u8.s8 "            \
    SK_WG_OPS_##N ", p;\n}\n"
    if constexpr (MT == 1) asm volatile(SK_WGI_ASM(8, "9, 0") : SK_WG_DI(0) : SK_WG_IN);
    else if constexpr (MT == 2) asm volatile(SK_WGI_ASM(16, "13, 0") : SK_WG_DI(0), SK_WG_DI(1) : SK_WG_IN);
    else if constexpr (MT == 3)
        asm volatile(SK_WGI_ASM(24, "17, 0") : SK_WG_DI(0), SK_WG_DI(1), SK_WG_DI(2) : SK_WG_IN);
    else asm volatile(SK_WGI_ASM(32, "21, 0") : SK_WG_DI(0), SK_WG_DI(1), SK_WG_DI(2), SK_WG_DI(3) : SK_WG_IN);
#undef SK_WGI_ASM
#endif
}
// d = A B + (add ? d : 0) over k32 of e4m3 (A: the 4 registers of the weights' bytes, B: x's staged bytes),
// asynchronously (sk_wg_wait)
template <int MT>
__device__ __forceinline__ void sk_wgmma8(float (&d)[MT][4], unsigned a0, unsigned a1, unsigned a2, unsigned a3,
                                          unsigned long long desc, bool add) {
#ifdef SK_WG_ARCH
#define SK_WG8_ASM(N, REGS)                                                                                        \
    "{\n.reg .pred p;\nsetp.ne.b32 p, %" REGS ";\nwgmma.mma_async.sync.aligned.m64n" #N "k32.f32.e4m3.e4m3 "        \
    SK_WG_OPS_##N ", p, 1, 1;\n}\n"
    if constexpr (MT == 1) asm volatile(SK_WG8_ASM(8, "9, 0") : SK_WG_D(0) : SK_WG_IN);
    else if constexpr (MT == 2) asm volatile(SK_WG8_ASM(16, "13, 0") : SK_WG_D(0), SK_WG_D(1) : SK_WG_IN);
    else if constexpr (MT == 3)
        asm volatile(SK_WG8_ASM(24, "17, 0") : SK_WG_D(0), SK_WG_D(1), SK_WG_D(2) : SK_WG_IN);
    else asm volatile(SK_WG8_ASM(32, "21, 0") : SK_WG_D(0), SK_WG_D(1), SK_WG_D(2), SK_WG_D(3) : SK_WG_IN);
#undef SK_WG8_ASM
#endif
}
#undef SK_WG_OPS_8
#undef SK_WG_OPS_16
#undef SK_WG_OPS_24
#undef SK_WG_OPS_32
#undef SK_WG_D
#undef SK_WG_DI
#undef SK_WG_IN
// o += a product's completed sums d times each column's factor (W8A8: the weight block's scale times x's row scale
// of the tile): fa[i] for x row 8 i + 2 q (d[i][0], d[i][2]), fb[i] for row 8 i + 2 q + 1 (d[i][1], d[i][3])
template <int MT>
__device__ __forceinline__ void sk_add_cols(float (&o)[MT][4], const float (&d)[MT][4], const float (&fa)[MT],
                                            const float (&fb)[MT]) {
#pragma unroll
    for (int i = 0; i < MT; ++i) {
        o[i][0] = fmaf(fa[i], d[i][0], o[i][0]), o[i][1] = fmaf(fb[i], d[i][1], o[i][1]);
        o[i][2] = fmaf(fa[i], d[i][2], o[i][2]), o[i][3] = fmaf(fb[i], d[i][3], o[i][3]);
    }
}
// W4A8: a product's factors: the weight rows' scales and zeros (rows g: sa, za; g + 8: sb, zb), and x's scales and
// sums of codes of the tile, rows 8 i + 2 q (ca, xa) and + 1 (cb, xb)
template <int MT> struct sk_w4a8_factors {
    float sa, sb;
    int za, zb;
    float ca[MT], cb[MT];
    int xa[MT], xb[MT];
};
// v (|v| < 2^22) as a float32, exactly, in two full-rate instructions (its bits added to 1.5 2^23's, less 1.5 2^23)
__device__ __forceinline__ float sk_i2f(int v) { return __int_as_float((int)((unsigned)v + 0x4B400000u)) - 12582912.f; }
// d - z x in 32 bits, wrapping (unsigned: a NaN group's garbage sums must not be undefined behaviour; its NaN scale
// makes the product NaN whatever this gives)
__device__ __forceinline__ int sk_less_zero(int d, int z, int x) {
    return (int)((unsigned)d - (unsigned)z * (unsigned)x);
}
// o += a W4A8 product's completed int32 sums d (sum of code x-code), each less its zero times x's sum of codes (now
// sum of (code - zero) x-code, exact: at most 255 127 128 < 2^22), times its row's scale and x's
template <int MT>
__device__ __forceinline__ void sk_add_w4a8(float (&o)[MT][4], const int (&d)[MT][4], const sk_w4a8_factors<MT>& f) {
#pragma unroll
    for (int i = 0; i < MT; ++i) {
        o[i][0] = fmaf(f.sa * f.ca[i], sk_i2f(sk_less_zero(d[i][0], f.za, f.xa[i])), o[i][0]);
        o[i][1] = fmaf(f.sa * f.cb[i], sk_i2f(sk_less_zero(d[i][1], f.za, f.xb[i])), o[i][1]);
        o[i][2] = fmaf(f.sb * f.ca[i], sk_i2f(sk_less_zero(d[i][2], f.zb, f.xa[i])), o[i][2]);
        o[i][3] = fmaf(f.sb * f.cb[i], sk_i2f(sk_less_zero(d[i][3], f.zb, f.xb[i])), o[i][3]);
    }
}
// each decoded A register computed before the wgmma.fence that follows (volatile asm keeps their order): the PTX rules
// want no register a wgmma reads written between the fence and it, and the decodes' own asm is not volatile
template <int P = 8> __device__ __forceinline__ void sk_wg_pin(unsigned (&a)[8][4]) {
#pragma unroll
    for (int p = 0; p < P; ++p)
#pragma unroll
        for (int j = 0; j < 4; ++j) asm volatile("" : "+r"(a[p][j])::"memory");
}
// a tile's A operands, decoded: product m' = 4 h + m (rows g, g + 8; inputs as the layout comment above), the zero
// subtracted from each pair (exactly: i4_minus)
template <bool BF16>
__device__ __forceinline__ void sk_wg_decode(unsigned (&a)[8][4], const uint4& va, const uint4& vb, unsigned nza,
                                             unsigned nzb) {
    const unsigned wa[4] = {va.x, va.y, va.z, va.w}, wb[4] = {vb.x, vb.y, vb.z, vb.w};
#pragma unroll
    for (int p = 0; p < 8; ++p) {
        const int word = 2 * (p >> 2) + ((p & 3) >> 1), shift = 8 * (p & 1);
        a[p][0] = i4_minus<BF16>(wa[word] >> shift, nza);
        a[p][1] = i4_minus<BF16>(wb[word] >> shift, nzb);
        a[p][2] = i4_minus<BF16>(wa[word] >> (shift + 4), nza);
        a[p][3] = i4_minus<BF16>(wb[word] >> (shift + 4), nzb);
    }
    sk_wg_pin(a);
}

// an e4m3 tile's A operands, decoded exactly (e4m3_pair): product m' = 4 s + m takes word m of step s (v[s]: row g,
// v[2 + s]: row g + 8), its bytes 0 and 2 in slots 2 q, 2 q + 1 and bytes 1 and 3 in slots 2 q + 8, 2 q + 9
template <bool BF16> __device__ __forceinline__ void sk_wg_decode8(unsigned (&a)[8][4], const uint4 (&v)[4]) {
#pragma unroll
    for (int s = 0; s < 2; ++s) {
        const unsigned ua[4] = {v[s].x, v[s].y, v[s].z, v[s].w}, ub[4] = {v[2 + s].x, v[2 + s].y, v[2 + s].z, v[2 + s].w};
#pragma unroll
        for (int m = 0; m < 4; ++m) {
            unsigned(&d)[4] = a[4 * s + m];
            d[0] = e4m3_pair<BF16>(ua[m] << 8), d[1] = e4m3_pair<BF16>(ub[m] << 8);
            d[2] = e4m3_pair<BF16>(ua[m]), d[3] = e4m3_pair<BF16>(ub[m]);
        }
    }
    sk_wg_pin(a);
}

// W8A8: an e4m3 tile's A registers as loaded, no decoding: product m = 2 s + h takes words 2 h and 2 h + 1 of step s
// (v[s]: row g, v[2 + s]: row g + 8) into slots 4 q .. 4 q + 3 and 16 + 4 q .. (rows g, g + 8), as sk_xstore8 stages x
__device__ __forceinline__ void sk_wg_raw8(unsigned (&a)[8][4], const uint4 (&v)[4]) {
#pragma unroll
    for (int s = 0; s < 2; ++s) {
        const unsigned ua[4] = {v[s].x, v[s].y, v[s].z, v[s].w}, ub[4] = {v[2 + s].x, v[2 + s].y, v[2 + s].z, v[2 + s].w};
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            unsigned(&d)[4] = a[2 * s + h];
            d[0] = ua[2 * h], d[1] = ub[2 * h], d[2] = ua[2 * h + 1], d[3] = ub[2 * h + 1];
        }
    }
    sk_wg_pin(a);
}

// W4A8: an int4 tile's A registers, the codes as bytes 0..15 (their zeros met after the product, sk_add_w4a8):
// product p = 2 h + v takes word p of rows g (va) and g + 8 (vb), inputs 64 h + 16 q + 8 v + {0..7} in the layout's
// fields 0, 2, 4, 6, 1, 3, 5, 7 (int4_decode.cuh): its even fields (inputs + 0, 4, 1, 5) in slots 4 q .. 4 q + 3, its
// odd ones (+ 2, 6, 3, 7) in slots 16 + 4 q .., as sk_xstorei8 stages x
__device__ __forceinline__ void sk_wg_raw4(unsigned (&a)[8][4], const uint4& va, const uint4& vb) {
    const unsigned wa[4] = {va.x, va.y, va.z, va.w}, wb[4] = {vb.x, vb.y, vb.z, vb.w};
#pragma unroll
    for (int p = 0; p < 4; ++p) {
        a[p][0] = wa[p] & 0x0f0f0f0fu, a[p][1] = wb[p] & 0x0f0f0f0fu;
        a[p][2] = (wa[p] >> 4) & 0x0f0f0f0fu, a[p][3] = (wb[p] >> 4) & 0x0f0f0f0fu;
    }
    sk_wg_pin<4>(a);
}

// The weight ring of the warpgroup form (RING > 0 stages): each warp's next runs of U tiles copied into shared memory
// by one bulk copy a run (cp.async.bulk, completed on an mbarrier of the stage), so RING - 1 runs are in flight while
// one is summed and no register holds a weight before its decode. A strip's tiles are one contiguous run of bytes in
// the tile-major layout, so a warp's run is one copy (e4m3: one a row, each lane one). bar: the stage's mbarrier (a
// shared address), arrived at once by lane 0 with the bytes its copies will complete.
__device__ __forceinline__ void sk_ring_init(unsigned bar) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(bar) : "memory");
}
// the stage's one arrival, with the bytes its copies (issued after this) will complete
__device__ __forceinline__ void sk_ring_expect(unsigned bar, unsigned bytes) {
#ifdef SK_WG_ARCH
    asm volatile("{\n.reg .b64 st;\nmbarrier.arrive.expect_tx.shared::cta.b64 st, [%0], %1;\n}\n" ::"r"(bar), "r"(bytes)
                 : "memory");
#endif
}
// `bytes` (a multiple of 16) of src into shared address dst, completing them on bar (expected there: sk_ring_expect)
__device__ __forceinline__ void sk_ring_copy(unsigned dst, const void* src, unsigned bytes, unsigned bar) {
#ifdef SK_WG_ARCH
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(dst),
                 "l"(src), "r"(bytes), "r"(bar)
                 : "memory");
#endif
}
// until bar's phase of this parity has completed (the stage's copy landed)
__device__ __forceinline__ void sk_ring_wait(unsigned bar, unsigned parity) {
#ifdef SK_WG_ARCH
    unsigned ok;
    do {
        asm volatile("{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
                     : "=r"(ok)
                     : "r"(bar), "r"(parity)
                     : "memory");
    } while (!ok);
#endif
}
__device__ __forceinline__ uint4 sk_lds(unsigned at) {
    uint4 v;
    asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(at));
    return v;
}

// a product's sums: float32, or int32 (W4A8's integer wgmma)
template <bool INT> struct sk_sums {
    using type = float;
};
template <> struct sk_sums<true> {
    using type = int;
};

// the warpgroup form: skinny_gemm's arguments and contract, whole warpgroups a block, for FMT SK_E4M3_A8 (as
// SK_E4M3_BLOCK, x e4m3 with its scales: the format comment at the top), SK_E4M3_A8Q (16-bit x, quantized here),
// SK_INT4 (q_b >= 1: groups of 128 inputs or more), SK_INT4_A8Q (as SK_INT4, x quantized here to int8), SK_E4M3_BLOCK (q_b >= 1: blocks of 128 inputs or more; q_a rows a block, a multiple
// of 16) or SK_E4M3_ROW. A tile is 128 inputs of a strip of 16 weight rows: int4's kilobyte of the tile-major layout,
// or e4m3's 16 row pieces of 128 bytes (rows k bytes apart). NT strips a warp (the warpgroup's 64 rows of each strip
// index one wgmma's; more strips share each staged pass of x); U tiles of weights in flight while the ones in hand
// are summed (RING 0: in registers) or RING stages of U tiles a strip in shared memory (the ring above: int4 one
// copy a strip, e4m3 one a row, each row's 128 U bytes padded to 128 U + 64 so that a quarter-warp's 16-byte reads
// of 8 rows take distinct banks); PIPE: a product's sums left running while the next tile is decoded (two sets of
// sums, alternating by product: U NT even, and each k range whole U tiles, the caller's) or waited for at once.
// e4m3's A pairs are bytes 0 and 2, then 1 and 3, of a word (each one shift fewer than bytes 0 and 1: fp8_tensor_
// cores.cuh's tc_chunk), so its x is staged through registers (XREG) with the same pairs put together.
template <bool BF16, bool F32OUT, int FMT, int MT, int NT, int U, int WARPS, int KX, bool PIPE, int RING, bool XREG>
__device__ __forceinline__ void skinny_wg(const unsigned short* __restrict__ x, const void* __restrict__ w,
                                          void* __restrict__ y, float* __restrict__ part, unsigned* __restrict__ done,
                                          int rows, int n, int k, long long x_ld, long long y_ld, int kc,
                                          const void* __restrict__ qd, long long q_ld, int q_a, int q_b) {
#ifdef SK_WG_ARCH
    constexpr bool W4A8 = FMT == SK_INT4_A8Q;
    constexpr bool I4 = FMT == SK_INT4 || W4A8;  // (int4 weights: the tile-major layout, a record a row and group)
    // SK_E4M3_A8: x e4m3 (x_ld in bytes), its float32 scales after its rows' bytes (at x + rows x_ld rounded up to
    // 256 bytes), one per row and 128 inputs, [k / 128][rows]: fp8_quant.cu's quant_groups with s_ld = rows
    constexpr bool AQ = FMT == SK_E4M3_A8Q || W4A8;  // (x 16-bit, quantized here as it is staged)
    constexpr bool A8 = FMT == SK_E4M3_A8 || AQ;     // (x staged as bytes, a scale a row and tile)
    constexpr bool RAW8 = A8 && !W4A8;               // (the A registers the weights' e4m3 bytes as loaded)
    // e4m3 row scales: each set of sums accumulates its products over the whole range (a row's one factor applied to
    // the sum at the end), no tile's sums added with factors
    constexpr bool RSUM = FMT == SK_E4M3_ROW;
    static_assert(!RSUM || NT == 1 || (PIPE && NT == 2), "row scales: each set of sums one strip's");
    // tiles, 32-bit words (for 16-bit x; W8A8's half of them used) and chunks of a pass
    constexpr int PASS = KX / 128, BUF = 4 * MT * KX, CP = A8 ? KX / 16 : KX / 8;
    // (PIPE with several runs of U tiles a pass: ptxas serializes the wgmma, their pipelining lost)
    static_assert(WARPS % 4 == 0 && KX % (128 * U) == 0 && (!PIPE || ((U * NT) % 2 == 0 && KX == 128 * U)),
                  "whole warpgroups; a pass of whole U tiles; PIPE: U NT even (each product's set of sums fixed), one "
                  "run of U tiles a pass");
    static_assert(RING == 0 || RING >= 2, "a ring of two stages or more");
    static_assert(NT == 1 || (PIPE && RING), "several strips a warp: pipelined, their weights in the ring (registers)");
    static_assert(I4 || (XREG && NT <= 2 && PIPE), "e4m3: x staged through registers (its pairs); a ring copy a lane's "
                  "row; pipelined (whole runs of 128 inputs: an e4m3 k of 64 past them would be left out)");
    constexpr int V = I4 ? 2 : 4;               // a lane's 16-byte weight vectors a tile
    constexpr int ROWB = 128 * U + 64;          // e4m3: bytes of a row's run in a stage (padded)
    constexpr int STAGE = I4 ? U * NT * 1024 : NT * 16 * ROWB;  // bytes of a ring stage
    extern __shared__ uint4 xs[];  // two passes of x, each 4 MT KX words in the layout above; then the ring
    __shared__ unsigned last;
    griddep_launch_dependents();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, q = lane & 3;
    const int j0 = (blockIdx.x * WARPS + warp) * 16 * NT;  // the warp's first row: strips j0 / 16 + t
    const int k_lo = blockIdx.y * kc, k_hi = min(k, k_lo + kc);
    const int steps = max(0, (k_hi - k_lo) / 128);
    const unsigned* rec = reinterpret_cast<const unsigned*>(qd);
    const int tile_at = k_lo >> 7;  // the range's first tile
    const unsigned char* wb = reinterpret_cast<const unsigned char*>(w);
    // int4: the warp's strips (past n: the last one) at the range's first tile. e4m3: the row this lane copies into
    // the ring (lane t 16 + r: strip t's row r) at input k_lo
    const unsigned char* wrun[I4 ? NT : 1];
    // int4: the lane's rows g and g + 8 of records (tile t's group: t >> (q_b - 1)); e4m3 blocks: each strip's row of
    // block scales (ra; tile t's block t >> (q_b - 1))
    const unsigned* ra[NT];
    const unsigned* rb[NT];
#pragma unroll
    for (int t = 0; t < NT; ++t) {
        const long long strip = min(j0 + 16 * t, n - 1) >> 4;
        if constexpr (I4) {
            wrun[t] = wb + (strip * (k >> 7) + tile_at) * 1024;
            ra[t] = rec + (long long)min(j0 + 16 * t + g, n - 1) * q_ld;
            rb[t] = rec + (long long)min(j0 + 16 * t + g + 8, n - 1) * q_ld;
        } else {
            ra[t] = rb[t] = rec + (long long)(min(j0 + 16 * t, n - 1) / q_a) * q_ld;
        }
    }
    if constexpr (!I4) wrun[0] = wb + (long long)min(j0 + (lane & (16 * NT - 1)), n - 1) * k + k_lo;
    const int gs = q_b - 1;
    // RING 0, NT 1: the lane's first vectors (int4: in its strip's first tile; e4m3: of rows g and g + 8)
    const uint4* wr = I4 ? reinterpret_cast<const uint4*>(wb + ((long long)(min(j0, n - 1) >> 4) * (k >> 7) + tile_at) *
                                                                   1024) + 4 * g + q
                         : reinterpret_cast<const uint4*>(wb + (long long)min(j0 + g, n - 1) * k + k_lo) + q;
    const long long wr_b = I4 ? I4_TILE_VECS / 2 : (long long)(min(j0 + g + 8, n - 1) - min(j0 + g, n - 1)) * k / 16;
    constexpr int TILE_VECS = I4 ? I4_TILE_VECS : 8;  // from a tile's vectors to the next's
    // the lane's x rows for the staging (sk_stage_wg), at its first input
    const unsigned short* xr[MT];
    const unsigned char* xr8[MT];  // SK_E4M3_A8: the lane's x rows at its first vector (sk_xload8's)
    int sz[MT];
    const unsigned char* x8 = reinterpret_cast<const unsigned char*>(x);
    const float* xsc = reinterpret_cast<const float*>(x8 + (((long long)rows * x_ld + 255) & ~255LL));
    // SK_E4M3_A8: x's scales of a pass are staged with it, after its bytes in the pass's buffer (the second half,
    // which 16-bit x would fill): thread i < PASS 8 MT loads a pass ahead the scale of row i % (8 MT) (past the rows:
    // the last) and the pass's tile i / (8 MT), and stores it at float i there (the in-kernel quantizations store
    // theirs there too, sk_xstoreq and sk_xstorei8)
    constexpr int XSN = FMT == SK_E4M3_A8 ? PASS * 8 * MT : 0;
    float xs_next = 0.f;
    auto xs_load = [&](int k0, int len) {
        const int i = threadIdx.x, t = i / (8 * MT);
        if (i < XSN && 128 * t < len) xs_next = __ldg(xsc + (long long)((k0 >> 7) + t) * rows + min(i % (8 * MT), rows - 1));
    };
#pragma unroll
    for (int ng = 0; ng < MT; ++ng) {
        const int r = 8 * ng + g;
        xr[ng] = x + (long long)min(r, rows - 1) * x_ld + 16 * q +
                 (XREG ? 64 * (warp >> 1) + 8 * (warp & 1)       // (sk_xload's first vector)
                       : 64 * (warp >> 3) + 2 * (warp & 7));  // (chunk `warp`)
        sz[ng] = r < rows ? 4 : 0;
        xr8[ng] = x8 + (long long)min(r, rows - 1) * x_ld + 16 * q + 64 * warp;
    }
    // XREG: 16-byte vectors of x a lane loads a row group (W8A8: a 64-input step's a vector, some warps none)
    constexpr int XJ = AQ ? 1 : A8 ? (KX / 64 + WARPS - 1) / WARPS : XREG ? KX / (32 * WARPS) : 1;
    // SK_E4M3_A8Q, SK_INT4_A8Q: a warp's (row group, 128-input group) pairs of the pass, four 16-byte vectors a lane each (sk_xloadq)
    constexpr int QJ = AQ ? (MT * PASS + WARPS - 1) / WARPS : 1;
    static_assert(!AQ || (PIPE && XREG), "in-kernel quantization: whole passes (the pipelined form's k ranges), whole "
                  "groups; staged through registers");
    uint4 xq[QJ][4];
    uint4 xv[MT][XJ];  // XREG: the next pass's x
    float acc[NT][MT][4];
    // each product's own sums (PIPE: two sets, alternating): float32, W4A8's int32
    typename sk_sums<W4A8>::type blk[PIPE ? 2 : 1][MT][4];
    sk_zero(acc);
#pragma unroll
    for (int b = 0; b < (PIPE ? 2 : 1); ++b)
#pragma unroll
        for (int i = 0; i < MT; ++i)
#pragma unroll
            for (int e = 0; e < 4; ++e) blk[b][i][e] = 0;
    unsigned* xw = reinterpret_cast<unsigned*>(xs);
    const unsigned base = (unsigned)__cvta_generic_to_shared(xw);
    // the ring: this warp's RING stages after x's two passes, then its stages' mbarriers
    const unsigned ring = base + 8 * BUF + warp * (RING * STAGE);
    const unsigned bars = base + 8 * BUF + WARPS * (RING * STAGE) + warp * (RING * 8);
    const int runs = (steps + U - 1) / U;
    // the lane's first vector in a stage's tile: int4 at 16 (4 g + q) (its second 512 bytes on); e4m3 row g's at
    // 16 q (row g + 8's 8 rows on, each step's 64 bytes on)
    const unsigned lane_at = I4 ? 16 * (4 * g + q) : g * ROWB + 16 * q;
    constexpr int NREC = FMT == SK_E4M3_ROW ? 0 : I4 ? 2 : 1;  // records or block scales a tile and strip
    uint4 cur[RING ? 1 : U][V];
    unsigned cr[U][NT][NREC ? NREC : 1];
    // a run's ring copies: int4 a strip's U kilobytes, lane 0; e4m3 a row's 128 U bytes, lane 16 t + r
    auto copy_run = [&](int r, int stage) {
        const int tiles = min(U, steps - r * U);
        if (lane == 0) sk_ring_expect(bars + 8 * stage, NT * (I4 ? 1024 : 2048) * tiles);
        if constexpr (I4) {
            if (lane == 0)
#pragma unroll
                for (int t = 0; t < NT; ++t)
                    sk_ring_copy(ring + stage * STAGE + t * U * 1024, wrun[t] + (long long)r * U * 1024, 1024 * tiles,
                                 bars + 8 * stage);
        } else {
            __syncwarp();  // (the stage's bytes expected before its copies)
            if (lane < 16 * NT)
                sk_ring_copy(ring + stage * STAGE + lane * ROWB, wrun[0] + (long long)r * U * 128, 128 * tiles,
                             bars + 8 * stage);
        }
    };
    if (RING) {  // (the weights are constants: their copies start before griddep_wait)
        if (lane == 0) {
#pragma unroll
            for (int s = 0; s < RING; ++s) sk_ring_init(bars + 8 * s);
            asm volatile("fence.proxy.async.shared::cta;" ::: "memory");  // the inits seen by the copies' completion
        }
        __syncwarp();
#pragma unroll
        for (int s = 0; s < RING; ++s)
            if (s < runs) copy_run(s, s);
    }
    // tile u's vectors of the lane from global memory (RING 0): int4 rows g, g + 8; e4m3 rows g, g + 8 at steps 0, 1
    auto load_tile = [&](uint4 (&v)[V], const uint4* at) {
        if constexpr (I4) {
            v[0] = load_weights(at), v[1] = load_weights(at + I4_TILE_VECS / 2);
        } else {
            v[0] = load_weights(at), v[1] = load_weights(at + 4), v[2] = load_weights(at + wr_b), v[3] = load_weights(at + wr_b + 4);
        }
    };
    auto load_rec = [&](unsigned (&r)[NT][NREC ? NREC : 1], int tl) {
#pragma unroll
        for (int t = 0; t < NT; ++t) {
            if constexpr (NREC >= 1) r[t][0] = __ldg(ra[t] + (tl >> gs));
            if constexpr (NREC == 2) r[t][1] = __ldg(rb[t] + (tl >> gs));
        }
    };
#pragma unroll
    for (int u = 0; u < U; ++u)
        if (u < steps) {
            if (!RING) load_tile(cur[RING ? 0 : u], wr + TILE_VECS * u);
            load_rec(cr[u], tile_at + u);
        }
    griddep_wait();  // x may be the previous kernel's output, part and done its scratch; W and its records constants
    const int passes = (k_hi - k_lo + KX - 1) / KX;
    if (steps > 0) {
        if constexpr (AQ) {
            sk_xloadq<MT, KX, WARPS, QJ>(xq, x, x_ld, rows, k_lo);
        } else if constexpr (A8) {
            sk_xload8<MT, KX, WARPS, XJ>(xv, xr8, k_lo, min(KX, k_hi - k_lo));
            xs_load(k_lo, min(KX, k_hi - k_lo));
        } else if constexpr (XREG) sk_xload<MT, KX, WARPS, XJ>(xv, xr, k_lo, min(KX, k_hi - k_lo));
        else sk_stage_wg<MT, KX, WARPS>(xw, xr, sz, k_lo, min(KX, k_hi - k_lo));
    }
    float sa = 0.f, sb = 0.f;  // PIPE: the scales of the product whose sums are running
    float pa[A8 ? MT : 1], pb[A8 ? MT : 1];  // W8A8 (e4m3 weights), PIPE: its columns' factors
#pragma unroll
    for (int i = 0; i < (A8 ? MT : 1); ++i) pa[i] = pb[i] = 0.f;
    sk_w4a8_factors<MT> pf = {};  // W4A8, PIPE: its factors (all zero before the first: its sums add nothing)
    const uint4* wn = wr;  // the weights of tile `step` (moved a run of U at a time: the loads' offsets immediate)
    for (int step = 0, run = 0; step < steps; step += U, ++run) {
        uint4 nxt[RING ? 1 : U][V];
        unsigned nr[U][NT][NREC ? NREC : 1];
        wn += U * TILE_VECS;
#pragma unroll
        for (int u = 0; u < U; ++u)
            if (step + U + u < steps) {
                if (!RING) load_tile(nxt[RING ? 0 : u], wn + TILE_VECS * u);
                load_rec(nr[u], tile_at + step + U + u);
            }
        if (step % PASS == 0) {  // pass p's x staged (asked for a pass ago), pass p + 1's asked for now
            const int p = step / PASS;
            if (PIPE) {  // the last product read pass p - 1's buffer: done before it is refilled (step 0: none)
                sk_wg_wait<0>(blk[1]);  // (the last product of a run: set 1, U NT even; strip NT - 1)
                if constexpr (W4A8) sk_add_w4a8(acc[NT - 1], blk[1], pf);
                else if constexpr (A8) sk_add_cols(acc[NT - 1], blk[1], pa, pb);
                else if constexpr (!RSUM) sk_add_scaled(acc[NT - 1], blk[1], sa, sb);
            }
            if constexpr (XREG) {  // pass p's x from the registers into its buffer, whose last readers (pass p - 2's
                                   // products) completed before the barrier of pass p - 1; then pass p + 1's loads
                if constexpr (W4A8) {
                    sk_xstorei8<BF16, MT, KX, WARPS, QJ>(base + (p & 1) * BUF * 4, xq);
                } else if constexpr (AQ) {
                    sk_xstoreq<BF16, MT, KX, WARPS, QJ>(base + (p & 1) * BUF * 4, xq);
                } else if constexpr (A8) {
                    sk_xstore8<MT, KX, WARPS, XJ>(base + (p & 1) * BUF * 4, xv, min(KX, k_hi - (k_lo + p * KX)));
                    if (threadIdx.x < XSN)
                        asm volatile("st.shared.f32 [%0], %1;" ::"r"(base + (p & 1) * BUF * 4 + 8 * MT * KX + 4 * threadIdx.x),
                                     "f"(xs_next)
                                     : "memory");
                } else {
                    sk_xstore<MT, KX, WARPS, XJ, !I4>(base + (p & 1) * BUF * 4, xv, min(KX, k_hi - (k_lo + p * KX)));
                }
                asm volatile("fence.proxy.async.shared::cta;" ::: "memory");  // (the stores seen by the tensor cores)
                __syncthreads();
                if (p + 1 < passes) {
                    const int k0 = k_lo + (p + 1) * KX;
                    if constexpr (AQ) {
                        sk_xloadq<MT, KX, WARPS, QJ>(xq, x, x_ld, rows, k0);
                    } else if constexpr (A8) {
                        sk_xload8<MT, KX, WARPS, XJ>(xv, xr8, k0, min(KX, k_hi - k0));
                        xs_load(k0, min(KX, k_hi - k0));
                    } else {
                        sk_xload<MT, KX, WARPS, XJ>(xv, xr, k0, min(KX, k_hi - k0));
                    }
                }
            } else {
                __syncthreads();  // every warpgroup's products over pass p - 1's buffer have completed
                if (p + 1 < passes) {
                    const int k0 = k_lo + (p + 1) * KX;
                    sk_stage_wg<MT, KX, WARPS>(xw + ((p + 1) & 1) * BUF, xr, sz, k0, min(KX, k_hi - k0));
                } else {
                    asm volatile("cp.async.commit_group;");
                }
                asm volatile("cp.async.wait_group 1;" ::: "memory");
                // this thread's copies, written through the generic proxy, made visible to the tensor cores' reads
                asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
                __syncthreads();
            }
        }
        const int stage = RING ? run % (RING ? RING : 1) : 0;
        if (RING) sk_ring_wait(bars + 8 * stage, (run / (RING ? RING : 1)) & 1);  // this run's tiles landed
        // the descriptor of the pass's first product; tile t's product m' is 2 (8 t + m') chunks of 128 bytes on
        const unsigned long long desc = sk_wg_desc<CP>(base + ((step / PASS) & 1) * BUF * 4);
#pragma unroll
        for (int u = 0; u < U; ++u) {
            if (PIPE || step + u < steps) {  // (PIPE: whole U tiles, below)
                // (x as bytes: 8 chunks a tile, 4 products of 2)
                const unsigned long long dt = desc + ((step + u) % PASS) * ((A8 ? 8 : 16) * 128 >> 4);
                float ca[A8 ? MT : 1], cb[A8 ? MT : 1];  // x as bytes: the tile's x scales of the lane's columns
                int xa[W4A8 ? MT : 1], xb[W4A8 ? MT : 1];  // W4A8: x's sums of codes there
                if constexpr (A8) {  // (rows 8 i + 2 q and + 1 of the staged scales: one 8-byte read each i)
                    const unsigned at = base + ((step / PASS) & 1) * BUF * 4 + 8 * MT * KX +
                                        4 * (((step + u) % PASS) * 8 * MT + 2 * q);
#pragma unroll
                    for (int i = 0; i < MT; ++i) {
                        asm volatile("ld.shared.v2.f32 {%0, %1}, [%2];" : "=f"(ca[i]), "=f"(cb[i]) : "r"(at + 32 * i));
                        if constexpr (W4A8)  // (the sums PASS 8 MT words after the scales)
                            asm volatile("ld.shared.v2.b32 {%0, %1}, [%2];"
                                         : "=r"(xa[W4A8 ? i : 0]), "=r"(xb[W4A8 ? i : 0])
                                         : "r"(at + 32 * i + 4 * PASS * 8 * MT));
                    }
                }
#pragma unroll
                for (int t = 0; t < NT; ++t) {
                    const int pi = u * NT + t, b = PIPE ? pi & 1 : 0;  // (the product's index in the run; its set)
                    uint4 v[V];
                    if (RING) {
                        if constexpr (I4) {
                            const unsigned at = ring + stage * STAGE + (t * U + u) * 1024 + lane_at;
                            v[0] = sk_lds(at), v[1] = sk_lds(at + 512);
                        } else {
                            const unsigned at = ring + stage * STAGE + t * 16 * ROWB + u * 128 + lane_at;
                            v[0] = sk_lds(at), v[1] = sk_lds(at + 64), v[2] = sk_lds(at + 8 * ROWB),
                            v[3] = sk_lds(at + 8 * ROWB + 64);
                        }
                    } else {
#pragma unroll
                        for (int e = 0; e < V; ++e) v[e] = cur[RING ? 0 : u][e];
                    }
                    unsigned a[8][4];
                    if constexpr (W4A8)
                        sk_wg_raw4(a, v[0], v[1]);
                    else if constexpr (I4)
                        sk_wg_decode<BF16>(a, v[0], v[1], i4_neg_zero<BF16>(cr[u][t][0]),
                                           i4_neg_zero<BF16>(cr[u][t][NREC > 1 ? 1 : 0]));
                    else if constexpr (A8)
                        sk_wg_raw8(a, v);
                    else
                        sk_wg_decode8<BF16>(a, v);
                    asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
                    if constexpr (W4A8) {
#pragma unroll
                        for (int p = 0; p < 4; ++p)
                            sk_wgmma_i8<MT>(blk[b], a[p][0], a[p][1], a[p][2], a[p][3], dt + p * (2 * 128 >> 4), p > 0);
                    } else if constexpr (A8) {
#pragma unroll
                        for (int p = 0; p < 4; ++p)
                            sk_wgmma8<MT>(blk[b], a[p][0], a[p][1], a[p][2], a[p][3], dt + p * (2 * 128 >> 4), p > 0);
                    } else {
#pragma unroll
                        for (int p = 0; p < 8; ++p)
                            sk_wgmma<BF16, MT>(blk[b], a[p][0], a[p][1], a[p][2], a[p][3], dt + p * (2 * 128 >> 4),
                                               RSUM || p > 0);
                    }
                    asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
                    // this product's factors for rows g and g + 8: int4 each row's scale, e4m3 the strip's block
                    // scale, 1 for row scales (applied to the whole sum at the end)
                    const float fa = I4 ? i4_scale(cr[u][t][0]) : NREC ? __uint_as_float(cr[u][t][0]) : 1.f;
                    const float fb = I4 ? i4_scale(cr[u][t][NREC > 1 ? 1 : 0]) : fa;
                    // PIPE: the product before's sums (the other set, strip t - 1 or the run's last) completed, added
                    // with its factors (at a run's first product, that is the last run's last, already added at the
                    // pass boundary above: every run starts a pass); else this product's
                    float fca[A8 ? MT : 1], fcb[A8 ? MT : 1];  // W8A8 (e4m3 weights): this product's columns' factors
                    sk_w4a8_factors<MT> cf;                    // W4A8: this product's factors
                    if constexpr (W4A8) {
                        cf.sa = fa, cf.sb = fb, cf.za = cr[u][t][0] & 0xff, cf.zb = cr[u][t][NREC > 1 ? 1 : 0] & 0xff;
#pragma unroll
                        for (int i = 0; i < MT; ++i)
                            cf.ca[i] = ca[i], cf.cb[i] = cb[i], cf.xa[i] = xa[W4A8 ? i : 0], cf.xb[i] = xb[W4A8 ? i : 0];
                    } else if constexpr (A8) {
#pragma unroll
                        for (int i = 0; i < MT; ++i) fca[i] = fa * ca[i], fcb[i] = fa * cb[i];
                    }
                    if (!PIPE || pi > 0) {
                        if (PIPE) sk_wg_wait<1>(blk[b ^ 1]);
                        else sk_wg_wait<0>(blk[0]);
                        if constexpr (W4A8) {
                            if (PIPE) sk_add_w4a8(acc[(t + NT - 1) % NT], blk[b ^ 1], pf);
                            else sk_add_w4a8(acc[t], blk[0], cf);
                        } else if constexpr (A8) {
                            if (PIPE) sk_add_cols(acc[(t + NT - 1) % NT], blk[b ^ 1], pa, pb);
                            else sk_add_cols(acc[t], blk[0], fca, fcb);
                        } else if constexpr (!RSUM) {
                            sk_add_scaled(acc[PIPE ? (t + NT - 1) % NT : t], blk[PIPE ? b ^ 1 : 0], PIPE ? sa : fa,
                                          PIPE ? sb : fb);
                        }
                    }
                    if (PIPE) {
                        sa = fa, sb = fb;
                        if constexpr (W4A8) {
                            pf = cf;
                        } else if constexpr (A8) {
#pragma unroll
                            for (int i = 0; i < MT; ++i) pa[i] = fca[i], pb[i] = fcb[i];
                        }
                    }
                }
            }
        }
        if (RING) {  // every lane has read this stage: the run RING on goes into it
            __syncwarp();
            if (run + RING < runs) {
                if (!I4 || lane == 0)  // (each copying lane: the stage's reads before the copy's writes)
                    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
                copy_run(run + RING, stage);
            }
        }
        if (step + U < steps) {
            // W8A8 without a ring: the products' A registers are `cur`'s own (no decode between), and the run's last
            // product may still be reading them; it completes before they take the next run's weights
            if constexpr (RAW8 && !RING) {
                sk_wg_wait<0>(blk[PIPE ? 1 : 0]);
#pragma unroll
                for (int u = 0; u < U; ++u)  // (cur's old values live until here: the copies below come after)
#pragma unroll
                    for (int e = 0; e < V; ++e)
                        asm volatile("" : "+r"(cur[RING ? 0 : u][e].x), "+r"(cur[RING ? 0 : u][e].y),
                                     "+r"(cur[RING ? 0 : u][e].z), "+r"(cur[RING ? 0 : u][e].w)::"memory");
            }
#pragma unroll
            for (int u = 0; u < U; ++u) {
                if (!RING)
#pragma unroll
                    for (int e = 0; e < V; ++e) cur[RING ? 0 : u][e] = nxt[RING ? 0 : u][e];
#pragma unroll
                for (int t = 0; t < NT; ++t)
#pragma unroll
                    for (int e = 0; e < (NREC ? NREC : 1); ++e) cr[u][t][e] = nr[u][t][e];
            }
        }
    }
    if (PIPE) {  // the last product's sums (set 1, strip NT - 1; none: sa, sb and the sums zero)
        sk_wg_wait<0>(blk[1]);
        if constexpr (W4A8) sk_add_w4a8(acc[NT - 1], blk[1], pf);
        else if constexpr (A8) sk_add_cols(acc[NT - 1], blk[1], pa, pb);
        else if constexpr (!RSUM) sk_add_scaled(acc[NT - 1], blk[1], sa, sb);
    }
    if constexpr (RSUM) {  // the sets' whole sums: strip t's set t (two strips), or both sets strip 0's
        if (!PIPE) sk_wg_wait<0>(blk[0]);
#pragma unroll
        for (int t = 0; t < NT; ++t)
#pragma unroll
            for (int i = 0; i < MT; ++i)
#pragma unroll
                for (int e = 0; e < 4; ++e)
                    acc[t][i][e] = NT == 2 ? blk[t][i][e] : PIPE ? blk[0][i][e] + blk[PIPE ? 1 : 0][i][e] : blk[0][i][e];
    }
    asm volatile("cp.async.wait_all;" ::: "memory");  // none left in flight at exit
    if (FMT == SK_E4M3_ROW) sk_scale_rows(acc, reinterpret_cast<const float*>(qd), j0, g, n);
    sk_finish<BF16, F32OUT, MT, NT, WARPS, false>(acc, y, part, done, last, rows, n, y_ld, j0, g, q, I4 ? q_a : 0);
#else
    __trap();  // compiled for an architecture without wgmma: never launched (SkinnyGemm compiles these for sm_90a)
#endif
}

// {name}_m{MT}_n{NT}_u{U}_w{WARPS}_b{MINB}_x{KX}(x, w, y, part, done, rows, n, k, x_ld, y_ld, kc, q, q_ld, q_a, q_b):
// grid (ceil(n / (16 NT WARPS)), ceil(k / kc)), 32 WARPS threads, dynamic shared memory two passes of 8 MT rows of
// SK_ROW(FMT, KX) elements (none for KX 0: x read from global memory); registers capped so that MINB blocks fit an SM
#define SKINNY(name, bf16, f32out, fmt, MT, NT, U, WARPS, MINB, KX)                                                 \
    extern "C" __global__ void __launch_bounds__(32 * WARPS, MINB)                                                   \
        name##_m##MT##_n##NT##_u##U##_w##WARPS##_b##MINB##_x##KX(                                                   \
            const unsigned short* x, const void* w, void* y, float* part, unsigned* done, int rows, int n, int k,   \
            long long x_ld, long long y_ld, int kc, const void* q, long long q_ld, int q_a, int q_b) {              \
        skinny_gemm<bf16, f32out, fmt, MT, NT, U, WARPS, (KX ? KX : 512), KX == 0, false>(                          \
            x, w, y, part, done, rows, n, k, x_ld, y_ld, kc, q, q_ld, q_a, q_b);                                    \
    }
// The SiLU form over 16-bit weights (16-bit y): the same arguments, n the gate/up weight's rows (2 q_a), q_a half of
// them, y [rows, q_a] at row stride y_ld, q and q_ld unused
#define SKINNY_SILU(name, bf16, MT, NT, U, WARPS, MINB, KX)                                                         \
    extern "C" __global__ void __launch_bounds__(32 * WARPS, MINB)                                                   \
        name##_m##MT##_n##NT##_u##U##_w##WARPS##_b##MINB##_x##KX(                                                   \
            const unsigned short* x, const void* w, void* y, float* part, unsigned* done, int rows, int n, int k,   \
            long long x_ld, long long y_ld, int kc, const void* q, long long q_ld, int q_a, int q_b) {              \
        skinny_gemm<bf16, false, SK_W16, MT, NT, U, WARPS, (KX ? KX : 512), KX == 0, true>(                         \
            x, w, y, part, done, rows, n, k, x_ld, y_ld, kc, q, q_ld, q_a, q_b);                                    \
    }
// The warpgroup form (sm_90a; int4 groups and e4m3 blocks of 128 inputs or more): the same arguments as SKINNY's; P 1:
// PIPE; R: RING; S 1: XREG (dynamic shared memory: x's two passes, then R stages and an 8-byte mbarrier each a warp)
#define SKINNY_WG(name, bf16, f32out, fmt, MT, NT, U, WARPS, MINB, KX, P, R, S)                                     \
    extern "C" __global__ void __launch_bounds__(32 * WARPS, MINB)                                                   \
        name##_m##MT##_n##NT##_u##U##_w##WARPS##_b##MINB##_x##KX##_p##P##_r##R##_s##S(                              \
            const unsigned short* x, const void* w, void* y, float* part, unsigned* done, int rows, int n, int k,   \
            long long x_ld, long long y_ld, int kc, const void* q, long long q_ld, int q_a, int q_b) {              \
        skinny_wg<bf16, f32out, fmt, MT, NT, U, WARPS, KX, P == 1, R, S == 1>(x, w, y, part, done, rows, n, k,     \
                                                                             x_ld, y_ld, kc, q, q_ld, q_a, q_b);    \
    }
// every type pair of one format and geometry: skinny{,8b,8r,4}_{bf16,f16}_{16,f32}_...
#define SKINNY_TYPES(prefix, fmt, MT, NT, U, WARPS, MINB, KX)                                                       \
    SKINNY(prefix##_bf16_16, true, false, fmt, MT, NT, U, WARPS, MINB, KX)                                          \
    SKINNY(prefix##_bf16_f32, true, true, fmt, MT, NT, U, WARPS, MINB, KX)                                          \
    SKINNY(prefix##_f16_16, false, false, fmt, MT, NT, U, WARPS, MINB, KX)                                          \
    SKINNY(prefix##_f16_f32, false, true, fmt, MT, NT, U, WARPS, MINB, KX)
// The instances: SKINNY_INSTANCES where the includer defines it (fi_engine.kernels.skinny_gemm compiles the ones a
// Dense needs, benchmarks/lab_skinny_gemm.py a sweep), else the engine's geometries (SkinnyGemm's GEOMETRIES) of
// every format, row group and type pair
#ifdef SKINNY_INSTANCES
SKINNY_INSTANCES
#else
#define SKINNY_ROWS(MT)                                                                                             \
    SKINNY_TYPES(skinny, SK_W16, MT, 1, 4, 4, 1, 0) SKINNY_TYPES(skinny, SK_W16, MT, 1, 4, 8, 1, 512)              \
    SKINNY_TYPES(skinny8b, SK_E4M3_BLOCK, MT, 1, 2, 8, 1, 0) SKINNY_TYPES(skinny8b, SK_E4M3_BLOCK, MT, 1, 4, 8, 1, 512) \
    SKINNY_TYPES(skinny8r, SK_E4M3_ROW, MT, 1, 2, 8, 1, 0) SKINNY_TYPES(skinny8r, SK_E4M3_ROW, MT, 1, 4, 8, 1, 512) \
    SKINNY_TYPES(skinny4, SK_INT4, MT, 1, 1, 8, 1, 0) SKINNY_TYPES(skinny4, SK_INT4, MT, 1, 2, 8, 1, 512)        \
    SKINNY_SILU(skinnysilu_bf16_16, true, MT, 1, 4, 4, 1, 0) SKINNY_SILU(skinnysilu_f16_16, false, MT, 1, 4, 4, 1, 0) \
    SKINNY_SILU(skinnysilu_bf16_16, true, MT, 1, 4, 8, 1, 512) SKINNY_SILU(skinnysilu_f16_16, false, MT, 1, 4, 8, 1, 512)
SKINNY_ROWS(1)
SKINNY_ROWS(2)
SKINNY_ROWS(3)
SKINNY_ROWS(4)
// two blocks an SM at 17-32 rows (registers capped at 128, none spilled, as NVRTC's ptxas -v reports for sm_90): e4m3
// row scales staged as above; e4m3 blocks with 2 steps in flight (4 spill); int4 at 25-32 rows only (17-24 spill)
SKINNY_TYPES(skinny8b, SK_E4M3_BLOCK, 3, 1, 2, 8, 2, 512) SKINNY_TYPES(skinny8b, SK_E4M3_BLOCK, 4, 1, 2, 8, 2, 512)
SKINNY_TYPES(skinny8r, SK_E4M3_ROW, 3, 1, 4, 8, 2, 512) SKINNY_TYPES(skinny8r, SK_E4M3_ROW, 4, 1, 4, 8, 2, 512)
SKINNY_TYPES(skinny4, SK_INT4, 4, 1, 2, 8, 2, 512)
// the warpgroup form at 17-32 rows (SkinnyGemm compiles it for sm_90a; here, without wgmma, each traps)
#define SKINNY_WG_TYPES(prefix, fmt, MT, NT, U, WARPS, MINB, KX, P, R, S)                                          \
    SKINNY_WG(prefix##_bf16_16, true, false, fmt, MT, NT, U, WARPS, MINB, KX, P, R, S)                              \
    SKINNY_WG(prefix##_bf16_f32, true, true, fmt, MT, NT, U, WARPS, MINB, KX, P, R, S)                              \
    SKINNY_WG(prefix##_f16_16, false, false, fmt, MT, NT, U, WARPS, MINB, KX, P, R, S)                              \
    SKINNY_WG(prefix##_f16_f32, false, true, fmt, MT, NT, U, WARPS, MINB, KX, P, R, S)
#define SKINNY_WG_ROWS(MT)                                                                                          \
    SKINNY_WG_TYPES(skinnywg4, SK_INT4, MT, 1, 2, 8, 1, 256, 1, 0, 0)                                               \
    SKINNY_WG_TYPES(skinnywg4, SK_INT4, MT, 1, 4, 8, 1, 512, 1, 0, 0)                                               \
    SKINNY_WG_TYPES(skinnywg4, SK_INT4, MT, 2, 2, 4, 2, 256, 1, 2, 1)
SKINNY_WG_ROWS(3)
SKINNY_WG_ROWS(4)
// the e4m3 warpgroup form's candidates (sm_90a), every row group: its geometries (skinny_gemm.py's _WG8), each format's
#define SKINNY_WG8_GEOMETRIES(prefix, fmt, MT)                                                                     \
    SKINNY_WG_TYPES(prefix, fmt, MT, 1, 2, 8, 1, 256, 1, 2, 1)                                                      \
    SKINNY_WG_TYPES(prefix, fmt, MT, 1, 2, 8, 1, 256, 1, 0, 1)                                                      \
    SKINNY_WG_TYPES(prefix, fmt, MT, 1, 2, 4, 2, 256, 1, 2, 1)                                                      \
    SKINNY_WG_TYPES(prefix, fmt, MT, 2, 1, 4, 2, 128, 1, 2, 1)
// e4m3 block scales, row scales, and the W8A8 form (e4m3 weights in blocks of 128 inputs or more times e4m3 x; x
// 16-bit and quantized in the kernel)
#define SKINNY_WG8_ROWS(MT)                                                                                         \
    SKINNY_WG8_GEOMETRIES(skinnywg8b, SK_E4M3_BLOCK, MT)                                                            \
    SKINNY_WG8_GEOMETRIES(skinnywg8r, SK_E4M3_ROW, MT)                                                              \
    SKINNY_WG8_GEOMETRIES(skinnywg8a, SK_E4M3_A8, MT)                                                              \
    SKINNY_WG8_GEOMETRIES(skinnywg8q, SK_E4M3_A8Q, MT)
SKINNY_WG8_ROWS(1)
SKINNY_WG8_ROWS(2)
SKINNY_WG8_ROWS(3)
SKINNY_WG8_ROWS(4)
// W4A8 (int4 weights times x quantized to int8 in the kernel): the e4m3 form's geometries and the int4 form's two
// strips a warp, every row group
#define SKINNY_WG4Q_ROWS(MT)                                                                                        \
    SKINNY_WG8_GEOMETRIES(skinnywg4q, SK_INT4_A8Q, MT)                                                              \
    SKINNY_WG_TYPES(skinnywg4q, SK_INT4_A8Q, MT, 2, 2, 4, 2, 256, 1, 2, 1)
SKINNY_WG4Q_ROWS(1)
SKINNY_WG4Q_ROWS(2)
SKINNY_WG4Q_ROWS(3)
SKINNY_WG4Q_ROWS(4)
#endif
