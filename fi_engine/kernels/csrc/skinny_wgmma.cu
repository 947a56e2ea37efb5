// y[r, j] = sum_c x[r, c] * W[j, c] for r < rows <= NR (16 or 32) on Hopper's warpgroup MMA (wgmma.mma_async,
// sm_90a): the skinny GEMM of skinny_gemm.cu (its arguments, weight formats FMT, quantization data and split-k
// reduction, which this file includes and shares) where the mma.sync of 16 x 8 outputs issues too slowly at 17-32
// rows. One instruction, m64nNRk16, multiplies 64 weight rows (A, from registers: the four warps of a warpgroup
// hold 16 rows each, in the fragment layout of mma.m16n8k16's A, decoded from the weights exactly as skinny_gemm.cu
// decodes them) with NR rows of x (B, from shared memory through a matrix descriptor), float32 sums in registers
// (D: warp w's rows 16 w + g (+ 8), x rows 8 i + 2 q (+ 1): the layout of skinny_gemm.cu's acc[0][i][e]).
//
// The k order. Lane (g, q) loads, of each 64-input group of a weight row, the 16 inputs 16 q .. 16 q + 15 (16-bit:
// two 16-byte vectors; e4m3: one; int4: one vector holds two groups, int4_decode.cuh's half tiles), and instruction
// I (0..3) of the group takes its 16-bit pairs 2 I and 2 I + 1 (inputs 16 q + 4 I .. + 3) as the A fragment's k
// slots 2 q, 2 q + 1 and 2 q + 8, 2 q + 9. A sum over k does not depend on which input goes to which slot as long as
// B agrees, so x is staged in that order: slot s of instruction I holds input 16 (s % 8 / 2) + 4 I + 2 (s / 8) +
// s % 2 of the group. In 16-byte chunks of 8 slots (the descriptor's core-matrix rows), chunk j = 2 I + s / 8 of a
// group holds the 32-bit words j, j + 8, j + 16, j + 24 of the group's x (words: input pairs); each thread loads
// four 16-byte vectors of an x row's group (vectors h, h + 2, h + 4, h + 6) and stores chunks 4 h .. 4 h + 3.
//
// Shared memory: two buffers of a pass of KX inputs, each [KX / 8 chunks][NR rows] of 16 bytes, rows past `rows`
// zero: wgmma's K-major layout without swizzling, core matrices of 8 rows x 16 bytes (128 contiguous bytes), the
// two of an instruction's k halves LBO = 16 NR bytes apart, 8-row groups SBO = 128 bytes apart. The descriptor's
// fixed fields (LBO, SBO, swizzle: bits 16-29, 32-45, 62-63; fi_engine.kernels.skinny_wgmma.descriptor_fields
// makes them) come from the host in `desc`; the kernel adds the chunk's address >> 4 (bits 0-13).
//
// The pipeline. A warp loads its next U steps of weights (a step: 64 inputs, int4 128) while it sums the U in hand,
// as skinny_gemm.cu; x's next pass goes to registers at a pass's start and to the other buffer at the next pass's
// start (then a fence for the async proxy, which wgmma reads shared memory through, and one barrier a pass; every
// group of wgmma is waited for before it, so the buffer written is one no warpgroup still reads). 16-bit weights
// and e4m3 with a scale per row sum every group into the same registers (row scales applied at the end); e4m3 with
// block scales and int4 (a scale per row and group, the zero subtracted exactly from the 16-bit codes as
// int4_decode.cuh's i4_minus) sum each 64-input group into one partial sum c and fold it in (acc += s * c, float32),
// as skinny_gemm.cu folds its per-step sums: each group waits for the previous group's wgmma (wait_group 0), folds
// its c, decodes its A fragments and, after the fence that orders the fold's reads of c before them, issues its four
// wgmma (the first with scale-d 0: c = A B). No instruction but a wgmma touches c between a wgmma and the
// wait_group 0 that completes it, so ptxas keeps the four wgmma of a group asynchronous; the weight loads of the next
// U steps and the other warpgroups of the SM overlap the wait. (Two partial sums alternating, each folded after
// wait_group 1, are correct too, but ptxas cannot prove it and serializes every wgmma: warning C7514. Decoding a
// group before the wait lets ptxas hoist a whole step's decoding and spill at NR 32, U 4.)
//
// Grid (ceil(n / (64 WG)), k ranges), 128 WG threads, dynamic shared memory 2 KX NR * 2 bytes; k, kc multiples of a
// step and kc of a scale block's width; e4m3 block rows a multiple of 16; x, W and x_ld 16-byte aligned (the
// caller checks). Compiled only for sm_90a (elsewhere the kernels are empty).
#define SKINNY_INSTANCES  // skinny_gemm.cu's device functions, none of its kernels
#include "skinny_gemm.cu"  // sk_zero, sk_scale_rows, sk_finish, SK_* formats; its includes

