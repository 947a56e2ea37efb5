// FlashInfer's silu_and_mul of 8 packed 16-bit elements: silu(g) * u in float32, rounded once, silu(a) =
// a / (1 + exp(-a)) as its fast-math build computes it (__expf). Uses convert.cuh's tof/fromf, which each includer
// includes before it: fused_gemv.cu (its SiLU prologue) and release_rows.cu.
template <bool BF16>
__device__ __forceinline__ uint4 silu_mul_vec(uint4 g, uint4 u) {
    const unsigned short* gv = reinterpret_cast<const unsigned short*>(&g);
    const unsigned short* uv = reinterpret_cast<const unsigned short*>(&u);
    uint4 o;
    unsigned short* ov = reinterpret_cast<unsigned short*>(&o);
#pragma unroll
    for (int e = 0; e < 8; ++e) {
        const float a = tof<BF16>(gv[e]);
        ov[e] = fromf<BF16>(a / (1.0f + __expf(-a)) * tof<BF16>(uv[e]));
    }
    return o;
}
