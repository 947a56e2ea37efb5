// out [n, k] 16-bit = w [n, k] e4m3 times its scales (as gemv8_rows reads them; block != 0: per block), each
// product rounded once to nearest even: the weight a 16-bit GEMM of many rows reads. A grid-stride loop over the
// 16-byte weight vectors; k a multiple of 16, w and out 16-byte aligned. TILED: w is in the tiled layout of
// grouped_gemv8.cu (n a multiple of 16, k of 128), out row-major as ever.
template <bool BF16, bool TILED = false>
__device__ __forceinline__ void dequant_rows(const unsigned char* __restrict__ w, unsigned short* __restrict__ out,
                                             long long n, int k, const float* __restrict__ scale, long long s_ld,
                                             int bn, int shift, int block) {
    const int vecs = k >> 4;
    const long long total = n * vecs;
    for (long long v = blockIdx.x * (long long)blockDim.x + threadIdx.x; v < total;
         v += (long long)gridDim.x * blockDim.x) {
        const long long j = v / vecs;
        const int c = (int)(v - j * vecs);
        const float s = block ? __ldg(scale + (j / bn) * s_ld + (c >> shift)) : __ldg(scale + j);
        float wf[16];
        long long from = v;
        if (TILED) {  // tile j / 16, chunk c / 8; within them run (j % 16 / 8, c % 8 / 4), lane (j % 8, c % 4)
            const long long tile = j >> 4;
            const int r = (int)(j & 15);
            from = ((((tile * (k >> 7) + (c >> 3)) * 2 + (r >> 3)) * 2 + ((c >> 2) & 1)) * 8 + (r & 7)) * 4 + (c & 3);
        }
        e4m3x16_int(load_weights(reinterpret_cast<const uint4*>(w) + from), wf);
        uint4 o[2];
        unsigned short* ov = reinterpret_cast<unsigned short*>(o);
#pragma unroll
        for (int e = 0; e < 16; ++e) ov[e] = fromf<BF16>(wf[e] * s);
        uint4* dst = reinterpret_cast<uint4*>(out) + 2 * v;
        dst[0] = o[0];
        dst[1] = o[1];
    }
}
// The kernels over it (out rows = every row of w; the experts' 16-bit copy in grouped_gemv8.cu: every expert's rows
// as one matrix, their scales as one too, expert e's block rows after expert e - 1's).
extern "C" __global__ void dequant_e4m3_bf16(const unsigned char* w, unsigned short* out, long long n, int k,
                                             const float* scale, long long s_ld, int bn, int shift, int block) {
    dequant_rows<true>(w, out, n, k, scale, s_ld, bn, shift, block);
}
extern "C" __global__ void dequant_e4m3_f16(const unsigned char* w, unsigned short* out, long long n, int k,
                                            const float* scale, long long s_ld, int bn, int shift, int block) {
    dequant_rows<false>(w, out, n, k, scale, s_ld, bn, shift, block);
}
