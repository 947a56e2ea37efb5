"""Every fi_ffi op the engine calls, in one place.

The engine passes fi_ffi :class:`~fi_ffi.tensor.Tensor` descriptors made once over its own buffers (so each
call skips conversion and hits the ops' validation memo) and one explicit ``stream``. The names and keyword
arguments are flashinfer-python's; if an op's spelling changes, only this module changes.

Ops used: ``rmsnorm``, ``fused_add_rmsnorm``, ``qk_rmsnorm`` (Qwen3), ``apply_rope_pos_ids_inplace`` /
``apply_llama31_rope_pos_ids_inplace``, ``append_paged_kv_cache``, ``batch_prefill_paged_plan`` / ``_run``,
``batch_decode_plan`` / ``_run`` (and ``prepare_decode_run``, ``prepare``), ``silu_and_mul``, ``softmax``,
``top_k_top_p_sampling_from_probs``, ``Generator``, ``Workspace``; and, handed on under fi_ffi's own names for the
families and the MoE layer, the ops imported below.
"""

from __future__ import annotations

from typing import Any, Literal

import fi_ffi

# fi_ffi's ops and values that the engine calls as fi_ffi names them (the families' own attention and norms, the MoE
# layer's grouped GEMMs): handed on from here, so this module lists every op the engine uses
from fi_ffi import KernelNotFoundError as KernelNotFoundError
from fi_ffi import Tensor as Tensor
from fi_ffi import Workspace as Workspace
from fi_ffi import append_paged_mla_kv_cache as append_paged_mla_kv_cache
from fi_ffi import apply_rope_with_cos_sin_cache_inplace as apply_rope_with_cos_sin_cache_inplace
from fi_ffi import batch_attention_sink_plan as batch_attention_sink_plan
from fi_ffi import batch_attention_sink_run as batch_attention_sink_run
from fi_ffi import batch_decode_plan as batch_decode_plan
from fi_ffi import batch_mla_plan as batch_mla_plan
from fi_ffi import batch_mla_run as batch_mla_run
from fi_ffi import batch_prefill_paged_plan as batch_prefill_paged_plan
from fi_ffi import fused_topk_deepseek as fused_topk_deepseek
from fi_ffi import gelu_tanh_and_mul as gelu_tanh_and_mul
from fi_ffi import gemma_fused_add_rmsnorm as gemma_fused_add_rmsnorm
from fi_ffi import gemma_rmsnorm as gemma_rmsnorm
from fi_ffi import prepare_segment_gemm as prepare_segment_gemm
from fi_ffi import routing_limits as routing_limits
from fi_ffi import segment_gemm as segment_gemm
from fi_ffi import segment_gemm_args_bytes as segment_gemm_args_bytes
from fi_ffi import stream_scope as stream_scope
from fi_ffi.ops.segment_gemm import SegmentGEMMArgs as SegmentGEMMArgs
from fi_ffi.ops.segment_gemm import prepare_segment_gemm_problems as prepare_segment_gemm_problems

from ..checkpoint.config import RopeConfig

__all__ = [
    "append_kv",
    "decode_plan",
    "decode_run",
    "descriptor",
    "fused_add_rmsnorm",
    "generator",
    "prefill_plan",
    "prefill_run",
    "prepared_append_kv",
    "prepared_decode_run",
    "prepared_fused_add_rmsnorm",
    "prepared_qk_rmsnorm",
    "prepared_rmsnorm",
    "prepared_rope_inplace",
    "prepared_silu_and_mul",
    "qk_rmsnorm",
    "rmsnorm",
    "rope_inplace",
    "sample_rows",
    "sample_top_k_top_p",
    "silu_and_mul",
    "softmax",
    "workspace",
]


def descriptor(
    ptr: int,
    shape: tuple[int, ...],
    dtype: str,
    device_id: int,
    strides: tuple[int, ...] | None = None,
    owner: Any = None,
) -> fi_ffi.Tensor:
    """A descriptor of device memory at ``ptr`` (strides in elements; None: contiguous)."""
    return fi_ffi.Tensor(ptr, shape, dtype, device_id, strides, owner)


