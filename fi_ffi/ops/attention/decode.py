"""Decode attention: one query token per request against a KV cache.

- :func:`single_decode`: one request, contiguous K/V (``single_decode_with_kv_cache_*`` ``run``).
- :func:`batch_decode_plan` then :func:`batch_decode_run`: a batch over a paged KV cache
  (``batch_decode_with_kv_cache_*`` ``plan`` / ``run``). A runtime plans once per step (the page table
  changed) and runs every layer with the same :class:`~fi_ffi.ops.attention.plan.Plan`.
- :func:`prepare_decode_run`: a batch decode run's tensors checked and packed once; its ``run(plan)`` takes only
  the step's plan (same settings and batch size), for a runtime whose buffers do not move.

Math, per request and query head ``h`` (KV head ``h // (num_qo_heads / num_kv_heads)``), in float32:
``o[h] = softmax(sm_scale * q[h] . K^T) V`` over the request's ``kv_len`` cached tokens; ``lse[h]`` (optional)
is the log-sum-exp of the scaled logits in base 2, as FlashInfer defines it. With ``logits_soft_cap > 0``
the logits are ``cap * tanh(sm_scale * q.k / cap)``; ``window_left >= 0`` keeps the last ``window_left + 1``
tokens. RoPE and ALiBi apply only with modules compiled for them (``pos_encoding``). An FP8 KV cache
(``kv_dtype="float8_e4m3fn"``) is read by the modules built for it (q and o stay float16/bfloat16); their kernels
take no dequantization scales: plan with ``sm_scale * k_scale`` and multiply the output by ``v_scale`` (what
flashinfer-python's ``k_scale``/``v_scale`` arguments do).

Everything is asynchronous on ``stream`` (see :mod:`fi_ffi.tensor.streams`); nothing synchronizes except the one
documented wait in :mod:`fi_ffi.ops.attention.workspace` (a plan waits for the previous plan's pinned-buffer copy).
Plan and run must use the same stream. The decode kernels support GQA group sizes 1, 2, 3, 4 and 8, and
equal q/k and v/o head dims.

Every kernel call goes through a launcher (:mod:`fi_ffi.launch.launcher`) of the declarations below; a run's
tensors are checked once per layout combination and plan settings (the launcher's ``context``).
"""

from __future__ import annotations

import threading
from types import SimpleNamespace
from typing import Any

from ... import caches
from ...abi.wire import ARRAY, BOOL, FLOAT, INT, OPT_FFI_TENSOR, Param, declare, optional_tensor, tensor, tensors
from ...dtypes import int32, uint8
from ...launch import checks
from ...launch.launcher import Bound, PreparedRun, launcher
from ...launch.pointer_rules import PointerRules
from ...launch.registry import op
from ...tensor.descriptor import Tensor
from ...tensor.protocols import IndexLike, StreamLike, TensorLike, TensorT
from . import attention_checks as AC
from . import plan_settings as S
from .common import (
    POS_ALIBI,
    POS_NONE,
    alibi_error,
    alibi_required,
    check_alibi,
    check_module_dtype,
    check_pages,
    check_tmp,
    check_workspace,
    early_alibi,
    empty,
    extent,
    kv_pair,
    layout_key,
    pages_error,
    runnable,
    variant_uri,
)
from .host_index import check_indices, check_indptr, check_last_page_len, host_array, host_tensor
from .plan import Plan
from .plan_call import call_plan
from .plan_settings import LAYOUTS, AttentionDType, KVLayout, PlanSettings, PosEncodingMode
from .variants import BATCH_DECODE, SINGLE_DECODE
from .workspace import Workspace

__all__ = ["PreparedDecodeRun"]  # public here, not ops of fi_ffi; the ops: @op below

# ---- declarations (FlashInfer 0.6.3 / 0.7.2 csrc/batch_decode.cu, single_decode.cu; public names where 1:1) -----

