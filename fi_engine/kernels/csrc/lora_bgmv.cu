// LoRA adapters chosen per row (fi_engine.kernels.lora_bgmv, fi_engine.lora): after a projection's base GEMM has
// written y = x @ W^T, each row r whose adapter sits in GPU slot s = slots[r] gets y[r] += scale[s] * B_s (A_s x[r]),
// in two launches in the manner of Punica's BGMV (a batched GEMV where each row reads its own adapter's matrix):
//
//   shrink:  t[r, j] = scale[s] * sum_c x[r, c] * A[s, j, c]          j < width (float32 t)
//   expand:  y[r, j] = round(y[r, j] + sum_i t[r, p(j) * rank + i] * Bt[s, i, j])    j < n
//
// A [slots, width, k] and Bt [slots, rank, n] are one layer's part of a slot array (the caller passes the address of
// slot 0's matrix and the distance between slots in elements). A projection stacked from parts (q, k, v; gate, up)
// has one A of `parts * rank` rows (part p's A in rows [p rank, (p + 1) rank)) and one Bt whose column j belongs to
// part p(j) = (j >= n0) + (j >= n1): the output columns [0, n0) read t's first rank entries, [n0, n1) the next, the
// rest the third (n0 = n1 = n: one part). An adapter of a smaller rank is zero past its rank; a part it does not
// adapt is zero. A row whose slot is negative (the base model's row, a padding row) or whose slot's adapter leaves
// this projection alone (bit `bit` of targets[s] clear) is left untouched by both launches. Every argument is read on
// the device: a CUDA graph captures the launches once and each replay reads the step's slots.
//
// The shrink has two forms (fi_engine.kernels.lora_bgmv.LONG_ROWS chooses): a decode step's few rows take the form
// that spreads each entry's work widest (shrink_rows), a prefill's rows the one that reads x fewer times
// (shrink_long_rows).
//
// The decode form (the fused step's o and down shrinks) may be launched with programmatic dependent launch
// (lora_shrink.cuh's shrink_start); launched without, its wait does nothing, and its early launch_dependents only
// lets a next kernel launched with the attribute start, which waits for this grid's end before it reads.
//
// Sums in float32, in a fixed order (each thread its strided share of k, a butterfly over each warp, the warps in
// order; the expand in rank order): the result does not depend on the batch. y is rounded once, to nearest even.
// x and A rows 16-byte aligned, k a multiple of 8 (the caller checks).
#include "convert.cuh"  // tof, fromf
#include "griddep.cuh"  // griddep_wait, griddep_launch_dependents
#include "lora_shrink.cuh"  // dot8, block_sum, shrink_start

// One block per (row, j): grid (width, rows), its warps splitting k. A row's shrink is a few thousand 16-byte loads
// per output entry; one warp an entry (the first form) walked k in 16-56 dependent steps and bound a decode step's
// adapters by latency, so the block's threads take the vectors in turn (a 4 KiB stride at 256 threads), each warp's
// lanes sum by butterfly, and thread 0 adds the warps' sums in warp order.
template <bool BF16>
__device__ __forceinline__ void shrink_rows(const unsigned short* __restrict__ x, long long x_ld,
                                            const int* __restrict__ slots, const float* __restrict__ scale,
                                            const int* __restrict__ targets, int bit,
                                            const unsigned short* __restrict__ a, long long a_slot, int width, int k,
                                            float* __restrict__ t, long long t_ld) {
    __shared__ float warp_sums[32];
    shrink_start();
    const int row = blockIdx.y;
    const int s = slots[row];
    if (s < 0 || !(targets[s] & bit)) return;  // (the whole block: one row)
    const int j = blockIdx.x;
    if (j >= width) return;
    const uint4* xv = reinterpret_cast<const uint4*>(x + row * x_ld);
    const uint4* av = reinterpret_cast<const uint4*>(a + s * a_slot + (long long)j * k);
    float acc = 0.f;
    for (int c = threadIdx.x; c < (k >> 3); c += blockDim.x) acc = dot8<BF16>(__ldg(av + c), __ldg(xv + c), acc);
    const float sum = block_sum(acc, warp_sums);
    if (threadIdx.x == 0) t[row * t_ld + j] = scale[s] * sum;
}