def workspace(device_id: int) -> Any:
    """A batch-attention workspace (128 MiB float, 8 MiB int, 8 MiB page-locked) on ``device_id``."""
    return fi_ffi.Workspace.allocate(device_id)


def rmsnorm(x: Any, weight: Any, out: Any, eps: float, stream: int) -> None:
    """:func:`fi_ffi.rmsnorm` of ``x`` ``[n, hidden]`` into ``out``, on the engine's stream."""
    fi_ffi.rmsnorm(x, weight, out=out, eps=eps, stream=stream)


def qk_rmsnorm(x: Any, weight: Any, eps: float, stream: int) -> None:
    """RMSNorm of every head of ``x`` ``[n, H, D]`` (a strided q or k view of the fused QKV rows), in place."""
    fi_ffi.qk_rmsnorm(x, weight, out=x, eps=eps, stream=stream)


def fused_add_rmsnorm(x: Any, residual: Any, weight: Any, eps: float, stream: int) -> None:
    """``residual += x``; ``x = rmsnorm(residual) * weight`` (both in place)."""
    fi_ffi.fused_add_rmsnorm(x, residual, weight, eps=eps, stream=stream)


def prepared_fused_add_rmsnorm(
    x: Any, residual: Any, weight: Any, eps: float, stream: int, enable_pdl: bool = False
) -> Any:
    """:func:`fused_add_rmsnorm` checked and packed once (:func:`fi_ffi.prepare`): calling the result launches it
    again on the same buffers (about one FFI call; the engine's buffers never move). ``enable_pdl``: launched with
    programmatic dependent launch (it may start while the kernel before it drains, and waits for it on the GPU)."""
    return fi_ffi.prepare(fi_ffi.fused_add_rmsnorm, x, residual, weight, eps=eps, enable_pdl=enable_pdl, stream=stream)


def prepared_rmsnorm(x: Any, weight: Any, out: Any, eps: float, stream: int, enable_pdl: bool = False) -> Any:
    """:func:`rmsnorm` checked and packed once (:func:`fi_ffi.prepare`): calling the result launches it."""
    return fi_ffi.prepare(fi_ffi.rmsnorm, x, weight, eps=eps, out=out, enable_pdl=enable_pdl, stream=stream)


def prepared_qk_rmsnorm(x: Any, weight: Any, eps: float, stream: int) -> Any:
    """:func:`qk_rmsnorm` (in place) checked and packed once: calling the result launches it."""
    return fi_ffi.prepare(fi_ffi.qk_rmsnorm, x, weight, eps, out=x, stream=stream)


def prepared_silu_and_mul(x: Any, out: Any, stream: int) -> Any:
    """:func:`silu_and_mul` checked and packed once: calling the result launches it."""
    return fi_ffi.prepare(fi_ffi.silu_and_mul, x, out, stream=stream)


def rope_inplace(q: Any, k: Any, positions: Any, rope: RopeConfig, stream: int) -> None:
    """Rotate ``q`` ``[n, Hq, D]`` and ``k`` ``[n, Hk, D]`` (views of the fused QKV rows) in place, Llama
    (non-interleaved) pairing, all of ``D`` rotated, at ``positions`` (int32 ``[n]``)."""
    # keyword calls straight to the op: this runs per layer per step (a shared (op, args) helper cost 0.35 us more
    # per call on the CPU proxy); prepared_rope_inplace packs the same call, which tests/engine/test_kernel_calls.py
    # pins frame for frame
    if rope.llama3:
        fi_ffi.apply_llama31_rope_pos_ids_inplace(
            q,
            k,
            positions,
            rotary_dim=None,
            interleave=False,
            rope_scale=rope.factor,
            rope_theta=rope.theta,
            low_freq_factor=rope.low_freq_factor,
            high_freq_factor=rope.high_freq_factor,
            old_context_len=rope.original_max_position_embeddings,
            stream=stream,
        )
    else:
        fi_ffi.apply_rope_pos_ids_inplace(
            q, k, positions, rotary_dim=None, interleave=False, rope_scale=1.0, rope_theta=rope.theta, stream=stream
        )


