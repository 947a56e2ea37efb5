// The grouped GEMV of a mixture-of-experts decode step over MXFP4 expert weights read as stored (W4A16: e2m1 values,
// one e8m0 scale per 32), on tensor cores (SM 8.0+; empty kernels below): grouped_gemv8.cu's grid, listing and
// staging with a decoding of its own, the experts' biases added as the sums are written, and gpt-oss's clamped
// SwiGLU (or SiLU-and-mul) made as the down projection stages its rows.
//
// The layout (mxfp4_moe_gemv.py, tiled_mxfp4, writes it; k_pad: k rounded up to 128, the padding zero codes): per
// expert, per tile T of 16 weight rows and chunk C of 128 columns, 1,024 bytes of codes -- two runs of 512, lane
// l = 4 g + t's 16 bytes at 16 l of each, 4 words: word v of run u holds row g + 8 (v & 1) of the chunk's 32-column
// block b = 2 u + (v >> 1) -- and 64 bytes of scales, lane group g's 8 at 8 g: row g's blocks 0-3, then row g + 8's.
// A word holds 8 values of its row, those lane t multiplies: pair q (0-3) is columns 2t, 2t + 1 of the block plus
// 0, 8, 16, 24 for q = 0, 1, 2, 3; the first value of pair q is in the low half, the second in the high half, each
// as its code's 3 magnitude bits (mantissa, then the 2 exponent bits) at bit 3q of the half and its sign at bit
// 12 + q. So e2m1_pair<q> makes the pair's float16 bits with two shifts and masks (the magnitude bits land on the
// float16's top mantissa bit and lowest two exponent bits, the sign on the sign): each value times 2**-14, exactly,
// the e2m1 subnormal (0.5) included. The 32-column block's two mma take pairs 0, 1 and 2, 3; their float32 sums
// take the block's scale 2**(s - 127) times 2**14 (s <= 240: tiled_mxfp4 refuses larger, whose values pass 2**113).
// The input rows are staged as float16 (bfloat16 converted, exact within float16's range; clamped to +-65504), each
// 32-column block's values in the order lane t reads its 16 bytes (2t, 2t + 1, 2t + 8, 2t + 9, then the same + 16):
// the two B fragments of both mma in one load.
#include "convert.cuh"  // h2f, b2f, f2h, f2b, tof, fromf
#include "load_weights.cuh"  // load_weights: past L1
#include "griddep.cuh"  // griddep_wait (tc_sums'), unused here
#include "fp8_tensor_cores.cuh"  // mma16816
#include "stage_rows.cuh"  // LIST_ASSIGNMENTS_OR_RETURN, SUM_TILE, next_chunk, shift_chunks
#define MAX_ASSIGN 1024

#ifndef G4_AHEAD  // chunks of weights a warp loads ahead of the one it sums (Mxfp4GroupedGemv.chunks_ahead)
#define G4_AHEAD 2
#endif
#ifndef G4_MIN_BLOCKS  // blocks of 512 threads an SM the registers must allow (Mxfp4GroupedGemv.min_blocks_per_sm)
#define G4_MIN_BLOCKS 1
#endif

// pair Q of word w (layout above) as two float16 values, each its e2m1 value times 2**-14
template <int Q> __device__ __forceinline__ unsigned e2m1_pair(unsigned w) {
    if (Q == 3) return w & 0x8E008E00u;  // magnitudes already at bits 9-11, signs at 15
    return ((w << (9 - 3 * Q)) & 0x0E000E00u) | ((w << (3 - Q)) & 0x80008000u);
}

// float16 bits of x clamped to float16's range (an activation past it would be an infinity)
__device__ __forceinline__ unsigned short to_f16(float x) { return f2h(fminf(fmaxf(x, -65504.f), 65504.f)); }

// ACT 0: the input row as it is; 1: silu(gate) * up; 2: gpt-oss's (clamp(up, -L, L) + 1) * g * sigmoid(alpha g),
// g = min(gate, L) -- gate and up the two halves of the input row (k values each)
template <int ACT> __device__ __forceinline__ float activate(float g, float u, float alpha, float limit) {
    if (ACT == 1) return g / (1.f + __expf(-g)) * u;
    g = fminf(g, limit);
    u = fminf(fmaxf(u, -limit), limit);
    return (u + 1.f) * g / (1.f + __expf(-alpha * g));
}

