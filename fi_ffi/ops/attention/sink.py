"""Batch prefill/decode attention with attention sinks (gpt-oss): plan, then run, over a paged or ragged KV.

flashinfer-python's ``BatchAttentionWithAttentionSinkWrapper`` (``.plan`` / ``.run``); modules
``batch_prefill_with_attention_sink_kv_cache_dtype_q_{d}_dtype_kv_{d}_dtype_o_{d}_dtype_idx_i32_head_dim_qk_{h}_
head_dim_vo_{h}_use_swa_{False,True}_`` (FA2) and the same with ``_sm90`` (FA3). The plan entry points are the
batch prefill ones (same argument lists as :mod:`.prefill`'s); the runs end with the per-head ``sink``
(a float32 device tensor passed as a TVM-FFI Tensor made for the call) and ``sm_scale``.

Math, per request, query row ``i`` and head ``h`` (KV head ``h // group``), in float32: the logits
``s_j = sm_scale * q[i, h] . k[j]`` over the keys ``j`` the mask allows (causal or not; ``window_left >= 0``
keeps ``j >= i + kv_len - qo_len - window_left``), then::

    o[i, h] = sum_j exp(s_j - m) v[j] / (exp(sink[h] - m) + sum_j exp(s_j - m)),   m = max(sink[h], max_j s_j)

The sink is an extra logit (natural-log units, not scaled by ``sm_scale``) that takes part in the normalization
and contributes no value: a head may put its attention "nowhere". ``window_left >= 0`` selects the
``use_swa_True`` module. No custom mask, positional encoding or soft cap (the modules have none).

``backend="auto"`` picks FA3 on an SM 9.x GPU when the ``_sm90`` module is pinned, else FA2. Plans are values as in
:mod:`.prefill`: a later plan on the same workspace makes this one stale, and plan and runs share one
stream. Outputs (``out``, ``lse``) must not overlap the inputs (the launcher refuses overlapping outputs; the
kernels read q/k/v/sink while writing ``out``).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from ...abi.wire import ARRAY, FFI_TENSOR, FLOAT, Param, declare
from ...dtypes import DType
from ...errors import KernelNotFoundError, UnsupportedDeviceError
from ...launch import checks
from ...launch.launcher import launcher
from ...launch.pointer_rules import PointerRules
from ...launch.registry import op
from ...tensor.protocols import IndexLike, StreamLike, TensorLike, TensorT
from . import attention_checks as AC
from . import plan_settings as S
from .common import check_kv_tokens, check_pages, check_rows, check_workspace, kv_pair, runnable
from .plan import Plan
from .plan_settings import MASK_CAUSAL, MASK_NONE, AttentionBackend, AttentionDType, KVLayout, PlanSettings
from .prefill import (
    FA2_PLAN,
    FA3_PLAN,
    PAGED_KV,
    RAGGED_KV,
    RUN_HEAD,
    RUN_MID,
    call_prefill_plan,
    check_paged_run,
    check_ragged_run,
    plan_lengths,
)
from .workspace import Workspace

KIND = "batch_attention_sink"
_SINK_TAIL: list[Param | tuple[str, str]] = [Param("sinks", FFI_TENSOR), ("sm_scale", FLOAT)]
# the plan entry points are the batch prefill ones; the sink modules are built from FlashInfer 0.6.3 only here
SINK_FA3_PLAN = declare("plan", FA3_PLAN.params, returns=ARRAY, release="0.6.3")
SINK_RAGGED = declare("ragged_run", [*RUN_HEAD, *RAGGED_KV, *RUN_MID, *_SINK_TAIL])
SINK_PAGED = declare("paged_run", [*RUN_HEAD, *PAGED_KV, *RUN_MID, *_SINK_TAIL])
_FA2 = r"batch_prefill_with_attention_sink_kv_cache_.*_use_swa_(True|False)_"
_FA3 = _FA2 + "_sm90"
DECLARATIONS = (
    (_FA2, FA2_PLAN),
    (_FA2, SINK_RAGGED),
    (_FA2, SINK_PAGED),
    (_FA3, SINK_FA3_PLAN),
    (_FA3, SINK_RAGGED),
    (_FA3, SINK_PAGED),
)


@dataclass(frozen=True)
class SinkVariant:
    """The attention-sink module of a dtype, head dim, window and backend (``uri`` as upstream spells it)."""

    dtype: DType
    head_dim: int
    sliding_window: bool
    backend: str  # "fa2" | "fa3"

    @property
    def uri(self) -> str:
        d = self.dtype.short
        return (
            f"batch_prefill_with_attention_sink_kv_cache_dtype_q_{d}_dtype_kv_{d}_dtype_o_{d}_dtype_idx_i32_"
            f"head_dim_qk_{self.head_dim}_head_dim_vo_{self.head_dim}_use_swa_{self.sliding_window}_"
            + ("_sm90" if self.backend == "fa3" else "")
        )


def _pinned(uri: str) -> bool:
    from .variants import available

    return uri in available()[0]


def _choose(dtype: DType, head_dim: int, swa: bool, backend: Any, device_id: int) -> SinkVariant:
    from .variants import available, sm_major

    if backend.__class__ is not str or backend not in ("auto", "fa2", "fa3"):
        raise ValueError(f"backend: expected 'auto', 'fa2' or 'fa3', got {backend!r}")
    major = sm_major(device_id)
    fa3 = SinkVariant(dtype, head_dim, swa, "fa3")
    fa2 = SinkVariant(dtype, head_dim, swa, "fa2")
    if backend == "fa3" and major is not None and major != 9:
        raise UnsupportedDeviceError(
            f"backend 'fa3' needs an SM 9.x GPU (H100/H200); cuda:{device_id} is SM {major}.x; use 'fa2' or 'auto'"
        )
    chosen = fa3 if backend == "fa3" or (backend == "auto" and major == 9 and _pinned(fa3.uri)) else fa2
    if not _pinned(chosen.uri):
        sinks = sorted(u for u in available()[0] if u.startswith("batch_prefill_with_attention_sink_"))
        listed = "\n  ".join(sinks) if sinks else "(none)"
        raise KernelNotFoundError(
            f"no pinned module {chosen.uri} (attention sinks, {dtype.name}, head_dim {head_dim}, "
            f"window {'on' if swa else 'off'}, {chosen.backend}); the pinned wheels have these sink "
            f"modules:\n  {listed}"
        )
    return chosen


def _settings(mode: str, device_id: int, args: tuple[Any, ...]) -> PlanSettings:
    (hq, hk, d, page_size, dtype, kv_layout, causal, window_left, sm_scale, backend, graph) = args
    g = S.geometry(hq, hk, ("head_dim_qk", d), page_size, kv_layout, decode=False)
    d, layout = g.head_dim_qk, g.kv_layout
    causal = checks.flag("causal", causal)
    w = S.window(window_left)
    sm, _, _ = S.scales(d, sm_scale, 1.0, 1e4)
    graph = checks.flag("enable_cuda_graph", graph)
    qd, _, _ = S.dtypes(dtype, None, None)
    if mode == "ragged" and layout == "HND" and backend == "fa3":
        raise ValueError("backend: 'fa3' ragged runs read K/V as NHD only; use kv_layout='NHD' or backend 'fa2'")
    variant = _choose(qd, d, w >= 0, "fa2" if mode == "ragged" and layout == "HND" else backend, device_id)
    fa3 = variant.backend == "fa3"
    uri = variant.uri
    run = launcher(
        SINK_RAGGED if mode == "ragged" else SINK_PAGED,
        uri,
        _check_run_ragged if mode == "ragged" else _check_run_paged,
    )
    return PlanSettings(
        kind=KIND,
        mode=mode,
        variant=variant,
        device_id=device_id,
        **g._asdict(),
        dtype_q=qd,
        dtype_kv=qd,
        dtype_o=qd,
        mask_mode=MASK_CAUSAL if causal else MASK_NONE,
        window_left=w,
        sm_scale=sm,
        enable_cuda_graph=graph,
        plan=launcher(SINK_FA3_PLAN if fa3 else FA2_PLAN, uri),
        run=run,
    )


def _plan(
    mode: str,
    workspace: Workspace,
    qo_indptr: Any,
    kv_indptr: Any,
    kv_indices: Any,
    kv_last_page_len: Any,
    stream: Any,
    args: tuple[Any, ...],
) -> Plan:
    ws = workspace if workspace.__class__ is Workspace else check_workspace(workspace)
    # every argument is checked before the settings resolve the module (which may fetch the kernel wheel)
    qo, rows, batch, kv, extent_, kv_lens = plan_lengths(
        mode, qo_indptr, kv_indptr, kv_indices, kv_last_page_len, args[3]
    )
    device_id = ws.device.device_id
    s = S.cached((KIND, mode, device_id, args, tuple(map(type, args))), lambda: _settings(mode, device_id, args))
    extra = {} if s.backend == "fa3" else {"fixed_split_size": -1, "disable_split_kv": False}
    info, generation = call_prefill_plan(ws, s, stream, qo, kv, kv_lens, rows, batch, extra)
    return Plan.make(info, ws, generation, s, batch, rows, extent_)


@op(flashinfer="flashinfer.prefill.BatchPrefillWithPagedKVCacheWrapper.plan")
def batch_attention_sink_plan(
    qo_indptr: IndexLike,
    paged_kv_indptr: IndexLike,
    paged_kv_indices: IndexLike | None,
    paged_kv_last_page_len: IndexLike,
    num_qo_heads: int,
    num_kv_heads: int,
    head_dim_qk: int,
    page_size: int,
    *,
    workspace: Workspace,
    causal: bool = True,
    sm_scale: float | None = None,
    window_left: int = -1,
    q_data_type: AttentionDType = "bfloat16",
    kv_layout: KVLayout = "NHD",
    backend: AttentionBackend = "auto",
    enable_cuda_graph: bool = False,
    stream: StreamLike = None,
) -> Plan:
    """Plan attention with sinks over a paged KV cache.

    flashinfer-python's ``BatchAttentionWithAttentionSinkWrapper(...).plan(...)``, the plan it inherits from
    ``BatchPrefillWithPagedKVCacheWrapper``: the same positional order and keywords (docs/porting.md).

    Args:
        workspace: the :class:`~fi_ffi.ops.attention.workspace.Workspace` of this plan and its runs.
        qo_indptr: host int32 ``[batch + 1]`` query rows per request (decode: ``[0, 1, 2, ...]``).
        paged_kv_indptr: host int32 ``[batch + 1]`` in pages.
        paged_kv_indices: host int32 page ids ``[>= paged_kv_indptr[-1]]``, checked if given; None: not checked.
        paged_kv_last_page_len: host int32 ``[batch]``.
        num_qo_heads, num_kv_heads, head_dim_qk, page_size: the problem (q/kv/o share ``q_data_type``).
        causal: causal mask aligned to the end of each request's KV (gpt-oss: True).
        sm_scale: default ``1 / sqrt(head_dim_qk)``.
        window_left: -1 (no window) or the left window in tokens (gpt-oss's sliding layers: 127).
        q_data_type: the element type of q, the caches and out.
        kv_layout: ``"NHD"`` ``[pages, page_size, kv_heads, d]`` or ``"HND"``.
        backend: ``"auto"``, ``"fa2"`` or ``"fa3"``.
        enable_cuda_graph: plan for runs captured in a CUDA graph.
        stream: the stream of the plan's copy; runs must use the same stream.

    Returns:
        the :class:`~fi_ffi.ops.attention.plan.Plan`; earlier plans on ``workspace`` become stale.

    Raises:
        TypeError, ValueError: an argument of the wrong type or value, named, before any module is looked up.
        KernelNotFoundError: no pinned sink module for these settings (lists the pinned ones).
        UnsupportedDeviceError: ``backend="fa3"`` on a GPU that is not SM 9.x.
        LoaderError: the module cannot be loaded (the kernel wheel absent offline, a damaged cache).
    """
    args = (num_qo_heads, num_kv_heads, head_dim_qk, page_size, q_data_type, kv_layout, causal, window_left, sm_scale,
            backend, enable_cuda_graph)  # fmt: skip
    return _plan("paged", workspace, qo_indptr, paged_kv_indptr, paged_kv_indices, paged_kv_last_page_len, stream, args)


@op(flashinfer="flashinfer.prefill.BatchPrefillWithRaggedKVCacheWrapper.plan")
def batch_attention_sink_ragged_plan(
    qo_indptr: IndexLike,
    kv_indptr: IndexLike,
    num_qo_heads: int,
    num_kv_heads: int,
    head_dim_qk: int,
    *,
    workspace: Workspace,
    causal: bool = True,
    window_left: int = -1,
    sm_scale: float | None = None,
    q_data_type: AttentionDType = "bfloat16",
    kv_layout: KVLayout = "NHD",
    backend: AttentionBackend = "auto",
    enable_cuda_graph: bool = False,
    stream: StreamLike = None,
) -> Plan:
    """Plan attention with sinks over ragged K/V (``kv_indptr`` in tokens); arguments as
    :func:`batch_attention_sink_plan` (flashinfer-python's ragged prefill wrapper's ``plan``).

    Returns:
        the :class:`~fi_ffi.ops.attention.plan.Plan`; earlier plans on ``workspace`` become stale.

    Raises:
        TypeError, ValueError: an argument of the wrong type or value, named, before any module is looked up.
        KernelNotFoundError: no pinned sink module for these settings (lists the pinned ones).
        UnsupportedDeviceError: ``backend="fa3"`` on a GPU that is not SM 9.x.
        LoaderError: the module cannot be loaded (the kernel wheel absent offline, a damaged cache).
    """
    args = (num_qo_heads, num_kv_heads, head_dim_qk, 1, q_data_type, kv_layout, causal, window_left, sm_scale, backend,
            enable_cuda_graph)  # fmt: skip
    return _plan("ragged", workspace, qo_indptr, kv_indptr, None, None, stream, args)


def _check_sink(a: SimpleNamespace, rules: PointerRules) -> PointerRules:
    s, _ = a.context
    AC.vector("sinks", a.sinks, "float32", s.num_qo_heads, a.float_workspace_buffer.device)
    return rules.disjoint("out", "sinks").disjoint("lse", "sinks")  # the kernel reads sinks while writing out/lse


def _check_run_ragged(a: SimpleNamespace) -> PointerRules:
    return _check_sink(a, check_ragged_run(a))  # q, k, v, indptrs, out, lse against the plan: prefill's run contract


def _check_run_paged(a: SimpleNamespace) -> PointerRules:
    return _check_sink(a, check_paged_run(a))


def _launch(
    plan: Plan, ws: Any, tensors: tuple[Any, ...], out: Any, sink: Any, lse: Any, pdl: Any, stream: Any
) -> None:
    s = plan._s
    if sink is None:
        raise TypeError(
            f"sinks: expected a float32 device tensor [{s.num_qo_heads}] (one logit per query head), got None"
        )
    s.run(
        ws.float_buffer,
        ws.int_buffer,
        plan._info,
        *tensors,
        out,
        lse,
        s.mask_mode,
        s.layout_code,
        s.window_left,
        pdl,
        sink,
        s.sm_scale,
        stream=stream,
        context=plan._context,
    )


@op(flashinfer="flashinfer.prefill.BatchPrefillWithPagedKVCacheWrapper.run")
def batch_attention_sink_run(
    q: TensorLike,
    paged_kv_cache: tuple[TensorLike, TensorLike],
    *,
    plan: Plan,
    qo_indptr: TensorLike,
    kv_indptr: TensorLike,
    kv_indices: TensorLike,
    kv_last_page_len: TensorLike,
    out: TensorT,
    sinks: TensorLike,
    lse: TensorLike | None = None,
    enable_pdl: bool | None = False,
    stream: StreamLike = None,
) -> TensorT:
    """Run attention with sinks over a paged KV cache with a plan from :func:`batch_attention_sink_plan`.

    flashinfer-python's ``wrapper.run(q, paged_kv_cache, sinks=..., out=...)``; the page table's device arrays
    are keywords here, and ``out`` is required (fi_ffi allocates nothing).

    Args:
        plan: a live paged sink plan.
        q: ``[>= qo_indptr[-1], num_qo_heads, head_dim]``; last dim contiguous.
        paged_kv_cache: ``(k_cache, v_cache)``: NHD ``[pages, page_size, num_kv_heads, head_dim]`` / HND, the
            plan's dtype.
        qo_indptr, kv_indptr, kv_last_page_len: device int32 copies of the plan's host arrays.
        kv_indices: device int32 ``[>= kv_indptr[-1]]`` page ids.
        out: ``[q.shape[0], num_qo_heads, head_dim]``, contiguous; written.
        sinks: float32 device ``[num_qo_heads]``: each head's sink logit.
        lse: optional float32 ``[q.shape[0], num_qo_heads]`` (base 2).
        enable_pdl: programmatic dependent launch (SM90+); None: where the device supports it.
        stream: the plan's stream.

    Returns:
        ``out``.

    Raises:
        TypeError, ValueError: a plan that is not a live sink plan of this kind; a tensor of the wrong shape,
            dtype, device or layout for the plan, named.
        KernelError: the kernel failed (a CUDA error of the launch).
    """
    k_cache, v_cache = kv_pair(paged_kv_cache)
    ws = runnable(plan, KIND, "paged", "batch_attention_sink_plan")
    check_rows(plan, q)
    check_pages(plan, kv_indices)
    tensors = (q, k_cache, v_cache, qo_indptr, kv_indptr, kv_indices, kv_last_page_len)
    _launch(plan, ws, tensors, out, sinks, lse, enable_pdl, stream)
    return out


@op(flashinfer="flashinfer.prefill.BatchPrefillWithRaggedKVCacheWrapper.run")
def batch_attention_sink_ragged_run(
    q: TensorLike,
    k: TensorLike,
    v: TensorLike,
    *,
    plan: Plan,
    qo_indptr: TensorLike,
    kv_indptr: TensorLike,
    out: TensorT,
    sinks: TensorLike,
    lse: TensorLike | None = None,
    enable_pdl: bool | None = False,
    stream: StreamLike = None,
) -> TensorT:
    """Run attention with sinks over ragged ``k``/``v`` (NHD ``[>= kv_indptr[-1], num_kv_heads, head_dim]`` or
    HND) with a plan from :func:`batch_attention_sink_ragged_plan`; other arguments as
    :func:`batch_attention_sink_run`.

    Returns:
        ``out``.

    Raises:
        TypeError, ValueError: a plan that is not a live sink plan of this kind; a tensor of the wrong shape,
            dtype, device or layout for the plan, named.
        KernelError: the kernel failed (a CUDA error of the launch).
    """
    ws = runnable(plan, KIND, "ragged", "batch_attention_sink_ragged_plan")
    check_rows(plan, q)
    check_kv_tokens(plan, k)
    _launch(plan, ws, (q, k, v, qo_indptr, kv_indptr), out, sinks, lse, enable_pdl, stream)
    return out
