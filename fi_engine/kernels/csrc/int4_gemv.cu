// Linear layers with int4 weights (AWQ / GPTQ, a scale and a zero per group of inputs) and 16-bit activations
// (W4A16): the weights are read as stored, half a byte each, and decoded in registers into exact 16-bit integers
// (code - zero) that the tensor cores multiply with x; each group's float32 scale multiplies its float32 sums.
#include "convert.cuh"  // fromf
#include "rope_append.cuh"  // RopeAppendArgs, rope_append_pair: the RoPE form's epilogue (FlashInfer's arithmetic)
#include "griddep.cuh"  // griddep_wait, griddep_launch_dependents
#include "load_weights.cuh"  // load_weights: past L1
#include "fp8_tensor_cores.cuh"  // mma16816 (the FP8 GEMV's m16n8k16 mma; its e4m3 helpers are unused here)

#include "int4_decode.cuh"  // the layout, i4_half_zsub, i4_scale, i4_neg_zero
#include "rms_rows.cuh"  // rows_rcp (norm_fold.cuh's)
#include "norm_fold.cuh"  // NormFold, FOLD_OUT / FOLD_IN: the norm between two GEMVs folded into them

#define I4_MAX_WARPS 16
#ifndef I4_LEAN_LOOP
#define I4_LEAN_LOOP 0  // Int4Linears.lean_loop
#endif

// the loads of TPL tiles from `tile` on (those < tiles): each tile's two weight vectors (rows a, b: wa points at
// tile `tile`'s row a, row b's is half a tile further) into v[2 u ..], its records into r[4 u ..] (G64: row a's
// halves, then row b's; else one a row, r[4 u], r[4 u + 2]); weights and records are constants
template <int TPL, bool G64>
__device__ __forceinline__ void i4_load(uint4* v, unsigned* r, const uint4* wa, const unsigned* ra, const unsigned* rb,
                                        int tile, int tiles, int gshift) {
#pragma unroll
    for (int u = 0; u < TPL; ++u) {
        if (tile + u < tiles) {
            v[2 * u] = load_weights(wa + I4_TILE_VECS * u);
            v[2 * u + 1] = load_weights(wa + I4_TILE_VECS / 2 + I4_TILE_VECS * u);
            if (G64) {
                const uint2 pa = __ldg(reinterpret_cast<const uint2*>(ra) + tile + u);
                const uint2 pb = __ldg(reinterpret_cast<const uint2*>(rb) + tile + u);
                r[4 * u] = pa.x, r[4 * u + 1] = pa.y, r[4 * u + 2] = pb.x, r[4 * u + 3] = pb.y;
            } else {
                r[4 * u] = __ldg(ra + ((2 * (tile + u)) >> gshift));
                r[4 * u + 2] = __ldg(rb + ((2 * (tile + u)) >> gshift));
            }
        }
    }
}

// the lean loop's sums of one tile (I4_LEAN_LOOP) into acc: the lane's weight vectors v[0] (row g), v[1] (row g + 8)
// and their records r[0..3] (as i4_load leaves them), x's NT row groups at xt[i]; each record's -(M + zero) pair in
// two instructions (i4_neg_zero2). (The plain loop's body below, kept as it was, so that its machine code stays the
// same until a GPU has timed the two: the loop that loses goes, and with it one of the two.)
template <bool BF16, int NT, bool G64>
__device__ __forceinline__ void i4_lean_tile(float (&acc)[NT][4], const uint4 (&v)[2], const unsigned (&r)[4],
                                             const uint4* const (&xt)[NT]) {
    const unsigned* ua = reinterpret_cast<const unsigned*>(&v[0]);
    const unsigned* ub = reinterpret_cast<const unsigned*>(&v[1]);
    const float sa[2] = {i4_scale(r[0]), G64 ? i4_scale(r[1]) : i4_scale(r[0])};
    const float sb[2] = {i4_scale(r[2]), G64 ? i4_scale(r[3]) : i4_scale(r[2])};
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        uint4 xq[NT][2];
#pragma unroll
        for (int i = 0; i < NT; ++i) xq[i][0] = __ldg(xt[i] + 8 * h), xq[i][1] = __ldg(xt[i] + 8 * h + 1);
        i4_half_zsub<BF16, NT>(acc, ua[2 * h], ua[2 * h + 1], ub[2 * h], ub[2 * h + 1], xq, sa[h],
                               i4_neg_zero2<BF16>(r[G64 ? h : 0]), sb[h], i4_neg_zero2<BF16>(r[2 + (G64 ? h : 0)]));
    }
}

