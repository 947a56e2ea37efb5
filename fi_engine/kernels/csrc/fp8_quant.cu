
// x [rows, k] 16-bit (row stride x_ld, 16-byte aligned rows for quant_rows, 8-byte for quant_groups) -> q [rows, k]
// e4m3 (row-major, row stride k) and float32 scales with x ~= q * scale. Per group of elements: amax = max(max |x|,
// 1e-12), scale = amax / 448 and q = e4m3(x * (448 / amax)), rounded to nearest even and saturated at +-448 (PTX
// cvt.rn.satfinite.e4m3x2.f32; SM 8.9+). The largest element of each group is stored as +-448 exactly.
#include "convert.cuh"  // tof, e4m3x2

// One group per row (per-token scales, scale[r]): one block of 256 threads per row; k a multiple of 8.
template <bool BF16>
__device__ __forceinline__ void quant_rows(const unsigned short* __restrict__ x, long long x_ld, int k,
                                           unsigned char* __restrict__ q, float* __restrict__ scale) {
    __shared__ float warp_max[8];
    const unsigned short* row = x + (long long)blockIdx.x * x_ld;
    const uint4* v = reinterpret_cast<const uint4*>(row);
    const int vecs = k >> 3;
    float m = 0.f;
    for (int i = threadIdx.x; i < vecs; i += blockDim.x) {
        const uint4 a = v[i];
        const unsigned w[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            m = fmaxf(m, fabsf(tof<BF16>((unsigned short)(w[j] & 0xffffu))));
            m = fmaxf(m, fabsf(tof<BF16>((unsigned short)(w[j] >> 16))));
        }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    if ((threadIdx.x & 31) == 0) warp_max[threadIdx.x >> 5] = m;
    __syncthreads();
    m = warp_max[0];
    for (int i = 1; i < (int)(blockDim.x >> 5); ++i) m = fmaxf(m, warp_max[i]);
    const float amax = fmaxf(m, 1e-12f);
    const float inv = 448.f / amax;
    if (threadIdx.x == 0) scale[blockIdx.x] = amax / 448.f;
    uint2* out = reinterpret_cast<uint2*>(q + (long long)blockIdx.x * k);
    for (int i = threadIdx.x; i < vecs; i += blockDim.x) {
        const uint4 a = v[i];
        const unsigned w[4] = {a.x, a.y, a.z, a.w};
        unsigned short b[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const float lo = tof<BF16>((unsigned short)(w[j] & 0xffffu));
            const float hi = tof<BF16>((unsigned short)(w[j] >> 16));
            b[j] = e4m3x2(lo * inv, hi * inv);
        }
        out[i] = make_uint2(b[0] | ((unsigned)b[1] << 16), b[2] | ((unsigned)b[3] << 16));
    }
}

// Groups of 128 elements along k (scale[g * s_ld + r]: groups major, rows contiguous, as cuBLASLt's VEC128_32F
// scales of the product's second operand): one warp per (row, group), 4 elements a lane; k a multiple of 4.
template <bool BF16>
__device__ __forceinline__ void quant_groups(const unsigned short* __restrict__ x, long long x_ld, int rows, int k,
                                             unsigned char* __restrict__ q, float* __restrict__ scale, long long s_ld) {
    const int groups = (k + 127) >> 7;
    const long long id = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (id >= (long long)rows * groups) return;
    const int r = (int)(id / groups), g = (int)(id % groups), lane = threadIdx.x & 31;
    const int c = (g << 7) + (lane << 2);
    float f[4] = {0.f, 0.f, 0.f, 0.f};
    if (c < k) {
        const uint2 a = *reinterpret_cast<const uint2*>(x + (long long)r * x_ld + c);
        f[0] = tof<BF16>((unsigned short)(a.x & 0xffffu));
        f[1] = tof<BF16>((unsigned short)(a.x >> 16));
        f[2] = tof<BF16>((unsigned short)(a.y & 0xffffu));
        f[3] = tof<BF16>((unsigned short)(a.y >> 16));
    }
    float m = fmaxf(fmaxf(fabsf(f[0]), fabsf(f[1])), fmaxf(fabsf(f[2]), fabsf(f[3])));
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    const float amax = fmaxf(m, 1e-12f);
    const float inv = 448.f / amax;
    if (lane == 0) scale[(long long)g * s_ld + r] = amax / 448.f;
    if (c < k) {
        const unsigned short lo = e4m3x2(f[0] * inv, f[1] * inv), hi = e4m3x2(f[2] * inv, f[3] * inv);
        *reinterpret_cast<unsigned*>(q + (long long)r * k + c) = lo | ((unsigned)hi << 16);
    }
}

#define QUANT(T, B)                                                                                                 \
    extern "C" __global__ void quant_rows_##T(const unsigned short* x, long long x_ld, int k, unsigned char* q,     \
                                              float* scale) {                                                       \
        quant_rows<B>(x, x_ld, k, q, scale);                                                                        \
    }                                                                                                               \
    extern "C" __global__ void quant_groups_##T(const unsigned short* x, long long x_ld, int rows, int k,            \
                                                unsigned char* q, float* scale, long long s_ld) {                   \
        quant_groups<B>(x, x_ld, rows, k, q, scale, s_ld);                                                          \
    }
QUANT(bf16, true)
QUANT(f16, false)
