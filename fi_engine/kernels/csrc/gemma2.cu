// Gemma 2's kernels (fi_engine.models.gemma2): the scaled embedding lookup and the logits' soft cap.
#include "convert.cuh"  // load16, store16
// dst[r, :width] = round(src[rows[r] - start, :width] * scale): Gemma's scaled embedding (scale already in the
// dtype), from a table of the ids [start, start + valid) (a vocabulary shard); zeros for an id outside it.
extern "C" __global__ void gather_scale16(const unsigned short* __restrict__ src, const int* __restrict__ rows,
                                          unsigned short* __restrict__ dst, long long width, float scale, int bf16,
                                          long long start, long long valid) {
    const long long id = (long long)rows[blockIdx.x] - start;
    unsigned short* b = dst + (long long)blockIdx.x * width;
    if (id < 0 || id >= valid) {
        for (long long c = threadIdx.x; c < width; c += blockDim.x) b[c] = 0;
        return;
    }
    const unsigned short* a = src + id * width;
    for (long long c = threadIdx.x; c < width; c += blockDim.x) b[c] = store16(load16(a[c], bf16) * scale, bf16);
}
// x[i] = cap * tanh(x[i] / cap) for i < n (float32 logits).
extern "C" __global__ void soft_cap(float* __restrict__ x, long long n, float cap) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        x[i] = cap * tanhf(x[i] / cap);
}
