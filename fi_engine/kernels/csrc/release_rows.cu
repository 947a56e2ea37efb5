// The separate-launch step's two row kernels between GEMMs, FlashInfer's arithmetic, each releasing the next launch
// at its start (programmatic dependent launch): the GEMM after it then starts on its SMs beside it and loads its
// first weights (constants: before its own griddep_wait) while this kernel runs, where after FlashInfer's kernels it
// starts only as they end.
#include "convert.cuh"   // tof, fromf
#include "griddep.cuh"   // griddep_wait, griddep_launch_dependents
#include "rms_rows.cuh"  // rows_rcp, row_vec: the norm's factor in FlashInfer's order
#include "silu_mul.cuh"  // silu_mul_vec: FlashInfer's silu_and_mul of 8 elements

// FlashInfer's fused_add_rmsnorm(input x, residual h, weight nw) for row blockIdx.x: s = x + h (float32), h = s
// (rounded), x = s * rsqrt(mean(s^2) + eps) * nw (rounded). One block a row of FlashInfer's shape: 32 W threads,
// W = ceil(min(1024, k / 8) / 32) (rows_rcp sums in its partition). k a multiple of 8; rows 16-byte aligned.
template <bool BF16>
__device__ __forceinline__ void add_rmsnorm_row(unsigned short* __restrict__ x, unsigned short* __restrict__ h,
                                                const unsigned short* __restrict__ nw, int k, long long x_ld,
                                                long long h_ld, float eps) {
    griddep_launch_dependents();
    __shared__ float rcp[1];
    unsigned short* xr = x + blockIdx.x * x_ld;
    unsigned short* hr = h + blockIdx.x * h_ld;
    griddep_wait();  // x is the GEMM before's output
    rows_rcp<BF16, 2, 1>(hr, xr, 1, k, 0, 0, eps, rcp);  // (ends with a barrier: every read of the row before a write)
    const int vecs = k >> 3;
    for (int c = threadIdx.x; c < vecs; c += blockDim.x) {
        float v[8];
        row_vec<BF16, 2>(hr, xr, 0, c, 0, 0, v);
        const uint4 g = *(reinterpret_cast<const uint4*>(nw) + c);
        const unsigned short* gv = reinterpret_cast<const unsigned short*>(&g);
        uint4 o, s;
        unsigned short* ov = reinterpret_cast<unsigned short*>(&o);
        unsigned short* sv = reinterpret_cast<unsigned short*>(&s);
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            ov[e] = fromf<BF16>(v[e] * rcp[0] * tof<BF16>(gv[e]));
            sv[e] = fromf<BF16>(v[e]);
        }
        *(reinterpret_cast<uint4*>(xr) + c) = o;
        *(reinterpret_cast<uint4*>(hr) + c) = s;
    }
}

// FlashInfer's silu_and_mul: act[r, c] = silu(gu[r, c]) * gu[r, inter + c] (float32, rounded once), silu(a) =
// a / (1 + exp(-a)) as its fast-math build computes it; grid (rows, column blocks of 8 blockDim.x elements). inter a
// multiple of 8; rows 16-byte aligned.
template <bool BF16>
__device__ __forceinline__ void silu_mul_row(const unsigned short* __restrict__ gu, unsigned short* __restrict__ act,
                                             int inter, long long gu_ld, long long act_ld) {
    griddep_launch_dependents();
    const int c = blockIdx.y * blockDim.x + threadIdx.x;
    griddep_wait();  // gu is the GEMM before's output
    if (c >= inter >> 3) return;
    const unsigned short* row = gu + blockIdx.x * gu_ld;
    const uint4 g = *(reinterpret_cast<const uint4*>(row) + c);
    const uint4 u = *(reinterpret_cast<const uint4*>(row + inter) + c);
    *(reinterpret_cast<uint4*>(act + blockIdx.x * act_ld) + c) = silu_mul_vec<BF16>(g, u);
}

#define RELEASE_ROWS(suffix, bf16)                                                                                  \
    extern "C" __global__ void add_rmsnorm_release_##suffix(unsigned short* x, unsigned short* h,                   \
                                                            const unsigned short* nw, int k, long long x_ld,        \
                                                            long long h_ld, float eps) {                            \
        add_rmsnorm_row<bf16>(x, h, nw, k, x_ld, h_ld, eps);                                                        \
    }                                                                                                               \
    extern "C" __global__ void silu_mul_release_##suffix(const unsigned short* gu, unsigned short* act, int inter,   \
                                                         long long gu_ld, long long act_ld) {                       \
        silu_mul_row<bf16>(gu, act, inter, gu_ld, act_ld);                                                          \
    }
RELEASE_ROWS(f16, false)
RELEASE_ROWS(bf16, true)
