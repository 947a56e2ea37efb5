"""The model runner's interface, declared once: what a model family reads and sets on the runner it is given (the
**family interface**), and what the runner's parts (:mod:`~fi_engine.runtime.worker.step_io`,
:mod:`~fi_engine.runtime.worker.step_graphs`, :mod:`~fi_engine.runtime.worker.fused_decode`) read and call on it.
Declarations only (types for the checker); the values are set by the runner's constructor
(:class:`~fi_engine.runtime.worker.model_runner.ModelRunner`, which implements it) and the family definition's
``load`` / ``allocate`` (:mod:`~fi_engine.runtime.family`). The serving loop's state (the scheduler, the requests, the
step in flight) is the engine's, not here.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from ...layers.tensor_parallel import VocabShard
    from ..family import ModelFamily
    from ..sample.sampler import Sampler
    from ..settings import EngineSettings

__all__: list[str] = []


class RunnerState:
    """The runner's attributes and methods that a family and the runner's parts use (set in
    :class:`~fi_engine.runtime.worker.model_runner.ModelRunner`'s constructor; the methods declared here for the type
    checker only)."""

    family: ModelFamily  # the model family's definition: config checks, weights, layer body, attention plans
    config: Any  # this rank's shard of the model's config (the checkpoint's on one GPU)
    model_config: Any
    settings: EngineSettings  # the constructor's arguments, checked (runtime.settings)
    tensor_parallel: int
    cuda_graph: bool
    max_batch: int
    page_size: int
    max_seq_len: int
    num_pages: int
    max_prefill_tokens: int
    prefill_graphs: bool
    prefill_graph_failures: dict[tuple[int, int], str]
    comm: Any
    rank: int
    device: int
    stream: Any
    dense: Any
    dtype: str
    kv_cache_dtype: str = "auto"  # "auto" (the model's dtype) or "fp8_e4m3" (fi_engine.layers.kv_fp8)
    vocab_shard: VocabShard | None
    kv_fp8: Any = None  # kv_fp8.KvFp8 with an FP8 cache (class default: an engine assembled without __init__)

    @property
    def kv_dtype(self) -> str:
        """The KV cache's element type as the attention ops name it: the model's dtype, or ``float8_e4m3fn``."""
        return "float8_e4m3fn" if self.kv_fp8 is not None else self.dtype

    @property
    def kv_sm_scale(self) -> float | None:
        """The attention plans' softmax scale: None (``1/sqrt(head_dim)``), or with an FP8 cache that times its
        ``k_scale`` (the FP8 modules take no scales: flashinfer-python's wrappers fold it the same way)."""
        return self.kv_fp8.sm_scale if self.kv_fp8 is not None else None

    # ---- the family interface ------------------------------------------------------------------------------------
    # What a model family (runtime.family.ModelFamily; fi_engine.models) reads and sets on the runner ``eng`` it is
    # given: these public attributes and the public methods embed_and_norm, add_norm, append_kv, allocate_layers,
    # allocate_steps, dense_moe. Nothing else: a family keeps its own state on itself (the family object is made
    # once per engine), and tests/package/test_structure.py fails on any private attribute a model module reaches.
    #
    # the engine's device context (set by the constructor; read by every family)
    cupy: Any  # the CuPy module (device arrays, RawModule kernels)
    stream_ptr: int  # the engine's CUDA stream (cudaStream_t as an int): every launch goes on it
    allreduce: Any  # tensor_parallel.ResidualAllReduce on a tensor-parallel rank, else None
    static_moe: bool  # MoE layers take the fixed-capacity device path for steps of at most max_batch rows
    # the weights (set by the family's load, mostly through models.weights.WeightLoader): device addresses (int) of
    # row-major [out, in] matrices in the model's dtype, or fi_ffi descriptors of vectors; one entry per layer
    device_arrays: list[Any]  # every uploaded array, kept alive with the engine
    gemm_type: Any  # cuBLAS data type of the weights (Dense.data_type(dtype)); gemm_f32: float32's
    gemm_f32: Any
    embed: int  # [vocab rows of this rank, hidden] token embedding
    lm_head: int  # [head_rows, hidden] (the embedding's address where tied)
    head_rows: int  # the LM head's output columns on this rank (vocab_size, or this rank's vocabulary shard)
    wqkv: list[int]  # [(Hq + 2 Hk) * D, hidden] fused q, k, v projections (or an FP8 weight's handle)
    wo: list[int]  # [hidden, Hq * D]
    wgu: list[int]  # [2 * intermediate, hidden] fused gate and up (dense MLP layers)
    wd: list[int]  # [hidden, intermediate]
    ln1: list[Any]  # [hidden] input_layernorm weights
    ln2: list[Any]  # [hidden] post_attention_layernorm weights
    final_norm: Any  # [hidden] the model's final norm
    q_norm: list[Any]  # [D] Qwen3's per-head q norm (empty where the model has none); k_norm: k's
    k_norm: list[Any]
    moe_layers: list[Any]  # layers.moe.MoELayer per layer (None for a dense layer); [] for a dense model
    moe_workspace: Any  # the MoE layers' grouped-GEMM workspace (None without routed experts)
    # LoRA adapters: the GPU slots (lora.device.DeviceSlots; None where the engine serves none); step_lora: those of
    # the step being run or captured, whose apply a family that serves adapters (ModelFamily.serves_lora) calls after
    # each projection's GEMM: ``lora`` where a row of the step takes an adapter, else None (the base model's path,
    # no adapters' launches; set by the runner per step)
    lora: Any = None
    step_lora: Any = None
    lora_gemvs: Any = None  # the LoRA form of the fused step's GEMVs (kernels.lora_fused; None: not compiled)
    # the buffers (the family's allocate: allocate_layers for the Llama pass, or its own layout): activations of
    # max(max_prefill_tokens, max_batch) rows, the paged KV cache, the attention workspaces, the step index arrays
    buffers: SimpleNamespace  # the activation buffers (h, x, qkv, attn, gu, act, last, logits, ids, kv, ...)
    normed: Any  # where the normalized rows of the final norm land (buffers.x, or x2 with the fused all-reduce)
    qkv_width: int  # (Hq + 2 Hk) * D: a qkv buffer row
    k_cache: list[Any]  # per layer, a descriptor of [num_pages, page_size, Hk, D] keys (kv_dtype)
    v_cache: list[Any]  # values, as k_cache
    prefill_workspace: Any  # the prefill attention's fi_ffi Workspace; decode_workspace: the decode's
    decode_workspace: Any
    decode_arrays: dict[
        str, np.ndarray
    ]  # the decode step's host index arrays (sched.step_arrays.decode_layout), by name
    prefill_arrays: dict[str, np.ndarray]  # the prefill pass's (step_arrays.prefill_layout)
    # the attention plans (set by the family's plan_decode / plan_prefill): the decode graph checks the decode
    # plan's schedule layout
    decode_plan: Any
    prefill_plan: Any
    # ---- end of the family interface

    # the runner's switches its parts read (ModelRunner documents each; set on the class to compare)
    packed_attention: bool
    fused_decode: bool
    graph_fused_decode: bool
    graph_fused_int4_rows: int
    decode_graph_ladder: bool
    lora_base_graphs: bool
    tune_decode_graphs: bool
    tp_tune_decode_graphs: bool
    lora_fused: bool
    lora_shrink_in_grid: bool
    attention_pdl: bool
    prefill_kernel_pdl: bool
    tensor_core_decode_rows: int
    tensor_core_decode_context: int
    silu_in_gate_up: bool
    tp_fused_epilogues: bool
    norm_pdl: bool
    prefill_buckets: tuple[int, ...]
    sampler: Sampler  # the tokens' choice (runtime.sample.sampler), made once the buffers exist
    staged_wait_s: float  # the last stage_decode_ahead's wait for the staging buffers, in seconds
    prepare_ahead: bool  # stage decode step n + 1 while the GPU runs step n (ModelRunner.stage_decode_ahead)

    if TYPE_CHECKING:  # the runner's methods its parts call (ModelRunner documents each)

        def forward(self, v: SimpleNamespace, rows: int, attention: Any, static_moe: bool = False) -> None: ...
        def decode_attention(self, i: int, v: SimpleNamespace) -> None: ...
        def prefill_attention(self, i: int, v: SimpleNamespace) -> None: ...
        def plan_decode(self, rows: int, cuda_graph: bool, kind: str | None = None) -> None: ...
        def plan_prefill_padded(self, batch: int) -> None: ...
        def finish_logits(self, logits: int, rows: int, columns: int) -> None: ...
        def head(self, rows: int, x: int) -> None: ...
        def view(self, kind: str, rows: int, batch: int) -> SimpleNamespace: ...
        def upload_decode(self, rows: int, n_pages: int, cuda_graph: bool) -> None: ...
        def fuses(self, rows: int) -> bool: ...
        def decode_pass(self, v: SimpleNamespace, rows: int, fused: bool, static_moe: bool = False) -> None: ...
        def dense_moe(self, rows: int) -> bool: ...
        def embed_and_norm(self, v: SimpleNamespace, rows: int) -> None: ...
        def add_norm(self, v: SimpleNamespace, weight: Any) -> None: ...
