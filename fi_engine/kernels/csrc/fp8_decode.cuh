
// A float32 product with subnormal inputs honored whatever the build's flush-to-zero setting (PTX mul without .ftz)
__device__ __forceinline__ float mul_subnormal(float a, float b) {
    float c;
    asm("mul.rn.f32 %0, %1, %2;" : "=f"(c) : "f"(a), "f"(b));
    return c;
}

// The 4 e4m3 values of u (bytes 0..3, in that order) as float32, exactly, with integer operations and one multiply
// each (a conversion instruction issues at a quarter of their rate): each byte's sign, exponent and mantissa go to
// a bfloat16's places, whose exponent bias (127) exceeds e4m3's (7) by 120 -- e4m3's subnormals land on bfloat16
// subnormals -- the bfloat16 pairs widen to float32 and a multiply by 2**120 (subnormal inputs honored) restores
// the value. The NaN codes (0x7f, 0xff) read as +-480.
__device__ __forceinline__ void e4m3x4(unsigned u, float* f) {
    const unsigned even = ((u << 8) & 0x80008000u) | ((u << 4) & 0x07f007f0u);  // bytes 0 and 2
    const unsigned odd = (u & 0x80008000u) | ((u >> 4) & 0x07f007f0u);          // bytes 1 and 3
    f[0] = mul_subnormal(__int_as_float(even << 16), 0x1p120f);
    f[1] = mul_subnormal(__int_as_float(odd << 16), 0x1p120f);
    f[2] = mul_subnormal(__int_as_float(even & 0xffff0000u), 0x1p120f);
    f[3] = mul_subnormal(__int_as_float(odd & 0xffff0000u), 0x1p120f);
}

// The 16 values of a 16-byte weight vector, by integer operations (e4m3x4; the dequantizer's)
__device__ __forceinline__ void e4m3x16_int(uint4 a, float* f) {
    e4m3x4(a.x, f);
    e4m3x4(a.y, f + 4);
    e4m3x4(a.z, f + 8);
    e4m3x4(a.w, f + 12);
}

// The 16 values of a 16-byte weight vector, the widening GEMVs': on SM 8.9+ two codes a conversion into two float16s
// (cvt.rn.f16x2.e4m3x2; every e4m3 value is a float16, exactly) and a conversion each to float32: the same values as
// e4m3x16_int's in fewer instructions (the one-row GEMV's loop: 143 where it took 215), but a NaN code reads as NaN
// (e4m3x16_int: +-480); below SM 8.9, e4m3x16_int
__device__ __forceinline__ void e4m3x16(uint4 a, float* f) {
#if __CUDA_ARCH__ >= 890
    const unsigned v[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
    for (int i = 0; i < 4; ++i)
        asm("{\n\t.reg .b16 l, h, p0, p1, q0, q1;\n\t.reg .b32 p, q;\n\t"
            "mov.b32 {l, h}, %4;\n\t"
            "cvt.rn.f16x2.e4m3x2 p, l;\n\tcvt.rn.f16x2.e4m3x2 q, h;\n\t"
            "mov.b32 {p0, p1}, p;\n\tmov.b32 {q0, q1}, q;\n\t"
            "cvt.f32.f16 %0, p0;\n\tcvt.f32.f16 %1, p1;\n\tcvt.f32.f16 %2, q0;\n\tcvt.f32.f16 %3, q1;\n\t}"
            : "=f"(f[4 * i]), "=f"(f[4 * i + 1]), "=f"(f[4 * i + 2]), "=f"(f[4 * i + 3])
            : "r"(v[i]));
#else
    e4m3x16_int(a, f);
#endif
}

// The 8 16-bit values of b as float32 (bfloat16: the high half of a float32; float16: cvt)
template <bool BF16> __device__ __forceinline__ void widen8(uint4 b, float* f) {
    const unsigned v[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        if (BF16) {
            f[2 * i] = __int_as_float(v[i] << 16);
            f[2 * i + 1] = __int_as_float(v[i] & 0xffff0000u);
        } else {
            f[2 * i] = h2f((unsigned short)(v[i] & 0xffffu));
            f[2 * i + 1] = h2f((unsigned short)(v[i] >> 16));
        }
    }
}

// x's 16 values at xr (two 16-byte vectors, through the read-only path) as float32
template <bool BF16> __device__ __forceinline__ void widen16(const uint4* xr, float* f) {
    widen8<BF16>(__ldg(xr), f);
    widen8<BF16>(__ldg(xr + 1), f + 8);
}

// acc plus the 16-product partial sum of one decoded weight vector wf with x's values xf, summed in order, times the
// vector's block scale s where BLOCK: each widening FP8 GEMV's step per weight vector and x row (their order of sums)
template <bool BLOCK>
__device__ __forceinline__ float add_partial16(float acc, const float* wf, const float* xf, float s) {
    float p = 0.f;
#pragma unroll
    for (int e = 0; e < 16; ++e) p = fmaf(wf[e], xf[e], p);
    return BLOCK ? fmaf(s, p, acc) : acc + p;
}

