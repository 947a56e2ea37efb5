// Linear layers with int4 weights (AWQ / GPTQ, a scale and a zero per group of inputs) and 16-bit activations
// (W4A16): the weights are read as stored, half a byte each, and decoded in registers into exact 16-bit integers
// (code - zero) that the tensor cores multiply with x; each group's float32 scale multiplies its float32 sums.
#include "convert.cuh"  // fromf
#include "griddep.cuh"  // griddep_wait, griddep_launch_dependents
#include "load_weights.cuh"  // load_weights: past L1
#include "fp8_tensor_cores.cuh"  // mma16816 (the FP8 GEMV's m16n8k16 mma; its e4m3 helpers are unused here)

// The weight layout (fi_engine.checkpoint.int4_weights.Int4Matrix.gemv_layout writes it): a row-major [n, k / 2]
// byte matrix, each row 128-input tiles of 64 bytes. Lane t (0..3) of an mma's quad reads the tile's 16 bytes at
// 16 t: the inputs 16 q + 4 t + e (step q = 0..7 of the tile, e = 0..3), as 4 little-endian words, word v holding
// steps 2 v and 2 v + 1 in its 4-bit fields (field 0 the lowest): fields 0, 4, 1, 5 are step 2 v's e = 0, 1, 2, 3
// and fields 2, 6, 3, 7 step 2 v + 1's. So `(word >> 4 p) & 0x000f000f` is one 16-bit pair of an mma's A
// fragment for p = 0..3: (e 0, 1) and (e 2, 3) of step 2 v, then of step 2 v + 1.
//
// A record per output row and group of inputs (uint32 [n, groups]): the group's float32 scale with its low 8 bits
// cleared (16-bit scales are exact; float32 ones keep 16 significant bits), and the group's zero (0..255) in them.
// Groups are 64 << gshift inputs (gshift 31: one group of the whole row).

// fields p and p + 4 of u (p: the shift / 4 already applied) as a 16-bit pair of (code - zero), exactly: the code
// OR-ed into the mantissa of 128 (bfloat16) or 1024 (float16), then nz = -(128 + zero) (or -(1024 + zero)) added
template <bool BF16> __device__ __forceinline__ unsigned i4_pair(unsigned u, unsigned nz) {
    const unsigned bits = (u & 0x000f000fu) | (BF16 ? 0x43004300u : 0x64006400u);
    unsigned d;
#if __CUDA_ARCH__ >= 800
    if (BF16)
        asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(bits), "r"(0x3f803f80u), "r"(nz));
    else
        asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(bits), "r"(0x3c003c00u), "r"(nz));
#else
    d = bits;
#endif
    return d;
}
// a record's scale, and its zero as the pair nz that i4_pair adds
template <bool BF16> __device__ __forceinline__ float i4_record(unsigned rec, unsigned& nz) {
    const unsigned h = (BF16 ? 0xc300u : 0xe400u) + (rec & 0xffu);  // -(128 + zero) / -(1024 + zero), exact
    nz = h | (h << 16);
    return __uint_as_float(rec & 0xffffff00u);
}

#define I4_MAX_WARPS 16