// The shrink of a prefill's rows: one warp per (row, j), grid (ceil(width / 8), rows), 8 warps a block. The split
// form above launches width x rows blocks that each read x's row again; past a few dozen rows that traffic costs
// twice this form's time (a 4096-row q/k/v shrink of rank 16 on an H100: 343 us against 168), while at a decode
// step's few rows the split form's shorter dependent chains win. Sums in a fixed order: each lane its strided share
// of k, then a butterfly over the warp.
template <bool BF16>
__device__ __forceinline__ void shrink_long_rows(const unsigned short* __restrict__ x, long long x_ld,
                                                 const int* __restrict__ slots, const float* __restrict__ scale,
                                                 const int* __restrict__ targets, int bit,
                                                 const unsigned short* __restrict__ a, long long a_slot, int width,
                                                 int k, float* __restrict__ t, long long t_ld) {
    const int row = blockIdx.y;
    const int s = slots[row];
    if (s < 0 || !(targets[s] & bit)) return;  // (the whole block: one row)
    const int lane = threadIdx.x & 31;
    const int j = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (j >= width) return;
    const uint4* xv = reinterpret_cast<const uint4*>(x + row * x_ld);
    const uint4* av = reinterpret_cast<const uint4*>(a + s * a_slot + (long long)j * k);
    float acc = 0.f;
    for (int c = lane; c < (k >> 3); c += 32) acc = dot8<BF16>(__ldg(av + c), __ldg(xv + c), acc);
    for (int off = 16; off; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
    if (lane == 0) t[row * t_ld + j] = scale[s] * acc;
}

// One thread per (row, j): grid (ceil(n / 256), rows), 256 threads, dynamic shared memory of t's row (tw floats).
template <bool BF16>
__device__ __forceinline__ void expand_rows(const float* __restrict__ t, long long t_ld, int tw,
                                            const int* __restrict__ slots, const int* __restrict__ targets, int bit,
                                            const unsigned short* __restrict__ bt, long long b_slot, int rank, int n,
                                            int n0, int n1, unsigned short* __restrict__ y, long long y_ld) {
    extern __shared__ float ts[];
    const int row = blockIdx.y;
    const int s = slots[row];
    if (s < 0 || !(targets[s] & bit)) return;  // (the whole block: one row)
    for (int i = threadIdx.x; i < tw; i += blockDim.x) ts[i] = t[row * t_ld + i];
    __syncthreads();
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= n) return;
    const float* tp = ts + ((j >= n0) + (j >= n1)) * rank;
    const unsigned short* b = bt + s * b_slot + j;
    float acc = 0.f;
    for (int i = 0; i < rank; ++i) acc += tp[i] * tof<BF16>(b[(long long)i * n]);
    unsigned short* out = y + row * y_ld + j;
    *out = fromf<BF16>(tof<BF16>(*out) + acc);
}

// The parameters of both shrink kernels (their arguments in SHRINK_ARGS)
#define SHRINK_PARAMS                                                                                                \
    const unsigned short *x, long long x_ld, const int *slots, const float *scale, const int *targets, int bit,      \
        const unsigned short *a, long long a_slot, int width, int k, float *t, long long t_ld
#define SHRINK_ARGS x, x_ld, slots, scale, targets, bit, a, a_slot, width, k, t, t_ld

// The segment form's last step (fi_engine.lora.segment_form: a prefill's shrink and expand as FlashInfer's segment
// GEMMs, whose SM90 kernel writes its output rather than adding to it): y[r, j] = round(y[r, j] + scale[s] * z[r, j])
// for the rows the other kernels serve, 8 columns a thread (n, y_ld, z_ld multiples of 8; 16-byte aligned rows).
// grid (ceil(n / 2048), rows), 256 threads.
template <bool BF16>
__device__ __forceinline__ void add_scaled_rows(const unsigned short* __restrict__ z, long long z_ld,
                                                const int* __restrict__ slots, const float* __restrict__ scale,
                                                const int* __restrict__ targets, int bit, int n,
                                                unsigned short* __restrict__ y, long long y_ld) {
    const int row = blockIdx.y;
    const int s = slots[row];
    if (s < 0 || !(targets[s] & bit)) return;
    const int j = (blockIdx.x * blockDim.x + threadIdx.x) * 8;
    if (j >= n) return;
    const float c = scale[s];
    uint4 zv = *reinterpret_cast<const uint4*>(z + row * z_ld + j);
    uint4* yp = reinterpret_cast<uint4*>(y + row * y_ld + j);
    uint4 yv = *yp;
    const unsigned short* pz = reinterpret_cast<const unsigned short*>(&zv);
    unsigned short* py = reinterpret_cast<unsigned short*>(&yv);
#pragma unroll
    for (int e = 0; e < 8; ++e) py[e] = fromf<BF16>(tof<BF16>(py[e]) + c * tof<BF16>(pz[e]));
    *yp = yv;
}

#define LORA_KERNELS(tag, bf16)                                                                                      \
    extern "C" __global__ void lora_shrink_##tag(SHRINK_PARAMS) { shrink_rows<bf16>(SHRINK_ARGS); }                 \
    extern "C" __global__ void lora_shrink_long_##tag(SHRINK_PARAMS) { shrink_long_rows<bf16>(SHRINK_ARGS); }       \
    extern "C" __global__ void lora_expand_##tag(const float* t, long long t_ld, int tw, const int* slots,           \
                                                 const int* targets, int bit, const unsigned short* bt,              \
                                                 long long b_slot, int rank, int n, int n0, int n1,                  \
                                                 unsigned short* y, long long y_ld) {                                \
        expand_rows<bf16>(t, t_ld, tw, slots, targets, bit, bt, b_slot, rank, n, n0, n1, y, y_ld);                  \
    }                                                                                                                \
    extern "C" __global__ void lora_add_scaled_##tag(const unsigned short* z, long long z_ld, const int* slots,      \
                                                     const float* scale, const int* targets, int bit, int n,         \
                                                     unsigned short* y, long long y_ld) {                            \
        add_scaled_rows<bf16>(z, z_ld, slots, scale, targets, bit, n, y, y_ld);                                      \
    }
LORA_KERNELS(f16, false)
LORA_KERNELS(bf16, true)
