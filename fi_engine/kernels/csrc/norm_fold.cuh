// The RMSNorm between two GEMVs of a quantized decode step, with no launch of its own (Int4Linears' and Fp8Linears'
// fold forms). Between the o GEMV and the gate/up GEMV (the down GEMV and the next QKV GEMV) FlashInfer's
// fused_add_rmsnorm computes s = y + h (y the first GEMV's output, h the residual), stores round(s) as the new
// residual and gives the second GEMV round(s * f * nw), f = rsqrt(mean(s^2) + eps) of the row. Folded:
//   FOLD_OUT, the first GEMV: as it stores y[r, j] it also stores h_out[r, j] = round(s) and xn[r, j] = round(s *
//            nw[j]), the second GEMV's input short of the row's factor, which needs the whole row (fold_out);
//   FOLD_IN, the second GEMV: sums W xn and multiplies each sum by its row's f before it rounds it or runs its
//            epilogue. The factors come from block 0 of its own grid, which computes them from h and y as
//            FlashInfer does (rms_rows.cuh's rows_rcp) while the other blocks stream their weights, and publishes
//            them in rs with a count (sync[1]); a block that reaches its epilogue before the count says so computes
//            them itself, the same way (the same bits), so no block ever waits on another (fold_factors).
// Every block of a FOLD_IN launch draws a ticket from sync[0] as it starts: the counters only grow, so ticket /
// gridDim is the launch's number among its call site's launches, and sync[1] greater than that number says that
// launch's factors are published. One counter pair serves one call site at one grid size (the host keeps to it).
// The result differs from the separate launches' only in where the input is rounded (s * nw, then times f in
// float32, where FlashInfer rounds the product of the three): one rounding of the same size. Uses convert.cuh,
// griddep.cuh (griddep_wait, load_acquire) and rms_rows.cuh (rows_rcp), which each includer includes before it.
#define FOLD_NONE 0
#define FOLD_OUT 1
#define FOLD_IN 2

struct NormFold {
    const unsigned short* h;   // the residual before the add, [rows, ld] (16-bit)
    const unsigned short* v;   // FOLD_OUT: the norm's weight nw [n]; FOLD_IN: the first GEMV's output y [rows, ld]
    unsigned short* h_out;     // FOLD_OUT: the new residual round(y + h), [rows, ld]
    unsigned short* xn;        // FOLD_OUT: round((y + h) * nw), the second GEMV's input, [rows, ld]
    unsigned long long* sync;  // FOLD_IN: [2] the tickets drawn, the launches whose factors are published
    float* rs;                 // FOLD_IN: [rows] the factors f
    float eps;                 // FOLD_IN: the norm's epsilon
};

// The fold kernels' parameters after their GEMV's, and the NormFold they make
#define NORM_FOLD_PARAMS                                                                                           \
    const unsigned short *fold_h, const unsigned short *fold_v, unsigned short *fold_h_out,                        \
        unsigned short *fold_xn, unsigned long long *fold_sync, float *fold_rs, float fold_eps
#define NORM_FOLD_ARGS NormFold{fold_h, fold_v, fold_h_out, fold_xn, fold_sync, fold_rs, fold_eps}

// FOLD_OUT: the first GEMV's output at element `at` (row r, column j: at = r ld + j) from its float32 value v:
// h_out and xn stored there, y's 16-bit value returned for the caller to store
template <bool BF16>
__device__ __forceinline__ unsigned short fold_out(const NormFold& f, long long at, int j, float v) {
    const unsigned short y = fromf<BF16>(v);
    const float s = tof<BF16>(y) + tof<BF16>(f.h[at]);  // (FlashInfer: float(input) + float(residual))
    f.h_out[at] = fromf<BF16>(s);
    f.xn[at] = fromf<BF16>(s * tof<BF16>(f.v[j]));
    return y;
}

// FOLD_IN: a block's ticket, drawn by thread 0 as the block starts (others: 0); its value is read only at the
// epilogue, so the atomic's round trip hides behind the weights' loads
__device__ __forceinline__ unsigned long long fold_ticket(const NormFold& f) {
    return threadIdx.x == 0 ? atomicAdd(f.sync, 1ull) : 0ull;
}

// FOLD_IN, block 0: the factors of rows < rows <= R into rs, then counted as published (every thread; after the wait
// for the previous kernel, which wrote y). k: the row length; ld: the row stride of h and y.
template <bool BF16, int R>
__device__ __forceinline__ void fold_block(const NormFold& f, int rows, int k, long long ld) {
    __shared__ float rcp[R];
    (void)fold_ticket(f);  // (block 0 draws one too: a launch draws gridDim tickets)
    griddep_wait();
    rows_rcp<BF16, 2, R>(f.h, f.v, rows, k, ld, ld, f.eps, rcp);
    if (threadIdx.x == 0) {
        for (int r = 0; r < rows; ++r) f.rs[r] = rcp[r];
        __threadfence();
        atomicAdd(f.sync + 1, 1ull);
    }
}

// FOLD_IN, a GEMV block before its first output (every thread, after the wait for the previous kernel): the factors
// of rows < rows <= R into rcp (shared), read where block 0 has published this launch's (ticket: thread 0's
// fold_ticket), else computed here as block 0 computes them; ends with a barrier
template <bool BF16, int R>
__device__ __forceinline__ void fold_factors(const NormFold& f, unsigned long long ticket, int rows, int k,
                                             long long ld, float* rcp) {
    __shared__ int published;
    if (threadIdx.x == 0) {
        published = load_acquire(f.sync + 1) > ticket / gridDim.x;
        if (published)
            for (int r = 0; r < rows; ++r) rcp[r] = __ldcg(f.rs + r);
    }
    __syncthreads();
    if (!published) rows_rcp<BF16, 2, R>(f.h, f.v, rows, k, ld, ld, f.eps, rcp);
}