__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int N> __device__ __forceinline__ void wg_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
}
// the compiler may not move reads of c above the wait that completes the wgmma writing c
template <int MT> __device__ __forceinline__ void wg_touch(float (&c)[MT][4]) {
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) asm volatile("" : "+f"(c[i][e])::"memory");
}

// d (+)= A (64 x 16, a: this thread's fragment) times B (16 x 8 MT, descriptor b); SCALE_D 0: d = A B
#define WG_D16 "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15}, {%16,%17,%18,%19}, %20, p, 1, 1, 0;\n}\n"
#define WG_D8 "{%0,%1,%2,%3,%4,%5,%6,%7}, {%8,%9,%10,%11}, %12, p, 1, 1, 0;\n}\n"
#define WG_OUT4(i) "+f"(d[i][0]), "+f"(d[i][1]), "+f"(d[i][2]), "+f"(d[i][3])
template <bool BF16, int SCALE_D, int MT>
__device__ __forceinline__ void wg_mma(float (&d)[MT][4], const unsigned (&a)[4], unsigned long long b) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    if (MT == 4) {
        if (BF16)
            asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %21, 0;\n"
                         "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 " WG_D16
                         : WG_OUT4(0), WG_OUT4(1), WG_OUT4(2), WG_OUT4(3)
                         : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "n"(SCALE_D));
        else
            asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %21, 0;\n"
                         "wgmma.mma_async.sync.aligned.m64n32k16.f32.f16.f16 " WG_D16
                         : WG_OUT4(0), WG_OUT4(1), WG_OUT4(2), WG_OUT4(3)
                         : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "n"(SCALE_D));
    } else {
        if (BF16)
            asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %13, 0;\n"
                         "wgmma.mma_async.sync.aligned.m64n16k16.f32.bf16.bf16 " WG_D8
                         : WG_OUT4(0), WG_OUT4(1)
                         : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "n"(SCALE_D));
        else
            asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %13, 0;\n"
                         "wgmma.mma_async.sync.aligned.m64n16k16.f32.f16.f16 " WG_D8
                         : WG_OUT4(0), WG_OUT4(1)
                         : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "n"(SCALE_D));
    }
#endif
}

__device__ __forceinline__ unsigned wg_word(const uint4& v, int j) { return j == 0 ? v.x : j == 1 ? v.y : j == 2 ? v.z : v.w; }