// y[r, j] = sum_c x[r, c] * (code[j, c] - zero[j, g(c)]) * scale[j, g(c)] for r < rows <= 8 NT: x [rows, k] 16-bit
// (row stride x_ld), y [rows, n] 16-bit or float32 (row stride y_ld). A block serves 16 output columns (the mma's
// m); its warps take runs of TPL tiles in turn (warp w the run w, w + warps, ...), each run's weights and records
// loaded while the run before is summed. Lane (g, t) (g = lane / 4, t = lane % 4) decodes its 16 bytes of rows
// j0 + g and j0 + g + 8 per tile and multiplies them with x's rows 8 i + g (the mma's n; past rows, x's last row)
// for each of NT groups of 8 rows, so each weight is decoded once for all rows. A half tile (64 inputs) lies in one
// group: its sums, the zero already subtracted from each code, meet the group's scale in float32; the warps' sums meet
// in shared memory and y is rounded once. G64: groups of 64 (two records a tile), else of 128 or more (one). k a
// multiple of 128; x, w, x_ld 16-byte aligned (the caller checks).
// FOLD (norm_fold.cuh; one group of rows, 16-bit y): FOLD_OUT stores h_out and xn with y (f: h, nw, h_out, xn; y's
// row stride); FOLD_IN multiplies each sum by its row's factor, block 0 of the grid computing them (f: h and y of
// the first GEMV, x's row stride, the counters, the factors, eps), the GEMV blocks 1, 2, ... serving 16 columns each.
// ROPE (one group of rows, 16-bit y = qkv [rows, (hq + 2 hk) d]): FlashInfer's RoPE and KV append as the epilogue
// (rope_append.cuh; a: their arguments). Block b serves the columns 16 m .. 16 m + 15 of both halves of head b / (d /
// 32) (m = b % (d / 32)), so that each pair (i, i + d / 2) the rotation takes lies in one lane: the first half of
// its warps sums the first half's tile as the plain GEMV's warps do, the second half the other (launched with twice
// the plain launch's warps, each column's sums are the plain GEMV's, in its order: the same bits).
template <bool BF16, bool F32OUT, int NT, int TPL, bool G64, bool SILU, int FOLD = FOLD_NONE, bool ROPE = false>
__device__ __forceinline__ void gemv4_tc(const unsigned short* __restrict__ x, const unsigned char* __restrict__ w,
                                         void* __restrict__ y, int rows, int n, int k, long long x_ld,
                                         long long y_ld, const unsigned* __restrict__ rec, int groups, int gshift,
                                         int half_n, NormFold f = NormFold(), RopeAppendArgs a = RopeAppendArgs()) {
#if __CUDA_ARCH__ >= 800
    static_assert(FOLD == FOLD_NONE || (NT == 1 && !F32OUT), "the fold forms serve one group of rows, 16-bit y");
    static_assert(!ROPE || (NT == 1 && !F32OUT && !SILU && FOLD == FOLD_NONE), "the RoPE form: 8 rows, 16-bit y");
    __shared__ float part[ROPE ? 2 * I4_MAX_WARPS : I4_MAX_WARPS][32][4 * NT];
    griddep_launch_dependents();
    if (FOLD == FOLD_IN && blockIdx.x == 0) {
        fold_block<BF16, 8>(f, rows, k, x_ld);
        return;
    }
    const unsigned long long ticket = FOLD == FOLD_IN ? fold_ticket(f) : 0ull;
    const int block = (int)blockIdx.x - (FOLD == FOLD_IN);  // the block's 16 columns (ROPE: 16 of each half of a head)
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int warps = ROPE ? blockDim.x >> 6 : blockDim.x >> 5;  // the warps that share a tile of 16 columns
    const int tile_warp = ROPE ? warp % warps : warp;
    const int g = lane >> 2, t = lane & 3;
    const int per_head = ROPE ? (int)(a.d >> 5) : 1;  // (ROPE: the blocks of a head)
    const int j0 = ROPE ? (block / per_head) * (int)a.d + 16 * (block % per_head) + (warp >= warps) * (int)(a.d >> 1)
                        : block * 16;
    // a last partial tile's records repeat its last row's (its rows past n are zero codes; their sums never stored)
    const int ja = min(j0 + g, n - 1), jb = min(j0 + g + 8, n - 1);
    const int tiles = k >> 7;
    // row g of strip j0 / 16 (j0 a multiple of 16), lane t's 16 bytes; row g + 8's are 512 bytes (I4_TILE_VECS / 2
    // vectors) further in each tile
    const uint4* wa = reinterpret_cast<const uint4*>(w) + (long long)(j0 >> 4) * tiles * I4_TILE_VECS + 4 * g + t;
    const unsigned* ra = rec + (long long)ja * groups;
    const unsigned* rb = rec + (long long)jb * groups;
    const uint4* xr[NT];  // x row 8 i + g at input 16 t (its last row for the rows past it: sums never stored)
#pragma unroll
    for (int i = 0; i < NT; ++i)
        xr[i] = reinterpret_cast<const uint4*>(x + (long long)min(8 * i + g, rows - 1) * x_ld) + 2 * t;
    float acc[NT][4];
#pragma unroll
    for (int i = 0; i < NT; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[i][e] = 0.f;
    uint4 cv[2 * TPL];
    unsigned cr[4 * TPL];
    // I4_LEAN_LOOP (Int4Linears.lean_loop): runs of one tile up to 16 rows, the plain, SiLU and RoPE forms
    constexpr bool LEAN = I4_LEAN_LOOP && TPL == 1 && NT <= 2 && FOLD == FOLD_NONE;
    int tile = tile_warp * TPL;
    const int step = warps * TPL;  // the tiles from one run of a warp to its next
    // the lane's weights and x at its run, moved a run at a time (rebuilt from the block's columns each tile, as
    // ptxas does from the expressions, their addresses took about 30 instructions a tile)
    const uint4* pa = wa + I4_TILE_VECS * tile;
    const uint4* xt[NT];
#pragma unroll
    for (int i = 0; i < NT; ++i) xt[i] = xr[i] + 16 * tile;
    if (tile < tiles) i4_load<TPL, G64>(cv, cr, pa, ra, rb, tile, tiles, gshift);
    griddep_wait();  // x may be the previous kernel's output; the weights and records are constants
    if constexpr (LEAN) {
        // two sets of registers in turn, each loaded while the other is summed, so none is copied between runs (the
        // plain loop's copies took 10 instructions a tile); the loop's condition already says the tile exists
        uint4 nv[2];
        unsigned nr[4];
        const auto run = [&](const uint4(&v)[2], const unsigned(&r)[4], uint4(&next_v)[2], unsigned(&next_r)[4]) {
            const int next = tile + step;
            if (next < tiles) i4_load<1, G64>(next_v, next_r, pa + I4_TILE_VECS * step, ra, rb, next, tiles, gshift);
            i4_lean_tile<BF16, NT, G64>(acc, v, r, xt);
#pragma unroll
            for (int i = 0; i < NT; ++i) xt[i] += 16 * step;
            pa += I4_TILE_VECS * step, tile = next;
        };
        while (tile < tiles) {
            run(cv, cr, nv, nr);
            if (tile >= tiles) break;
            run(nv, nr, cv, cr);
        }
    }
    while (!LEAN && tile < tiles) {
        const int next = tile + step;
        const uint4* na = pa + I4_TILE_VECS * step;
        uint4 nv[2 * TPL];
        unsigned nr[4 * TPL];
        if (next < tiles) i4_load<TPL, G64>(nv, nr, na, ra, rb, next, tiles, gshift);
#pragma unroll
        for (int u = 0; u < TPL; ++u) {
            if (tile + u < tiles) {
                const unsigned* ua = reinterpret_cast<const unsigned*>(&cv[2 * u]);
                const unsigned* ub = reinterpret_cast<const unsigned*>(&cv[2 * u + 1]);
                float sa[2], sb[2];
                sa[0] = i4_scale(cr[4 * u]);
                sb[0] = i4_scale(cr[4 * u + 2]);
                sa[1] = G64 ? i4_scale(cr[4 * u + 1]) : sa[0];
                sb[1] = G64 ? i4_scale(cr[4 * u + 3]) : sb[0];
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    uint4 xq[NT][2];  // the half's x values: row group, 8 inputs (loaded a half at a time: registers)
#pragma unroll
                    for (int i = 0; i < NT; ++i) {
                        // a lane past the rows loads x's last row (xr), not zeros: its sums go to outputs of rows
                        // past `rows`, which no epilogue stores (and zeros cost an instruction a register)
                        const uint4* xp = xt[i] + 16 * u + 8 * h;
                        xq[i][0] = __ldg(xp);
                        xq[i][1] = __ldg(xp + 1);
                    }
                    // the zero subtracted from each pair (the records of half h: G64 two a tile, else one): at 1-16
                    // rows too, where an mma of ones a step had been thought cheaper, this took 1-15 % less time
                    i4_half_zsub<BF16, NT>(acc, ua[2 * h], ua[2 * h + 1], ub[2 * h], ub[2 * h + 1], xq, sa[h],
                                           i4_neg_zero<BF16>(cr[4 * u + (G64 ? h : 0)]), sb[h],
                                           i4_neg_zero<BF16>(cr[4 * u + 2 + (G64 ? h : 0)]));
                }
            }
        }
#pragma unroll
        for (int u = 0; u < 2 * TPL; ++u) cv[u] = nv[u];
#pragma unroll
        for (int u = 0; u < 4 * TPL; ++u) cr[u] = nr[u];
#pragma unroll
        for (int i = 0; i < NT; ++i) xt[i] += 16 * step;
        pa = na, tile = next;
    }
#pragma unroll
    for (int i = 0; i < NT; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) part[warp][lane][4 * i + e] = acc[i][e];
    __syncthreads();
    __shared__ float rcp[8];  // FOLD_IN: the rows' norm factors
    if (FOLD == FOLD_IN) fold_factors<BF16, 8>(f, ticket, rows, k, x_ld, rcp);
    if (ROPE && warp == 0) {  // accumulator e: column 16 m + g (+ 8 for e >= 2) of each half, x row 2 t + (e & 1)
        unsigned short* y16 = reinterpret_cast<unsigned short*>(y);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            float s0 = 0.f, s1 = 0.f;
            for (int p = 0; p < warps; ++p) s0 += part[p][lane][e];
            for (int p = 0; p < warps; ++p) s1 += part[warps + p][lane][e];
            const int r = 2 * t + (e & 1);
            const unsigned i = 16 * (block % per_head) + g + 8 * (e >> 1);
            if (r < rows) rope_append_pair<BF16>(fromf<BF16>(s0), fromf<BF16>(s1), block / per_head, i, r, y16, y_ld, a);
        }
    }
    if (!ROPE && warp == 0) {
        // accumulator (i, e): stored row j0 + g (+ 8 for e >= 2), x row 8 i + 2 t + (e & 1); its output column j,
        // or with half_n (gate and up interleaved by 8 rows) the gate's column 8 blockIdx + g, the up's half_n more
#pragma unroll
        for (int i = 0; i < NT; ++i) {
            float s[4];
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                s[e] = 0.f;
                for (int p = 0; p < warps; ++p) s[e] += part[p][lane][4 * i + e];
                if (FOLD == FOLD_IN) s[e] *= rcp[2 * t + (e & 1)];  // (NT 1: x row 2 t + (e & 1))
            }
            if (SILU) {  // y [rows, half_n]: FlashInfer's silu_and_mul of the outputs as the plain GEMV rounds them
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int r = 8 * i + 2 * t + e;
                    if (r < rows) {
                        const float gate = tof<BF16>(fromf<BF16>(s[e])), up = tof<BF16>(fromf<BF16>(s[e + 2]));
                        reinterpret_cast<unsigned short*>(y)[r * y_ld + 8 * (unsigned)block + g] =
                            fromf<BF16>(__fdividef(gate, 1.0f + __expf(-gate)) * up);
                    }
                }
                continue;
            }
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int j = j0 + g + (e >> 1) * 8, r = 8 * i + 2 * t + (e & 1);
                const int jo = half_n ? 8 * block + g + (e >> 1) * half_n : j;
                if (j < n && r < rows) {
                    unsigned short* y16 = reinterpret_cast<unsigned short*>(y);
                    if (F32OUT) reinterpret_cast<float*>(y)[r * y_ld + jo] = s[e];
                    else if (FOLD == FOLD_OUT) y16[r * y_ld + jo] = fold_out<BF16>(f, r * y_ld + jo, jo, s[e]);
                    else y16[r * y_ld + jo] = fromf<BF16>(s[e]);
                }
            }
        }
    }
