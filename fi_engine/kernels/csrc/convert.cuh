// Conversions between float32 and the 16-bit and 8-bit element formats, by PTX (NVRTC has no cuda_fp16.h here):
// float16 via cvt, bfloat16 as the high half of a float32; float32 -> 16 bits rounded to nearest even, -> e4m3
// rounded to nearest even and saturated at +-448 (SM 8.9+). Each device function is inlined where it is used, so
// the programs that include this header and use only some of it compile to the same code as with their own copies.
__device__ __forceinline__ float h2f(unsigned short u) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(u));
    return f;
}
__device__ __forceinline__ float b2f(unsigned short u) { return __int_as_float(((unsigned)u) << 16); }
__device__ __forceinline__ unsigned short f2h(float f) {
    unsigned short u;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(u) : "f"(f));
    return u;
}
__device__ __forceinline__ unsigned short f2b(float f) {
    unsigned short u;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(u) : "f"(f));
    return u;
}
// the 16-bit type a template argument (the GEMVs' BF16) ...
template <bool BF16> __device__ __forceinline__ float tof(unsigned short u) { return BF16 ? b2f(u) : h2f(u); }
template <bool BF16> __device__ __forceinline__ unsigned short fromf(float f) { return BF16 ? f2b(f) : f2h(f); }
// ... or a kernel argument (bf16 nonzero: bfloat16)
__device__ __forceinline__ float load16(unsigned short v, int bf16) {
    if (bf16) return __uint_as_float(((unsigned int)v) << 16);
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v));
    return f;
}
__device__ __forceinline__ unsigned short store16(float f, int bf16) {
    unsigned short h;
    if (bf16) asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
    else asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
// Two floats -> two e4m3 bytes (lo at the lower address).
__device__ __forceinline__ unsigned short e4m3x2(float lo, float hi) {
    unsigned short out;
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(out) : "f"(hi), "f"(lo));
    return out;
}
