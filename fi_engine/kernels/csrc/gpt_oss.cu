// gpt-oss's kernel (fi_engine.models.gpt_oss): the k projection's bias.
#include "convert.cuh"  // b2f, f2b
// x[t, c] = round(x[t, c] + b[c]) for t < rows, c < width (bfloat16; row stride ld).
extern "C" __global__ void add_bias(unsigned short* __restrict__ x, const unsigned short* __restrict__ b,
                                    long long width, long long ld) {
    unsigned short* row = x + (long long)blockIdx.x * ld;
    for (long long c = threadIdx.x; c < width; c += blockDim.x) row[c] = f2b(b2f(row[c]) + b2f(b[c]));
}