// the A fragments of group G's 4 instructions from a step's weight vectors (v[0]: row g, v[1]: row g + 8; 16-bit
// VR = 2 vectors a row, else 1); int4: nza / nzb the rows' -(M + zero) pairs of the group (int4_decode.cuh)
template <bool BF16, int FMT, int VR>
__device__ __forceinline__ void wg_decode(unsigned (&a)[4][4], const uint4 (&v)[2][VR], int G, unsigned nza, unsigned nzb) {
#pragma unroll
    for (int I = 0; I < 4; ++I) {
        if (FMT == SK_W16) {  // pairs 2 I, 2 I + 1 of the row's 8: vector I / 2, words 2 (I % 2), + 1
            const int e = VR - 1;
            a[I][0] = wg_word(v[0][(I >> 1) & e], 2 * (I & 1)), a[I][1] = wg_word(v[1][(I >> 1) & e], 2 * (I & 1));
            a[I][2] = wg_word(v[0][(I >> 1) & e], 2 * (I & 1) + 1), a[I][3] = wg_word(v[1][(I >> 1) & e], 2 * (I & 1) + 1);
        } else if (FMT == SK_INT4) {  // group G's word G * 2 + I / 2, steps 2 (I % 2) and + 1 of its fields
            const unsigned wa = wg_word(v[0][0], 2 * G + (I >> 1)) >> (8 * (I & 1));
            const unsigned wb = wg_word(v[1][0], 2 * G + (I >> 1)) >> (8 * (I & 1));
            a[I][0] = i4_minus<BF16>(wa, nza), a[I][1] = i4_minus<BF16>(wb, nzb);
            a[I][2] = i4_minus<BF16>(wa >> 4, nza), a[I][3] = i4_minus<BF16>(wb >> 4, nzb);
        } else {  // e4m3: word I's bytes 0-1, then 2-3 (e4m3_pair decodes bytes 1 and 3: put them there first)
            const unsigned wa = wg_word(v[0][0], I), wb = wg_word(v[1][0], I);
            a[I][0] = e4m3_pair<BF16>(prmt(wa, 0u, 0x1404u)), a[I][1] = e4m3_pair<BF16>(prmt(wb, 0u, 0x1404u));
            a[I][2] = e4m3_pair<BF16>(prmt(wa, 0u, 0x3424u)), a[I][3] = e4m3_pair<BF16>(prmt(wb, 0u, 0x3424u));
        }
    }
}

// acc += a partial sum times its rows' scales (sa: row g, sb: row g + 8)
template <int MT>
__device__ __forceinline__ void wg_fold(float (&acc)[1][MT][4], float (&c)[MT][4], float sa, float sb) {
    wg_touch(c);
#pragma unroll
    for (int i = 0; i < MT; ++i) {
        acc[0][i][0] = fmaf(sa, c[i][0], acc[0][i][0]), acc[0][i][1] = fmaf(sa, c[i][1], acc[0][i][1]);
        acc[0][i][2] = fmaf(sb, c[i][2], acc[0][i][2]), acc[0][i][3] = fmaf(sb, c[i][3], acc[0][i][3]);
    }
}

// x[:, k0 : k0 + len] (len a multiple of 64) in the staged order, this thread's ITEMS items (an x row's group of 64
// inputs and half h of its chunks, h = 0, 1): vectors h, h + 2, h + 4, h + 6 of the group (zeros past rows)
template <int NR, int THREADS, int ITEMS>
__device__ __forceinline__ void wg_fetch(uint4 (&xin)[ITEMS][4], const unsigned short* __restrict__ x, int rows,
                                         long long x_ld, int k0, int len) {
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
        const int idx = threadIdx.x + i * THREADS, r = idx % NR, half = (idx / NR) & 1, grp = idx / NR / 2;
        const bool ok = r < rows && grp < len / 64;
        const uint4* src = reinterpret_cast<const uint4*>(x + (long long)min(r, rows - 1) * x_ld + k0) + 8 * grp + half;
#pragma unroll
        for (int m = 0; m < 4; ++m) xin[i][m] = ok ? __ldg(src + 2 * m) : make_uint4(0u, 0u, 0u, 0u);
    }
}
// ... into a buffer ([chunk][NR] of 16 bytes): chunk 8 grp + 4 h + j holds word j of each of the four vectors
template <int NR, int THREADS, int ITEMS>
__device__ __forceinline__ void wg_put(uint4* buf, const uint4 (&xin)[ITEMS][4], int len) {
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
        const int idx = threadIdx.x + i * THREADS, r = idx % NR, half = (idx / NR) & 1, grp = idx / NR / 2;
        if (grp < len / 64) {
            uint4* dst = buf + (8 * grp + 4 * half) * NR + r;
#pragma unroll
            for (int j = 0; j < 4; ++j)
                dst[j * NR] = make_uint4(wg_word(xin[i][0], j), wg_word(xin[i][1], j), wg_word(xin[i][2], j), wg_word(xin[i][3], j));
        }
    }
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");  // visible to wgmma (the async proxy)
}

