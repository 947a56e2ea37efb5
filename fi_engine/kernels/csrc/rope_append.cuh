// RoPE with the KV append as a QKV GEMV's epilogue, FlashInfer's arithmetic: the frequency of an element of a head
// (rope_freq) and the rotation, the store and the append of one pair of rounded outputs (rope_store_append); shared by
// fused_gemv.cu's QKV GEMVs (and fp8_fused.cu's, which includes it) and int4_gemv.cu's. The division is written as the
// instruction FlashInfer's fast-math build makes of it (__fdividef: div.approx), so that a program compiled without
// --use_fast_math (int4_gemv.cu) computes the same frequencies; uses convert.cuh's tof and fromf, which each includer
// includes before it.

// RoPE's frequency of element i of a head of d (and of i + d / 2: FlashInfer indexes it by e % (d / 2)), with
// FlashInfer's expressions (the host computes rcp_theta, rcp_scale, smooth_a and smooth_b as its launcher does):
// explicit fmas where the compiler could contract either product, FlashInfer's build fusing the first
__device__ __forceinline__ float rope_freq(unsigned i, unsigned d, float rcp_theta, float rcp_scale, float smooth_a,
                                           float smooth_b) {
    const unsigned half = d >> 1;
    float freq = __powf(rcp_theta, __fdividef(float(2 * (i % half)), float(d)));
    float smooth = freq * smooth_a + smooth_b;
    smooth = max(0.0f, min(1.0f, smooth));
    return __fmaf_rn(1 - smooth, freq * rcp_scale, smooth * freq);
}

// A QKV GEMV's epilogue for row r of one pair of its rounded outputs (q0, q1: columns j0 = head d + i and j0 + d /
// 2): a q or k head rotated at the row's position (FlashInfer's rotation, written as its kernel writes it, in
// float32 from the rounded values, rounded again), stored back into y, and a k or v head also written into page
// kv_indices[kv_indptr[batch_indices[r]] + pos / page_size] of its cache (strides in elements)
template <bool BF16>
__device__ __forceinline__ void rope_store_append(
        unsigned short q0, unsigned short q1, int head, unsigned i, float freq, int r, unsigned short* __restrict__ y,
        long long y_ld, long long j0, int hq, int hk, unsigned d, const int* __restrict__ positions,
        const int* __restrict__ batch_indices, const int* __restrict__ kv_indptr, const int* __restrict__ kv_indices,
        unsigned short* __restrict__ k_cache, unsigned short* __restrict__ v_cache, int page_size,
        long long stride_page, long long stride_n, long long stride_h) {
    const unsigned half = d >> 1;
    const int pos = positions[r];
    if (head < hq + hk) {
        float sn, cs;
        __sincosf(float(pos) * freq, &sn, &cs);
        const float x0 = tof<BF16>(q0), x1 = tof<BF16>(q1);
        const float o0 = __fmaf_rn(x0, cs, -x1 * sn);
        const float o1 = __fmaf_rn(x1, cs, x0 * sn);
        q0 = fromf<BF16>(o0);
        q1 = fromf<BF16>(o1);
    }
    y[r * y_ld + j0] = q0;
    y[r * y_ld + j0 + half] = q1;
    if (head >= hq) {
        const bool is_k = head < hq + hk;
        const int kvh = is_k ? head - hq : head - hq - hk;
        const int page = kv_indices[kv_indptr[batch_indices[r]] + pos / page_size];
        const long long at = page * stride_page + (long long)(pos % page_size) * stride_n + kvh * stride_h + i;
        unsigned short* cache = is_k ? k_cache : v_cache;
        cache[at] = q0;
        cache[at + half] = q1;
    }
}

// The RoPE and append arguments of a QKV GEMV's epilogue as one value (int4_gemv.cu's RoPE form): the kernel takes
// ROPE_APPEND_PARAMS after its GEMV's (the order fi_engine.kernels.fused_args.rope_ints packs them in) and passes
// ROPE_APPEND_ARGS on
struct RopeAppendArgs {
    int hq, hk;
    unsigned d;
    float rcp_theta, rcp_scale, smooth_a, smooth_b;
    const int *positions, *batch_indices, *kv_indptr, *kv_indices;
    unsigned short *k_cache, *v_cache;
    int page_size;
    long long stride_page, stride_n, stride_h;
};
#define ROPE_APPEND_PARAMS                                                                                          \
    int rope_hq, int rope_hk, unsigned rope_d, float rope_rcp_theta, float rope_rcp_scale, float rope_smooth_a,     \
        float rope_smooth_b, const int *rope_positions, const int *rope_batch_indices, const int *rope_kv_indptr,    \
        const int *rope_kv_indices, unsigned short *rope_k_cache, unsigned short *rope_v_cache, int rope_page_size, \
        long long rope_stride_page, long long rope_stride_n, long long rope_stride_h
#define ROPE_APPEND_ARGS                                                                                            \
    RopeAppendArgs{rope_hq, rope_hk, rope_d, rope_rcp_theta, rope_rcp_scale, rope_smooth_a, rope_smooth_b,          \
                   rope_positions, rope_batch_indices, rope_kv_indptr, rope_kv_indices, rope_k_cache, rope_v_cache,  \
                   rope_page_size, rope_stride_page, rope_stride_n, rope_stride_h}

// rope_store_append of row r's pair (q0, q1) at element i of head `head`, its arguments from a
template <bool BF16>
__device__ __forceinline__ void rope_append_pair(unsigned short q0, unsigned short q1, int head, unsigned i, int r,
                                                 unsigned short* __restrict__ y, long long y_ld,
                                                 const RopeAppendArgs& a) {
    const float freq = rope_freq(i, a.d, a.rcp_theta, a.rcp_scale, a.smooth_a, a.smooth_b);
    rope_store_append<BF16>(q0, q1, head, i, freq, r, y, y_ld, (long long)head * a.d + i, a.hq, a.hk, a.d,
                            a.positions, a.batch_indices, a.kv_indptr, a.kv_indices, a.k_cache, a.v_cache,
                            a.page_size, a.stride_page, a.stride_n, a.stride_h);
}
