"""What the engine runs on the GPU, one launch layer: FlashInfer's ops through fi_ffi, cuBLAS/cuBLASLt, the engine's
own CUDA kernels (``csrc/*.cu``, compiled by NVRTC), and CUDA graphs. The only part of the engine that imports
fi_ffi (tests/package/test_structure.py holds it to that).

- :mod:`~fi_engine.kernels.flashinfer`: every fi_ffi op and name the engine uses, in one adapter.
- :mod:`~fi_engine.kernels.cublas`: cuBLAS through cffi (a handle, its stream and workspace, ``cublasGemmEx``);
  :mod:`~fi_engine.kernels.cublas_lt`: cuBLASLt matmuls with the algorithm chosen once per shape.
- :mod:`~fi_engine.kernels.dense`: each linear routed to cuBLAS, the engine's own GEMV or the skinny GEMM
  (:mod:`~fi_engine.kernels.skinny_gemm`, the tensor-core GEMM of GPU-bound steps of up to 32 rows), holding the parts
  the engine reaches through it: :mod:`~fi_engine.kernels.launch` (packed launches through the driver),
  :mod:`~fi_engine.kernels.fused_gemv` (the GEMV fused with the decode step's norms, SiLU, RoPE and KV append, or
  routing; its call values checked in :mod:`~fi_engine.kernels.fused_args`),
  :mod:`~fi_engine.kernels.quantized_weights` (FP8 and int4 weights: :mod:`~fi_engine.kernels.fp8_linear`,
  :mod:`~fi_engine.kernels.int4_linear`, sharing :mod:`~fi_engine.kernels.quantized_linears`),
  :mod:`~fi_engine.kernels.row_kernels` and :mod:`~fi_engine.kernels.shard_kernels` (sampling's row gather and
  argmax, a vocabulary shard's); :mod:`~fi_engine.kernels.moe_gemv`: the MoE decode step's grouped GEMV and the
  launch its FP8 and MXFP4 forms share (:mod:`~fi_engine.kernels.fp8_moe_gemv`,
  :mod:`~fi_engine.kernels.mxfp4_moe_gemv`); :mod:`~fi_engine.kernels.lora_bgmv`: the LoRA adapters' shrink and
  expand launches (each row its own adapter's slot), :mod:`~fi_engine.kernels.lora_fused` the fused decode step's
  GEMVs with the expand as their epilogue; :mod:`~fi_engine.kernels.cuda_sources`: their CUDA C.
- :mod:`~fi_engine.kernels.graph`: CUDA graph capture and replay with cuda-python.
"""

from typing import Any

__all__: list[str] = []


def __getattr__(name: str) -> Any:  # the old module fi_engine.kernels's names, for one release
    from ..moved import old_name

    return old_name(__name__, name)