// one step's loads: the lane's weight vectors of rows g, g + 8, the e4m3 block scale or the int4 records (r[G][h]:
// group G, row g + 8 h)
template <int FMT, int VR>
__device__ __forceinline__ void wg_load(uint4 (&v)[2][VR], float& s, unsigned (&r)[2][2], const uint4* const (&wr)[2],
                                        const float* sr, const unsigned* const (&rr)[2], int step, int tile_at, int q_b) {
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int e = 0; e < VR; ++e) v[h][e] = load_weights(wr[h] + 4 * VR * step + e);
    if (FMT == SK_E4M3_BLOCK) s = __ldg(sr + (step >> q_b));
    if (FMT == SK_INT4) {
        const int half = 2 * (tile_at + step);
#pragma unroll
        for (int h = 0; h < 2; ++h) r[0][h] = __ldg(rr[h] + (half >> q_b)), r[1][h] = __ldg(rr[h] + ((half + 1) >> q_b));
    }
}

template <bool BF16, bool F32OUT, int FMT, int NR, int WG, int U, int KX>
__device__ __forceinline__ void skinny_wgmma(const unsigned short* __restrict__ x, const void* __restrict__ w,
                                             void* __restrict__ y, float* __restrict__ part, unsigned* __restrict__ done,
                                             int rows, int n, int k, long long x_ld, long long y_ld, int kc,
                                             const void* __restrict__ qd, long long q_ld, int q_a, int q_b,
                                             unsigned long long desc) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    extern __shared__ uint4 xs[];  // two passes of [KX / 8][NR] 16-byte chunks
    __shared__ unsigned last;
    griddep_launch_dependents();
    constexpr int MT = NR / 8, WARPS = 4 * WG, THREADS = 128 * WG;
    constexpr int SK = FMT == SK_INT4 ? 128 : 64;  // inputs a step
    constexpr int VR = FMT == SK_W16 ? 2 : 1;      // 16-byte vectors a lane loads of a row a step
    constexpr int GPS = SK / 64, PASS = KX / SK;   // 64-input groups a step, steps a pass
    constexpr int BUF = KX / 8 * NR;               // chunks of a buffer
    constexpr int ITEMS = (NR * (KX / 64) * 2 + THREADS - 1) / THREADS;
    constexpr bool SCALED = FMT == SK_E4M3_BLOCK || FMT == SK_INT4;
    static_assert((NR == 16 || NR == 32) && KX % SK == 0, "NR 16 or 32; KX whole steps");
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, q = lane & 3;
    const int j0 = (blockIdx.x * WARPS + warp) * 16;
    const int k_lo = blockIdx.y * kc, k_hi = min(k, k_lo + kc);
    const int len = max(0, k_hi - k_lo), steps = len / SK;
    const long long row_bytes = FMT == SK_W16 ? 2ll * k : FMT == SK_INT4 ? k / 2 : k;
    const long long lo_bytes = FMT == SK_W16 ? 2ll * k_lo : FMT == SK_INT4 ? k_lo / 2 : k_lo;
    const unsigned char* wb = reinterpret_cast<const unsigned char*>(w);
    const float* scale = reinterpret_cast<const float*>(qd);
    const unsigned* rec = reinterpret_cast<const unsigned*>(qd);
    const uint4* wr[2];       // the lane's weight rows g, g + 8 (a last partial tile repeats row n - 1) at input k_lo
    const unsigned* rr[2];    // int4: their records
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const long long row = min(j0 + g + 8 * h, n - 1);
        wr[h] = reinterpret_cast<const uint4*>(wb + row * row_bytes + lo_bytes) + VR * q;
        rr[h] = rec + row * q_ld;
    }
    const float* sr = FMT == SK_E4M3_BLOCK ? scale + (long long)(min(j0, n - 1) / q_a) * q_ld + (k_lo >> (6 + q_b)) : scale;
    const int tile_at = k_lo >> 7;
    uint4 cur[U][2][VR];
    float cs[U];
    unsigned cr[U][2][2];