PLAN = declare(
    "plan",
    [
        *tensors("float_workspace_buffer", "int_workspace_buffer", "page_locked_int_workspace_buffer", "kv_indptr"),
        ("batch_size", INT),
        ("num_qo_heads", INT),
        ("num_kv_heads", INT),
        ("page_size", INT),
        ("enable_cuda_graph", BOOL),
        ("window_left", INT),
        ("logits_soft_cap", FLOAT),
        ("head_dim_qk", INT),
        ("head_dim_vo", INT),
        *tensors("empty_q_data", "empty_kv_data"),
    ],
    returns=ARRAY,
)
RUN = declare(
    "run",
    [
        *tensors("float_workspace_buffer", "int_workspace_buffer"),
        ("plan_info_vec", ARRAY),
        *tensors("q", "k_cache", "v_cache", "kv_indptr", "kv_indices", "kv_last_page_len"),
        tensor("out", output=True),
        optional_tensor("lse", output=True),
        ("kv_layout_code", INT),
        ("window_left", INT),
        ("enable_pdl", BOOL),
        Param("alibi_slopes", OPT_FFI_TENSOR),
        ("logits_soft_cap", FLOAT),
        ("sm_scale", FLOAT),
        ("rope_rcp_scale", FLOAT),
        ("rope_rcp_theta", FLOAT),
    ],
)
SINGLE = declare(
    "run",
    [
        *tensors("q", "k", "v"),
        *tensors("tmp", "out", output=True),
        optional_tensor("lse", output=True),
        ("kv_layout_code", INT),
        ("window_left", INT),
        Param("alibi_slopes", OPT_FFI_TENSOR),
        ("logits_soft_cap", FLOAT),
        ("sm_scale", FLOAT),
        ("rope_rcp_scale", FLOAT),
        ("rope_rcp_theta", FLOAT),
    ],
)
# (module URI pattern, declaration), checked against the pinned modules by tests/launch/test_declarations.py
DECLARATIONS = (
    (r"batch_decode_with_kv_cache_.*", PLAN),
    (r"batch_decode_with_kv_cache_.*", RUN),
    (r"single_decode_with_kv_cache_.*", SINGLE),
)


# ------------------------------------------------------------------------------------------ batch decode