def prepared_rope_inplace(q: Any, k: Any, positions: Any, rope: RopeConfig, stream: int) -> Any:
    """:func:`rope_inplace` checked and packed once (:func:`fi_ffi.prepare`): calling the result launches it again
    on the same buffers, reading the positions the step wrote into ``positions``."""
    if rope.llama3:
        return fi_ffi.prepare(
            fi_ffi.apply_llama31_rope_pos_ids_inplace,
            q,
            k,
            positions,
            rotary_dim=None,
            interleave=False,
            rope_scale=rope.factor,
            rope_theta=rope.theta,
            low_freq_factor=rope.low_freq_factor,
            high_freq_factor=rope.high_freq_factor,
            old_context_len=rope.original_max_position_embeddings,
            stream=stream,
        )
    return fi_ffi.prepare(
        fi_ffi.apply_rope_pos_ids_inplace,
        q,
        k,
        positions,
        rotary_dim=None,
        interleave=False,
        rope_scale=1.0,
        rope_theta=rope.theta,
        stream=stream,
    )


_KV_LAYOUT: Literal["NHD"] = "NHD"  # the engine's caches: [pages, page_size, kv_heads, head_dim]


def append_kv(
    k: Any,
    v: Any,
    batch_indices: Any,
    positions: Any,
    k_cache: Any,
    v_cache: Any,
    kv_indices: Any,
    kv_indptr: Any,
    kv_last_page_len: Any,
    stream: int,
) -> None:
    """:func:`fi_ffi.append_paged_kv_cache` of this step's ``k``/``v`` ``[nnz, kv_heads, head_dim]``."""
    fi_ffi.append_paged_kv_cache(
        k,
        v,
        batch_indices,
        positions,
        (k_cache, v_cache),
        kv_indices,
        kv_indptr,
        kv_last_page_len,
        kv_layout=_KV_LAYOUT,
        stream=stream,
    )


def prepared_append_kv(
    k: Any,
    v: Any,
    batch_indices: Any,
    positions: Any,
    k_cache: Any,
    v_cache: Any,
    kv_indices: Any,
    kv_indptr: Any,
    kv_last_page_len: Any,
    stream: int,
) -> Any:
    """:func:`append_kv` checked and packed once (:func:`fi_ffi.prepare`): calling the result launches it again on
    the same buffers, reading the index arrays the step wrote."""
    append = (k, v, batch_indices, positions, (k_cache, v_cache), kv_indices, kv_indptr, kv_last_page_len)
    return fi_ffi.prepare(fi_ffi.append_paged_kv_cache, *append, kv_layout=_KV_LAYOUT, stream=stream)


def prefill_plan(
    ws: Any,
    qo_indptr: Any,
    kv_indptr: Any,
    kv_last_page_len: Any,
    num_qo_heads: int,
    num_kv_heads: int,
    head_dim: int,
    page_size: int,
    dtype: Any,  # a name or dtype object of the attention modules (the engine's config checked it)
    stream: int,
    cuda_graph: bool = False,
    kv_dtype: Any = None,
    sm_scale: float | None = None,
    backend: Literal["auto", "fa2", "fa3"] = "auto",
) -> Any:
    """A causal paged-prefill plan (host int32 arrays); FlashInfer picks FA3 on Hopper where it can (``backend``
    "auto"; "fa2": FlashInfer's FA2 kernel, whose small query tiles suit a decode step's one query a request).
    ``cuda_graph``: a schedule whose layout (workspace offsets, grid) depends only on ``qo_indptr[-1]`` and the
    batch size, so a run captured in a CUDA graph replays under every later plan of the same two. ``kv_dtype``:
    the cache's element type (None: ``dtype``; ``float8_e4m3fn`` for an FP8 cache, served by FA2); ``sm_scale``:
    None for ``1/sqrt(head_dim)``."""
    return fi_ffi.batch_prefill_paged_plan(
        qo_indptr,
        kv_indptr,
        None,
        kv_last_page_len,
        num_qo_heads,
        num_kv_heads,
        head_dim,
        page_size,
        q_data_type=dtype,
        kv_data_type=kv_dtype,
        sm_scale=sm_scale,
        causal=True,
        backend=backend,
        enable_cuda_graph=cuda_graph,
        stream=stream,
        workspace=ws,
    )


