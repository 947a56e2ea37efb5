"""fi_ffi: call prebuilt FlashInfer kernels through the TVM-FFI C ABI from pure Python (cffi ABI mode).

Importing fi_ffi loads no shared library and imports neither torch nor cffi's parser: the runtime, the CUDA
runtime and each kernel module are loaded on first use. The public surface:

- descriptors: :class:`Tensor` (``Tensor.from_pointer``), :func:`as_tensor`, dtypes and devices in
  :mod:`fi_ffi.dtypes`;
- ops: :mod:`fi_ffi.ops` (norms, paged-KV append, GDN prefill, attention, RoPE, activations, cascade merge,
  bit packing, sampling, top-k); the sampling ops' random state: :class:`Generator`;
- errors: :class:`KernelError`, :class:`LoaderError`, :class:`CudaError` and friends in :mod:`fi_ffi.errors`.
"""

# Each public name is stated once, as a row of _EXPORTS: name -> the module (relative to fi_ffi) that defines it;
# "" marks a submodule exported under its own name (``from . import dtypes``). Everything else is derived from the
# table: ``__all__``, the lazy module ``__getattr__`` (PEP 562: a name's module is imported on first use, so
# ``import fi_ffi`` stays light) and ``__dir__``, and the type stub ``__init__.pyi`` that type checkers and IDEs
# read instead of this file (PEP 561), written by ``python tools/gen_init_stub.py`` and kept equal to what the tool
# writes by tests/package/test_exports.py. Why this shape: cuda.core states each public name once, as an eager import,
# which a lazy package cannot do without loading every op module; scientific-python's lazy-loader (SPEC 1) pairs a
# lazy ``__getattr__`` with a ``.pyi`` stub for type checkers, and makes the stub the source (parsed with ``ast`` at
# every import). Here the source is a dict literal instead: it costs nothing at import, a test reads it as data,
# and the stub is generated from it. ``TYPE_CHECKING`` imports would restate every name a second time.

from __future__ import annotations

import importlib
from typing import Any

# The ground floor every op stands on, imported eagerly as before (cheap: no shared library, no cffi parser), so
# that ``fi_ffi.errors`` and ``fi_ffi.tensor`` are there after ``import fi_ffi``.
from . import dtypes, errors, moved, tensor  # noqa: F401

moved.install()  # fi_ffi.models and fi_ffi.typing: their old paths, with a DeprecationWarning

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "dtypes": "",
    "bfloat16": "dtypes",
    "Device": "dtypes",
    "DType": "dtypes",
    "float16": "dtypes",
    "float32": "dtypes",
    "int32": "dtypes",
    "int64": "dtypes",
    "uint8": "dtypes",
    "Tensor": "tensor.descriptor",
    "CudaError": "errors",
    "FiFFIError": "errors",
    "KernelError": "errors",
    "KernelNotFoundError": "errors",
    "LoaderError": "errors",
    "UnsupportedDeviceError": "errors",
    "as_tensor": "tensor.interop",
    "current_stream": "tensor.streams",
    "stream_scope": "tensor.streams",
    "prepare": "launch.packing",
    "Generator": "generator",
    "gelu_and_mul": "ops.activation",
    "gelu_tanh_and_mul": "ops.activation",
    "silu_and_mul": "ops.activation",
    "merge_state": "ops.attention.cascade",
    "merge_state_in_place": "ops.attention.cascade",
    "merge_states": "ops.attention.cascade",
    "batch_decode_plan": "ops.attention.decode",
    "batch_decode_run": "ops.attention.decode",
    "prepare_decode_run": "ops.attention.decode",
    "single_decode": "ops.attention.decode",
    "batch_mla_plan": "ops.attention.mla",
    "batch_mla_run": "ops.attention.mla",
    "MLAPlan": "ops.attention.mla",
    "Plan": "ops.attention.plan",
    "batch_prefill_paged_plan": "ops.attention.prefill",
    "batch_prefill_paged_run": "ops.attention.prefill",
    "batch_prefill_ragged_plan": "ops.attention.prefill",
    "batch_prefill_ragged_run": "ops.attention.prefill",
    "pack_custom_mask": "ops.attention.prefill",
    "pack_custom_mask_device": "ops.attention.prefill",
    "single_prefill": "ops.attention.prefill",
    "batch_attention_sink_plan": "ops.attention.sink",
    "batch_attention_sink_ragged_plan": "ops.attention.sink",
    "batch_attention_sink_ragged_run": "ops.attention.sink",
    "batch_attention_sink_run": "ops.attention.sink",
    "list_variants": "ops.attention.variants",
    "Workspace": "ops.attention.workspace",
    "bmm_fp8": "ops.bmm_fp8",
    "gdn_prefill": "ops.gdn",
    "gdn_workspace_size": "ops.gdn",
    "selective_state_update": "ops.mamba",
    "fused_add_rmsnorm": "ops.norm",
    "gemma_fused_add_rmsnorm": "ops.norm",
    "gemma_rmsnorm": "ops.norm",
    "qk_rmsnorm": "ops.norm",
    "rmsnorm": "ops.norm",
    "append_paged_kv_cache": "ops.page",
    "append_paged_mla_kv_cache": "ops.page",
    "get_batch_indices_positions": "ops.page",
    "packbits": "ops.quantization",
    "segment_packbits": "ops.quantization",
    "segment_packbits_indptr": "ops.quantization",
    "apply_llama31_rope": "ops.rope",
    "apply_llama31_rope_inplace": "ops.rope",
    "apply_llama31_rope_pos_ids": "ops.rope",
    "apply_llama31_rope_pos_ids_inplace": "ops.rope",
    "apply_rope": "ops.rope",
    "apply_rope_inplace": "ops.rope",
    "apply_rope_pos_ids": "ops.rope",
    "apply_rope_pos_ids_inplace": "ops.rope",
    "apply_rope_with_cos_sin_cache": "ops.rope",
    "apply_rope_with_cos_sin_cache_inplace": "ops.rope",
    "fused_topk_deepseek": "ops.router",
    "mm_M1_16_K7168_N128": "ops.router",
    "mm_M1_16_K7168_N256": "ops.router",
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
    "segment_gemm": "ops.segment_gemm",
    "top_k": "ops.topk",
    "top_k_page_table_transform": "ops.topk",
    "top_k_ragged_transform": "ops.topk",
    # What the engine (fi_engine) takes from the binding beyond the ops, public so that it needs nothing private
    # (tests/package/test_structure.py): the cuBLAS/cuBLASLt error, the grouped GEMM packed once, the fused
    # router's limits and the pinned sampling module's release.
    "CublasError": "errors",
    "prepare_segment_gemm": "ops.segment_gemm",
    "segment_gemm_args_bytes": "ops.segment_gemm",
    "routing_limits": "ops.router",
    "sampling_release": "ops.sampling",
}

__all__ = sorted(("__version__", *_EXPORTS))


def _resolve(name: str, module: str) -> Any:
    """The object ``name`` of ``fi_ffi.<module>`` (``module == ""``: the submodule ``fi_ffi.<name>`` itself)."""
    if not module:
        return importlib.import_module(f".{name}", __name__)
    return getattr(importlib.import_module(f".{module}", __name__), name)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = _resolve(name, module)
    globals()[name] = value  # once resolved, a plain module attribute: later reads skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