@op(flashinfer="flashinfer.decode.BatchDecodeWithPagedKVCacheWrapper.plan")
def batch_decode_plan(
    indptr: IndexLike,
    indices: IndexLike | None,
    last_page_len: IndexLike | None,
    num_qo_heads: int,
    num_kv_heads: int,
    head_dim: int,
    page_size: int,
    pos_encoding_mode: PosEncodingMode = "NONE",
    window_left: int = -1,
    logits_soft_cap: float | None = 0.0,
    q_data_type: AttentionDType = "float16",
    kv_data_type: AttentionDType | None = None,
    o_data_type: AttentionDType | None = None,
    *,
    workspace: Workspace,
    sm_scale: float | None = None,
    rope_scale: float | None = 1.0,
    rope_theta: float | None = 1e4,
    kv_layout: KVLayout = "NHD",
    alibi_slopes: TensorLike | None = None,
    enable_cuda_graph: bool = False,
    stream: StreamLike = None,
) -> Plan:
    """Plan a batch decode step over a paged KV cache; returns the :class:`~fi_ffi.ops.attention.plan.Plan` runs use.

    flashinfer-python's ``BatchDecodeWithPagedKVCacheWrapper(workspace, kv_layout).plan(indptr, indices,
    last_page_len, num_qo_heads, ...)``, as a function of the workspace: the positional order and keywords are the
    wrapper's (docs/porting.md); ``kv_layout`` and CUDA-graph mode, which the wrapper takes at construction, are
    keywords here.

    Args:
        workspace: the :class:`~fi_ffi.ops.attention.workspace.Workspace` this plan and its runs use.
        indptr: **host** int32 ``[batch + 1]``: request ``i`` owns pages ``indices[indptr[i]:indptr[i+1]]``.
            A numpy int32 array (used without a copy), a host descriptor, or a list of ints. Starts at 0,
            non-decreasing.
        indices: host int32 page ids ``[>= indptr[-1]]``, checked if given (>= 0); None: not checked. The run
            takes the device copy (``kv_indices``).
        last_page_len: host int32 ``[batch]``, checked if given: 1..page_size for a request with pages, 0 for one
            without; None: not checked. The run takes the device copy (``kv_last_page_len``).
        num_qo_heads, num_kv_heads: query and KV heads; the group size ``num_qo_heads / num_kv_heads`` must be
            1, 2, 3, 4 or 8.
        head_dim: head dimension of q, k, v and o.
        page_size: tokens per page (>= 1).
        pos_encoding_mode: ``"NONE"``, ``"ROPE_LLAMA"`` or ``"ALIBI"`` (selects the module).
        window_left: -1 (off) or the left window in tokens (selects a sliding-window module).
        logits_soft_cap: 0 or None (off), or > 0 (selects a soft-cap module).
        q_data_type, kv_data_type, o_data_type: element types, names or dtype objects (kv and o default to q's);
            they select the module (``kv_data_type="float8_e4m3fn"`` with float16 q/o: the FP8 KV cache modules).
        sm_scale: softmax scale; default ``1 / sqrt(head_dim)``.
        rope_scale, rope_theta: RoPE interpolation scale and base (None: 1.0 and 1e4; the kernel takes their
            reciprocals).
        kv_layout: ``"NHD"`` (``[pages, page_size, kv_heads, dim]``) or ``"HND"`` (``[pages, kv_heads, page_size,
            dim]``), fixed for the runs of this plan.
        alibi_slopes: float32 ``[num_qo_heads]`` on the workspace's device, required with ALIBI; the plan refers
            to it until released and passes it to every run.
        enable_cuda_graph: plan for a run captured in a CUDA graph (fixed batch size; padded schedule);
            flashinfer-python's ``use_cuda_graph`` of the wrapper.
        stream: the stream of the plan's asynchronous copy; its runs must use the same stream.

    The plan is valid until the next plan on the same workspace; it may be run any number of times before.

    Returns:
        the :class:`~fi_ffi.ops.attention.plan.Plan`; earlier plans on ``workspace`` become stale.

    Raises:
        TypeError, ValueError: an argument of the wrong type or value, named, before any module is looked up (an
            index list's dtype, length, order; a head count, dtype, layout, position encoding, scale).
        KernelNotFoundError: no pinned module for these settings (names the closest ones).
        LoaderError: the module cannot be loaded (the kernel wheel absent offline, a damaged cache).
    """
    ws = workspace if workspace.__class__ is Workspace else check_workspace(workspace)
    args = (
        num_qo_heads,
        num_kv_heads,
        head_dim,
        page_size,
        q_data_type,
        kv_data_type,
        o_data_type,
        kv_layout,
        pos_encoding_mode,
        window_left,
        logits_soft_cap,
        sm_scale,
        rope_scale,
        rope_theta,
        enable_cuda_graph,
    )
    alibi_required(pos_encoding_mode, alibi_slopes)
    # every argument is checked before the settings resolve the module (which may fetch the kernel wheel)
    host_indptr = host_array("indptr", indptr)
    pages = check_indptr("indptr", host_indptr)
    batch = host_indptr.shape[0] - 1
    if indices is not None:
        check_indices("indices", host_array("indices", indices), pages)
    if last_page_len is not None:
        last = host_array("last_page_len", last_page_len)
        check_last_page_len("last_page_len", last, host_indptr, S.count("page_size", page_size))
    if alibi_slopes is not None:
        early_alibi(num_qo_heads, alibi_slopes, ws.device)
    device_id = ws.device.device_id
    s = S.cached((BATCH_DECODE, device_id, args, tuple(map(type, args))), lambda: _settings(device_id, args))
    if alibi_slopes is not None or s.pos_encoding == POS_ALIBI:
        check_alibi(s, alibi_slopes, ws.device)
    info, generation = call_plan(
        ws,
        s.plan,
        stream,
        ws.float_buffer,
        ws.int_buffer,
        ws.pinned_buffer,
        host_tensor(host_indptr),
        batch,
        s.num_qo_heads,
        s.num_kv_heads,
        s.page_size,
        s.enable_cuda_graph,
        s.window_left,
        s.logits_soft_cap,
        s.head_dim_qk,
        s.head_dim_vo,
        empty(s.dtype_q, "cpu"),
        empty(s.dtype_kv, "cpu"),
    )
    return Plan.make(info, ws, generation, s, batch, batch, pages, (None, None, alibi_slopes))


