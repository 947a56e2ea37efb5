// The grouped GEMV of a mixture-of-experts decode step over e4m3 expert weights read as stored (W8A16), on tensor
// cores (SM 8.0+; empty kernels below): grouped_gemv.cu's grid and staging with gemv8_tc's decoding and mma.
#include "convert.cuh"  // h2f, b2f, f2h, f2b, tof, fromf
#include "load_weights.cuh"  // load_weights: past L1
#include "griddep.cuh"  // griddep_wait (tc_sums'), unused here
#include "fp8_decode.cuh"  // e4m3x16_int (dequant_rows')
#include "fp8_tensor_cores.cuh"  // e4m3_pair, prmt, mma16816, tc_load, tc_chunk
#include "fp8_dequant.cuh"  // dequant_e4m3_{bf16,f16}: the experts as a 16-bit copy, for grouped GEMMs of many rows
#include "stage_rows.cuh"  // stage_rows, LIST_ASSIGNMENTS_OR_RETURN, SUM_TILE, next_chunk, shift_chunks
#define MAX_ASSIGN 1024

#ifndef G8_AHEAD  // chunks of weights a warp loads ahead of the one it sums (Fp8GroupedGemv.chunks_ahead)
#define G8_AHEAD 2
#endif
#ifndef G8_MIN_BLOCKS  // blocks of 512 threads an SM the registers must allow (Fp8GroupedGemv.min_blocks_per_sm)
#define G8_MIN_BLOCKS 1
#endif

// y[a, j] = sum_c in[a / div, c] * W[experts[a], j, c] * scale(experts[a], j, c) for a < A: W [E, n, k] e4m3
// (row-major per expert), in and y 16-bit rows (strides in_ld, y_ld elements). Scales of expert e start at
// scale + e * s_e: BLOCK false, scale(e, j, c) = that row's [j], applied to the whole sum; BLOCK true,
// [(j / bn) * s_ld + (c >> (4 + shift))] (blocks of bn rows, a multiple of 16, and 16 << shift columns, a multiple
// of 128), applied to each 128-column chunk's sum. Grid (blocks per expert, E), W warps a block (blockDim / 32,
// at most 16). A block lists its expert's assignments (none: it returns, the weights unread), stages up to R of
// their input rows in shared memory (R <= 8, the mma's n; GATED: silu(gate) * up, stage_rows.cuh), then walks the
// expert's tiles of 16 weight rows, blockIdx.x, blockIdx.x + gridDim.x, ...: warp v sums the chunks of 128 of k at
// 128 v, 128 (v + W), ... of the tile as gemv8_tc does (lane (g, t): weight rows j0 + g and j0 + g + 8, staged row
// g; the staged rows in the order the mma's B fragments take), with the next G8_AHEAD chunks loading -- the next
// tile's first once this tile's are all loading -- while it sums one; the warps' sums meet in shared memory and
// warp 0 writes y, rounded once. More than R assignments take further passes. TILED: W in tiled_layout's order
// (fp8_moe_gemv.py: per tile of 16 rows and chunk of 128 columns, 4 runs of 512 bytes, lane l's 16 bytes at 16 l of
// each: run q holds what tc_load's v[q] reads), n a multiple of 16 and k of 128.
// Dynamic shared memory: R * k * 2 bytes of staged rows, then W * 512 bytes of the warps' sums. k a multiple of 16;
// w, in, in_ld 16-byte aligned.
template <bool BF16, bool GATED, bool BLOCK, bool TILED>
__device__ __forceinline__ void grouped_gemv8(const unsigned short* __restrict__ in, long long in_ld, int div,
                                              const int* __restrict__ experts, int A,
                                              const unsigned char* __restrict__ w, int n, int k,
                                              const float* __restrict__ scale, long long s_e, long long s_ld,
                                              int bn, int shift, unsigned short* __restrict__ y, long long y_ld,
                                              int R) {
#if __CUDA_ARCH__ >= 800
    extern __shared__ uint4 sx[];
    LIST_ASSIGNMENTS_OR_RETURN(experts, A);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int vecs = k >> 3;  // 16-byte vectors of a staged row
    float* part = reinterpret_cast<float*>(sx + (long long)R * vecs);  // [warps][32 lanes][4 sums]
    const unsigned char* we = w + (long long)blockIdx.y * n * k;
    const float* se = scale + (long long)blockIdx.y * s_e;
    const int tiles = (n + 15) >> 4, stride = warps * 128, at0 = warp * 128;
    const uint4 z = make_uint4(0u, 0u, 0u, 0u);
    for (int base = 0; base < c_all; base += R) {
        const int rows = min(R, c_all - base);
        if (base) __syncthreads();  // the last pass is done with the staged rows
        stage_rows<BF16, GATED, true>(sx, in, in_ld, div, list, base, rows, vecs);
        __syncthreads();
        const unsigned short* xr = reinterpret_cast<const unsigned short*>(sx) + (long long)min(g, rows - 1) * k + 16 * t;
        // this warp's work: the block's tiles in turn, chunks at0, at0 + stride, ... < k of each (nc of them), loaded
        // G8_AHEAD chunks ahead, the next tile's first while this tile's last are summed
        const int nc = at0 < k ? (k - at0 + stride - 1) / stride : 0;
        const int my_tiles = blockIdx.x < tiles ? (tiles - blockIdx.x + gridDim.x - 1) / gridDim.x : 0;
        int lt = 0, lc = 0;  // the next chunk to load: the block's tile lt, chunk lc
        auto load_next = [&](uint4* v) {
            if (lt >= my_tiles || nc == 0) return;
            const int tile = blockIdx.x + lt * gridDim.x;
            if (TILED) {  // the tile's chunk: 4 runs of 512 bytes, lane l's 16 bytes at 16 l of each
                const uint4* at = reinterpret_cast<const uint4*>(we + ((long long)tile * (k >> 7) + (at0 >> 7) +
                                                                     lc * (stride >> 7)) * 2048) + lane;
#pragma unroll
                for (int q = 0; q < 4; ++q) v[q] = load_weights(at + 32 * q);
            } else {
                const int row = tile * 16 + g;  // a last partial tile repeats its last row
                tc_load(v, we + (long long)min(row, n - 1) * k + 16 * t, we + (long long)min(row + 8, n - 1) * k + 16 * t,
                        at0 + lc * stride, t, k);
            }
            next_chunk(lt, lc, nc);
        };
        uint4 buf[G8_AHEAD + 1][4];
#pragma unroll
        for (int b = 0; b < G8_AHEAD; ++b) load_next(buf[b]);
        for (int ti = 0; ti < my_tiles; ++ti) {
            const int j0 = (blockIdx.x + ti * gridDim.x) * 16;
            const float* srow = BLOCK ? se + (long long)(j0 / bn) * s_ld : se;  // (the tile inside one scale block)
            float acc[4] = {0.f, 0.f, 0.f, 0.f};
            for (int c = 0, at = at0; c < nc; ++c, at += stride) {
                load_next(buf[G8_AHEAD]);
                uint4 xq[4];
                const bool lo = g < rows && at + 16 * t + 16 <= k, hi = g < rows && at + 80 + 16 * t <= k;
                const uint4* xp = reinterpret_cast<const uint4*>(xr + at);
                xq[0] = lo ? xp[0] : z;
                xq[1] = lo ? xp[1] : z;
                xq[2] = hi ? xp[8] : z;
                xq[3] = hi ? xp[9] : z;
                float cs[4] = {0.f, 0.f, 0.f, 0.f};
                tc_chunk<BF16, true>(buf[0], xq, cs);  // the staged rows are PAIRED
                const float s = BLOCK ? __ldg(srow + (at >> (4 + shift))) : 1.f;
#pragma unroll
                for (int i = 0; i < 4; ++i) acc[i] = BLOCK ? fmaf(s, cs[i], acc[i]) : acc[i] + cs[i];
                shift_chunks(buf);
            }
            SUM_TILE(part, acc, warp, warps, lane, g, t, j0,
                if (j < n && r < rows) {
                    if (!BLOCK) v *= __ldg(se + j);
                    y[(long long)list[base + r] * y_ld + j] = fromf<BF16>(v);
                })
        }
    }
#endif
}

