"""The calling engine: how one kernel call is described, checked and made. ``fi_ffi.ops`` and ``fi_ffi.comm`` stand
on it; it imports neither.

- :mod:`.kernels`: a declaration bound to the entry point of its module (once per module and name).
- :mod:`.launcher`: from a declaration, a generated straight-line function that reads the arguments, looks up
  the layout cache, tests the pointers and calls; it ties :mod:`.codegen` (the generated source), :mod:`.images`
  (the layout cache), :mod:`.validation` (the slow path), :mod:`.prepared` (calls packed once) and
  :mod:`.binding` (the entry point's signature checked against the declaration).
- :mod:`.pointer_rules`: what a cached verdict requires of the addresses (alignment, disjoint outputs), tested on
  every call.
- :mod:`.aliasing`: the byte-range overlap test under those rules.
- :mod:`.checks`: the generic argument checks the ops' ``check`` functions are written with.
- :mod:`.device`: the properties of a CUDA device a kernel's launch depends on (compute capability, SM count).
- :mod:`.cublaslt`: the per-device cuBLASLt handle a kernel that takes one is launched with (``bmm_fp8``).
- :mod:`.packing`: ``fi_ffi.prepare``, an op call packed once (each op family registers what of it can be packed).
"""