def _settings(device_id: int, args: tuple[Any, ...]) -> PlanSettings:
    """Validate the settings arguments of :func:`batch_decode_plan` (in its order) into a PlanSettings."""
    (
        num_qo_heads,
        num_kv_heads,
        head_dim,
        page_size,
        q_dtype,
        kv_dtype,
        o_dtype,
        kv_layout,
        pos_encoding,
        window_left,
        logits_soft_cap,
        sm_scale,
        rope_scale,
        rope_theta,
        enable_cuda_graph,
    ) = args
    g = S.geometry(num_qo_heads, num_kv_heads, ("head_dim", head_dim), page_size, kv_layout, decode=True)
    d = g.head_dim_qk
    pos = S.pos_encoding(pos_encoding)
    w = S.window(window_left)
    cap = S.soft_cap(logits_soft_cap)
    sm, rs, rt = S.scales(d, sm_scale, rope_scale, rope_theta)
    graph = checks.flag("enable_cuda_graph", enable_cuda_graph)
    qd, kd, od = S.dtypes(q_dtype, kv_dtype, o_dtype)
    variant, uri = variant_uri(BATCH_DECODE, qd, kd, od, int32, d, d, pos, w != -1, cap > 0)
    return PlanSettings(
        kind=BATCH_DECODE,
        mode="paged",
        variant=variant,
        device_id=device_id,
        **g._asdict(),
        dtype_q=qd,
        dtype_kv=kd,
        dtype_o=od,
        pos_encoding=pos,
        window_left=w,
        logits_soft_cap=cap,
        sm_scale=sm,
        rope_scale=rs,
        rope_theta=rt,
        enable_cuda_graph=graph,
        plan=launcher(PLAN, uri),
        run=launcher(RUN, uri, _check_run, _RUN_SCALARS),
    )


@op(flashinfer="flashinfer.decode.BatchDecodeWithPagedKVCacheWrapper.run")
def batch_decode_run(
    q: TensorLike,
    paged_kv_cache: tuple[TensorLike, TensorLike],
    *,
    plan: Plan,
    kv_indptr: TensorLike,
    kv_indices: TensorLike,
    kv_last_page_len: TensorLike,
    out: TensorT,
    lse: TensorLike | None = None,
    enable_pdl: bool | None = False,
    stream: StreamLike = None,
) -> TensorT:
    """Run batch decode attention with a plan from :func:`batch_decode_plan`.

    flashinfer-python's ``wrapper.run(q, paged_kv_cache, out=..., lse=...)``; the page table's device arrays, which
    the wrapper copies at plan time, are keywords here (fi_ffi copies nothing), and ``out`` is required (fi_ffi
    allocates nothing).

    Args:
        plan: a live plan (not released, not superseded by a later plan on its workspace).
        q: ``[batch, num_qo_heads, head_dim]`` of the plan's q dtype; last dim contiguous (rows may be strided).
        paged_kv_cache: ``(k_cache, v_cache)``, the paged cache in the plan's layout (NHD ``[pages, page_size,
            num_kv_heads, head_dim]`` or HND ``[pages, num_kv_heads, page_size, head_dim]``), kv dtype, identical
            strides.
        kv_indptr: device int32 ``[batch + 1]`` (the same values the plan saw).
        kv_indices: device int32 ``[>= kv_indptr[-1]]``: page ids.
        kv_last_page_len: device int32 ``[batch]``.
        out: ``[batch, num_qo_heads, head_dim]`` of the plan's o dtype, contiguous (written densely).
        lse: optional float32 ``[batch, num_qo_heads]``, contiguous.
        enable_pdl: programmatic dependent launch (SM90+); None: where the device supports it.
        stream: the plan's stream (None: the framework's current stream of the first tensor, as for every op).

    Returns:
        ``out``.

    Raises:
        TypeError, ValueError: a plan that is not a live batch decode plan; a tensor of the wrong shape, dtype,
            device or layout for the plan, named.
        KernelError: the kernel failed (a CUDA error of the launch).
    """
    if paged_kv_cache.__class__ is tuple and len(paged_kv_cache) == 2:
        k_cache, v_cache = paged_kv_cache
    else:
        k_cache, v_cache = kv_pair(paged_kv_cache)
    # runnable() and check_pages() of .common, inline (a call each per layer otherwise): a live, current batch
    # decode plan, and at least the pages its kv_indptr ends at (a plan's fact against kv_indices' length,
    # which the launcher's key does not hold, so it is tested on every call)
    if plan.__class__ is not Plan:
        raise TypeError(f"plan: expected a Plan from batch_decode_plan, got {type(plan).__name__}")
    s = plan._s
    ws = plan.workspace
    if s.kind is not BATCH_DECODE or s.mode != "paged" or not plan._info.handle or ws is None:
        ws = runnable(plan, BATCH_DECODE, "paged", "batch_decode_plan")
    elif ws._generation != plan._generation:
        plan.refuse()
    try:
        pages = kv_indices.shape[0]  # type: ignore[union-attr]  # a descriptor's, torch tensor's or CuPy array's length: an int
    except Exception:
        pages = None
    if pages.__class__ is not int or pages < plan.kv_extent:
        check_pages(plan, kv_indices)  # raises naming kv_indices (or reads another producer's length properly)
    # the plan's scalars (layout code, window, soft cap, scales) are bound to its context (_RUN_SCALARS)
    s.run(
        ws.float_buffer,
        ws.int_buffer,
        plan._info,
        q,
        k_cache,
        v_cache,
        kv_indptr,
        kv_indices,
        kv_last_page_len,
        out,
        lse,
        enable_pdl,
        plan._inputs[2],
        stream=stream,
        context=plan._context,
    )
    return out


