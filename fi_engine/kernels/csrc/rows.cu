
#define NEG_INF __int_as_float((int)0xff800000u)

// dst[r, :width] = src[rows[r], :width] for 16-bit elements; grid (rows, column blocks): blockIdx.y's blocks share
// a row's columns (one block a row made a decode step's embedding gather a chain of dependent copies on one SM).
extern "C" __global__ void gather_rows16(const unsigned short* __restrict__ src, const int* __restrict__ rows,
                                         unsigned short* __restrict__ dst, long long width, long long src_ld,
                                         long long dst_ld) {
    const long long c0 = (long long)blockIdx.y * blockDim.x + threadIdx.x, stride = (long long)gridDim.y * blockDim.x;
    const unsigned short* a = src + (long long)rows[blockIdx.x] * src_ld;
    unsigned short* b = dst + (long long)blockIdx.x * dst_ld;
    for (long long c = c0; c < width; c += stride) b[c] = a[c];
}

__device__ __forceinline__ void keep_first_max(float& best, int& idx, float ob, int oi) {
    if (ob > best || (ob == best && oi < idx)) { best = ob; idx = oi; }
}

// dst[r, :width] = src[rows[r] - lo, :width] where lo <= rows[r] < lo + n, else zeros: the rows a vocabulary shard
// holds (the other ranks add the rest); grid as gather_rows16.
extern "C" __global__ void gather_rows16_shard(const unsigned short* __restrict__ src, const int* __restrict__ rows,
                                               unsigned short* __restrict__ dst, long long width, long long src_ld,
                                               long long dst_ld, int lo, int n) {
    const long long c0 = (long long)blockIdx.y * blockDim.x + threadIdx.x, stride = (long long)gridDim.y * blockDim.x;
    const int id = rows[blockIdx.x] - lo;
    unsigned short* b = dst + (long long)blockIdx.x * dst_ld;
    if (id < 0 || id >= n) {
        for (long long c = c0; c < width; c += stride) b[c] = 0;
        return;
    }
    const unsigned short* a = src + (long long)id * src_ld;
    for (long long c = c0; c < width; c += stride) b[c] = a[c];
}

// The largest of row[:n] and its first index, for the whole block; the answer is in thread 0's (best, idx);
// idx 0x7fffffff when no value beats -inf (NaN never wins).
__device__ __forceinline__ void block_argmax(const float* __restrict__ row, long long n, float& best, int& idx) {
    best = NEG_INF;
    idx = 0x7fffffff;
    const long long b = blockDim.x;
    long long i = threadIdx.x;
    // 8 loads in flight per thread before they are compared (one at a time, a 128K vocabulary's row took 30 us
    // of dependent loads on its one SM); compared in ascending index order, as one at a time
    for (; i + 7 * b < n; i += 8 * b) {
        float v[8];
#pragma unroll
        for (int u = 0; u < 8; ++u) v[u] = row[i + u * b];
#pragma unroll
        for (int u = 0; u < 8; ++u)
            if (v[u] > best) { best = v[u]; idx = (int)(i + u * b); }  // ascending: '>' keeps the first max
    }
    for (; i < n; i += b) {
        float v = row[i];
        if (v > best) { best = v; idx = (int)i; }
    }
    for (int off = 16; off; off >>= 1)
        keep_first_max(best, idx, __shfl_down_sync(0xffffffffu, best, off), __shfl_down_sync(0xffffffffu, idx, off));
    __shared__ float sb[32];
    __shared__ int si[32];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) { sb[warp] = best; si[warp] = idx; }
    __syncthreads();
    if (warp == 0) {
        int warps = (blockDim.x + 31) >> 5;
        best = lane < warps ? sb[lane] : NEG_INF;
        idx = lane < warps ? si[lane] : 0x7fffffff;
        for (int off = 16; off; off >>= 1)
            keep_first_max(best, idx, __shfl_down_sync(0xffffffffu, best, off),
                           __shfl_down_sync(0xffffffffu, idx, off));
    }
}

// out[r] = the first index of the largest of x[r, :n] (NaN never wins; a row of NaN/-inf gives 0).
extern "C" __global__ void argmax_rows(const float* __restrict__ x, long long n, long long ld,
                                       int* __restrict__ out) {
    float best;
    int idx;
    block_argmax(x + (long long)blockIdx.x * ld, n, best, idx);
    if (threadIdx.x == 0) out[blockIdx.x] = idx == 0x7fffffff ? 0 : idx;
}

// A vocabulary shard's argmax: pairs[r] = (the largest of x[r, :n] as float bits, its first index + offset);
// (-inf, offset) for a row with no value above -inf (or n == 0).
extern "C" __global__ void argmax_rows_shard(const float* __restrict__ x, long long n, long long ld, int offset,
                                             int* __restrict__ pairs) {
    float best;
    int idx;
    block_argmax(x + (long long)blockIdx.x * ld, n, best, idx);
    if (threadIdx.x == 0) {
        pairs[2 * blockIdx.x] = __float_as_int(best);
        pairs[2 * blockIdx.x + 1] = (idx == 0x7fffffff ? 0 : idx) + offset;
    }
}

// The ranks' shard argmaxes combined, one thread per row: pairs [parts, rows, 2] (all-gathered, rank order); the
// largest value wins, an equal value on a later rank does not (its ids are larger); nothing above -inf anywhere:
// rank 0's index (0 for its -inf row, as argmax_rows). fi_engine.layers.tensor_parallel.combine_shard_argmax is the
// same rule in numpy.
extern "C" __global__ void combine_argmax(const int* __restrict__ pairs, int parts, int rows, int* __restrict__ out) {
    const int r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= rows) return;
    float best = NEG_INF;
    int idx = pairs[2 * r + 1];
    for (int p = 0; p < parts; ++p) {
        const long long at = 2 * ((long long)p * rows + r);
        const float v = __int_as_float(pairs[at]);
        if (v > best) { best = v; idx = pairs[at + 1]; }
    }
    out[r] = idx;
}

// dst[r, c] = the gathered shards' column c: src [parts, rows, width] (rank order) -> dst [rows, :n], n <= parts *
// width (the padding columns past n dropped); float32; one block per row.
extern "C" __global__ void unshard_columns(const float* __restrict__ src, int rows, long long width, long long n,
                                           float* __restrict__ dst, long long dst_ld) {
    const int r = blockIdx.x;
    for (long long c = threadIdx.x; c < n; c += blockDim.x)
        dst[r * dst_ld + c] = src[((c / width) * rows + r) * width + c % width];
}
