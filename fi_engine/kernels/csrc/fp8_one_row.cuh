
// 4 warps a block walk groups of two e4m3 weight rows, g = blockIdx.x, blockIdx.x + gridDim.x, ... < groups, the
// weight rows row_of(g, 0) and row_of(g, 1). Each row's sum is gemv8_rows' at one row, in its order (lane l of warp
// v sums the 16-byte vectors 32 v + l, 32 (v + 4) + l, ..., 16 products at a time, each times its block scale where
// BLOCK; a butterfly over the lanes; the warps' sums added in order by one thread): the same bits. The schedule is
// what differs: two weight rows a block where gemv8_rows takes four, at most 64 registers a thread (the launch
// bounds), so that 8 blocks share an SM where 5 did, and a block's next weight vectors load while it sums the last
// ones, the next group's first ones included. finish(g, va, vb) gets the two sums (no per-row scale applied) in
// thread 0. Why: a one-row step's GEMVs are bound by the bytes in flight, and more resident warps keep more of them
// in flight (an H100, 8B shape, 128x128 blocks, weights past L2, us a launch: QKV 12.4 -> 10.9, o 9.3 -> 8.2, gate/up
// 45.1 -> 42.1, down 24.2 -> 22.0; benchmarks/RESULTS.md). The block's groups are first, first + stride, ... (its
// blockIdx and gridDim, or its place among the GEMV blocks of a grid with a block of other work); before() runs in
// every thread once, before the first finish.
template <bool BF16, bool BLOCK, class RowOf, class Finish, class Before>
__device__ __forceinline__ void gemv8_one_row(const unsigned short* __restrict__ x,
                                              const unsigned char* __restrict__ w, int groups, int k,
                                              const float* __restrict__ scale, long long s_ld, int bn, int shift,
                                              RowOf row_of, Finish finish, int first, int stride, Before before) {
    __shared__ float part[2][4][2];  // [group parity][warp][weight row]: the next group writes the other half
    griddep_launch_dependents();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int vecs = k >> 4, c0 = warp * 32 + lane;
    int g = first;
    uint4 a[2];
    if (g < groups && c0 < vecs) {
#pragma unroll
        for (int i = 0; i < 2; ++i)
            a[i] = load_weights(reinterpret_cast<const uint4*>(w + (long long)row_of(g, i) * k) + c0);
    }
    griddep_wait();  // x may be the previous kernel's output; the weights and scales are constants
    for (int parity = 0; g < groups; g += stride, parity ^= 1) {
        const float* srow[2];
#pragma unroll
        for (int i = 0; i < 2; ++i) srow[i] = BLOCK ? scale + (long long)(row_of(g, i) / bn) * s_ld : scale;
        float acc[2] = {0.f, 0.f};
        for (int c = c0; c < vecs; c += 128) {
            float wf[2][16];
            float s[2];
#pragma unroll
            for (int i = 0; i < 2; ++i) {
                e4m3x16(a[i], wf[i]);
                s[i] = BLOCK ? __ldg(srow[i] + (c >> shift)) : 1.f;
            }
            int next = c + 128, ng = g;  // this lane's next vectors: further along k, else the next group's first
            if (next >= vecs) {
                next = c0;
                ng = g + stride;
            }
            if (ng < groups) {
#pragma unroll
                for (int i = 0; i < 2; ++i)
                    a[i] = load_weights(reinterpret_cast<const uint4*>(w + (long long)row_of(ng, i) * k) + next);
            }
            float xf[16];
            widen16<BF16>(reinterpret_cast<const uint4*>(x) + 2 * c, xf);
#pragma unroll
            for (int i = 0; i < 2; ++i) acc[i] = add_partial16<BLOCK>(acc[i], wf[i], xf, s[i]);
        }
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            float v = acc[i];
            for (int off = 16; off; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
            if (lane == 0) part[parity][warp][i] = v;
        }
        __syncthreads();
        if (g == first) before();
        if (threadIdx.x == 0) {
            float va = 0.f, vb = 0.f;
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                va += part[parity][q][0];
                vb += part[parity][q][1];
            }
            finish(g, va, vb);
        }
    }
}