@op()
def prepare_decode_run(
    q: TensorLike,
    paged_kv_cache: tuple[TensorLike, TensorLike],
    *,
    kv_indptr: TensorLike,
    kv_indices: TensorLike,
    kv_last_page_len: TensorLike,
    out: TensorLike,
    plan: Plan,
    lse: TensorLike | None = None,
    enable_pdl: bool | None = False,
    stream: StreamLike = None,
) -> PreparedDecodeRun:
    """:func:`batch_decode_run`'s call checked and packed once; the result's ``run(plan)`` launches it with a plan.

    The arguments are :func:`batch_decode_run`'s, checked as it checks them against ``plan`` (a live plan from
    :func:`batch_decode_plan` without ALiBi slopes). The result launches the same run with any later plan of the
    same settings and batch size on the same workspace (a runtime plans every step): one FFI call after the
    plan checks :func:`batch_decode_run` makes per call. It keeps its tensors referenced (their memory must stay
    valid; drop it to release them), and the stream it was prepared with (None: the framework's current stream
    of ``q`` at this call, as :func:`fi_ffi.prepare`).

    Raises:
        TypeError, ValueError: as :func:`batch_decode_run` does, naming the argument; a plan with ALiBi slopes.
    """
    k_cache, v_cache = kv_pair(paged_kv_cache)
    ws = runnable(plan, BATCH_DECODE, "paged", "batch_decode_plan")
    if plan._inputs[2] is not None:
        raise _alibi_refusal()
    check_pages(plan, kv_indices)
    s = plan._s
    values = (ws.float_buffer, ws.int_buffer, plan._info, q, k_cache, v_cache, kv_indptr, kv_indices)
    call = s.run.launcher.prepare_run(  # type: ignore[attr-defined]
        [*values, kv_last_page_len, out, lse, enable_pdl, None], stream, plan._context
    )
    return PreparedDecodeRun(call, ws, extent("kv_indices", kv_indices))