// Stage the input rows of list[base .. base + rows) as float16 in the lanes' order (header), k_pad / 32 blocks of 64
// bytes a row, zeros past k (a multiple of 32). The block's 4 source vectors' words t make staged vector t.
template <bool BF16, int ACT>
__device__ __forceinline__ void stage_f16(uint4* sx, const unsigned short* __restrict__ in, long long in_ld, int div,
                                          const int* list, int base, int rows, int k, int k_pad, float alpha,
                                          float limit) {
    const int blocks = k_pad >> 5, real = k >> 5;
    for (int i = threadIdx.x; i < rows * blocks; i += blockDim.x) {
        const int r = i / blocks, b = i - r * blocks;
        uint4 out[4] = {};
        if (b < real) {
            const unsigned short* src = in + (long long)(list[base + r] / div) * in_ld + 32 * b;
            unsigned h[16];  // the block's 32 values as float16 pairs, in column order
#pragma unroll
            for (int v = 0; v < 4; ++v) {
                const uint4 a = reinterpret_cast<const uint4*>(src)[v];
                const unsigned short* av = reinterpret_cast<const unsigned short*>(&a);
                uint4 u4 = make_uint4(0u, 0u, 0u, 0u);
                if (ACT) u4 = reinterpret_cast<const uint4*>(src + k)[v];
                const unsigned short* uv = reinterpret_cast<const unsigned short*>(&u4);
#pragma unroll
                for (int e = 0; e < 8; e += 2) {
                    float x0 = tof<BF16>(av[e]), x1 = tof<BF16>(av[e + 1]);
                    if (ACT) {
                        x0 = activate<ACT>(x0, tof<BF16>(uv[e]), alpha, limit);
                        x1 = activate<ACT>(x1, tof<BF16>(uv[e + 1]), alpha, limit);
                    }
                    h[4 * v + e / 2] = (unsigned)to_f16(x0) | ((unsigned)to_f16(x1) << 16);
                }
            }
            // staged vector t: words t of source vectors 0-3 (columns 2t, 2t + 1 plus 0, 8, 16, 24)
#pragma unroll
            for (int t = 0; t < 4; ++t) out[t] = make_uint4(h[t], h[4 + t], h[8 + t], h[12 + t]);
        }
#pragma unroll
        for (int t = 0; t < 4; ++t) sx[(long long)r * (k_pad >> 3) + 4 * b + t] = out[t];
    }
}

