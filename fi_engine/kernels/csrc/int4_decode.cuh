// The int4 weights' decoding for the tensor cores, shared by the int4 GEMV (int4_gemv.cu) and the skinny GEMM
// (skinny_gemm.cu): the layout both read, the 16-bit pairs of codes, the records' factors, and a half tile's
// sums. Uses mma16816 (fp8_tensor_cores.cuh), which each includer includes before it.
//
// The weight layout (fi_engine.checkpoint.int4_weights.Int4Matrix.gemv_layout writes it): tile-major, [ceil(n / 16),
// k / 128, 1024] bytes. Tile (s, c) holds the 128 inputs 128 c .. 128 c + 127 of the 16 rows 16 s .. 16 s + 15 (rows
// past n zero), row 16 s + r's 64 bytes at 64 r, so a warp's tile is one contiguous kilobyte (its two loads of 8
// rows 512 contiguous bytes each: on an H200 the GEMV took 5-9 % less time than over row-major rows, whose 64-byte
// pieces lay a row apart). Lane t (0..3) of an mma's quad reads a row's 16 bytes at 16 t, 4 little-endian words:
// words 2 h and 2 h + 1 hold its inputs of half tile h (0, 1), 64 h + 16 t + 4 q + e (step q = 0..3 of the half,
// e = 0..3), word 2 h + v steps 2 v and 2 v + 1 in its 4-bit fields (field 0 the lowest): fields 0, 4, 1, 5 are
// step 2 v's e = 0, 1, 2, 3 and fields 2, 6, 3, 7 step 2 v + 1's. So `(word >> 4 p) & 0x000f000f` is one 16-bit
// pair of an mma's A fragment for p = 0..3: (e 0, 1) and (e 2, 3) of step 2 v, then of step 2 v + 1; and a lane's
// x values of a half are 16 consecutive inputs, two 16-byte loads.
#define I4_TILE_VECS 64  // the 16-byte vectors of a tile of 16 rows (a kilobyte)
//
// A record per output row and group of inputs (uint32 [n, groups]): the group's float32 scale with its low 8 bits
// cleared (16-bit scales are exact; float32 ones keep 16 significant bits), and the group's zero (0..255) in them.
// Groups are 64 << gshift inputs (gshift 31: one group of the whole row).
//
// Two ways to meet the zero. i4_half_zsub subtracts it from each pair of codes (code + M, the code OR-ed into the
// mantissa of M = 128 in bfloat16, 1024 in float16: one logic operation a pair; less M + zero: one 16-bit add, exact)
// before the mma. i4_half (the skinny GEMM's, under four groups of rows) multiplies x by code + M and sums x over the
// half with a second mma of ones: s * (sum((code + M) x) - (M + zero) sum(x)) = s * sum((code - zero) x). The int4
// GEMV subtracts at every row count: on an H200 at 1, 8 and 16 rows its launches took 1-15 % less time so (the mma
// of ones costs more than the adds it saves).

// fields p and p + 4 of u (p: the shift / 4 already applied) as a 16-bit pair of code + M, exactly
template <bool BF16> __device__ __forceinline__ unsigned i4_pair(unsigned u) {
    // one lop3 of (u & mask) | M: written in C, ptxas splits the two constants into two (32 more a tile)
    unsigned d;
    asm("lop3.b32 %0, %1, %2, %3, 0xea;" : "=r"(d) : "r"(u), "n"(0x000f000f), "n"(BF16 ? 0x43004300 : 0x64006400));
    return d;
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
// the same pair as two instructions (a mask, then one multiply-add: the zero's byte into both halves of -M's pair; no
// carry leaves a half, M + zero < 2^16 - 0xc300)
template <bool BF16> __device__ __forceinline__ unsigned i4_neg_zero2(unsigned rec) {
    return (rec & 0xffu) * 0x10001u + (BF16 ? 0xc300c300u : 0xe400e400u);
}
// a record's scale s
__device__ __forceinline__ float i4_scale(unsigned rec) { return __uint_as_float(rec & 0xffffff00u); }
// a record's scale s, and -s (M + zero): the factors of a half's two sums (i4_half)
template <bool BF16> __device__ __forceinline__ float i4_record(unsigned rec, float& offset) {
    const float s = i4_scale(rec);
    offset = -s * ((BF16 ? 128.f : 1024.f) + (float)(rec & 0xffu));
    return s;
}

// one half tile's sums: lane (g, t)'s words of rows j0 + g (wa0, wa1) and j0 + g + 8 (wb0, wb1), x's 16 values of
// rows 8 i + g (xq[i]), the rows' scales and offsets, into acc (the skinny GEMM's under four groups of rows; the
// lanes' roles as gemv4_tc's)
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

// i4_half with the zero subtracted from each pair of codes instead (a 16-bit FMA a pair, exact), which costs less
// than the mma of ones (the int4 GEMV's at every row count, the skinny GEMM's from four groups of rows); nza / nzb:
// -(M + zero) as a 16-bit pair
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
