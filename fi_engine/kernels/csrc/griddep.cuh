// Programmatic dependent launch (sm_90; no-ops where the launch did not ask for it): the next kernel in the
// stream may start once every block of this one has called griddep_launch_dependents (here: at once), and
// griddep_wait blocks until the previous kernel has finished and its writes are visible. Everything a kernel
// reads or writes that another kernel touches comes after its griddep_wait; only the weights, which nothing
// writes, are loaded before it.
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