// y[r, j] = sum_c x[r, c] * (code[j, c] - zero[j, g(c)]) * scale[j, g(c)] for r < rows <= 8 NT: x [rows, k] 16-bit
// (row stride x_ld), y [rows, n] 16-bit or float32 (row stride y_ld). A block serves 16 output columns (the mma's
// m); its warps take the tiles warp, warp + warps, ... Lane (g, t) (g = lane / 4, t = lane % 4) decodes its 16
// bytes of rows j0 + g and j0 + g + 8 per tile (the next tile's loading meanwhile) and multiplies them with x's rows
// 8 i + g (the mma's n; zeros past rows) for each of NT groups of 8 rows, so each weight is decoded once for all
// rows. A half tile (64 inputs) lies in one group: its mma sums start from zero, and the group's scale multiplies
// them into the float32 sums; the warps' sums meet in shared memory and y is rounded once. k a multiple of 128;
// x, w, x_ld 16-byte aligned (the caller checks).
template <bool BF16, bool F32OUT, int NT>
__device__ __forceinline__ void gemv4_tc(const unsigned short* __restrict__ x, const unsigned char* __restrict__ w,
                                         void* __restrict__ y, int rows, int n, int k, long long x_ld,
                                         long long y_ld, const unsigned* __restrict__ rec, int groups, int gshift) {
#if __CUDA_ARCH__ >= 800
    __shared__ float part[I4_MAX_WARPS][32][4 * NT];
    griddep_launch_dependents();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int j0 = blockIdx.x * 16;
    const int ja = min(j0 + g, n - 1), jb = min(j0 + g + 8, n - 1);  // a last partial tile repeats its last column
    const long long row_bytes = k >> 1;
    const uint4* wa = reinterpret_cast<const uint4*>(w + ja * row_bytes) + t;
    const uint4* wb = reinterpret_cast<const uint4*>(w + jb * row_bytes) + t;
    const unsigned* ra = rec + (long long)ja * groups;
    const unsigned* rb = rec + (long long)jb * groups;
    const int tiles = k >> 7;
    float acc[NT][4];
#pragma unroll
    for (int i = 0; i < NT; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[i][e] = 0.f;
    uint4 cur[2], nxt[2];
    int tile = warp;
    if (tile < tiles) {
        cur[0] = load_weights(wa + 4 * tile);
        cur[1] = load_weights(wb + 4 * tile);
    }
    griddep_wait();  // x may be the previous kernel's output; the weights and records are constants
    while (tile < tiles) {
        const int next = tile + warps;
        if (next < tiles) {
            nxt[0] = load_weights(wa + 4 * next);
            nxt[1] = load_weights(wb + 4 * next);
        }
        const unsigned* ua = reinterpret_cast<const unsigned*>(&cur[0]);
        const unsigned* ub = reinterpret_cast<const unsigned*>(&cur[1]);
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int gi = (2 * tile + half) >> gshift;
            unsigned za, zb;
            const float sa = i4_record<BF16>(__ldg(ra + gi), za), sb = i4_record<BF16>(__ldg(rb + gi), zb);
            // x's values at inputs 128 tile + 64 half + 16 q + 4 t + (0..3), q = 0..3, of each group of 8 rows
            uint2 xv[NT][4];
#pragma unroll
            for (int i = 0; i < NT; ++i) {
                const int r = 8 * i + g;
                const uint2* xp =
                    reinterpret_cast<const uint2*>(x + (long long)min(r, rows - 1) * x_ld + 128 * tile + 64 * half) + t;
#pragma unroll
                for (int q = 0; q < 4; ++q) xv[i][q] = r < rows ? __ldg(xp + 4 * q) : make_uint2(0u, 0u);
            }
            float c[NT][4];
#pragma unroll
            for (int i = 0; i < NT; ++i)
#pragma unroll
                for (int e = 0; e < 4; ++e) c[i][e] = 0.f;
#pragma unroll
            for (int v = 0; v < 2; ++v) {
                const unsigned a = ua[2 * half + v], b = ub[2 * half + v];
                // steps 2 v and 2 v + 1 of this half: A's pairs (rows g and g + 8; inputs e 0-1, then 2-3)
                const unsigned a0 = i4_pair<BF16>(a, za), a2 = i4_pair<BF16>(a >> 4, za);
                const unsigned b0 = i4_pair<BF16>(b, zb), b2 = i4_pair<BF16>(b >> 4, zb);
                const unsigned a1 = i4_pair<BF16>(a >> 8, za), a3 = i4_pair<BF16>(a >> 12, za);
                const unsigned b1 = i4_pair<BF16>(b >> 8, zb), b3 = i4_pair<BF16>(b >> 12, zb);
#pragma unroll
                for (int i = 0; i < NT; ++i) {
                    mma16816<BF16>(c[i], a0, b0, a2, b2, xv[i][2 * v].x, xv[i][2 * v].y);
                    mma16816<BF16>(c[i], a1, b1, a3, b3, xv[i][2 * v + 1].x, xv[i][2 * v + 1].y);
                }
            }
#pragma unroll
            for (int i = 0; i < NT; ++i) {
                acc[i][0] = fmaf(sa, c[i][0], acc[i][0]);
                acc[i][1] = fmaf(sa, c[i][1], acc[i][1]);
                acc[i][2] = fmaf(sb, c[i][2], acc[i][2]);
                acc[i][3] = fmaf(sb, c[i][3], acc[i][3]);
            }
        }
        cur[0] = nxt[0];
        cur[1] = nxt[1];
        tile = next;
    }
#pragma unroll
    for (int i = 0; i < NT; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) part[warp][lane][4 * i + e] = acc[i][e];
    __syncthreads();
    if (warp == 0) {
        // accumulator (i, e): column j0 + g (+ 8 for e >= 2), x row 8 i + 2 t + (e & 1)
#pragma unroll
        for (int i = 0; i < NT; ++i)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                float s = 0.f;
                for (int p = 0; p < warps; ++p) s += part[p][lane][4 * i + e];
                const int j = j0 + g + (e >> 1) * 8, r = 8 * i + 2 * t + (e & 1);
                if (j < n && r < rows) {
                    if (F32OUT) reinterpret_cast<float*>(y)[r * y_ld + j] = s;
                    else reinterpret_cast<unsigned short*>(y)[r * y_ld + j] = fromf<BF16>(s);
                }
            }
    }