#endif
}

// I4_TILES_AHEAD (Int4Linears.options): the tiles of a warp's run, loaded while the run before is summed, up to 16
// rows; 32 rows take runs of 1 (their registers)
#define GEMV4(name, bf16, f32out, nt, g64, silu)                                                                    \
    extern "C" __global__ void __launch_bounds__(32 * I4_MAX_WARPS)                                                \
        name(const unsigned short* x, const unsigned char* w, void* y, int rows, int n, int k, long long x_ld,     \
             long long y_ld, const unsigned* rec, int groups, int gshift, int half_n) {                            \
        gemv4_tc<bf16, f32out, nt, nt == 4 ? 1 : I4_TILES_AHEAD, g64, silu>(x, w, y, rows, n, k, x_ld, y_ld, rec,  \
                                                                              groups, gshift, half_n);             \
    }
#define GEMV4_ROWS(t, bf16, out, f32out, silu)                                                                      \
    GEMV4(gemv4_##t##_##out##_8, bf16, f32out, 1, false, silu)                                                      \
    GEMV4(gemv4_##t##_##out##_16, bf16, f32out, 2, false, silu)                                                     \
    GEMV4(gemv4_##t##_##out##_32, bf16, f32out, 4, false, silu)                                                     \
    GEMV4(gemv4_##t##_##out##_8_g64, bf16, f32out, 1, true, silu)                                                   \
    GEMV4(gemv4_##t##_##out##_16_g64, bf16, f32out, 2, true, silu)                                                  \
    GEMV4(gemv4_##t##_##out##_32_g64, bf16, f32out, 4, true, silu)
GEMV4_ROWS(bf16, true, bf16, false, false)
GEMV4_ROWS(bf16, true, f32, true, false)
GEMV4_ROWS(f16, false, f16, false, false)
GEMV4_ROWS(f16, false, f32, true, false)
// SiLU as the epilogue: w holds gate and up interleaved by 8 rows (half_n each), y [rows, half_n] 16-bit
GEMV4_ROWS(bf16, true, silu, false, true)
GEMV4_ROWS(f16, false, silu, false, true)

// The fold forms (norm_fold.cuh), one group of rows (up to 8), 16-bit y: gemv4_<t>_<t>_8[_g64]_fold_out (the o and
// down GEMVs: y, h_out and xn), gemv4_<t>_<t>_8[_g64]_fold_in (QKV) and gemv4_<t>_silu_8[_g64]_fold_in (gate/up,
// interleaved) over xn, times the rows' factors; the FOLD_IN launches take one block more than the GEMV's
#define GEMV4F(name, bf16, g64, silu, fold)                                                                         \
    extern "C" __global__ void __launch_bounds__(32 * I4_MAX_WARPS)                                                \
        name(const unsigned short* x, const unsigned char* w, void* y, int rows, int n, int k, long long x_ld,     \
             long long y_ld, const unsigned* rec, int groups, int gshift, int half_n, NORM_FOLD_PARAMS) {          \
        gemv4_tc<bf16, false, 1, I4_TILES_AHEAD, g64, silu, fold>(x, w, y, rows, n, k, x_ld, y_ld, rec, groups,    \
                                                                  gshift, half_n, NORM_FOLD_ARGS);                 \
    }
#define GEMV4_FOLDS(t, bf16, g64, suffix)                                                                           \
    GEMV4F(gemv4_##t##_##t##_8##suffix##_fold_out, bf16, g64, false, FOLD_OUT)                                      \
    GEMV4F(gemv4_##t##_##t##_8##suffix##_fold_in, bf16, g64, false, FOLD_IN)                                        \
    GEMV4F(gemv4_##t##_silu_8##suffix##_fold_in, bf16, g64, true, FOLD_IN)
GEMV4_FOLDS(bf16, true, false, )
GEMV4_FOLDS(bf16, true, true, _g64)
GEMV4_FOLDS(f16, false, false, )
GEMV4_FOLDS(f16, false, true, _g64)

// The RoPE form (gemv4_tc's ROPE), up to 8 rows: gemv4_<t>_rope_8[_g64] over the QKV weight, y = qkv (16-bit), the
// caches written too; a grid of n / 32 blocks of twice the plain launch's warps (up to 32)
#define GEMV4R(name, bf16, g64)                                                                                     \
    extern "C" __global__ void __launch_bounds__(64 * I4_MAX_WARPS)                                                \
        name(const unsigned short* x, const unsigned char* w, void* y, int rows, int n, int k, long long x_ld,     \
             long long y_ld, const unsigned* rec, int groups, int gshift, int half_n, ROPE_APPEND_PARAMS) {        \
        gemv4_tc<bf16, false, 1, I4_TILES_AHEAD, g64, false, FOLD_NONE, true>(                                     \
            x, w, y, rows, n, k, x_ld, y_ld, rec, groups, gshift, half_n, NormFold(), ROPE_APPEND_ARGS);           \
    }
GEMV4R(gemv4_bf16_rope_8, true, false)
GEMV4R(gemv4_bf16_rope_8_g64, true, true)
GEMV4R(gemv4_f16_rope_8, false, false)
GEMV4R(gemv4_f16_rope_8_g64, false, true)

// out [n, k] 16-bit = (code - zero) * scale, each product exact in float32 and rounded once to nearest even: the
// weight a 16-bit GEMM of many rows reads. A grid-stride loop over the layout's 16-byte lane vectors (32 weights
// each, in storage order: strip, tile, row of the strip, lane t), rows past n skipped; k a multiple of 128, w and out
// 16-byte aligned.
template <bool BF16>
__device__ __forceinline__ void dequant_i4(const unsigned char* __restrict__ w, const unsigned* __restrict__ rec,
                                           unsigned short* __restrict__ out, long long n, int k, int groups,
                                           int gshift, int half_n) {
    const int tiles = k >> 7;
    const long long total = ((n + 15) >> 4) * tiles * I4_TILE_VECS;
    for (long long v = blockIdx.x * (long long)blockDim.x + threadIdx.x; v < total;
         v += (long long)gridDim.x * blockDim.x) {
        const int t = (int)(v & 3), r = (int)((v >> 2) & 15);
        const long long st = v >> 6, strip = st / tiles;
        const int tile = (int)(st - strip * tiles);
        const long long j = 16 * strip + r;
        if (j >= n) continue;  // (the last strip's rows past n)
        // its output row: j, or with half_n (gate and up interleaved by 8 rows) the gate's or the up's own
        const long long jo = half_n ? (j >> 4) * 8 + (j & 7) + ((j >> 3) & 1) * half_n : j;
        const uint4 q = load_weights(reinterpret_cast<const uint4*>(w) + v);
        const unsigned* words = reinterpret_cast<const unsigned*>(&q);
#pragma unroll
        for (int word = 0; word < 4; ++word) {
            const int half = word >> 1;
            const unsigned rc = __ldg(rec + j * groups + ((2 * tile + half) >> gshift));
            const float s = __uint_as_float(rc & 0xffffff00u), z = (float)(rc & 0xffu);
            // inputs 128 tile + 64 half + 16 t + 4 q + e, q = 2 (word & 1) + step
            unsigned short* at = out + jo * k + 128 * tile + 64 * half + 16 * t + 8 * (word & 1);
#pragma unroll
            for (int step = 0; step < 2; ++step) {
                // e = 0, 1, 2, 3 in fields 2 step, 2 step + 4, 2 step + 1, 2 step + 5
                const unsigned u = words[word] >> (8 * step);
                unsigned short e[4];
                e[0] = fromf<BF16>(((float)(u & 0xfu) - z) * s);
                e[1] = fromf<BF16>(((float)((u >> 16) & 0xfu) - z) * s);
                e[2] = fromf<BF16>(((float)((u >> 4) & 0xfu) - z) * s);
                e[3] = fromf<BF16>(((float)((u >> 20) & 0xfu) - z) * s);
                uint2 o;
                o.x = (unsigned)e[0] | ((unsigned)e[1] << 16);
                o.y = (unsigned)e[2] | ((unsigned)e[3] << 16);
                *reinterpret_cast<uint2*>(at + 4 * step) = o;
            }
        }
    }
}
extern "C" __global__ void dequant_int4_bf16(const unsigned char* w, const unsigned* rec, unsigned short* out,
                                             long long n, int k, int groups, int gshift, int half_n) {
    dequant_i4<true>(w, rec, out, n, k, groups, gshift, half_n);
}
extern "C" __global__ void dequant_int4_f16(const unsigned char* w, const unsigned* rec, unsigned short* out,
                                            long long n, int k, int groups, int gshift, int half_n) {
    dequant_i4<false>(w, rec, out, n, k, groups, gshift, half_n);
}