#pragma unroll
    for (int u = 0; u < U; ++u)
        if (u < steps) wg_load<FMT, VR>(cur[u], cs[u], cr[u], wr, sr, rr, u, tile_at, q_b);
    griddep_wait();  // x may be the previous kernel's output, part and done its scratch; W and its data are constants
    uint4 xin[ITEMS][4];
    const int passes = (len + KX - 1) / KX;
    if (passes > 0) {
        wg_fetch<NR, THREADS, ITEMS>(xin, x, rows, x_ld, k_lo, min(KX, len));
        wg_put<NR, THREADS, ITEMS>(xs, xin, min(KX, len));
    }
    __syncthreads();
    if (passes > 1) wg_fetch<NR, THREADS, ITEMS>(xin, x, rows, x_ld, k_lo + KX, min(KX, len - KX));
    const unsigned long long desc0 = desc | ((__cvta_generic_to_shared(xs) & 0x3ffffu) >> 4);
    float acc[1][MT][4], c[MT][4];  // c: scaled formats' partial sum of the group in flight
    sk_zero(acc);
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) c[i][e] = 0.f;
    float pa = 0.f, pb = 0.f;  // the scales of the group in flight (rows g, g + 8); 0 before the first: folds nothing
    for (int step = 0; step < steps; step += U) {
        uint4 nxt[U][2][VR];
        float ns[U];
        unsigned nr[U][2][2];
#pragma unroll
        for (int u = 0; u < U; ++u)
            if (step + U + u < steps) wg_load<FMT, VR>(nxt[u], ns[u], nr[u], wr, sr, rr, step + U + u, tile_at, q_b);
        if (step > 0 && step % PASS == 0) {  // pass p's x (fetched a pass ago) into its buffer, pass p + 1's fetched
            const int p = step / PASS;
            const int left = len - p * KX;
            // (buffer p & 1 was last read by pass p - 2, whose groups every warpgroup waited for before the barrier
            // of pass p - 1)
            wg_put<NR, THREADS, ITEMS>(xs + (p & 1) * BUF, xin, min(KX, left));
            wg_wait<0>();  // this warpgroup's reads of buffer (p - 1) & 1 done before the barrier
            __syncthreads();
            if (p + 1 < passes) wg_fetch<NR, THREADS, ITEMS>(xin, x, rows, x_ld, k_lo + (p + 1) * KX, min(KX, left - KX));
        }
        const unsigned long long pass_desc = desc0 + ((step / PASS) & 1) * BUF;
#pragma unroll
        for (int u = 0; u < U; ++u) {
            if (step + u < steps) {
                const int sp = (step + u) % PASS;
#pragma unroll
                for (int G = 0; G < GPS; ++G) {
                    unsigned nza = 0u, nzb = 0u;
                    if (FMT == SK_INT4) nza = i4_neg_zero<BF16>(cr[u][G][0]), nzb = i4_neg_zero<BF16>(cr[u][G][1]);
                    if (SCALED) {  // the previous group's partial sum complete: fold it (c is then free)
                        wg_wait<0>();
                        wg_fold(acc, c, pa, pb);
                    }
                    unsigned a[4][4];
                    wg_decode<BF16, FMT, VR>(a, cur[u], G, nza, nzb);
                    const unsigned long long d = pass_desc + 8 * (sp * GPS + G) * NR;  // the group's first chunk
                    wg_fence();  // orders the fold's reads of c and the decoding's writes of a before the wgmma
                    if (!SCALED) {
#pragma unroll
                        for (int I = 0; I < 4; ++I) wg_mma<BF16, 1>(acc[0], a[I], d + 2 * I * NR);
                        wg_commit();
                    } else {
                        wg_mma<BF16, 0>(c, a[0], d);
#pragma unroll
                        for (int I = 1; I < 4; ++I) wg_mma<BF16, 1>(c, a[I], d + 2 * I * NR);
                        wg_commit();
                        if (FMT == SK_INT4)
                            pa = __uint_as_float(cr[u][G][0] & 0xffffff00u), pb = __uint_as_float(cr[u][G][1] & 0xffffff00u);
                        else
                            pa = pb = cs[u];
                    }
                }
            }
        }
        if (step + U < steps) {
#pragma unroll
            for (int u = 0; u < U; ++u) {
                cs[u] = ns[u];
#pragma unroll
                for (int h = 0; h < 2; ++h) {
#pragma unroll
                    for (int e = 0; e < VR; ++e) cur[u][h][e] = nxt[u][h][e];
                    cr[u][0][h] = nr[u][0][h], cr[u][1][h] = nr[u][1][h];
                }
            }
        }
    }
    wg_wait<0>();
    if (SCALED) {
        wg_fold(acc, c, pa, pb);  // the last group's
    } else {
        wg_touch(acc[0]);
    }
    if (FMT == SK_E4M3_ROW) sk_scale_rows(acc, scale, j0, g, n);
    sk_finish<BF16, F32OUT, MT, 1, WARPS>(acc, y, part, done, last, rows, n, y_ld, j0, g, q, FMT == SK_INT4 ? q_a : 0);
