// Linear layers with int4 weights (AWQ / GPTQ, a scale and a zero per group of inputs) and 16-bit activations
// (W4A16): the weights are read as stored, half a byte each, and decoded in registers into exact 16-bit integers
// (code - zero) that the tensor cores multiply with x; each group's float32 scale multiplies its float32 sums.
#include "convert.cuh"  // fromf
#include "griddep.cuh"  // griddep_wait, griddep_launch_dependents
#include "load_weights.cuh"  // load_weights: past L1
#include "fp8_tensor_cores.cuh"  // mma16816 (the FP8 GEMV's m16n8k16 mma; its e4m3 helpers are unused here)

// The weight layout (fi_engine.checkpoint.int4_weights.Int4Matrix.gemv_layout writes it): a row-major [n, k / 2]
// byte matrix, each row 128-input tiles of 64 bytes. Lane t (0..3) of an mma's quad reads the tile's 16 bytes at
// 16 t, 4 little-endian words: words 2 h and 2 h + 1 hold its inputs of half tile h (0, 1), 64 h + 16 t + 4 q + e
// (step q = 0..3 of the half, e = 0..3), word 2 h + v steps 2 v and 2 v + 1 in its 4-bit fields (field 0 the
// lowest): fields 0, 4, 1, 5 are step 2 v's e = 0, 1, 2, 3 and fields 2, 6, 3, 7 step 2 v + 1's. So
// `(word >> 4 p) & 0x000f000f` is one 16-bit pair of an mma's A fragment for p = 0..3: (e 0, 1) and (e 2, 3) of step
// 2 v, then of step 2 v + 1; and a lane's x values of a half are 16 consecutive inputs, two 16-byte loads.
//
// A record per output row and group of inputs (uint32 [n, groups]): the group's float32 scale with its low 8 bits
// cleared (16-bit scales are exact; float32 ones keep 16 significant bits), and the group's zero (0..255) in them.
// Groups are 64 << gshift inputs (gshift 31: one group of the whole row).
//
// Up to 16 rows the zero is not subtracted from each weight: the mma multiplies x by code + M exactly (the code OR-ed
// into the mantissa of M = 128 in bfloat16, 1024 in float16: one logic operation a pair), a second mma of ones sums x
// over the half, and the half's float32 sum is s * (sum((code + M) x) - (M + zero) sum(x)) = s * sum((code - zero) x).
// At 32 rows four groups of rows share each decoded pair, and subtracting the zero from the pair (one 16-bit FMA,
// exact) costs less than four mma of ones.

#define I4_MAX_WARPS 16

