// FlashInfer's RMSNorm factor of a few rows, rsqrt(mean(s^2) + eps), summed in its order: the fused GEMVs'
// prologue (fused_gemv.cu's stage_block) and the quantized GEMVs' folded norm (norm_fold.cuh) compute it so.
// Uses convert.cuh's tof, which each includer includes before it.
__device__ __forceinline__ float rsqrt_approx(float x) {
    float y;
    asm("rsqrt.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// element e of the 8-vector at c8 of row r: h alone, or x + h (FlashInfer: float(input) + float(residual))
template <bool BF16, int MODE>
__device__ __forceinline__ void row_vec(const unsigned short* __restrict__ h, const unsigned short* __restrict__ x,
                                        int r, int c8, long long h_ld, long long x_ld, float v[8]) {
    uint4 a = *(reinterpret_cast<const uint4*>(h + r * h_ld) + c8);
    const unsigned short* av = reinterpret_cast<const unsigned short*>(&a);
    if (MODE == 2) {
        uint4 b = *(reinterpret_cast<const uint4*>(x + r * x_ld) + c8);
        const unsigned short* bv = reinterpret_cast<const unsigned short*>(&b);
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            float t = tof<BF16>(bv[e]);
            t += tof<BF16>(av[e]);
            v[e] = t;
        }
    } else {
#pragma unroll
        for (int e = 0; e < 8; ++e) v[e] = tof<BF16>(av[e]);
    }
}

// rcp[r] (shared) = rsqrt(mean(s^2) + eps) over the k elements of row r < rows <= R, s = h (MODE 1) or x + h (MODE
// 2) as row_vec reads them, every thread of the block taking part; ends with a barrier. FlashInfer's partition of the
// sum: its block of W = ceil(min(1024, k / 8) / 32) warps, thread t summing the 8-element vectors t, t + 32 W, ... in
// turn, a butterfly within each warp, then one across the W warp sums; rsqrt.approx as its math::rsqrt. k a multiple
// of 8; h, x and the row strides 16-byte aligned.
template <bool BF16, int MODE, int R>
__device__ __forceinline__ void rows_rcp(const unsigned short* __restrict__ h, const unsigned short* __restrict__ x,
                                         int rows, int k, long long h_ld, long long x_ld, float eps, float* rcp) {
    __shared__ float part[R][32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    const int vecs = k >> 3;
    const int fw = (min(1024, vecs) + 31) >> 5;
    const int ft = fw << 5;
    for (int r = 0; r < rows; ++r)
        for (int vw = warp; vw < fw; vw += warps) {
            const int t = (vw << 5) + lane;
            float sum = 0.f;
            for (int c = t; c < vecs; c += ft) {
                float v[8];
                row_vec<BF16, MODE>(h, x, r, c, h_ld, x_ld, v);
#pragma unroll
                for (int e = 0; e < 8; ++e) sum += v[e] * v[e];
            }
#pragma unroll
            for (int off = 16; off; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
            if (lane == 0) part[r][vw] = sum;
        }
    __syncthreads();
    if (warp == 0)
        for (int r = 0; r < rows; ++r) {
            float sum = lane < fw ? part[r][lane] : 0.f;
#pragma unroll
            for (int off = 16; off; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
            if (lane == 0) rcp[r] = rsqrt_approx(sum / float(k) + eps);
        }
    __syncthreads();
}