class PreparedDecodeRun:
    """A batch decode run packed once (:func:`prepare_decode_run`); ``run(plan)`` launches it with ``plan``.

    Each call checks what :func:`batch_decode_run` checks of a plan, with its messages: a :class:`Plan` of
    :func:`batch_decode_plan`, live, current on its workspace, with no more pages than ``kv_indices`` holds; and
    what the packing fixed: the workspace and the plan's settings and batch size (a ValueError naming ``plan``).
    """

    __slots__ = ("_call", "_context", "_pages", "_ws")

    def __init__(self, call: PreparedRun, workspace: Workspace, pages: int) -> None:
        self._call = call
        self._context = call.context  # the run context it was packed for (an interned token: compared by identity)
        self._ws = workspace
        self._pages = pages  # kv_indices' length: packed, so the plans' page counts are tested against it

    def run(self, plan: Plan) -> None:
        """Launch the packed run with ``plan`` (this step's plan: same workspace, settings and batch size)."""
        if (
            plan.__class__ is not Plan
            or plan._context is not self._context  # a prefill plan's too: refused in batch_decode_run's words
            or plan.workspace is not self._ws
            or plan._generation != self._ws._generation
            or plan.kv_extent > self._pages
            or plan._inputs[2] is not None
            or not plan._info.handle
        ):
            self._refuse(plan)
        self._call.run(plan._info, plan._context)

    def _refuse(self, plan: Any) -> None:
        """Raise the error of a plan :meth:`run` cannot take, in :func:`batch_decode_run`'s order and words."""
        ws = runnable(plan, BATCH_DECODE, "paged", "batch_decode_plan")
        if ws is not self._ws:
            raise ValueError(
                "plan: made on another workspace than the run was prepared with (its buffers are packed); "
                "prepare a run for that workspace"
            )
        self._call.check(plan._info, plan._context)  # settings and batch size
        if plan.kv_extent > self._pages:
            raise pages_error(plan, self._pages)
        if plan._inputs[2] is not None:
            raise _alibi_refusal()

    def __repr__(self) -> str:
        return f"<PreparedDecodeRun {self._call!r}>"


def _alibi_refusal() -> ValueError:
    return ValueError(
        "plan: has ALiBi slopes, which a prepared decode run does not take (they reach the kernel as a Tensor "
        "object made per call); use batch_decode_run"
    )


def _run_scalars(context: Any) -> tuple[Any, ...]:
    """The run's scalars that are the plan's settings, from its launcher context (a RunContext), in RUN's order."""
    s, _ = context  # (settings, batch size)
    return s.layout_code, s.window_left, s.logits_soft_cap, s.sm_scale, s.rope_rcp_scale, s.rope_rcp_theta


# A run passes neither these nor keys them: they follow from the context (the plan's settings) the key holds.
_RUN_SCALARS = Bound(
    ("kv_layout_code", "window_left", "logits_soft_cap", "sm_scale", "rope_rcp_scale", "rope_rcp_theta"), _run_scalars
)


def _check_run(a: SimpleNamespace) -> PointerRules:
    """The contract of a batch decode run, against the plan's settings and batch size (``a.context``)."""
    s, b = a.context
    dev = a.float_workspace_buffer.device
    hq, hk, d = s.num_qo_heads, s.num_kv_heads, s.head_dim_qk
    rules = PointerRules()
    AC.device_tensor(rules, "q", a.q, (b, hq, d), "[batch, num_qo_heads, head_dim]", s.dtype_q, dev)
    if any(stride >= 1 << 31 for stride in a.q.strides):  # BatchDecodeParams keeps q's strides as int32
        raise ValueError(f"q: the decode kernel takes q's strides as int32, got {a.q.strides}")
    AC.kv_cache(rules, a.k_cache, a.v_cache, s.kv_layout, hk, s.page_size, d, d, s.dtype_kv, dev)
    AC.strides_u32("k_cache", a.k_cache)  # paged_kv_t keeps 32-bit strides (v_cache's equal k_cache's)
    AC.index_tensor("kv_indptr", a.kv_indptr, b + 1, dev)
    AC.index_tensor("kv_indices", a.kv_indices, None, dev)
    AC.index_tensor("kv_last_page_len", a.kv_last_page_len, b, dev)
    AC.device_tensor(
        rules, "out", a.out, (b, hq, d), "[batch, num_qo_heads, head_dim]", s.dtype_o, dev, contiguous=True
    )
    AC.lse_tensor("lse", a.lse, (b, hq), dev)
    AC.vector("alibi_slopes", a.alibi_slopes, "float32", hq, dev)
    return AC.outputs_apart(rules, ("alibi_slopes",))


# ------------------------------------------------------------------------------------------ single decode

# (layout keys of q, k, out; pos_encoding, sliding window, soft cap) -> (launch, head_dim, empty tmp): values only
_single: dict[tuple[Any, ...], tuple[Any, int, Tensor]] = {}
_single_lock = threading.Lock()
_MAX_SINGLE = 1024


