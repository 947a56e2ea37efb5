// The LoRA shrink's sum of one t entry (lora_bgmv.cu's shrink, lora_fused.cu's normed shrink: the same order, so
// the same float32 value): each thread adds the 8 products of its A vectors with x's (dot8, A's element first), then
// block_sum adds the threads' sums, a butterfly within each warp and thread 0 the warps' sums in warp order.
// Uses convert.cuh's tof and griddep.cuh's calls, which each includer includes before it.
template <bool BF16>
__device__ __forceinline__ float dot8(uint4 wa, uint4 wx, float acc) {
    const unsigned short* pa = reinterpret_cast<const unsigned short*>(&wa);
    const unsigned short* px = reinterpret_cast<const unsigned short*>(&wx);
#pragma unroll
    for (int e = 0; e < 8; ++e) acc += tof<BF16>(pa[e]) * tof<BF16>(px[e]);
    return acc;
}

// The block's sum of every thread's acc, valid in thread 0 (every thread must call it: a barrier); warp_sums: 32
// floats of shared memory.
__device__ __forceinline__ float block_sum(float acc, float* warp_sums) {
    for (int off = 16; off; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
    if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = acc;
    __syncthreads();
    float sum = 0.f;
    if (threadIdx.x == 0)
        for (int w = 0; w < (blockDim.x >> 5); ++w) sum += warp_sums[w];
    return sum;
}

// The first statement of a shrink launched with programmatic dependent launch (the fused decode step's: the GEMV
// after it then starts at once and loads its weights while the shrink sums): every block waits for the kernel before
// it, whose outputs are the shrink's input, before anything else, also a block that then returns at once, so that
// the grid ends only after the one before it has (the GEMV after it waits for this grid alone). Where the launch did
// not ask for it the wait is a no-op; launch_dependents still lets a next kernel launched with the attribute start
// at once, which is safe because every such kernel waits (griddep_wait) before it reads or writes shared data.
__device__ __forceinline__ void shrink_start() {
    griddep_launch_dependents();
    griddep_wait();
}
