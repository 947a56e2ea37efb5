// Programmatic dependent launch (sm_90; no-ops where the launch did not ask for it): the next kernel in the
// stream may start once every block of this one has called griddep_launch_dependents (here: at once), and
// griddep_wait blocks until the previous kernel has finished and its writes are visible. Everything a kernel
// reads or writes that another kernel touches comes after its griddep_wait; only the weights, which nothing
// writes, are loaded before it.
//
// load_acquire: a block's read of a counter that other blocks of its own grid increment after their writes (the
// in-grid LoRA shrinks' count, fused_gemv.cu; the folded norm's, norm_fold.cuh), ordered before its reads of what
// they wrote.
__device__ __forceinline__ void griddep_wait() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void griddep_launch_dependents() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;");
#endif
}
__device__ __forceinline__ unsigned long long load_acquire(const unsigned long long* p) {
    unsigned long long v;
    asm volatile("ld.acquire.gpu.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
    return v;
}