@op(flashinfer="flashinfer.decode.single_decode_with_kv_cache")
def single_decode(
    q: TensorLike,
    k: TensorLike,
    v: TensorLike,
    kv_layout: KVLayout = "NHD",
    pos_encoding_mode: PosEncodingMode = "NONE",
    *,
    out: TensorT,
    tmp: TensorLike | None = None,
    lse: TensorLike | None = None,
    window_left: int = -1,
    logits_soft_cap: float | None = 0.0,
    sm_scale: float | None = None,
    rope_scale: float | None = 1.0,
    rope_theta: float | None = 1e4,
    alibi_slopes: TensorLike | None = None,
    stream: StreamLike = None,
) -> TensorT:
    """Decode attention of one request: ``out[h] = softmax(sm_scale * q[h] . K^T) V``.

    flashinfer-python's ``single_decode_with_kv_cache(q, k, v, kv_layout, pos_encoding_mode, ...)``, writing into
    ``out`` (fi_ffi allocates nothing; ``lse`` is returned in place when given, flashinfer's ``return_lse``).

    Args:
        q: ``[num_qo_heads, head_dim]``, contiguous, float16/bfloat16 (or the dtype of an available module).
        k, v: NHD ``[kv_len, num_kv_heads, head_dim]`` or HND ``[num_kv_heads, kv_len, head_dim]``, contiguous,
            one dtype.
        kv_layout: ``"NHD"`` or ``"HND"``.
        pos_encoding_mode: ``"NONE"``, ``"ROPE_LLAMA"`` or ``"ALIBI"`` (selects the module).
        out: ``[num_qo_heads, head_dim]``, contiguous; its dtype selects the module (usually q's).
        tmp: uint8 1-D device scratch for splitting long KV across CTAs (upstream uses 32 MiB,
            :data:`~.workspace.TMP_BYTES`; a workspace's ``float_buffer`` serves on the same stream).
            None: never split (slower for long ``kv_len``, no scratch). A scratch smaller than the split may
            need is a ValueError stating the bytes.
        lse: optional float32 ``[num_qo_heads]``.
        window_left, logits_soft_cap: select the module (see :func:`batch_decode_plan`).
        sm_scale: default ``1 / sqrt(head_dim)``; rope_scale, rope_theta: RoPE parameters (None: 1.0, 1e4).
        alibi_slopes: float32 ``[num_qo_heads]`` with ALIBI.
        stream: where the kernel runs.

    Returns:
        ``out``.

    Raises:
        TypeError, ValueError: an argument of the wrong type, shape, dtype or value, named, before any module is
            looked up.
        KernelNotFoundError: no pinned module for these dtypes, head dim and options.
        LoaderError: the module cannot be loaded (the kernel wheel absent offline, a damaged cache).
        KernelError: the kernel failed.
    """
    layout = LAYOUTS.get(kv_layout) if kv_layout.__class__ is str else None
    if layout is None:
        layout = LAYOUTS[S.layout_name(kv_layout)]
    pos = (
        POS_NONE
        if pos_encoding_mode.__class__ is str and pos_encoding_mode == "NONE"
        else S.pos_encoding(pos_encoding_mode)
    )
    w = window_left if window_left.__class__ is int and -1 <= window_left < 1 << 31 else S.window(window_left)
    cap = 0.0 if logits_soft_cap.__class__ is float and logits_soft_cap == 0.0 else S.soft_cap(logits_soft_cap)
    if (pos == POS_ALIBI) != (alibi_slopes is not None):
        raise alibi_error(pos)
    key = (layout_key("q", q, stream), layout_key("k", k, stream), layout_key("out", out, stream), pos, w >= 0, cap > 0)
    found = _single.get(key)
    if found is None:
        found = _single_variant(q, k, v, out, key, (tmp, lse, layout, alibi_slopes, sm_scale, rope_scale, rope_theta))
    launch, d, no_tmp = found
    sm, rs, rt = S.scales(d, sm_scale, rope_scale, rope_theta)
    launch(
        q,
        k,
        v,
        no_tmp if tmp is None else tmp,
        out,
        lse,
        layout,
        w,
        alibi_slopes,
        cap,
        sm,
        1.0 / rs,
        1.0 / rt,
        stream=stream,
    )
    return out


