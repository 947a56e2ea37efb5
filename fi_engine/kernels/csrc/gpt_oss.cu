// gpt-oss's kernel (fi_engine.models.gpt_oss): the k projection's bias.
__device__ __forceinline__ float bf(unsigned short v) { return __uint_as_float(((unsigned int)v) << 16); }
__device__ __forceinline__ unsigned short to_bf(float f) {
    unsigned short h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
// x[t, c] = round(x[t, c] + b[c]) for t < rows, c < width (bfloat16; row stride ld).
extern "C" __global__ void add_bias(unsigned short* __restrict__ x, const unsigned short* __restrict__ b,
                                    long long width, long long ld) {
    unsigned short* row = x + (long long)blockIdx.x * ld;
    for (long long c = threadIdx.x; c < width; c += blockDim.x) row[c] = to_bf(bf(row[c]) + bf(b[c]));
}
