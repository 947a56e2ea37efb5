// The row count of a kernel compiled for R rows (1 to 4: loops of known length, whose loads of x the
// compiler may issue together), or the launch's `rows` where R is 0 (any count: each row's load behind a branch)
#define ROWS(R, rows) ((R) ? (R) : (rows))
#ifndef GEMV_FIXED_ROWS  // 1: a kernel per row count, name suffix _r1 .. _r4; 0: one kernel (_r0) for 1 to 4 rows
#define GEMV_FIXED_ROWS 1
#endif
#ifndef GEMV_PIPELINE  // 1: each lane loads its next UNROLL weight vectors before it sums the current ones
#define GEMV_PIPELINE 1
#endif
#ifndef GEMV_FUSED_MIN_BLOCKS  // the one-row fused kernels' registers capped so this many 256-thread blocks fit an SM
#define GEMV_FUSED_MIN_BLOCKS 4
#endif
#if GEMV_FUSED_MIN_BLOCKS > 1
#define FUSED_BOUNDS_1 __launch_bounds__(256, GEMV_FUSED_MIN_BLOCKS)
#else
#define FUSED_BOUNDS_1
#endif
#define FUSED_BOUNDS_0
#define FUSED_BOUNDS_2
#define FUSED_BOUNDS_3
#define FUSED_BOUNDS_4
// M(R, ...) for each row count R the kernels are compiled for
#if GEMV_FIXED_ROWS
#define ALL_ROW_COUNTS(M, ...) M(1, __VA_ARGS__) M(2, __VA_ARGS__) M(3, __VA_ARGS__) M(4, __VA_ARGS__)
#else
#define ALL_ROW_COUNTS(M, ...) M(0, __VA_ARGS__)
#endif
// the same for fused_gemv.cu's kernels, none in a module that includes it for its device functions only
#if defined(GEMV_DEVICE_FUNCTIONS_ONLY)
#define EACH_ROW_COUNT(M, ...)
#else
#define EACH_ROW_COUNT(M, ...) ALL_ROW_COUNTS(M, __VA_ARGS__)
#endif