#endif
}

#define GEMV4(name, bf16, f32out, nt)                                                                               \
    extern "C" __global__ void __launch_bounds__(32 * I4_MAX_WARPS)                                                \
        name(const unsigned short* x, const unsigned char* w, void* y, int rows, int n, int k, long long x_ld,     \
             long long y_ld, const unsigned* rec, int groups, int gshift) {                                        \
        gemv4_tc<bf16, f32out, nt>(x, w, y, rows, n, k, x_ld, y_ld, rec, groups, gshift);                          \
    }
#define GEMV4_ROWS(t, bf16, out, f32out)                                                                            \
    GEMV4(gemv4_##t##_##out##_8, bf16, f32out, 1)                                                                   \
    GEMV4(gemv4_##t##_##out##_16, bf16, f32out, 2)                                                                  \
    GEMV4(gemv4_##t##_##out##_32, bf16, f32out, 4)
GEMV4_ROWS(bf16, true, bf16, false)
GEMV4_ROWS(bf16, true, f32, true)
GEMV4_ROWS(f16, false, f16, false)
GEMV4_ROWS(f16, false, f32, true)

// out [n, k] 16-bit = (code - zero) * scale, each product exact in float32 and rounded once to nearest even: the
// weight a 16-bit GEMM of many rows reads. A grid-stride loop over the 16-byte lane vectors (32 weights each, laid
// out as gemv4_tc reads them); k a multiple of 128, w and out 16-byte aligned.
template <bool BF16>
__device__ __forceinline__ void dequant_i4(const unsigned char* __restrict__ w, const unsigned* __restrict__ rec,
                                           unsigned short* __restrict__ out, long long n, int k, int groups,
                                           int gshift) {
    const int vecs = k >> 5;
    const long long total = n * vecs;
    for (long long v = blockIdx.x * (long long)blockDim.x + threadIdx.x; v < total;
         v += (long long)gridDim.x * blockDim.x) {
        const long long j = v / vecs;
        const int c = (int)(v - j * vecs), tile = c >> 2, t = c & 3;
        const uint4 q = load_weights(reinterpret_cast<const uint4*>(w) + v);
        const unsigned* words = reinterpret_cast<const unsigned*>(&q);
        unsigned short* row = out + j * k + 128 * tile + 4 * t;
#pragma unroll
        for (int word = 0; word < 4; ++word) {
            const unsigned r = __ldg(rec + j * groups + ((2 * tile + (word >> 1)) >> gshift));
            const float s = __uint_as_float(r & 0xffffff00u), z = (float)(r & 0xffu);
#pragma unroll
            for (int step = 0; step < 2; ++step) {
                // step 2 word + step: e = 0, 1, 2, 3 in fields 2 step, 2 step + 4, 2 step + 1, 2 step + 5
                const unsigned u = words[word] >> (8 * step);
                unsigned short e[4];
                e[0] = fromf<BF16>(((float)(u & 0xfu) - z) * s);
                e[1] = fromf<BF16>(((float)((u >> 16) & 0xfu) - z) * s);
                e[2] = fromf<BF16>(((float)((u >> 4) & 0xfu) - z) * s);
                e[3] = fromf<BF16>(((float)((u >> 20) & 0xfu) - z) * s);
                uint2 o;
                o.x = (unsigned)e[0] | ((unsigned)e[1] << 16);
                o.y = (unsigned)e[2] | ((unsigned)e[3] << 16);
                *reinterpret_cast<uint2*>(row + 16 * (2 * word + step)) = o;
            }
        }
    }
}
extern "C" __global__ void dequant_int4_bf16(const unsigned char* w, const unsigned* rec, unsigned short* out,
                                             long long n, int k, int groups, int gshift) {
    dequant_i4<true>(w, rec, out, n, k, groups, gshift);
}
extern "C" __global__ void dequant_int4_f16(const unsigned char* w, const unsigned* rec, unsigned short* out,
                                            long long n, int k, int groups, int gshift) {
    dequant_i4<false>(w, rec, out, n, k, groups, gshift);
}
