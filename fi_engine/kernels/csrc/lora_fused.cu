// The fused decode step with LoRA adapters (fi_engine.kernels.lora_fused): fused_gemv.cu's GEMVs with each row's
// adapter expand as an epilogue (LoraEpi, lora_column: y_j += sum_i t[r, i] Bt_s[i, j] before the output is rounded,
// so before RoPE, SiLU or the next layer's residual add), and the shrinks that compute their own input as the fused
// GEMV does (its prologue, stage): t[r, j] = scale[s] * A_s[j] . rmsnorm(h[r]) * nw (MODE 1; MODE 2: of h[r] + x[r]).
// A separate module, compiled only by an engine serving adapters, so fused_gemv.cu's kernels stay as they were.
//
// Two forms, one compiled (LORA_SHRINK_IN_GRID, LoraFusedKernels.options): the shrink in the GEMV's own grid (1,
// the default: lora_grid_*), or launched before it (0: lora_gemv_* and the normed shrinks; lora_bgmv.cu's shrink
// for the o and down projections).
//
//   lora_gemv_{f16,bf16}_{copy,norm,addnorm}_r{R}:  gemv_fused (16-bit y) + the expand; copy: the input rows as
//                                                   they are (the o and down projections)
//   lora_gemv_{f16,bf16}_{norm,addnorm}_rope_r{R}:  the QKV GEMV + the expand + RoPE + the KV append
//   lora_gemv_{f16,bf16}_addnorm_gateup_r{R}:       the gate/up GEMV + the expand + SiLU-and-mul
//   lora_shrink_{f16,bf16}_{norm,addnorm}:          the shrink of the normalized rows
//   lora_grid_{f16,bf16}_<each kind above>_r{R}:    the GEMVs with the shrink in their grid
#ifndef LORA_SHRINK_IN_GRID
#define LORA_SHRINK_IN_GRID 1
#endif
#define GEMV_DEVICE_FUNCTIONS_ONLY  // fused_gemv.cu's device functions, none of its kernels
#include "fused_gemv.cu"  // (and lora_shrink.cuh's dot8, block_sum, shrink_start: lora_bgmv.cu's shrink sums)
// The expand's arguments (LoraEpi's first fields), and the in-grid shrink's after them: A's slot 0 (a, [width, k]
// 16-bit), the elements between slots, the slots' float32 scales, the shrink's width (its blocks) and the launch's
// two uint64 counters
#define LORA_PARAMS                                                                                                  \
    const float *t, long long t_ld, const int *slots, const int *targets, int bit, const unsigned short *bt,          \
            long long b_slot, int rank, int n0, int n1
#define LORA_GRID_PARAMS                                                                                             \
    LORA_PARAMS, const unsigned short *a, long long a_slot, const float *scale, int width, unsigned long long *sync