// y[a, j] = sum_c in[a / div, c] * W[experts[a], j, c] (+ bias[experts[a], j]) for a < A: W [E, n, k] MXFP4 in the
// layout above (codes at w, n * k_pad / 2 bytes an expert; scales at s, n * k_pad / 32 an expert), in and y 16-bit
// rows (strides in_ld, y_ld elements; with ACT the input row is [gate | up], 2k values). Grid (blocks per expert,
// E), W warps a block (blockDim / 32, at most 16): grouped_gemv8's walk (its header), a warp summing the chunks of
// 128 at 128 v, 128 (v + W), ... of each of the block's tiles, G4_AHEAD chunks loading ahead. n a multiple of 16, k
// of 32; in and in_ld 16-byte aligned. Dynamic shared memory: R * k_pad * 2 bytes of staged rows, then W * 512 bytes
// of the warps' sums.
template <bool BF16, int ACT, bool BIAS>
__device__ __forceinline__ void grouped_gemv4(const unsigned short* __restrict__ in, long long in_ld, int div,
                                              const int* __restrict__ experts, int A,
                                              const unsigned char* __restrict__ w,
                                              const unsigned char* __restrict__ s, int n, int k, int k_pad,
                                              const float* __restrict__ bias, float alpha, float limit,
                                              unsigned short* __restrict__ y, long long y_ld, int R) {
#if __CUDA_ARCH__ >= 800
    extern __shared__ uint4 sx[];
    LIST_ASSIGNMENTS_OR_RETURN(experts, A);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int vecs = k_pad >> 3, chunks = k_pad >> 7;
    float* part = reinterpret_cast<float*>(sx + (long long)R * vecs);  // [warps][32 lanes][4 sums]
    const unsigned char* we = w + (long long)blockIdx.y * n * (k_pad >> 1);
    const unsigned char* se = s + (long long)blockIdx.y * n * (k_pad >> 5);
    const int tiles = n >> 4;
    const int nc = warp < chunks ? (chunks - warp + warps - 1) / warps : 0;  // this warp's chunks of a tile
    const int my_tiles = blockIdx.x < tiles ? (tiles - blockIdx.x + gridDim.x - 1) / gridDim.x : 0;
    for (int base = 0; base < c_all; base += R) {
        const int rows = min(R, c_all - base);
        if (base) __syncthreads();  // the last pass is done with the staged rows
        stage_f16<BF16, ACT>(sx, in, in_ld, div, list, base, rows, k, k_pad, alpha, limit);
        __syncthreads();
        const uint4* xr = sx + (long long)min(g, rows - 1) * vecs + t;  // staged row g, lane t's vector of a block
        int lt = 0, lc = 0;  // the next chunk to load: the block's tile lt, this warp's chunk lc of it
        auto load_next = [&](uint4* v) {
            if (lt >= my_tiles || nc == 0) return;
            const long long at = (long long)(blockIdx.x + lt * gridDim.x) * chunks + warp + lc * warps;
            const uint4* p = reinterpret_cast<const uint4*>(we + at * 1024) + lane;
            v[0] = load_weights(p);
            v[1] = load_weights(p + 32);
            const uint2 sc = __ldg(reinterpret_cast<const uint2*>(se + at * 64) + g);
            v[2] = make_uint4(sc.x, sc.y, 0u, 0u);
            next_chunk(lt, lc, nc);
        };
        uint4 buf[G4_AHEAD + 1][3];
#pragma unroll
        for (int b = 0; b < G4_AHEAD; ++b) load_next(buf[b]);
        const uint4 z = make_uint4(0u, 0u, 0u, 0u);
        for (int ti = 0; ti < my_tiles; ++ti) {
            const int j0 = (blockIdx.x + ti * gridDim.x) * 16;
            float acc[4] = {0.f, 0.f, 0.f, 0.f};
            for (int c = 0, ch = warp; c < nc; ++c, ch += warps) {
                load_next(buf[G4_AHEAD]);
                const unsigned* wv = reinterpret_cast<const unsigned*>(buf[0]);  // runs 0, 1: 8 words
#pragma unroll
                for (int b = 0; b < 4; ++b) {
                    const uint4 xq = g < rows ? xr[(ch * 4 + b) * 4] : z;
                    const unsigned wa = wv[4 * (b >> 1) + 2 * (b & 1)], wb = wv[4 * (b >> 1) + 2 * (b & 1) + 1];
                    float cs[4] = {0.f, 0.f, 0.f, 0.f};
                    mma16816<false>(cs, e2m1_pair<0>(wa), e2m1_pair<0>(wb), e2m1_pair<1>(wa), e2m1_pair<1>(wb), xq.x,
                                    xq.y);
                    mma16816<false>(cs, e2m1_pair<2>(wa), e2m1_pair<2>(wb), e2m1_pair<3>(wa), e2m1_pair<3>(wb), xq.z,
                                    xq.w);
                    // the block's scales, row g's in byte b of the first word, row g + 8's of the second: 2**(s - 113)
                    const float sa = __int_as_float((((buf[0][2].x >> (8 * b)) & 0xffu) + 14u) << 23);
                    const float sb = __int_as_float((((buf[0][2].y >> (8 * b)) & 0xffu) + 14u) << 23);
                    acc[0] = fmaf(sa, cs[0], acc[0]);
                    acc[1] = fmaf(sa, cs[1], acc[1]);
                    acc[2] = fmaf(sb, cs[2], acc[2]);
                    acc[3] = fmaf(sb, cs[3], acc[3]);
                }
                shift_chunks(buf);
            }
            SUM_TILE(part, acc, warp, warps, lane, g, t, j0,
                if (r < rows) {
                    if (BIAS) v += __ldg(bias + (long long)blockIdx.y * n + j);
                    y[(long long)list[base + r] * y_ld + j] = fromf<BF16>(v);
                })
        }
    }
#endif
}