#define GROUPED8(name, bf16, gated, block, tiled)                                                                  \
    extern "C" __global__ void __launch_bounds__(512, G8_MIN_BLOCKS)                                               \
        name(const unsigned short* in, long long in_ld, int div, const int* experts, int A, const unsigned char* w, \
             int n, int k, const float* scale, long long s_e, long long s_ld, int bn, int shift, unsigned short* y,  \
             long long y_ld, int R) {                                                                               \
        grouped_gemv8<bf16, gated, block, tiled>(in, in_ld, div, experts, A, w, n, k, scale, s_e, s_ld, bn, shift, \
                                                 y, y_ld, R);                                                      \
    }
GROUPED8(grouped_gemv8_bf16_row, true, false, false, false)
GROUPED8(grouped_gemv8_bf16_row_silu, true, true, false, false)
GROUPED8(grouped_gemv8_bf16_block, true, false, true, false)
GROUPED8(grouped_gemv8_bf16_block_silu, true, true, true, false)
GROUPED8(grouped_gemv8_f16_row, false, false, false, false)
GROUPED8(grouped_gemv8_f16_row_silu, false, true, false, false)
GROUPED8(grouped_gemv8_f16_block, false, false, true, false)
GROUPED8(grouped_gemv8_f16_block_silu, false, true, true, false)
GROUPED8(grouped_gemv8_bf16_row_tiled, true, false, false, true)
GROUPED8(grouped_gemv8_bf16_row_silu_tiled, true, true, false, true)
GROUPED8(grouped_gemv8_bf16_block_tiled, true, false, true, true)
GROUPED8(grouped_gemv8_bf16_block_silu_tiled, true, true, true, true)
GROUPED8(grouped_gemv8_f16_row_tiled, false, false, false, true)
GROUPED8(grouped_gemv8_f16_row_silu_tiled, false, true, false, true)
GROUPED8(grouped_gemv8_f16_block_tiled, false, false, true, true)
GROUPED8(grouped_gemv8_f16_block_silu_tiled, false, true, true, true)

// The tiled experts' 16-bit copy (dequant_e4m3_{bf16,f16} of fp8_dequant.cuh read the row-major layout)
extern "C" __global__ void dequant_e4m3_bf16_tiled(const unsigned char* w, unsigned short* out, long long n, int k,
                                                   const float* scale, long long s_ld, int bn, int shift, int block) {
    dequant_rows<true, true>(w, out, n, k, scale, s_ld, bn, shift, block);
}
extern "C" __global__ void dequant_e4m3_f16_tiled(const unsigned char* w, unsigned short* out, long long n, int k,
                                                  const float* scale, long long s_ld, int bn, int shift, int block) {
    dequant_rows<false, true>(w, out, n, k, scale, s_ld, bn, shift, block);
}