#endif
}

// {name}_r{NR}_w{WG}_u{U}_x{KX}(x, w, y, part, done, rows, n, k, x_ld, y_ld, kc, q, q_ld, q_a, q_b, desc): grid
// (ceil(n / (64 WG)), ceil(k / kc)), 128 WG threads, dynamic shared memory 4 KX NR bytes
#define SKINNY_WGMMA(name, bf16, f32out, fmt, NR, WG, U, KX)                                                        \
    extern "C" __global__ void __launch_bounds__(128 * WG, 1) name##_r##NR##_w##WG##_u##U##_x##KX(                  \
        const unsigned short* x, const void* w, void* y, float* part, unsigned* done, int rows, int n, int k,       \
        long long x_ld, long long y_ld, int kc, const void* q, long long q_ld, int q_a, int q_b,                    \
        unsigned long long desc) {                                                                                  \
        skinny_wgmma<bf16, f32out, fmt, NR, WG, U, KX>(x, w, y, part, done, rows, n, k, x_ld, y_ld, kc, q, q_ld,    \
                                                       q_a, q_b, desc);                                             \
    }
// every type pair of one format and geometry: wgmma{,8b,8r,4}_{bf16,f16}_{16,f32}_...
#define SKINNY_WGMMA_TYPES(prefix, fmt, NR, WG, U, KX)                                                              \
    SKINNY_WGMMA(prefix##_bf16_16, true, false, fmt, NR, WG, U, KX)                                                 \
    SKINNY_WGMMA(prefix##_bf16_f32, true, true, fmt, NR, WG, U, KX)                                                 \
    SKINNY_WGMMA(prefix##_f16_16, false, false, fmt, NR, WG, U, KX)                                                 \
    SKINNY_WGMMA(prefix##_f16_f32, false, true, fmt, NR, WG, U, KX)
// The instances: WGMMA_INSTANCES where the includer defines it (fi_engine.kernels.skinny_wgmma compiles the ones a
// Dense needs, benchmarks/lab_skinny_gemm.py a sweep), else the engine's geometries (skinny_wgmma.GEOMETRIES) of
// every format, row count and type pair
#ifdef WGMMA_INSTANCES
WGMMA_INSTANCES
#else
#define WGMMA_ROWS(NR)                                                                                              \
    SKINNY_WGMMA_TYPES(wgmma, SK_W16, NR, 2, 2, 512) SKINNY_WGMMA_TYPES(wgmma, SK_W16, NR, 1, 4, 512)               \
    SKINNY_WGMMA_TYPES(wgmma8b, SK_E4M3_BLOCK, NR, 2, 2, 512) SKINNY_WGMMA_TYPES(wgmma8b, SK_E4M3_BLOCK, NR, 1, 4, 512) \
    SKINNY_WGMMA_TYPES(wgmma8r, SK_E4M3_ROW, NR, 2, 2, 512) SKINNY_WGMMA_TYPES(wgmma8r, SK_E4M3_ROW, NR, 1, 4, 512) \
    SKINNY_WGMMA_TYPES(wgmma4, SK_INT4, NR, 2, 2, 512) SKINNY_WGMMA_TYPES(wgmma4, SK_INT4, NR, 1, 2, 512)
WGMMA_ROWS(16)
WGMMA_ROWS(32)
#endif
