__device__ __forceinline__ unsigned prmt(unsigned a, unsigned b, unsigned sel) {
    unsigned d;
    asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(sel));
    return d;
}
// bytes 1 and 3 of u (each half's high byte), e4m3, as a 16-bit pair (low half: byte 1), exactly
template <bool BF16> __device__ __forceinline__ unsigned e4m3_pair(unsigned u) {
    const unsigned bits = (u & 0x80008000u) | ((u & 0x7f007f00u) >> (BF16 ? 4 : 1));
    unsigned d;
#if __CUDA_ARCH__ >= 800
    if (BF16)  // times 2**120 (plus -0: a product's sign kept)
        asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(bits), "r"(0x7b807b80u), "r"(0x80008000u));
    else  // times 2**8
        asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(bits), "r"(0x5c005c00u), "r"(0x80008000u));
#else
    d = bits;
#endif
    return d;
}
template <bool BF16>
__device__ __forceinline__ void mma16816(float* c, unsigned a0, unsigned a1, unsigned a2, unsigned a3, unsigned b0,
                                         unsigned b1) {
#if __CUDA_ARCH__ >= 800
    if (BF16)
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
                     "{%8,%9}, {%0,%1,%2,%3};"
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                     : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
    else
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
                     "{%8,%9}, {%0,%1,%2,%3};"
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                     : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#endif
}
// a lane's 16-byte weight vectors of one chunk at `at`: column g's at 16 t and 64 + 16 t, then column g + 8's
// (zeros past k)
__device__ __forceinline__ void tc_load(uint4* v, const unsigned char* wa, const unsigned char* wb, int at, int t,
                                        int k) {
    const uint4 z = make_uint4(0u, 0u, 0u, 0u);
    const bool lo = at + 16 * t + 16 <= k, hi = at + 80 + 16 * t <= k;
    v[0] = lo ? load_weights(reinterpret_cast<const uint4*>(wa + at)) : z;
    v[1] = hi ? load_weights(reinterpret_cast<const uint4*>(wa + at + 64)) : z;
    v[2] = lo ? load_weights(reinterpret_cast<const uint4*>(wb + at)) : z;
    v[3] = hi ? load_weights(reinterpret_cast<const uint4*>(wb + at + 64)) : z;
}
// c += one chunk: 8 mma, each over word q of both columns' 32 weights and x's 4 values at the same places. PAIRED:
// x's values already in the B fragments' order (stage_rows.cuh's PAIRED staging, grouped_gemv8.cu), taken as loaded
template <bool BF16, bool PAIRED = false>
__device__ __forceinline__ void tc_chunk(const uint4* v, const uint4* xq, float* c) {
    const unsigned* ua = reinterpret_cast<const unsigned*>(v);
    const unsigned* ub = reinterpret_cast<const unsigned*>(v + 2);
    const unsigned* xv = reinterpret_cast<const unsigned*>(xq);
#pragma unroll
    for (int q = 0; q < 8; ++q) {
        // A: (column g, k pair 0) bytes 0 and 2, (g + 8, pair 0), (g, pair 1) bytes 1 and 3, (g + 8, pair 1)
        const unsigned a0 = e4m3_pair<BF16>(ua[q] << 8), a1 = e4m3_pair<BF16>(ub[q] << 8);
        const unsigned a2 = e4m3_pair<BF16>(ua[q]), a3 = e4m3_pair<BF16>(ub[q]);
        // B: x's values 0 and 2, then 1 and 3, of the same 4 places (row g of x)
        const unsigned b0 = PAIRED ? xv[2 * q] : prmt(xv[2 * q], xv[2 * q + 1], 0x5410u);
        const unsigned b1 = PAIRED ? xv[2 * q + 1] : prmt(xv[2 * q], xv[2 * q + 1], 0x7632u);
        mma16816<BF16>(c, a0, a1, a2, a3, b0, b1);
    }
}
#ifndef FP8_LEAN_LOOP
#define FP8_LEAN_LOOP 0  // Fp8Linears.lean_loop
#endif
// acc += one chunk's sums (tc_chunk over the weights v and x's xq), times its block scales at sa (acc[0..1]) and sb
// (acc[2..3], ONE_SCALE: sa's) where BLOCK, plain otherwise: tc_sums' and tc_sums_whole's step
template <bool BF16, bool BLOCK, bool ONE_SCALE>
__device__ __forceinline__ void tc_chunk_sums(float* acc, const uint4* v, const uint4* xq, const float* sa,
                                              const float* sb, int at, int shift) {
    float c[4] = {0.f, 0.f, 0.f, 0.f};
    tc_chunk<BF16>(v, xq, c);
    const float s_a = BLOCK ? __ldg(sa + (at >> (4 + shift))) : 1.f;
    const float s_b = BLOCK && !ONE_SCALE ? __ldg(sb + (at >> (4 + shift))) : s_a;
    acc[0] = BLOCK ? fmaf(s_a, c[0], acc[0]) : acc[0] + c[0];
    acc[1] = BLOCK ? fmaf(s_a, c[1], acc[1]) : acc[1] + c[1];
    acc[2] = BLOCK ? fmaf(s_b, c[2], acc[2]) : acc[2] + c[2];
    acc[3] = BLOCK ? fmaf(s_b, c[3], acc[3]) : acc[3] + c[3];
}
// tc_sums where k is a multiple of 128 (FP8_LEAN_LOOP): every chunk whole, so no load is predicated and no register
// zeroed for one; a lane past the rows reads x's last row (xr already points there), whose sums no caller stores (both
// store rows < rows only); two sets of weight registers in turn, each loaded while the other is summed, so none is
// copied between chunks. The same sums in the same order as tc_sums.
template <bool BF16, bool BLOCK, bool ONE_SCALE>
__device__ __forceinline__ void tc_sums_whole(float* acc, const unsigned char* wa, const unsigned char* wb,
                                              const unsigned short* xr, const float* sa, const float* sb, int warp,
                                              int warps, int k, int shift) {
    const int stride = warps * 128;
    int at = warp * 128;
    const auto load = [&](uint4(&v)[4], int a) {
        v[0] = load_weights(reinterpret_cast<const uint4*>(wa + a));
        v[1] = load_weights(reinterpret_cast<const uint4*>(wa + a + 64));
        v[2] = load_weights(reinterpret_cast<const uint4*>(wb + a));
        v[3] = load_weights(reinterpret_cast<const uint4*>(wb + a + 64));
    };
    const auto sum = [&](const uint4(&cur)[4], uint4(&nxt)[4]) {
        const int next = at + stride;
        if (next < k) load(nxt, next);
        const uint4* xp = reinterpret_cast<const uint4*>(xr + at);
        const uint4 xq[4] = {__ldg(xp), __ldg(xp + 1), __ldg(xp + 8), __ldg(xp + 9)};
        tc_chunk_sums<BF16, BLOCK, ONE_SCALE>(acc, cur, xq, sa, sb, at, shift);
        at = next;
    };
    uint4 v0[4], v1[4];
    if (at < k) load(v0, at);
    griddep_wait();  // x may be the previous kernel's output; the weights and scales are constants
    while (at < k) {
        sum(v0, v1);
        if (at >= k) break;
        sum(v1, v0);
    }
}
// gemv8_tc's sums, which gemv8_tc_pairs shares: lane (g, t) of warp `warp` (of `warps`) sums the chunks at warp 128,
// (warp + warps) 128, ... < k of its two weight rows (wa: mma row g, wb: row g + 8, each already at 16 t) against x's
// row g (xr, at 16 t; zeros for g >= rows, except in tc_sums_whole), loading the next chunk's weights while it sums
// this one; acc[0..1] (wa's column) times its block scales at sa, acc[2..3] (wb's) times those at sb where BLOCK (one
// 128-column chunk inside one scale block; ONE_SCALE: both rows in one scale block, sb unread), plain sums otherwise.
// The first chunk's weights load before griddep_wait, the rest after.
template <bool BF16, bool BLOCK, bool ONE_SCALE>
__device__ __forceinline__ void tc_sums(float* acc, const unsigned char* wa, const unsigned char* wb,
                                        const unsigned short* xr, const float* sa, const float* sb, int warp,
                                        int warps, int g, int t, int rows, int k, int shift) {
#if FP8_LEAN_LOOP
    if ((k & 127) == 0) return tc_sums_whole<BF16, BLOCK, ONE_SCALE>(acc, wa, wb, xr, sa, sb, warp, warps, k, shift);
#endif
    const int stride = warps * 128;
    uint4 cur[4], nxt[4];
    int at = warp * 128;
    if (at < k) tc_load(cur, wa, wb, at, t, k);
    griddep_wait();  // x may be the previous kernel's output; the weights and scales are constants
    while (at < k) {
        const int next = at + stride;
        if (next < k) tc_load(nxt, wa, wb, next, t, k);
        uint4 xq[4];
        const uint4 z = make_uint4(0u, 0u, 0u, 0u);
        const bool lo = g < rows && at + 16 * t + 16 <= k, hi = g < rows && at + 80 + 16 * t <= k;
        const uint4* xp = reinterpret_cast<const uint4*>(xr + at);
        xq[0] = lo ? __ldg(xp) : z;
        xq[1] = lo ? __ldg(xp + 1) : z;
        xq[2] = hi ? __ldg(xp + 8) : z;
        xq[3] = hi ? __ldg(xp + 9) : z;
        tc_chunk_sums<BF16, BLOCK, ONE_SCALE>(acc, cur, xq, sa, sb, at, shift);
#pragma unroll
        for (int i = 0; i < 4; ++i) cur[i] = nxt[i];
        at = next;
    }
}