// fields p and p + 4 of u (p: the shift / 4 already applied) as a 16-bit pair of code + M, exactly
template <bool BF16> __device__ __forceinline__ unsigned i4_pair(unsigned u) {
    return (u & 0x000f000fu) | (BF16 ? 0x43004300u : 0x64006400u);
}
// fields p and p + 4 of u as a 16-bit pair of code - zero, exactly: code + M less M + zero (nz = -(M + zero))
template <bool BF16> __device__ __forceinline__ unsigned i4_minus(unsigned u, unsigned nz) {
    const unsigned bits = i4_pair<BF16>(u);
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
// a record's -(M + zero) as a 16-bit pair (exact)
template <bool BF16> __device__ __forceinline__ unsigned i4_neg_zero(unsigned rec) {
    const unsigned h = (BF16 ? 0xc300u : 0xe400u) + (rec & 0xffu);
    return h | (h << 16);
}
// a record's scale s, and -s (M + zero): the factors of a half's two sums
template <bool BF16> __device__ __forceinline__ float i4_record(unsigned rec, float& offset) {
    const float s = __uint_as_float(rec & 0xffffff00u);
    offset = -s * ((BF16 ? 128.f : 1024.f) + (float)(rec & 0xffu));
    return s;
}

// one half tile's sums: lane (g, t)'s words of rows j0 + g (wa0, wa1) and j0 + g + 8 (wb0, wb1), x's 16 values of
// rows 8 i + g (xq[i]: zeros past rows), the rows' scales and offsets, into acc (see gemv4_tc)
template <bool BF16, int NT>
__device__ __forceinline__ void i4_half(float (&acc)[NT][4], unsigned wa0, unsigned wa1, unsigned wb0, unsigned wb1,
                                        const uint4 (&xq)[NT][2], float sa, float oa, float sb, float ob) {
    const unsigned one = BF16 ? 0x3f803f80u : 0x3c003c00u;
    float c[NT][4], sx[NT][4];
#pragma unroll
    for (int i = 0; i < NT; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) c[i][e] = sx[i][e] = 0.f;
#pragma unroll
    for (int v = 0; v < 2; ++v) {
        const unsigned a = v ? wa1 : wa0, b = v ? wb1 : wb0;
        // steps 2 v and 2 v + 1: A's pairs (rows g and g + 8; inputs e 0-1, then 2-3)
        const unsigned a0 = i4_pair<BF16>(a), a2 = i4_pair<BF16>(a >> 4);
        const unsigned b0 = i4_pair<BF16>(b), b2 = i4_pair<BF16>(b >> 4);
        const unsigned a1 = i4_pair<BF16>(a >> 8), a3 = i4_pair<BF16>(a >> 12);
        const unsigned b1 = i4_pair<BF16>(b >> 8), b3 = i4_pair<BF16>(b >> 12);
#pragma unroll
        for (int i = 0; i < NT; ++i) {
            const unsigned* xw = reinterpret_cast<const unsigned*>(&xq[i][v]);  // steps 2 v (words 0, 1), 2 v + 1
            mma16816<BF16>(c[i], a0, b0, a2, b2, xw[0], xw[1]);
            mma16816<BF16>(sx[i], one, one, one, one, xw[0], xw[1]);
            mma16816<BF16>(c[i], a1, b1, a3, b3, xw[2], xw[3]);
            mma16816<BF16>(sx[i], one, one, one, one, xw[2], xw[3]);
        }
    }
#pragma unroll
    for (int i = 0; i < NT; ++i) {  // sx[i][0], [1]: x rows 2 t, 2 t + 1 summed over the half (as [2], [3])
        acc[i][0] = fmaf(sa, c[i][0], fmaf(oa, sx[i][0], acc[i][0]));
        acc[i][1] = fmaf(sa, c[i][1], fmaf(oa, sx[i][1], acc[i][1]));
        acc[i][2] = fmaf(sb, c[i][2], fmaf(ob, sx[i][0], acc[i][2]));
        acc[i][3] = fmaf(sb, c[i][3], fmaf(ob, sx[i][1], acc[i][3]));
    }
}

// i4_half for many rows (ZSUB): the zero subtracted from each pair of codes instead (a 16-bit FMA a pair, exact),
// which costs less than the mma of ones once NT groups of rows share each decoded pair; nza / nzb: -(M + zero) as
// a 16-bit pair
template <bool BF16, int NT>
__device__ __forceinline__ void i4_half_zsub(float (&acc)[NT][4], unsigned wa0, unsigned wa1, unsigned wb0,
                                             unsigned wb1, const uint4 (&xq)[NT][2], float sa, unsigned nza, float sb,
                                             unsigned nzb) {
    float c[NT][4];
#pragma unroll
    for (int i = 0; i < NT; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) c[i][e] = 0.f;
#pragma unroll
    for (int v = 0; v < 2; ++v) {
        const unsigned a = v ? wa1 : wa0, b = v ? wb1 : wb0;
        const unsigned a0 = i4_minus<BF16>(a, nza), a2 = i4_minus<BF16>(a >> 4, nza);
        const unsigned b0 = i4_minus<BF16>(b, nzb), b2 = i4_minus<BF16>(b >> 4, nzb);
        const unsigned a1 = i4_minus<BF16>(a >> 8, nza), a3 = i4_minus<BF16>(a >> 12, nza);
        const unsigned b1 = i4_minus<BF16>(b >> 8, nzb), b3 = i4_minus<BF16>(b >> 12, nzb);
#pragma unroll
        for (int i = 0; i < NT; ++i) {
            const unsigned* xw = reinterpret_cast<const unsigned*>(&xq[i][v]);
            mma16816<BF16>(c[i], a0, b0, a2, b2, xw[0], xw[1]);
            mma16816<BF16>(c[i], a1, b1, a3, b3, xw[2], xw[3]);
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

// the loads of TPL tiles from `tile` on (those < tiles): each tile's two weight vectors (rows a, b) into v[2 u ..],
// its records into r[4 u ..] (G64: row a's halves, then row b's; else one a row, r[4 u], r[4 u + 2]); weights and
// records are constants
template <int TPL, bool G64>
__device__ __forceinline__ void i4_load(uint4* v, unsigned* r, const uint4* wa, const uint4* wb, const unsigned* ra,
                                        const unsigned* rb, int tile, int tiles, int gshift) {
#pragma unroll
    for (int u = 0; u < TPL; ++u) {
        if (tile + u < tiles) {
            v[2 * u] = load_weights(wa + 4 * (tile + u));
            v[2 * u + 1] = load_weights(wb + 4 * (tile + u));
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

// y[r, j] = sum_c x[r, c] * (code[j, c] - zero[j, g(c)]) * scale[j, g(c)] for r < rows <= 8 NT: x [rows, k] 16-bit
// (row stride x_ld), y [rows, n] 16-bit or float32 (row stride y_ld). A block serves 16 output columns (the mma's
// m); its warps take runs of TPL tiles in turn (warp w the run w, w + warps, ...), each run's weights and records
// loaded while the run before is summed. Lane (g, t) (g = lane / 4, t = lane % 4) decodes its 16 bytes of rows
// j0 + g and j0 + g + 8 per tile and multiplies them with x's rows 8 i + g (the mma's n; zeros past rows) for each
// of NT groups of 8 rows, so each weight is decoded once for all rows. A half tile (64 inputs) lies in one group: its
// mma sums start from zero and meet the group's scale and zero in float32 (the layout comment); the warps' sums meet
// in shared memory and y is rounded once. G64: groups of 64 (two records a tile), else of 128 or more (one). k a
// multiple of 128; x, w, x_ld 16-byte aligned (the caller checks).
template <bool BF16, bool F32OUT, int NT, int TPL, bool G64, bool SILU>
__device__ __forceinline__ void gemv4_tc(const unsigned short* __restrict__ x, const unsigned char* __restrict__ w,
                                         void* __restrict__ y, int rows, int n, int k, long long x_ld,
                                         long long y_ld, const unsigned* __restrict__ rec, int groups, int gshift,
                                         int half_n) {
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
    const uint4* xr[NT];  // x row 8 i + g at input 16 t (its last row for the rows past it, never used)
#pragma unroll
    for (int i = 0; i < NT; ++i)
        xr[i] = reinterpret_cast<const uint4*>(x + (long long)min(8 * i + g, rows - 1) * x_ld) + 2 * t;
    const int tiles = k >> 7;
    float acc[NT][4];
#pragma unroll
    for (int i = 0; i < NT; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[i][e] = 0.f;
    uint4 cv[2 * TPL];
    unsigned cr[4 * TPL];
    int tile = warp * TPL;
    if (tile < tiles) i4_load<TPL, G64>(cv, cr, wa, wb, ra, rb, tile, tiles, gshift);
    griddep_wait();  // x may be the previous kernel's output; the weights and records are constants
    while (tile < tiles) {
        const int next = tile + warps * TPL;
        uint4 nv[2 * TPL];
        unsigned nr[4 * TPL];
        if (next < tiles) i4_load<TPL, G64>(nv, nr, wa, wb, ra, rb, next, tiles, gshift);
#pragma unroll
        for (int u = 0; u < TPL; ++u) {
            if (tile + u < tiles) {
                const unsigned* ua = reinterpret_cast<const unsigned*>(&cv[2 * u]);
                const unsigned* ub = reinterpret_cast<const unsigned*>(&cv[2 * u + 1]);
                float oa[2], ob[2], sa[2], sb[2];
                sa[0] = i4_record<BF16>(cr[4 * u], oa[0]);
                sb[0] = i4_record<BF16>(cr[4 * u + 2], ob[0]);
                sa[1] = G64 ? i4_record<BF16>(cr[4 * u + 1], oa[1]) : sa[0];
                sb[1] = G64 ? i4_record<BF16>(cr[4 * u + 3], ob[1]) : sb[0];
                if (!G64) oa[1] = oa[0], ob[1] = ob[0];
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    uint4 xq[NT][2];  // the half's x values: row group, 8 inputs (loaded a half at a time: registers)
#pragma unroll
                    for (int i = 0; i < NT; ++i) {
                        const bool live = 8 * i + g < rows;
                        const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
                        const uint4* xp = xr[i] + 16 * (tile + u) + 8 * h;
                        xq[i][0] = live ? __ldg(xp) : zero;
                        xq[i][1] = live ? __ldg(xp + 1) : zero;
                    }
                    if (NT >= 4)  // (the records of half h: G64 two a tile, else one)
                        i4_half_zsub<BF16, NT>(acc, ua[2 * h], ua[2 * h + 1], ub[2 * h], ub[2 * h + 1], xq, sa[h],
                                               i4_neg_zero<BF16>(cr[4 * u + (G64 ? h : 0)]), sb[h],
                                               i4_neg_zero<BF16>(cr[4 * u + 2 + (G64 ? h : 0)]));
                    else
                        i4_half<BF16, NT>(acc, ua[2 * h], ua[2 * h + 1], ub[2 * h], ub[2 * h + 1], xq, sa[h], oa[h],
                                          sb[h], ob[h]);
                }
            }
        }
#pragma unroll
        for (int u = 0; u < 2 * TPL; ++u) cv[u] = nv[u];
#pragma unroll
        for (int u = 0; u < 4 * TPL; ++u) cr[u] = nr[u];
        tile = next;
    }
#pragma unroll
    for (int i = 0; i < NT; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) part[warp][lane][4 * i + e] = acc[i][e];
    __syncthreads();
    if (warp == 0) {
        // accumulator (i, e): stored row j0 + g (+ 8 for e >= 2), x row 8 i + 2 t + (e & 1); its output column j,
        // or with half_n (gate and up interleaved by 8 rows) the gate's column 8 blockIdx + g, the up's half_n more
#pragma unroll
        for (int i = 0; i < NT; ++i) {
            float s[4];
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                s[e] = 0.f;
                for (int p = 0; p < warps; ++p) s[e] += part[p][lane][4 * i + e];
            }
            if (SILU) {  // y [rows, half_n]: FlashInfer's silu_and_mul of the outputs as the plain GEMV rounds them
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int r = 8 * i + 2 * t + e;
                    if (r < rows) {
                        const float gate = tof<BF16>(fromf<BF16>(s[e])), up = tof<BF16>(fromf<BF16>(s[e + 2]));
                        reinterpret_cast<unsigned short*>(y)[r * y_ld + 8 * blockIdx.x + g] =
                            fromf<BF16>(__fdividef(gate, 1.0f + __expf(-gate)) * up);
                    }
                }
                continue;
            }
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int j = j0 + g + (e >> 1) * 8, r = 8 * i + 2 * t + (e & 1);
                const int jo = half_n ? 8 * (int)blockIdx.x + g + (e >> 1) * half_n : j;
                if (j < n && r < rows) {
                    if (F32OUT) reinterpret_cast<float*>(y)[r * y_ld + jo] = s[e];
                    else reinterpret_cast<unsigned short*>(y)[r * y_ld + jo] = fromf<BF16>(s[e]);
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

// out [n, k] 16-bit = (code - zero) * scale, each product exact in float32 and rounded once to nearest even: the
// weight a 16-bit GEMM of many rows reads. A grid-stride loop over the 16-byte lane vectors (32 weights each, laid
// out as gemv4_tc reads them); k a multiple of 128, w and out 16-byte aligned.
template <bool BF16>
__device__ __forceinline__ void dequant_i4(const unsigned char* __restrict__ w, const unsigned* __restrict__ rec,
                                           unsigned short* __restrict__ out, long long n, int k, int groups,
                                           int gshift, int half_n) {
    const int vecs = k >> 5;
    const long long total = n * vecs;
    for (long long v = blockIdx.x * (long long)blockDim.x + threadIdx.x; v < total;
         v += (long long)gridDim.x * blockDim.x) {
        const long long j = v / vecs;
        const int c = (int)(v - j * vecs), tile = c >> 2, t = c & 3;
        // its output row: j, or with half_n (gate and up interleaved by 8 rows) the gate's or the up's own
        const long long jo = half_n ? (j >> 4) * 8 + (j & 7) + ((j >> 3) & 1) * half_n : j;
        const uint4 q = load_weights(reinterpret_cast<const uint4*>(w) + v);
        const unsigned* words = reinterpret_cast<const unsigned*>(&q);
#pragma unroll
        for (int word = 0; word < 4; ++word) {
            const int half = word >> 1;
            const unsigned r = __ldg(rec + j * groups + ((2 * tile + half) >> gshift));
            const float s = __uint_as_float(r & 0xffffff00u), z = (float)(r & 0xffu);
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
