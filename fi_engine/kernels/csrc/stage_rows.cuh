// v's 8 16-bit values with each run of 4 reordered 0, 2, 1, 3
__device__ __forceinline__ uint4 paired(uint4 v) {
    return make_uint4(__byte_perm(v.x, v.y, 0x5410u), __byte_perm(v.x, v.y, 0x7632u), __byte_perm(v.z, v.w, 0x5410u),
                      __byte_perm(v.z, v.w, 0x7632u));
}

// The grouped GEMVs' staging: the input rows of `rows` assignments, list[base .. base + rows), copied into shared
// memory sx as rows of `vecs` 16-byte vectors (assignment a reads input row a / div, row stride in_ld elements), by
// all the block's threads. GATED: the input row is [gate | up] of 2 * 8 * vecs elements and the staged row is
// silu(gate) * up (FlashInfer's silu_and_mul, rounded to the 16-bit type as it rounds, its __expf and division as
// --use_fast_math compiles them), so the down projection reads the gate/up output directly. PAIRED: each run of 4
// values is staged in the order 0, 2, 1, 3, the pairs an mma.m16n8k16's B fragment takes (grouped_gemv8.cu).
template <bool BF16, bool GATED, bool PAIRED = false>
__device__ __forceinline__ void stage_rows(uint4* sx, const unsigned short* __restrict__ in, long long in_ld, int div,
                                           const int* list, int base, int rows, int vecs) {
    for (int r = 0; r < rows; ++r) {
        const uint4* src = reinterpret_cast<const uint4*>(in + (long long)(list[base + r] / div) * in_ld);
        for (int v = threadIdx.x; v < vecs; v += blockDim.x) {
            if (GATED) {
                uint4 g = src[v], u = src[vecs + v], o;
                const unsigned short* gv = reinterpret_cast<const unsigned short*>(&g);
                const unsigned short* uv = reinterpret_cast<const unsigned short*>(&u);
                unsigned short* ov = reinterpret_cast<unsigned short*>(&o);
#pragma unroll
                for (int e = 0; e < 8; ++e) {
                    float a = BF16 ? b2f(gv[e]) : h2f(gv[e]);
                    float m = a / (1.0f + __expf(-a)) * (BF16 ? b2f(uv[e]) : h2f(uv[e]));
                    ov[e] = BF16 ? f2b(m) : f2h(m);
                }
                sx[r * vecs + v] = PAIRED ? paired(o) : o;
            } else {
                sx[r * vecs + v] = PAIRED ? paired(src[v]) : src[v];
            }
        }
    }
}

// The assignments a < A of this block's expert (blockIdx.y) listed in `list` (in no particular order: each a's sums
// do not depend on its place); their number.
__device__ __forceinline__ int list_assignments(const int* __restrict__ experts, int A, int* list, int* count) {
    const int expert = blockIdx.y;
    if (threadIdx.x == 0) *count = 0;
    __syncthreads();
    for (int a = threadIdx.x; a < A; a += blockDim.x)
        if (experts[a] == expert) list[atomicAdd(count, 1)] = a;
    __syncthreads();
    return *count;
}