def _single_variant(
    q: Any, k: Any, v: Any, out: Any, key: tuple[Any, ...], rest: tuple[Any, ...]
) -> tuple[Any, int, Tensor]:
    """The module of a single decode call (from q's, k's and out's dtypes and the head dim), remembered by value.

    ``rest`` is the call's other arguments (tmp, lse, layout code, ALiBi slopes, sm_scale, rope_scale,
    rope_theta): the whole call is checked before the module is looked up (which may fetch the kernel wheel)."""
    qt, kt, ot = checks.tensor("q", q), checks.tensor("k", k), checks.tensor("out", out)
    if qt.ndim != 2:
        raise ValueError(f"q: expected a 2-D tensor [num_qo_heads, head_dim], got shape {qt.shape}")
    if kt.ndim != 3:
        raise ValueError(
            f"k: expected a 3-D tensor (NHD [kv_len, num_kv_heads, head_dim] or HND [num_kv_heads, "
            f"kv_len, head_dim]), got shape {kt.shape}"
        )
    if not qt.device.is_cuda:
        raise ValueError(f"q: expected a CUDA device tensor, got one on {qt.device}")
    d = qt.shape[1]
    if d == 0:
        raise ValueError(f"q: head_dim (the last dimension) must be > 0, got shape {qt.shape}")
    for name, t in (("q", qt), ("k", kt), ("out", ot)):
        check_module_dtype(name, t)
    tmp, lse, layout, alibi_slopes, sm_scale, rope_scale, rope_theta = rest
    S.scales(d, sm_scale, rope_scale, rope_theta)
    _check_single(
        SimpleNamespace(
            q=qt,
            k=kt,
            v=checks.tensor("v", v),
            out=ot,
            tmp=empty(uint8, qt.device) if tmp is None else checks.tensor("tmp", tmp),
            lse=None if lse is None else checks.tensor("lse", lse),
            kv_layout_code=layout,
            alibi_slopes=None if alibi_slopes is None else checks.tensor("alibi_slopes", alibi_slopes),
        )
    )
    pos, swa, cap = key[3:]
    _, uri = variant_uri(SINGLE_DECODE, qt.dtype, kt.dtype, ot.dtype, None, d, d, pos, swa, cap)
    found = (launcher(SINGLE, uri, _check_single), d, empty(uint8, qt.device))
    with _single_lock:
        if len(_single) >= _MAX_SINGLE:
            _single.clear()
        _single[key] = found
    return found


def _check_single(a: SimpleNamespace) -> PointerRules:
    """The contract of a single decode call."""
    q, k, v, out, tmp = a.q, a.k, a.v, a.out, a.tmp
    if q.ndim != 2:
        raise ValueError(f"q: expected a 2-D tensor [num_qo_heads, head_dim], got shape {q.shape}")
    if not q.device.is_cuda:
        raise ValueError(f"q: expected a CUDA device tensor, got one on {q.device}")
    dev = q.device
    hq, d = q.shape
    rules = PointerRules()
    AC.device_tensor(rules, "q", q, (hq, d), "[num_qo_heads, head_dim]", None, dev, contiguous=True)
    nhd = a.kv_layout_code == LAYOUTS["NHD"]
    text = "NHD [kv_len, num_kv_heads, head_dim]" if nhd else "HND [num_kv_heads, kv_len, head_dim]"
    AC.device_tensor(rules, "k", k, (None, None, d), text, None, dev, contiguous=True)
    AC.device_tensor(rules, "v", v, k.shape, text, k.dtype, dev, contiguous=True)
    hk, kv_len = (k.shape[1], k.shape[0]) if nhd else (k.shape[0], k.shape[1])
    if hk == 0:
        raise ValueError(f"k: expected at least one KV head, got shape {k.shape}")
    S.gqa(hq, hk, decode=True, where=f"k (shape {k.shape} read as kv_layout {text})")
    AC.device_tensor(rules, "out", out, (hq, d), "[num_qo_heads, head_dim]", None, dev, contiguous=True)
    check_tmp(tmp, dev, kv_len, 1, hq, hk, d, out.dtype.itemsize, prefill=False)
    AC.scratch(rules, "tmp", tmp)
    AC.lse_tensor("lse", a.lse, (hq,), dev)
    AC.vector("alibi_slopes", a.alibi_slopes, "float32", hq, dev)
    return AC.outputs_apart(rules, ("alibi_slopes",))


caches.register("single decode modules (by layout values)", _single.clear)
