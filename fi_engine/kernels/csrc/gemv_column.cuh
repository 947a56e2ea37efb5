
// One output column of the 16-bit GEMVs (gemv.cu's gemv_rows, fused_gemv.cu's gemv_fused): the weight loop and the
// store of the column's sums. Uses UNROLL and row_counts.cuh's GEMV_PIPELINE and ROWS, load_weights and fromf,
// which each includer defines or includes before it.

// Weight vectors c, c + 32, ... < vecs of the weight row wv, each handed to SUM(vector, its index) in order (SUM:
// the includer's macro, adding the vector's products to its sums); the first UNROLL are already in a where more
// (the includer loads them before waiting for the previous kernel, as weights are constants), and more is false
// after. With GEMV_PIPELINE each next UNROLL are loaded before the ones in hand are summed, so the loads wait on no
// sum; the one-at-a-time tail sums in the same order, so the sums do not depend on the unrolling. A macro, not a
// function taking a lambda: that compiled the fused GEMVs to other instructions (tools/kernel_fingerprints.py).
#define EACH_WEIGHT_VECTOR(wv, vecs, c, a, more, SUM)                                                                  \
    while (more) {                                                                                                     \
        const bool next = c + 32 * (2 * UNROLL - 1) < vecs;                                                            \
        uint4 b[UNROLL];                                                                                               \
        if (GEMV_PIPELINE && next) {                                                                                   \
            _Pragma("unroll") for (int u = 0; u < UNROLL; ++u) b[u] = load_weights(wv + c + 32 * (UNROLL + u));        \
        }                                                                                                              \
        _Pragma("unroll") for (int u = 0; u < UNROLL; ++u) SUM(a[u], c + 32 * u);                                      \
        c += 32 * UNROLL;                                                                                              \
        more = next;                                                                                                   \
        if (more) {                                                                                                    \
            _Pragma("unroll") for (int u = 0; u < UNROLL; ++u)                                                         \
                a[u] = GEMV_PIPELINE ? b[u] : load_weights(wv + c + 32 * u);                                           \
        }                                                                                                              \
    }                                                                                                                  \
    for (; c < vecs; c += 32) SUM(load_weights(wv + c), c)

// y[r, j] for r < ROWS(R, rows): the sum of the warp's acc[r] (one per lane), stored by lane 0 as float32 or rounded
// once to the 16-bit type; y's rows y_ld elements apart.
template <bool BF16, bool F32OUT, int R>
__device__ __forceinline__ void store_column(const float acc[4], int lane, int rows, void* __restrict__ y,
                                             long long y_ld, int j) {
#pragma unroll
    for (int r = 0; r < 4; ++r) {
        float v = acc[r];
        for (int off = 16; off; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
        if (lane == 0 && r < ROWS(R, rows)) {
            if (F32OUT) reinterpret_cast<float*>(y)[r * y_ld + j] = v;
            else reinterpret_cast<unsigned short*>(y)[r * y_ld + j] = fromf<BF16>(v);
        }
    }
}