#define GROUPED4(name, bf16, act, bias)                                                                            \
    extern "C" __global__ void __launch_bounds__(512, G4_MIN_BLOCKS)                                               \
        name(const unsigned short* in, long long in_ld, int div, const int* experts, int A, const unsigned char* w, \
             const unsigned char* s, int n, int k, int k_pad, const float* b, float alpha, float limit,            \
             unsigned short* y, long long y_ld, int R) {                                                            \
        grouped_gemv4<bf16, act, bias>(in, in_ld, div, experts, A, w, s, n, k, k_pad, b, alpha, limit, y, y_ld, R); \
    }
GROUPED4(grouped_gemv4_bf16, true, 0, false)
GROUPED4(grouped_gemv4_bf16_silu, true, 1, false)
GROUPED4(grouped_gemv4_bf16_bias, true, 0, true)
GROUPED4(grouped_gemv4_bf16_swiglu_bias, true, 2, true)
GROUPED4(grouped_gemv4_f16, false, 0, false)
GROUPED4(grouped_gemv4_f16_silu, false, 1, false)
GROUPED4(grouped_gemv4_f16_bias, false, 0, true)
GROUPED4(grouped_gemv4_f16_swiglu_bias, false, 2, true)

// The experts' 16-bit copy, for the paths that read 16-bit weights (grouped GEMMs of many rows): out [rows, k] =
// the codes of `rows` weight rows (every expert's, one after another: expert e's n rows after expert e - 1's) times
// their scales, each value exact in bfloat16 (float16: rounded once). One thread per row and 32-column block, a
// grid-stride loop; k a multiple of 32.
template <bool BF16>
__device__ __forceinline__ void dequant_mxfp4(const unsigned char* __restrict__ w, const unsigned char* __restrict__ s,
                                              unsigned short* __restrict__ out, long long rows, int k, int k_pad) {
    const int blocks = k >> 5, chunks = k_pad >> 7;
    const long long total = rows * blocks;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const long long j = i / blocks;
        const int b = (int)(i - j * blocks), r = (int)(j & 15);
        const long long at = (j >> 4) * chunks + (b >> 2);  // the tile's chunk, across experts alike
        const int bb = b & 3, u = bb >> 1, v = 2 * (bb & 1) + (r >> 3), g = r & 7;
        const unsigned sc = s[at * 64 + 8 * g + 4 * (r >> 3) + bb];  // row r's scale of block bb
        const float scale = __int_as_float((sc + 14u) << 23);
        unsigned short* o = out + j * k + 32 * b;
#pragma unroll
        for (int t = 0; t < 4; ++t) {
            const unsigned word = __ldg(reinterpret_cast<const unsigned*>(w + at * 1024 + u * 512 + 16 * (4 * g + t)) + v);
            const unsigned p[4] = {e2m1_pair<0>(word), e2m1_pair<1>(word), e2m1_pair<2>(word), e2m1_pair<3>(word)};
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                const int col = 2 * t + 8 * q;
                o[col] = fromf<BF16>(h2f((unsigned short)(p[q] & 0xffffu)) * scale);
                o[col + 1] = fromf<BF16>(h2f((unsigned short)(p[q] >> 16)) * scale);
            }
        }
    }
}
extern "C" __global__ void dequant_mxfp4_bf16(const unsigned char* w, const unsigned char* s, unsigned short* out,
                                              long long rows, int k, int k_pad) {
    dequant_mxfp4<true>(w, s, out, rows, k, k_pad);
}
extern "C" __global__ void dequant_mxfp4_f16(const unsigned char* w, const unsigned char* s, unsigned short* out,
                                             long long rows, int k, int k_pad) {
    dequant_mxfp4<false>(w, s, out, rows, k, k_pad);
}
