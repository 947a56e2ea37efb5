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

// The start of the tensor-core grouped GEMVs (grouped_gemv8.cu, grouped_gemv4.cu): `list` (shared memory, MAX_ASSIGN
// entries) holds the c_all assignments of this block's expert (list_assignments); a block with none returns, its
// weights unread
#define LIST_ASSIGNMENTS_OR_RETURN(experts, A)                                                                     \
    __shared__ int list[MAX_ASSIGN];                                                                               \
    __shared__ int count;                                                                                          \
    const int c_all = list_assignments(experts, A, list, &count);                                                  \
    if (c_all == 0) return

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

// The tile sums of the tensor-core grouped GEMVs (grouped_gemv8.cu, grouped_gemv4.cu), 16 weight rows from j0 by the
// block's staged rows: each warp's four mma accumulators acc into part ([warps][32 lanes][4], shared memory), then
// warp 0 adds the warps' sums and runs the statements STORE (the last arguments) for each, with v the sum of
// accumulator i of lane (g, t): weight row j = j0 + g (+ 8 for i >= 2), staged row r = 2 t + (i & 1). Barriers before
// and after: part is free again after it. A macro, not a function: its loop over the warps and STORE compile in
// their place, into the instructions each kernel had when it wrote them out (as a function, they compiled otherwise).
#define SUM_TILE(part, acc, warp, warps, lane, g, t, j0, ...)                                                      \
    _Pragma("unroll") for (int i = 0; i < 4; ++i) part[(warp * 32 + lane) * 4 + i] = acc[i];                       \
    __syncthreads();                                                                                               \
    if (warp == 0) {                                                                                               \
        _Pragma("unroll") for (int i = 0; i < 4; ++i) {                                                            \
            float v = 0.f;                                                                                         \
            for (int p = 0; p < warps; ++p) v += part[(p * 32 + lane) * 4 + i];                                    \
            const int j = j0 + g + (i >> 1) * 8, r = 2 * t + (i & 1);                                              \
            __VA_ARGS__                                                                                            \
        }                                                                                                          \
    }                                                                                                              \
    __syncthreads(); /* part is free for the next tile */

// The next chunk a warp loads (the tensor-core grouped GEMVs' load_next): chunk lc + 1 of the block's tile lt, or past
// the tile's last (nc chunks), the first of tile lt + 1
__device__ __forceinline__ void next_chunk(int& lt, int& lc, int nc) {
    if (++lc == nc) {
        lc = 0;
        ++lt;
    }
}

// The chunks of weights loaded ahead (buf[1 ..]) moved up one place, once buf[0] is summed
template <int AHEAD, int N>
__device__ __forceinline__ void shift_chunks(uint4 (&buf)[AHEAD][N]) {
#pragma unroll
    for (int b = 0; b < AHEAD - 1; ++b)
#pragma unroll
        for (int i = 0; i < N; ++i) buf[b][i] = buf[b + 1][i];
}
