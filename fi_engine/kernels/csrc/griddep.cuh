// Programmatic dependent launch (sm_90; no-ops where the launch did not ask for it): the next kernel in the
// stream may start once every block of this one has called griddep_launch_dependents (here: at once), and
// griddep_wait blocks until the previous kernel has finished and its writes are visible. Everything a kernel
// reads or writes that another kernel touches comes after its griddep_wait; only the weights, which nothing
// writes, are loaded before it.
//
// GRIDDEP_AFTER_WAIT (defined where fi_engine.kernels.cuda_sources.Griddep.after_wait is on): the next kernel may
// start only once this one's griddep_wait has returned, not at its start. Then a kernel that starts has every
// kernel two or more before it finished, which a kernel that reads before its own wait needs of those: FlashInfer's
// fused all-reduce loads its residual before it waits, and that residual was written by the all-reduce before it
// (fi_engine.layers.tensor_parallel.ResidualAllReduce).
//
// load_acquire: a block's read of a counter that other blocks of its own grid increment after their writes (the
// in-grid LoRA shrinks' count, fused_gemv.cu; the folded norm's, norm_fold.cuh), ordered before its reads of what
// they wrote.
__device__ __forceinline__ void griddep_wait() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#ifdef GRIDDEP_AFTER_WAIT
    asm volatile("griddepcontrol.launch_dependents;");
#endif
#endif
}
__device__ __forceinline__ void griddep_launch_dependents() {
#if __CUDA_ARCH__ >= 900 && !defined(GRIDDEP_AFTER_WAIT)
    asm volatile("griddepcontrol.launch_dependents;");
#endif
}
__device__ __forceinline__ unsigned long long load_acquire(const unsigned long long* p) {
    unsigned long long v;
    asm volatile("ld.acquire.gpu.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
    return v;
}