def prefill_run(
    plan: Any,
    q: Any,
    k_cache: Any,
    v_cache: Any,
    qo_indptr: Any,
    kv_indptr: Any,
    kv_indices: Any,
    kv_last_page_len: Any,
    out: Any,
    stream: int,
    enable_pdl: bool = False,
) -> None:
    """:func:`fi_ffi.batch_prefill_paged_run` with a plan from :func:`prefill_plan` (``enable_pdl``: programmatic
    dependent launch, SM 9.0 and later)."""
    fi_ffi.batch_prefill_paged_run(
        q,
        (k_cache, v_cache),
        qo_indptr=qo_indptr,
        kv_indptr=kv_indptr,
        kv_indices=kv_indices,
        kv_last_page_len=kv_last_page_len,
        out=out,
        enable_pdl=enable_pdl,
        stream=stream,
        plan=plan,
    )


def decode_plan(
    ws: Any,
    kv_indptr: Any,
    num_qo_heads: int,
    num_kv_heads: int,
    head_dim: int,
    page_size: int,
    dtype: Any,  # a name or dtype object of the attention modules (the engine's config checked it)
    cuda_graph: bool,
    stream: int,
    kv_dtype: Any = None,
    sm_scale: float | None = None,
) -> Any:
    """A batch-decode plan (host ``kv_indptr``); ``cuda_graph``: a fixed-batch schedule a captured run
    replays; ``kv_dtype``, ``sm_scale``: as :func:`prefill_plan`'s."""
    return fi_ffi.batch_decode_plan(
        kv_indptr,
        None,
        None,
        num_qo_heads,
        num_kv_heads,
        head_dim,
        page_size,
        q_data_type=dtype,
        kv_data_type=kv_dtype,
        sm_scale=sm_scale,
        enable_cuda_graph=cuda_graph,
        stream=stream,
        workspace=ws,
    )


def decode_run(
    plan: Any,
    q: Any,
    k_cache: Any,
    v_cache: Any,
    kv_indptr: Any,
    kv_indices: Any,
    kv_last_page_len: Any,
    out: Any,
    stream: int,
) -> None:
    """:func:`fi_ffi.batch_decode_run` with a plan from :func:`decode_plan`."""
    fi_ffi.batch_decode_run(
        q,
        (k_cache, v_cache),
        kv_indptr=kv_indptr,
        kv_indices=kv_indices,
        kv_last_page_len=kv_last_page_len,
        out=out,
        stream=stream,
        plan=plan,
    )


def prepared_decode_run(
    plan: Any,
    q: Any,
    k_cache: Any,
    v_cache: Any,
    kv_indptr: Any,
    kv_indices: Any,
    kv_last_page_len: Any,
    out: Any,
    stream: int,
    enable_pdl: bool = False,
) -> Any:
    """:func:`decode_run` checked and packed once (:func:`fi_ffi.prepare_decode_run`): the result's ``run(plan)``
    launches it with any plan of ``plan``'s settings and batch size on its workspace. ``enable_pdl``: launched with
    programmatic dependent launch (SM90+; the kernels before and after it wait for their predecessors themselves)."""
    return fi_ffi.prepare_decode_run(
        q,
        (k_cache, v_cache),
        kv_indptr=kv_indptr,
        kv_indices=kv_indices,
        kv_last_page_len=kv_last_page_len,
        out=out,
        plan=plan,
        enable_pdl=enable_pdl,
        stream=stream,
    )


def silu_and_mul(x: Any, out: Any, stream: int) -> None:
    """``out = silu(x[:, :d]) * x[:, d:]`` for ``x`` ``[n, 2d]``."""
    fi_ffi.silu_and_mul(x, out, stream=stream)


def generator(seed: int) -> Any:
    """A Philox generator state for the sampling ops."""
    return fi_ffi.Generator(seed, 0)