// The compiled form: its kernels' name prefix, LoraEpi mode, parameters after the GEMV's, and epilogue value
#if LORA_SHRINK_IN_GRID
#define LORA_EACH(M, name, ...)                                                                                      \
    ALL_ROW_COUNTS(M, lora_grid_f16_##name, false, __VA_ARGS__)                                                      \
    ALL_ROW_COUNTS(M, lora_grid_bf16_##name, true, __VA_ARGS__)
#define LORA_FORM LORA_IN_GRID
#define LORA_FORM_PARAMS LORA_GRID_PARAMS
#define LORA_FORM_EPI LoraEpi{t, t_ld, slots, targets, bit, bt, b_slot, rank, n0, n1, a, a_slot, scale, width, sync}
#else
#define LORA_EACH(M, name, ...)                                                                                      \
    ALL_ROW_COUNTS(M, lora_gemv_f16_##name, false, __VA_ARGS__)                                                      \
    ALL_ROW_COUNTS(M, lora_gemv_bf16_##name, true, __VA_ARGS__)
#define LORA_FORM LORA_EXPAND
#define LORA_FORM_PARAMS LORA_PARAMS
#define LORA_FORM_EPI LoraEpi{t, t_ld, slots, targets, bit, bt, b_slot, rank, n0, n1}
#endif

#define LORA_FUSED(R, name, bf16, mode)                                                                              \
    extern "C" __global__ void FUSED_BOUNDS_##R name##_r##R(FUSED_PARAMS, LORA_FORM_PARAMS) {                        \
        gemv_fused<bf16, false, mode, R, LORA_FORM>(FUSED_ARGS, LORA_FORM_EPI);                                      \
    }
LORA_EACH(LORA_FUSED, copy, 0)
LORA_EACH(LORA_FUSED, norm, 1)
LORA_EACH(LORA_FUSED, addnorm, 2)

#define LORA_PAIRS(R, name, bf16, mode, epi)                                                                         \
    extern "C" __global__ void FUSED_BOUNDS_##R name##_r##R(PAIRS_PARAMS, LORA_FORM_PARAMS) {                        \
        gemv_pairs<bf16, mode, R, epi, LORA_FORM>(PAIRS_ARGS, LORA_FORM_EPI);                                        \
    }
LORA_EACH(LORA_PAIRS, norm_rope, 1, EPI_ROPE)
LORA_EACH(LORA_PAIRS, addnorm_rope, 2, EPI_ROPE)
LORA_EACH(LORA_PAIRS, addnorm_gateup, 2, EPI_SILU)

// The shrink of one row's normalized input (grid (width, rows), 256 threads, k * 2 bytes of dynamic shared memory):
// block (j, r) stages row r as the fused GEMV's prologue does (stage: the same 16-bit values the GEMV reads), then
// sums A_s[j] . in as lora_bgmv.cu's shrink sums A_s[j] . x (each thread its strided share of the vectors, a
// butterfly per warp, the warps in order), so t equals the separate launches' rmsnorm + shrink. The residual is not
// written (h_out: the GEMV after it writes it). A row of no adapter, or whose adapter leaves this group alone,
// returns at once.
template <bool BF16, int MODE>
__device__ __forceinline__ void shrink_normed(const unsigned short* __restrict__ h, const unsigned short* __restrict__ x,
                                              long long h_ld, long long x_ld, const unsigned short* __restrict__ nw,
                                              float eps, int k, const int* __restrict__ slots,
                                              const float* __restrict__ scale, const int* __restrict__ targets,
                                              int bit, const unsigned short* __restrict__ a, long long a_slot,
                                              int width, float* __restrict__ t, long long t_ld) {
    extern __shared__ uint4 sx[];  // the row's input, k / 8 vectors
    __shared__ float warp_sums[32];
    shrink_start();  // (launched with programmatic dependent launch: lora_shrink.cuh)
    const int row = blockIdx.y;
    const int s = slots[row];
    if (s < 0 || !(targets[s] & bit)) return;  // (the whole block: one row)
    const int j = blockIdx.x;
    if (j >= width) return;
    stage<BF16, MODE>(sx, MODE == 2 ? x + row * x_ld : x, 1, k, x_ld, h + row * h_ld, nw, nullptr, h_ld, eps);
    const uint4* av = reinterpret_cast<const uint4*>(a + s * a_slot + (long long)j * k);
    float acc = 0.f;
    for (int c = threadIdx.x; c < (k >> 3); c += blockDim.x) acc = dot8<BF16>(__ldg(av + c), sx[c], acc);
    const float sum = block_sum(acc, warp_sums);
    if (threadIdx.x == 0) t[row * t_ld + j] = scale[s] * sum;
}

#if !LORA_SHRINK_IN_GRID
#define LORA_SHRINK(name, bf16, mode)                                                                                \
    extern "C" __global__ void name(const unsigned short* h, const unsigned short* x, long long h_ld, long long x_ld, \
                                    const unsigned short* nw, float eps, int k, const int* slots, const float* scale,  \
                                    const int* targets, int bit, const unsigned short* a, long long a_slot,          \
                                    int width, float* t, long long t_ld) {                                           \
        shrink_normed<bf16, mode>(h, x, h_ld, x_ld, nw, eps, k, slots, scale, targets, bit, a, a_slot, width, t,    \
                                  t_ld);                                                                             \
    }
LORA_SHRINK(lora_shrink_f16_norm, false, 1)
LORA_SHRINK(lora_shrink_bf16_norm, true, 1)
LORA_SHRINK(lora_shrink_f16_addnorm, false, 2)
LORA_SHRINK(lora_shrink_bf16_addnorm, true, 2)
#endif
