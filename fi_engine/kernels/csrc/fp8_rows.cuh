
// The sums of the FP8 GEMVs of up to R x rows (gemv8_rows in fp8_gemv.cu, gemv8_pairs in fp8_fused.cu) over four e4m3
// weight rows wv[i] (16-byte vectors; block scales from srow[i] where BLOCK) and x rows r < rows <= R (16-bit, row
// stride x_ld): lane l of warp v takes the vectors 32 v + l, 32 (v + SPLITS) + l, ... of each weight row (the next
// ones loading while these are summed, the first ones loaded before the wait for the previous kernel), a butterfly
// sums each warp's lanes, and warp v's sum of weight row i and x row r is part[v][i][r] after it (past a barrier).
// Float32 sums of exact products, 16 at a time (add_partial16), in the same order for both callers. A macro, not a
// function: its loop compiles in its place, into the instructions each kernel had when it wrote the loop out (as a
// function's, the loop compiled otherwise).
#define GEMV8_SUMS(BF16, BLOCK, R, x, wv, srow, rows, k, x_ld, shift, part, lane, warp)                               \
    {                                                                                                                 \
        const int vecs = k >> 4;                                                                                      \
        float acc[4][R];                                                                                              \
        _Pragma("unroll")                                                                                             \
        for (int i = 0; i < 4; ++i)                                                                                   \
            _Pragma("unroll")                                                                                         \
            for (int r = 0; r < R; ++r) acc[i][r] = 0.f;                                                              \
        uint4 a[4];                                                                                                   \
        int c = warp * 32 + lane;                                                                                     \
        if (c < vecs) {                                                                                               \
            _Pragma("unroll")                                                                                         \
            for (int i = 0; i < 4; ++i) a[i] = load_weights(wv[i] + c);                                               \
        }                                                                                                             \
        griddep_wait(); /* x may be the previous kernel's output; the weights and scales are constants */              \
        while (c < vecs) {                                                                                            \
            float wf[4][16];                                                                                          \
            float s[4];                                                                                               \
            _Pragma("unroll")                                                                                         \
            for (int i = 0; i < 4; ++i) {                                                                             \
                e4m3x16(a[i], wf[i]);                                                                                 \
                s[i] = BLOCK ? __ldg(srow[i] + (c >> shift)) : 1.f;                                                   \
            }                                                                                                         \
            const int next = c + 32 * SPLITS;                                                                         \
            if (next < vecs) {                                                                                        \
                _Pragma("unroll")                                                                                     \
                for (int i = 0; i < 4; ++i) a[i] = load_weights(wv[i] + next);                                        \
            }                                                                                                         \
            _Pragma("unroll")                                                                                         \
            for (int r = 0; r < R; ++r) {                                                                             \
                if (r < rows) {                                                                                       \
                    float xf[16];                                                                                     \
                    widen16<BF16>(reinterpret_cast<const uint4*>(x + r * x_ld) + 2 * c, xf);                          \
                    _Pragma("unroll")                                                                                 \
                    for (int i = 0; i < 4; ++i) acc[i][r] = add_partial16<BLOCK>(acc[i][r], wf[i], xf, s[i]);         \
                }                                                                                                     \
            }                                                                                                         \
            c = next;                                                                                                 \
        }                                                                                                             \
        _Pragma("unroll")                                                                                             \
        for (int i = 0; i < 4; ++i)                                                                                   \
            _Pragma("unroll")                                                                                         \
            for (int r = 0; r < R; ++r) {                                                                             \
                float v = acc[i][r];                                                                                  \
                for (int off = 16; off; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);                         \
                if (lane == 0) part[warp][i][r] = v;                                                                  \
            }                                                                                                         \
        __syncthreads();                                                                                              \
    }