def softmax_workspace_bytes(max_batch: int, vocab_size: int) -> int:
    """Bytes of the softmax scratch :func:`sample_top_k_top_p` and :func:`softmax` need for any batch of at most
    ``max_batch`` rows (at least 8, so the buffer is never empty). The kernel's vocabulary-split path, which needs
    the scratch, serves batches of up to 128 rows only: a larger ``max_batch`` needs the scratch of 128."""
    return max(8, fi_ffi.softmax_workspace_size(min(max_batch, 128), vocab_size))


def sampling_needs_valid() -> bool:
    """True where the pinned sampling module is FlashInfer 0.7's, whose samplers also write a ``valid`` flag
    per row (0.6.3's take none: passing one there is refused)."""
    return fi_ffi.sampling_release() != "0.6.3"


def sample_top_k_top_p(
    logits: Any,
    probs: Any,
    workspace: Any,
    out: Any,
    top_k: int,
    top_p: float,
    temperature: float,
    gen: Any,
    stream: int,
    valid: Any = None,
) -> None:
    """``out[i]`` = a token drawn from ``softmax(logits[i] / temperature)`` restricted to the top-k and top-p
    set (``logits`` float32 ``[n, V]``, ``probs`` float32 ``[n, V]`` scratch, ``workspace`` uint8 softmax scratch
    of :func:`softmax_workspace_bytes`, ``out`` int32 ``[n]``; ``valid`` bool ``[n]`` where
    :func:`sampling_needs_valid`, else None)."""
    fi_ffi.softmax(logits, out=probs, workspace=workspace, temperature=temperature, stream=stream)
    fi_ffi.top_k_top_p_sampling_from_probs(probs, top_k, top_p, out=out, valid=valid, generator=gen, stream=stream)


def sample_logit_rows(logits: Any, temperature: Any, top_k: Any, top_p: Any, gen: Any, stream: int) -> Any:
    """One token per row of float32 CuPy ``logits`` ``[n, V]`` drawn from ``softmax(logits[i] / temperature[i])``
    restricted to the tokens in both its top ``top_k[i]`` and its ``top_p[i]`` nucleus (``temperature``, ``top_p``
    float32 ``[n]``, > 0; ``top_k`` int32 ``[n]`` in ``[1, V]``), from the Philox stream ``gen``: int32 ``[n]`` on the
    device. Its scratch is allocated here (CuPy's pool): a verifying pass's rows, not the decode step's buffers."""
    import cupy as cp

    n, vocab = logits.shape
    probs = cp.empty((n, vocab), cp.float32)
    workspace = cp.empty((softmax_workspace_bytes(n, vocab),), cp.uint8)
    out = cp.empty((n,), cp.int32)
    valid = cp.empty((n,), cp.bool_) if sampling_needs_valid() else None
    fi_ffi.softmax(logits, temperature, out=probs, workspace=workspace, stream=stream)
    fi_ffi.top_k_top_p_sampling_from_probs(probs, top_k, top_p, out=out, valid=valid, generator=gen, stream=stream)
    return out


def softmax(logits: Any, probs: Any, workspace: Any, temperature: Any, stream: int) -> None:
    """``probs[r] = softmax(logits[r] / temperature[r])`` (``logits``, ``probs`` float32 ``[R, V]``; ``temperature``
    float32 ``[R]``, each > 0; ``workspace`` as :func:`sample_top_k_top_p`'s)."""
    fi_ffi.softmax(logits, temperature, out=probs, workspace=workspace, stream=stream)


def sample_rows(
    probs: Any, out: Any, top_k: Any, top_p: Any, indices: Any, gen: Any, stream: int, valid: Any = None
) -> None:
    """``out[b]`` = a token drawn from ``probs[indices[b]]`` restricted to its row's top-k and top-p set (``probs``
    float32 ``[R, V]``; ``top_k`` int32 and ``top_p`` float32 ``[R]``, read at ``indices[b]``; ``indices``, ``out``
    int32 ``[B]``; ``valid`` bool ``[B]`` where :func:`sampling_needs_valid`, else None). Output row ``b`` draws
    Philox subsequence ``b`` of ``gen``, which advances by ``32 * B``."""
    fi_ffi.top_k_top_p_sampling_from_probs(
        probs, top_k, top_p, indices, out=out, valid=valid, generator=gen, stream=stream
    )
