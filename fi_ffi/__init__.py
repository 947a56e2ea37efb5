"""fi_ffi: call prebuilt FlashInfer kernels through the TVM-FFI C ABI from pure Python (cffi ABI mode).

Importing fi_ffi loads no shared library and imports neither torch nor cffi's parser: the runtime, the CUDA
runtime and each kernel module are loaded on first use. The public surface:

- descriptors: :class:`Tensor` (``Tensor.from_pointer``), :func:`as_tensor`, dtypes and devices in
  :mod:`fi_ffi.dtypes`;
- ops: :mod:`fi_ffi.ops` (norms, paged-KV append, GDN prefill, attention, RoPE, activations, cascade merge,
  bit packing, sampling, top-k); the sampling ops' random state: :class:`Generator`;
- errors: :class:`KernelError`, :class:`LoaderError` and friends in :mod:`fi_ffi.errors`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import dtypes
from .dtypes import Device, DType, bfloat16, float16, float32, int32, int64, uint8
from .errors import FiFFIError, KernelError, KernelNotFoundError, LoaderError, UnsupportedDeviceError
from .tensor import Tensor

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .generator import Generator
    from .interop import as_tensor
    from .ops.activation import gelu_and_mul, gelu_tanh_and_mul, silu_and_mul
    from .ops.attention.cascade import merge_state, merge_state_in_place, merge_states
    from .ops.attention.decode import batch_decode_plan, batch_decode_run, single_decode
    from .ops.attention.mla import MLAPlan, batch_mla_plan, batch_mla_run
    from .ops.attention.plan import Plan
    from .ops.attention.prefill import (
        batch_prefill_paged_plan,
        batch_prefill_paged_run,
        batch_prefill_ragged_plan,
        batch_prefill_ragged_run,
        pack_custom_mask,
        pack_custom_mask_device,
        single_prefill,
    )
    from .ops.attention.sink import (
        batch_attention_sink_plan,
        batch_attention_sink_ragged_plan,
        batch_attention_sink_ragged_run,
        batch_attention_sink_run,
    )
    from .ops.attention.variants import list_variants
    from .ops.attention.workspace import Workspace
    from .ops.bmm_fp8 import bmm_fp8
    from .ops.gdn import gdn_prefill, gdn_workspace_size
    from .ops.mamba import selective_state_update
    from .ops.norm import fused_add_rmsnorm, gemma_fused_add_rmsnorm, gemma_rmsnorm, prepare, qk_rmsnorm, rmsnorm
    from .ops.page import append_paged_kv_cache, append_paged_mla_kv_cache, get_batch_indices_positions
    from .ops.quantization import packbits, segment_packbits, segment_packbits_indptr
    from .ops.rope import (
        apply_llama31_rope,
        apply_llama31_rope_inplace,
        apply_llama31_rope_pos_ids,
        apply_llama31_rope_pos_ids_inplace,
        apply_rope,
        apply_rope_inplace,
        apply_rope_pos_ids,
        apply_rope_pos_ids_inplace,
        apply_rope_with_cos_sin_cache,
        apply_rope_with_cos_sin_cache_inplace,
    )
    from .ops.router import fused_topk_deepseek, mm_M1_16_K7168_N128, mm_M1_16_K7168_N256
    from .ops.sampling import (
        chain_speculative_sampling,
        min_p_sampling_from_probs,
        sampling_from_logits,
        sampling_from_probs,
        softmax,
        softmax_workspace_size,
        top_k_mask_logits,
        top_k_renorm_probs,
        top_k_sampling_from_probs,
        top_k_top_p_sampling_from_probs,
        top_p_renorm_probs,
        top_p_renorm_workspace_size,
        top_p_sampling_from_probs,
    )
    from .ops.segment_gemm import segment_gemm
    from .ops.topk import top_k, top_k_page_table_transform, top_k_ragged_transform
    from .streams import current_stream, stream_scope

_LAZY = {
    "as_tensor": "interop",
    "stream_scope": "streams",
    "prepare": "ops.norm",
    "append_paged_kv_cache": "ops.page",
    "append_paged_mla_kv_cache": "ops.page",
    "get_batch_indices_positions": "ops.page",
    "gdn_prefill": "ops.gdn",
    "gdn_workspace_size": "ops.gdn",
    "Workspace": "ops.attention.workspace",
    "Plan": "ops.attention.plan",
    "list_variants": "ops.attention.variants",
    "batch_decode_plan": "ops.attention.decode",
    "batch_decode_run": "ops.attention.decode",
    "batch_mla_plan": "ops.attention.mla",
    "batch_mla_run": "ops.attention.mla",
    "MLAPlan": "ops.attention.mla",
    "single_decode": "ops.attention.decode",
    "single_prefill": "ops.attention.prefill",
    "batch_prefill_ragged_plan": "ops.attention.prefill",
    "batch_prefill_ragged_run": "ops.attention.prefill",
    "batch_prefill_paged_plan": "ops.attention.prefill",
    "batch_prefill_paged_run": "ops.attention.prefill",
    "pack_custom_mask": "ops.attention.prefill",
    "pack_custom_mask_device": "ops.attention.prefill",
    "current_stream": "streams",
    "Generator": "generator",
    "chain_speculative_sampling": "ops.sampling",
    "min_p_sampling_from_probs": "ops.sampling",
    "sampling_from_logits": "ops.sampling",
    "sampling_from_probs": "ops.sampling",
    "softmax": "ops.sampling",
    "softmax_workspace_size": "ops.sampling",
    "top_k_mask_logits": "ops.sampling",
    "top_k_renorm_probs": "ops.sampling",
    "top_k_sampling_from_probs": "ops.sampling",
    "top_k_top_p_sampling_from_probs": "ops.sampling",
    "top_p_renorm_probs": "ops.sampling",
    "top_p_renorm_workspace_size": "ops.sampling",
    "top_p_sampling_from_probs": "ops.sampling",
    "top_k": "ops.topk",
    "top_k_page_table_transform": "ops.topk",
    "top_k_ragged_transform": "ops.topk",
    "rmsnorm": "ops.norm",
    "qk_rmsnorm": "ops.norm",
    "gemma_rmsnorm": "ops.norm",
    "fused_add_rmsnorm": "ops.norm",
    "gemma_fused_add_rmsnorm": "ops.norm",
    "silu_and_mul": "ops.activation",
    "gelu_and_mul": "ops.activation",
    "gelu_tanh_and_mul": "ops.activation",
    "merge_state": "ops.attention.cascade",
    "merge_state_in_place": "ops.attention.cascade",
    "merge_states": "ops.attention.cascade",
    "packbits": "ops.quantization",
    "segment_packbits": "ops.quantization",
    "segment_packbits_indptr": "ops.quantization",
    "mm_M1_16_K7168_N256": "ops.router",
    "mm_M1_16_K7168_N128": "ops.router",
    "fused_topk_deepseek": "ops.router",
    "selective_state_update": "ops.mamba",
    "segment_gemm": "ops.segment_gemm",
    "bmm_fp8": "ops.bmm_fp8",
    "batch_attention_sink_plan": "ops.attention.sink",
    "batch_attention_sink_run": "ops.attention.sink",
    "batch_attention_sink_ragged_plan": "ops.attention.sink",
    "batch_attention_sink_ragged_run": "ops.attention.sink",
    "apply_rope": "ops.rope",
    "apply_rope_inplace": "ops.rope",
    "apply_rope_pos_ids": "ops.rope",
    "apply_rope_pos_ids_inplace": "ops.rope",
    "apply_llama31_rope": "ops.rope",
    "apply_llama31_rope_inplace": "ops.rope",
    "apply_llama31_rope_pos_ids": "ops.rope",
    "apply_llama31_rope_pos_ids_inplace": "ops.rope",
    "apply_rope_with_cos_sin_cache": "ops.rope",
    "apply_rope_with_cos_sin_cache_inplace": "ops.rope",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fi_ffi' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "DType",
    "Device",
    "FiFFIError",
    "Generator",
    "KernelError",
    "KernelNotFoundError",
    "LoaderError",
    "MLAPlan",
    "Plan",
    "Tensor",
    "UnsupportedDeviceError",
    "Workspace",
    "__version__",
    "append_paged_kv_cache",
    "append_paged_mla_kv_cache",
    "apply_llama31_rope",
    "apply_llama31_rope_inplace",
    "apply_llama31_rope_pos_ids",
    "apply_llama31_rope_pos_ids_inplace",
    "apply_rope",
    "apply_rope_inplace",
    "apply_rope_pos_ids",
    "apply_rope_pos_ids_inplace",
    "apply_rope_with_cos_sin_cache",
    "apply_rope_with_cos_sin_cache_inplace",
    "as_tensor",
    "batch_attention_sink_plan",
    "batch_attention_sink_ragged_plan",
    "batch_attention_sink_ragged_run",
    "batch_attention_sink_run",
    "batch_decode_plan",
    "batch_decode_run",
    "batch_mla_plan",
    "batch_mla_run",
    "batch_prefill_paged_plan",
    "batch_prefill_paged_run",
    "batch_prefill_ragged_plan",
    "batch_prefill_ragged_run",
    "bfloat16",
    "bmm_fp8",
    "chain_speculative_sampling",
    "current_stream",
    "dtypes",
    "float16",
    "float32",
    "fused_add_rmsnorm",
    "fused_topk_deepseek",
    "gdn_prefill",
    "gdn_workspace_size",
    "gelu_and_mul",
    "gelu_tanh_and_mul",
    "gemma_fused_add_rmsnorm",
    "gemma_rmsnorm",
    "get_batch_indices_positions",
    "int32",
    "int64",
    "list_variants",
    "merge_state",
    "merge_state_in_place",
    "merge_states",
    "min_p_sampling_from_probs",
    "mm_M1_16_K7168_N128",
    "mm_M1_16_K7168_N256",
    "pack_custom_mask",
    "pack_custom_mask_device",
    "packbits",
    "prepare",
    "qk_rmsnorm",
    "rmsnorm",
    "sampling_from_logits",
    "sampling_from_probs",
    "segment_gemm",
    "segment_packbits",
    "segment_packbits_indptr",
    "selective_state_update",
    "silu_and_mul",
    "single_decode",
    "single_prefill",
    "softmax",
    "softmax_workspace_size",
    "stream_scope",
    "top_k",
    "top_k_mask_logits",
    "top_k_page_table_transform",
    "top_k_ragged_transform",
    "top_k_renorm_probs",
    "top_k_sampling_from_probs",
    "top_k_top_p_sampling_from_probs",
    "top_p_renorm_probs",
    "top_p_renorm_workspace_size",
    "top_p_sampling_from_probs",
    "uint8",
]
