
#include "convert.cuh"  // b2f, e4m3x2

// One block per appended token t: its K and V rows (hk * d bf16 elements each, heads contiguous, rows row_ld
// elements apart: views of the fused QKV rows) scaled by 1/k_scale, 1/v_scale, rounded to e4m3 and stored at the
// token's page (kv_indices[kv_indptr[b] + pos / page_size]) and slot (pos % page_size) of the NHD caches
// [pages, page_size, hk, d]: what FlashInfer's append_paged_kv_cache does, with the conversion.
extern "C" __global__ void append_kv_e4m3(
    const unsigned short* __restrict__ k, const unsigned short* __restrict__ v, unsigned long long row_ld,
    const int* __restrict__ batch_indices, const int* __restrict__ positions,
    const int* __restrict__ kv_indices, const int* __restrict__ kv_indptr,
    unsigned char* __restrict__ k_cache, unsigned char* __restrict__ v_cache,
    unsigned int page_size, unsigned int width, unsigned int inv_k_bits, unsigned int inv_v_bits) {
    const unsigned int t = blockIdx.x;
    const int b = batch_indices[t];
    const int pos = positions[t];
    const long long page = kv_indices[kv_indptr[b] + pos / (int)page_size];
    const unsigned long long base = ((unsigned long long)page * page_size + (unsigned)(pos % (int)page_size)) * width;
    const float ik = __uint_as_float(inv_k_bits), iv = __uint_as_float(inv_v_bits);
    const unsigned short* kr = k + (unsigned long long)t * row_ld;
    const unsigned short* vr = v + (unsigned long long)t * row_ld;
    for (unsigned int j = 2 * threadIdx.x; j < width; j += 2 * blockDim.x) {
        const unsigned int kk = *reinterpret_cast<const unsigned int*>(kr + j);  // two bf16 (4-byte aligned)
        const unsigned int vv = *reinterpret_cast<const unsigned int*>(vr + j);
        *reinterpret_cast<unsigned short*>(k_cache + base + j) =
            e4m3x2(b2f(kk & 0xffff) * ik, b2f(kk >> 16) * ik);
        *reinterpret_cast<unsigned short*>(v_cache + base + j) =
            e4m3x2(b2f(vv & 0xffff) * iv, b2f(vv >> 16) * iv);
    }
}

// x[i] *= scale for n bf16 elements (the attention output times v_scale), rounded to nearest even.
extern "C" __global__ void scale_bf16(unsigned short* __restrict__ x, unsigned long long n, unsigned int scale_bits) {
    const float s = __uint_as_float(scale_bits);
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x) {
        unsigned int f = __float_as_uint(b2f(x[i]) * s);
        f += 0x7fff + ((f >> 16) & 1);  // round to nearest even (finite inputs: the output stays finite or inf)
        x[i] = (unsigned short)(f >> 16);
    }
}
