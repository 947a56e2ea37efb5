"""Multi-head latent attention (DeepSeek MLA) over a paged compressed-KV cache: plan once, run every layer.

- :func:`batch_mla_plan` computes the schedule of a batch (``plan`` of a ``batch_mla_attention_*`` module) on a
  :class:`~fi_ffi.ops.attention.workspace.Workspace` and returns an :class:`MLAPlan`;
- :func:`batch_mla_run` runs the attention with it (``run``), any number of times, until the next plan on the
  same workspace.

Modules: ``batch_mla_attention_dtype_q_{f16,bf16}_dtype_kv_<same>_dtype_o_<same>_dtype_idx_i32_head_dim_ckv_512_
head_dim_kpe_64_profiler_False`` (FA2, every GPU FlashInfer supports) and the same with ``_sm90`` (FA3, Hopper).
FlashInfer 0.7.x names them ``..._profiler_False_planabi2[_sm90]``: its plan returns ``Tuple<Array<int>, int>``
(the schedule and the bytes it staged in the page-locked buffer, which fi_ffi then copies into the int workspace
on the plan's stream, as the 0.6.x plan did itself) and its run takes three more arguments (FP8 KV scale
factors). Both argument lists are declared here (:data:`DECLARATIONS`, each tagged with its release) and the
one the bound module states is used, so the public API is the same for both releases.

Layout (the "absorbed" form: ``W_UK`` folded into the queries, ``W_UV`` into the output projection), with
``H`` query heads, ``ckv = 512`` and ``kpe = 64`` for DeepSeek V2/V3 (H = 128, or 16 per GPU at TP 8):

- ``q_nope [rows, H, ckv]``, ``q_pe [rows, H, kpe]``: the query rows of all requests, concatenated
  (``qo_indptr``); a decode step has one row per request.
- ``ckv_cache [pages, page_size, ckv]``, ``kpe_cache [pages, page_size, kpe]``: the paged cache, one shared KV
  head, filled by :func:`fi_ffi.append_paged_mla_kv_cache`; request ``b`` owns pages
  ``kv_indices[kv_indptr[b]:kv_indptr[b+1]]`` and its first ``kv_len_arr[b]`` tokens.
- ``out [rows, H, ckv]``; ``lse [rows, H]`` float32 (optional).

Math, per request, row ``i`` (of ``qo_len``), head ``h``, over the request's tokens ``j < kv_len``, in float32::

    s[j]   = sm_scale * (q_nope[i, h] . ckv[j] + q_pe[i, h] . kpe[j])
    out[i, h] = sum_j softmax(s)[j] * ckv[j]          (the compressed KV is also the value)
    lse[i, h] = log2(sum_j exp(s[j]))                  (natural log with return_lse_base_on_e)

With ``causal``, row ``i`` sees tokens ``j <= kv_len - qo_len + i`` (the rows are the request's last ``qo_len``
tokens, FlashInfer's bottom-right alignment); one-row (decode) requests see every token either way.

Everything is asynchronous on ``stream`` (see :mod:`fi_ffi.tensor.streams`); a plan and its runs must use the same
stream. The only wait is the workspace's: a plan waits for the previous plan's pinned-buffer copy
(:mod:`fi_ffi.ops.attention.workspace`).
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from ... import caches
from ...abi.objects import Array
from ...abi.streams import current_stream
from ...abi.wire import ARRAY, BOOL, FLOAT, INT, Param, declare, optional_tensor, scalar, tensor, tensors
from ...cuda.runtime import DeviceScope, runtime
from ...cuda.runtime import check as _check_cuda
from ...dtypes import DType, bfloat16, float8_e4m3fn, float8_e5m2, float16, float32, int32
from ...dtypes import dtype as to_dtype
from ...errors import KernelError, UnsupportedDeviceError
from ...launch import checks
from ...launch.launcher import launcher
from ...launch.pointer_rules import PointerRules
from ...launch.registry import op
from ...tensor.descriptor import Tensor
from ...tensor.protocols import IndexLike, StreamLike, TensorLike, TensorT
from ...tensor.streams import stream_handle
from . import variants as V
from .host_index import check_indices, check_indptr, host_array, host_tensor
from .plan import Schedule
from .plan_settings import MASK_CAUSAL, MASK_NONE, AttentionBackend, AttentionDType  # mask-mode codes, once
from .workspace import Workspace

__all__ = ["DECLARATIONS"]  # public here, not ops of fi_ffi; the ops: @op below

# ---------------------------------------------------------------------------------------------- declarations

TUPLE_ARRAY_INT = "Tuple<Array<int>, int>"  # 0.7.x plan: (schedule, bytes staged in the page-locked buffer)

_PLAN_PARAMS: list[Param] = [
    *tensors("float_workspace_buffer", "int_workspace_buffer", "page_locked_int_workspace_buffer"),
    *tensors("qo_indptr", "kv_indptr"),
    tensor("kv_len_arr"),  # host int32 arrays (C++: kv_len)
    Param("num_heads", INT),
    Param("head_dim_o", INT),
    Param("causal", BOOL),
]
PLAN = declare("plan", _PLAN_PARAMS, returns=ARRAY, release="0.6.3")
PLAN_PLANABI2 = declare("plan", _PLAN_PARAMS, returns=TUPLE_ARRAY_INT, release="0.7.2")

_RUN_PARAMS: list[Param] = [
    *tensors("float_workspace_buffer", "int_workspace_buffer"),
    Param("plan_info_vec", ARRAY),
    *tensors("q_nope", "q_pe", "ckv_cache", "kpe_cache", "kv_indices"),
    tensor("out", output=True),
    optional_tensor("lse", output=True),  # C++: o, maybe_lse
    Param("mask_mode_code", INT),
    Param("num_heads", INT),
    Param("page_size", INT),
    Param("sm_scale", FLOAT),
    Param("return_lse_base_on_e", BOOL),
]
RUN = declare("run", _RUN_PARAMS, release="0.6.3")
# 0.7.x: FP8 KV dequantization factors after the scalars; their defaults (1.0, 1.0, None) are 0.6.3's behaviour.
RUN_PLANABI2 = declare(
    "run",
    [
        *_RUN_PARAMS,
        scalar("ckv_scale", FLOAT, 1.0),
        scalar("kpe_scale", FLOAT, 1.0),
        optional_tensor("ckv_scale_arr", default=None),
    ],  # C++: maybe_ckv_scale_arr
    release="0.7.2",
)

_PLAN_DECLS = (PLAN, PLAN_PLANABI2)
_RUN_DECLS = (RUN, RUN_PLANABI2)

_URI_063 = r"batch_mla_attention_dtype_q_\w+?_profiler_False(_sm90)?"
_URI_072 = r"batch_mla_attention_dtype_q_\w+?_profiler_False_planabi2(_sm90)?"
# (module URI pattern, declaration) of both releases; tests/launch/test_declarations.py checks each declaration against
# every module of the releases its ``release`` names that the pattern matches.
DECLARATIONS = ((_URI_063, PLAN), (_URI_063, RUN), (_URI_072, PLAN_PLANABI2), (_URI_072, RUN_PLANABI2))

# ---------------------------------------------------------------------------------------------- limits

_Q_DTYPES = (float16, bfloat16)
_FP8 = (float8_e4m3fn, float8_e5m2)
_U32 = 1 << 32  # the kernels index tokens and elements with 32-bit unsigned offsets
# The schedule's per-work arrays hold at most 16384 entries (MLAPlan's max_total_num_works); it writes past them
# otherwise. A plan has at most (query tiles) + (clusters) work items; clusters <= SMs, kept below this margin.
_MAX_WORKS = 16384
_SM_MARGIN = 1024


class _Settings:
    """What every plan with the same arguments on the same device shares: the module, its launch functions, and
    the values the run passes and checks. Compared by identity (the run's ``context``)."""

    __slots__ = (
        "backend",
        "causal",
        "device",
        "dtype_kv",
        "dtype_q",
        "head_dim_ckv",
        "head_dim_kpe",
        "mask_mode",
        "num_heads",
        "page_size",
        "plan",
        "run",
        "sm_scale",
        "tuple_result",
        "uri",
    )

    def __init__(
        self,
        device: Any,
        num_heads: int,
        head_dim_ckv: int,
        head_dim_kpe: int,
        page_size: int,
        causal: bool,
        sm_scale: float,
        dtype_q: DType,
        dtype_kv: DType,
        backend: str,
        uri: str,
    ) -> None:
        self.device = device
        self.num_heads = num_heads
        self.head_dim_ckv = head_dim_ckv
        self.head_dim_kpe = head_dim_kpe
        self.page_size = page_size
        self.causal = causal
        self.mask_mode = MASK_CAUSAL if causal else MASK_NONE
        self.sm_scale = sm_scale
        self.dtype_q = dtype_q
        self.dtype_kv = dtype_kv
        self.backend = backend
        self.uri = uri
        # Binding picks the declaration the module's own signature matches (0.6.3 or 0.7.x planabi2).
        self.plan = launcher(_PLAN_DECLS, uri, _check_plan)
        self.run = launcher(_RUN_DECLS, uri, _check_run)
        self.tuple_result = self.plan.launcher.decl.returns == TUPLE_ARRAY_INT  # type: ignore[attr-defined]


@op()
class MLAPlan(Schedule):
    """The schedule of one MLA batch (what :func:`batch_mla_plan` returns) and what its runs must match.

    Attributes:
        workspace: the :class:`~fi_ffi.ops.attention.workspace.Workspace` the schedule lives in.
        batch_size: requests; ``num_rows``: query rows (``qo_indptr[-1]``); ``kv_extent``: pages in the page table
            (``kv_indptr[-1]``).
        staged_bytes: bytes of the page-locked buffer the plan staged (0.7.x modules report it; None on 0.6.x).
        backend (``"fa2"``/``"fa3"``), uri, num_heads, head_dim_ckv, head_dim_kpe, page_size, causal, sm_scale,
        dtype_q, dtype_kv: the plan's settings.

    Ownership: the schedule (an ``Array<int>``) is released once, by :meth:`release` (idempotent; a ``with`` exit
    calls it) or when the plan is garbage-collected. A plan is reusable for any number of runs until the next
    plan on its workspace overwrites the schedule: from then on it is :attr:`stale` and running it is a
    ValueError (the workspace's generation counter, the rule of :class:`~fi_ffi.ops.attention.plan.Plan`).

    Raises:
        ValueError: a run given this plan with tensors that do not match what it was planned for, named by the run.
    """

    __slots__ = ("staged_bytes",)

    def __init__(
        self,
        info: Array,
        workspace: Workspace,
        generation: int,
        settings: _Settings,
        batch_size: int,
        num_rows: int,
        kv_extent: int,
        staged_bytes: int | None = None,
    ) -> None:
        """Take ownership of ``info`` (a plan call's schedule) made on ``workspace`` at ``generation``."""
        if not isinstance(info, Array):
            raise TypeError(f"info: expected the Array a plan call returned, got {type(info).__name__}")
        self._info = info
        self.workspace = workspace
        self._generation = generation
        self._s = settings
        self.batch_size = batch_size
        self.num_rows = num_rows
        self.kv_extent = kv_extent
        self.staged_bytes = staged_bytes
        self._context = (settings, num_rows, kv_extent)  # what the run's check validates against, by value

    def __repr__(self) -> str:
        s = self._s
        state = "released" if self.released else ("stale" if self.stale else "live")
        return (
            f"<MLAPlan {s.backend} batch={self.batch_size} rows={self.num_rows} heads={s.num_heads} "
            f"ckv={s.head_dim_ckv} kpe={s.head_dim_kpe} page={s.page_size} causal={s.causal} {state}>"
        )


# ---------------------------------------------------------------------------------------------- plan


@op(flashinfer="flashinfer.mla.BatchMLAPagedAttentionWrapper.plan")
def batch_mla_plan(
    qo_indptr: IndexLike,
    kv_indptr: IndexLike,
    kv_indices: IndexLike | None,
    kv_len_arr: IndexLike,
    num_heads: int,
    head_dim_ckv: int,
    head_dim_kpe: int,
    page_size: int,
    causal: bool,
    sm_scale: float,
    q_data_type: AttentionDType = "float16",
    kv_data_type: AttentionDType | None = None,
    *,
    workspace: Workspace,
    backend: AttentionBackend = "auto",
    stream: StreamLike = None,
) -> MLAPlan:
    """Plan an MLA batch over a paged cache (``BatchMLAPagedAttentionWrapper.plan`` of flashinfer-python).

    Args:
        workspace: the :class:`~.workspace.Workspace` of this plan and its runs (128 MiB float buffer
            is plenty: the plan needs about ``4 * SMs * 128 * (2 * head_dim_ckv + 4)`` bytes of it).
        qo_indptr: **host** int32 ``[batch + 1]``: request ``b``'s query rows are ``qo_indptr[b]:qo_indptr[b+1]``
            (``[0, 1, ..., batch]`` for decode). Numpy array, host descriptor or list; starts at 0,
            non-decreasing.
        kv_indptr: host int32 ``[batch + 1]``: request ``b`` owns pages ``kv_indices[kv_indptr[b]:kv_indptr[b+1]]``.
        kv_indices: host int32 page ids ``[>= kv_indptr[-1]]``, checked if given (>= 0); None: not checked. The
            run takes the device copy.
        kv_len_arr: host int32 ``[batch]``: tokens of each request (KV length, >= 0, at most its pages times
            ``page_size``; with ``causal``, at least its query rows).
        num_heads: query heads ``H`` (128 for DeepSeek V3, 16 per GPU at tensor parallel 8).
        head_dim_ckv, head_dim_kpe: 512 and 64 for DeepSeek (they select the module).
        page_size: tokens per page (>= 1).
        causal: mask each request's rows causally (bottom-right aligned); no effect on one-row requests.
        sm_scale: softmax scale, finite and > 0 (DeepSeek: ``1 / sqrt(128 + 64)``, the head dim before absorption,
            times any YaRN factor).
        q_data_type: float16 or bfloat16 (q and out); kv_data_type: the caches' dtype (default: q's).
        backend: ``"auto"`` (FA3 on an SM 9.x GPU when the pinned wheels have the ``_sm90`` module, else FA2),
            ``"fa2"`` or ``"fa3"``.
        stream: the stream of the plan's asynchronous schedule copy; its runs must use the same stream (None:
            TVM-FFI's current stream of the device).

    Returns:
        The :class:`MLAPlan`; earlier plans on ``workspace`` become stale.

    Raises:
        TypeError, ValueError: an argument of the wrong type or value, named, before any module is looked up (an
            index list's dtype, length, order; a head count, head dim, dtype, scale).
        KernelNotFoundError: no pinned module for these dtypes and head dims (names the closest ones).
        UnsupportedDeviceError: ``backend="fa3"`` on a GPU that is not SM 9.x.
        LoaderError: the module cannot be loaded (the kernel wheel absent offline, a damaged cache).
    """
    if type(workspace) is not Workspace:
        raise TypeError(
            f"workspace: expected a fi_ffi.Workspace (Workspace.allocate() or "
            f"Workspace.from_buffers()), got {type(workspace).__name__}"
        )
    args = (num_heads, head_dim_ckv, head_dim_kpe, page_size, causal, sm_scale, q_data_type, kv_data_type, backend)
    try:
        key: Any = (workspace.device, args, tuple(map(type, args)))
        st = _settings_cache.get(key)
    except TypeError:  # an unhashable argument: validated below, never cached
        key, st = None, None
    qo = host_array("qo_indptr", qo_indptr)
    kv = host_array("kv_indptr", kv_indptr)
    lens = host_array("kv_len_arr", kv_len_arr)
    if st is None:
        # every argument is checked before the settings resolve the module (which may fetch the kernel wheel)
        values = _values(*args)
        batch, rows, pages = _check_schedule(qo, kv, lens, values[3], values[4], values[0])
        if kv_indices is not None:
            check_indices("kv_indices", host_array("kv_indices", kv_indices), pages)
        st = _resolved(workspace, key, values)
    else:
        batch, rows, pages = _check_schedule(qo, kv, lens, st.page_size, st.causal, st.num_heads)
        if kv_indices is not None:
            check_indices("kv_indices", host_array("kv_indices", kv_indices), pages)
    handle = current_stream(workspace.device.device_id) if stream is None else stream_handle(stream)
    info, staged, generation = _plan_on(workspace, st, 0 if handle is None else handle, qo, kv, lens, stream)
    return MLAPlan(info, workspace, generation, st, batch, rows, pages, staged)


def _plan_on(
    ws: Workspace, st: _Settings, handle: int, qo: np.ndarray, kv: np.ndarray, lens: np.ndarray, stream: Any
) -> tuple[Array, int | None, int]:
    """Call the plan on ``ws`` under the workspace's two rules (see :mod:`fi_ffi.ops.attention.workspace`): wait for the
    previous plan's pinned-buffer copy, make every earlier plan stale, call, record this plan's copy event.

    Returns (schedule, staged bytes or None, the workspace generation of this plan).
    """
    with ws.staging(handle) as stage:  # records this plan's copy event on ``handle`` when the block succeeds
        result = st.plan(
            ws.float_buffer,
            ws.int_buffer,
            ws.pinned_buffer,
            host_tensor(qo),
            host_tensor(kv),
            host_tensor(lens),
            st.num_heads,
            st.head_dim_ckv,
            st.causal,
            stream=stream,
        )
        staged = None
        if st.tuple_result:  # 0.7.x: (schedule, staged bytes); the schedule is taken out, the tuple released
            with result:
                info, staged = result[0], result[1]
            try:
                _check_schedule_result(info, st)
                _copy_staged(ws, staged, handle, st)
            except BaseException:
                if isinstance(info, Array):
                    info.release()
                raise
        else:
            info = result
            _check_schedule_result(info, st)
        return info, staged, stage.generation


def _check_schedule_result(info: Any, st: _Settings) -> None:
    if not isinstance(info, Array):
        raise KernelError(
            "TypeError",
            f"plan returned {type(info).__name__}, expected the schedule Array<int>",
            function=f"{st.uri}.plan",
        )


def _copy_staged(ws: Workspace, staged: Any, stream: int, st: _Settings) -> None:
    """Enqueue the copy of the schedule a 0.7.x plan staged in the page-locked buffer into the int workspace.

    FlashInfer 0.6.x's plan enqueues this ``cudaMemcpyAsync`` itself; from 0.7 (``planabi2``) the plan only fills
    the page-locked buffer and returns how many bytes it staged, and the caller copies them (on the plan's
    stream, so the runs after it see the schedule). The workspace's copy event, recorded after this, keeps the
    next plan from overwriting the page-locked buffer before the copy has read it.
    """
    limit = min(ws.int_bytes, ws.pinned_bytes)
    if type(staged) is not int or not 0 <= staged <= limit:
        raise KernelError(
            "ValueError",
            f"plan reported {staged!r} staged bytes; expected an int in 0..{limit} "
            f"(the workspace's int and page-locked buffer sizes)",
            function=f"{st.uri}.plan",
        )
    if not staged:
        return
    rt = runtime()
    with DeviceScope(ws.device.device_id):
        err = rt.cudaMemcpyAsync(
            ws.int_buffer.data_ptr,
            ws.pinned_buffer.data_ptr,
            staged,
            rt.cudaMemcpyKind.cudaMemcpyHostToDevice,
            rt.cudaStream_t(stream),
        )[0]
        _check_cuda(err, "cudaMemcpyAsync(MLA plan schedule, page-locked -> int workspace)")


_settings_cache: dict[tuple[Any, ...], _Settings] = {}
_settings_lock = threading.Lock()
# The module a setting resolves to depends on the lock: forgotten with the other caches (fi_ffi.caches.reset()).
caches.register("MLA plan settings (module and launchers per argument tuple)", _settings_cache.clear)


def _values(*args: Any) -> tuple[Any, ...]:
    """The settings arguments of :func:`batch_mla_plan` (num_heads .. backend, in its order) checked, as values:
    (heads, ckv, kpe, page size, causal, sm_scale, q dtype, kv dtype, backend). Looks nothing up."""
    num_heads, head_dim_ckv, head_dim_kpe, page_size, causal, sm_scale, q_data_type, kv_data_type, backend = args
    h = checks.integer("num_heads", num_heads, 1)
    ckv = checks.integer("head_dim_ckv", head_dim_ckv, 1)
    kpe = checks.integer("head_dim_kpe", head_dim_kpe, 1)
    ps = checks.integer("page_size", page_size, 1)
    if h >= 1 << 16:
        raise ValueError(f"num_heads: expected at most 65535, got {h}")
    for name, dim in (("head_dim_ckv", ckv), ("head_dim_kpe", kpe)):
        if dim >= 1 << 16:  # before the module lookup, which would only say no such variant
            raise ValueError(f"{name}: expected at most 65535 (DeepSeek MLA: 512 and 64), got {dim}")
    if ps >= 1 << 16:
        raise ValueError(f"page_size: expected at most 65535 tokens per page, got {ps}")
    c = checks.flag("causal", causal)
    sm = checks.positive_finite("sm_scale", sm_scale)
    qd = _dtype("q_data_type", q_data_type)
    if qd not in _Q_DTYPES:
        raise TypeError(f"q_data_type: expected float16 or bfloat16, got {qd.name}")
    kd = qd if kv_data_type is None else _dtype("kv_data_type", kv_data_type)
    if kd != qd and kd not in _FP8:
        raise TypeError(f"kv_data_type: expected {qd.name} (as q_data_type) or an FP8 type, got {kd.name}")
    if backend not in ("auto", "fa2", "fa3"):
        raise ValueError(f"backend: expected 'auto', 'fa2' or 'fa3', got {backend!r}")
    return h, ckv, kpe, ps, c, sm, qd, kd, backend


def _settings(ws: Workspace, *args: Any) -> _Settings:
    """The validated settings for ``args`` (num_heads .. backend, as :func:`batch_mla_plan` takes them) on ``ws``'s
    device, cached per argument values and types."""
    try:
        key: Any = (ws.device, args, tuple(map(type, args)))
        found = _settings_cache.get(key)
    except TypeError:  # an unhashable argument: validated below, never cached
        key, found = None, None
    return found if found is not None else _resolved(ws, key, _values(*args))


def _resolved(ws: Workspace, key: Any, values: tuple[Any, ...]) -> _Settings:
    """The settings of checked ``values`` (:func:`_values`) on ``ws``'s device: the module chosen and resolved,
    remembered under ``key`` (the plan's argument values and types; None: not remembered)."""
    h, ckv, kpe, ps, c, sm, qd, kd, backend = values
    device_id = ws.device.device_id
    base = V.Variant(V.BATCH_MLA, qd, kd, qd, ckv, kpe, int32)
    uri, chosen = _choose(base, backend, device_id)
    st = _Settings(ws.device, h, ckv, kpe, ps, c, sm, qd, kd, chosen, uri)
    if key is not None:
        with _settings_lock:
            if len(_settings_cache) > 256:
                _settings_cache.clear()
            _settings_cache[key] = st
    return st


def _dtype(name: str, value: Any) -> DType:
    try:
        return to_dtype(value)
    except (TypeError, ValueError, KeyError) as exc:
        raise TypeError(
            f"{name}: expected a dtype (float16, bfloat16, a torch/numpy dtype), got {value!r}: {exc}"
        ) from None


def _choose(base: V.Variant, backend: str, device_id: int) -> tuple[str, str]:
    """(module URI, backend) for ``backend``: ``auto`` takes FA3 on SM 9.x when the ``_sm90`` module is pinned.

    FA3 serves every MLA problem FA2 does (no pos-encoding or mask options), so unlike prefill there is no
    eligibility rule; a forced ``fa3`` on a GPU known not to be SM 9.x is an UnsupportedDeviceError.
    """
    from dataclasses import replace

    if backend == "fa2":
        return V.resolve(base), "fa2"
    fa3 = replace(base, backend="fa3")
    major = V.sm_major(device_id)
    if backend == "auto":
        if major == 9 and V.has(fa3):
            return V.resolve(fa3), "fa3"
        return V.resolve(base), "fa2"
    if major is not None and major != 9:
        raise UnsupportedDeviceError(
            f"backend 'fa3' needs an SM 9.x GPU (H100/H200); cuda:{device_id} is SM {major}.x; use 'fa2' or 'auto'"
        )
    return V.resolve(fa3), "fa3"


def _check_schedule(
    qo: np.ndarray, kv: np.ndarray, lens: np.ndarray, page_size: int, causal: bool, num_heads: int
) -> tuple[int, int, int]:
    """Validate the host arrays against each other, the (checked) settings and the kernels' limits; returns
    (batch, rows, pages)."""
    n = qo.shape[0]
    if n < 2:
        raise ValueError(f"qo_indptr: expected at least 2 entries ([batch_size + 1], batch_size >= 1), got {n}")
    batch = n - 1
    if kv.shape[0] != n:
        raise ValueError(f"kv_indptr: expected {n} entries ([batch_size + 1], as qo_indptr), got {kv.shape[0]}")
    if lens.shape[0] != batch:
        raise ValueError(f"kv_len_arr: expected {batch} entries ([batch_size]), got {lens.shape[0]}")
    check_indptr("qo_indptr", qo)
    check_indptr("kv_indptr", kv)
    q_lens = np.diff(qo.astype(np.int64))
    pages = np.diff(kv.astype(np.int64))
    kv_lens = lens.astype(np.int64)
    if (kv_lens < 0).any():
        i = int(np.argmax(kv_lens < 0))
        raise ValueError(f"kv_len_arr: must be >= 0, got kv_len_arr[{i}] = {int(kv_lens[i])}")
    over = kv_lens > pages * page_size
    if over.any():
        i = int(np.argmax(over))
        raise ValueError(
            f"kv_len_arr: request {i} has {int(kv_lens[i])} tokens but only {int(pages[i])} page(s) of "
            f"{page_size} in kv_indptr; its tokens must fit its pages"
        )
    if causal:
        short = q_lens > kv_lens
        if short.any():
            i = int(np.argmax(short))
            raise ValueError(
                f"kv_len_arr: with causal=True each request needs at least as many tokens as query rows "
                f"(its rows are its last tokens); request {i} has {int(q_lens[i])} rows, "
                f"{int(kv_lens[i])} tokens"
            )
    rows, total_pages = int(qo[-1]), int(kv[-1])
    if total_pages * page_size >= _U32:
        raise ValueError(
            f"kv_indptr: {total_pages} pages of {page_size} tokens exceed the kernels' 32-bit token "
            f"index; plan fewer tokens"
        )
    packed = q_lens * num_heads  # rows x heads, tiled by the schedule as FlashInfer's MLAPlan does
    tile = 128 if int(packed.sum()) // batch > 64 else 64
    works = int(((packed + tile - 1) // tile).sum())
    if works + _SM_MARGIN > _MAX_WORKS:
        raise ValueError(
            f"qo_indptr: {rows} query rows x {num_heads} heads make {works} work tiles; the MLA "
            f"schedule holds at most {_MAX_WORKS - _SM_MARGIN} (FlashInfer's fixed limit); split the "
            f"batch into several plans"
        )
    return batch, rows, total_pages


def _check_plan(a: Any) -> None:
    """The plan call's layouts (values were checked by :func:`_check_schedule`): host int32 1-D arrays."""
    for name in ("qo_indptr", "kv_indptr", "kv_len_arr"):
        t = getattr(a, name)
        checks.host(name, t)
        if t.ndim != 1 or t.dtype != int32:
            raise TypeError(f"{name}: expected a 1-D int32 host array, got {t.dtype.name}{list(t.shape)}")
        checks.contiguous(name, t)


# ---------------------------------------------------------------------------------------------- run


@op(flashinfer="flashinfer.mla.BatchMLAPagedAttentionWrapper.run")
def batch_mla_run(
    q_nope: TensorLike,
    q_pe: TensorLike,
    ckv_cache: TensorLike,
    kpe_cache: TensorLike,
    *,
    plan: MLAPlan,
    out: TensorT,
    lse: TensorLike | None = None,
    kv_indices: TensorLike,
    return_lse_base_on_e: bool = False,
    ckv_scale: float | None = None,
    kpe_scale: float | None = None,
    ckv_scale_arr: TensorLike | None = None,
    stream: StreamLike = None,
) -> TensorT:
    """Run MLA paged attention with a plan from :func:`batch_mla_plan` (``BatchMLAPagedAttentionWrapper.run``).

    flashinfer-python's ``wrapper.run(q_nope, q_pe, ckv_cache, kpe_cache, out=..., lse=...)``; the page ids'
    device array, which the wrapper copies at plan time, is a keyword here, and ``out`` is required (fi_ffi
    allocates nothing).

    Args:
        plan: a live :class:`MLAPlan` (not released, not superseded by a later plan on its workspace).
        q_nope: ``[rows, num_heads, head_dim_ckv]`` of the plan's q dtype, on the workspace's GPU; last dim
            contiguous, rows and heads may be strided (16-byte aligned).
        q_pe: ``[rows, num_heads, head_dim_kpe]``, likewise.
        ckv_cache: ``[pages, page_size, head_dim_ckv]`` of the plan's kv dtype; kpe_cache: ``[pages, page_size,
            head_dim_kpe]``, as :func:`fi_ffi.append_paged_mla_kv_cache` fills them.
        kv_indices: device int32 ``[>= kv_indptr[-1]]``: page ids (< pages; not checked, they live on the GPU).
        out: ``[rows, num_heads, head_dim_ckv]`` of the q dtype, written asynchronously.
        lse: optional float32 ``[rows, num_heads]``, contiguous: the log-sum-exp of the scaled logits, base 2
            (natural log with ``return_lse_base_on_e``).
        ckv_scale, kpe_scale, ckv_scale_arr: FP8 KV caches only (FlashInfer 0.7.x modules): dequantization
            factors. For float16/bfloat16 caches they must be left None.
        stream: the plan's stream (None: TVM-FFI's current stream of the device).

    Returns:
        ``out``, as passed.

    Raises:
        TypeError, ValueError: a plan that is not a live MLA plan; a tensor of the wrong shape, dtype, device or
            layout for the plan, named; FP8 scales with a float16/bfloat16 cache.
        KernelError: the kernel failed (a CUDA error of the launch).
    """
    if type(plan) is not MLAPlan:
        raise TypeError(f"plan: expected an MLAPlan from batch_mla_plan, got {type(plan).__name__}")
    info = plan._info
    if not info.handle or plan.workspace._generation != plan._generation:
        plan.refuse()
    st = plan._s
    ws = plan.workspace
    # FP8 scales exist only in 0.7.x modules: passed only when given, so a 0.6.3 module refuses them by name
    no_scales = ckv_scale is None and kpe_scale is None and ckv_scale_arr is None
    scales = {} if no_scales else _fp8_scales(st, ckv_scale, kpe_scale, ckv_scale_arr)
    st.run(
        ws.float_buffer,
        ws.int_buffer,
        info,
        q_nope,
        q_pe,
        ckv_cache,
        kpe_cache,
        kv_indices,
        out,
        lse,
        st.mask_mode,
        st.num_heads,
        st.page_size,
        st.sm_scale,
        return_lse_base_on_e,
        stream=stream,
        context=plan._context,
        **scales,
    )
    return out


def _fp8_scales(st: _Settings, ckv_scale: Any, kpe_scale: Any, ckv_scale_arr: Any) -> dict[str, Any]:
    """The FP8 dequantization arguments (FlashInfer 0.7.x rules): only for FP8 caches; ``kpe_scale`` and exactly
    one of ``ckv_scale`` / ``ckv_scale_arr``. A module without them (0.6.x) refuses them by name at the call."""
    given = "ckv_scale" if ckv_scale is not None else "kpe_scale" if kpe_scale is not None else "ckv_scale_arr"
    if st.dtype_kv not in _FP8:
        raise ValueError(
            f"{given}: scale factors apply to FP8 KV caches only; this plan's caches are "
            f"{st.dtype_kv.name}: leave ckv_scale, kpe_scale and ckv_scale_arr None"
        )
    if (ckv_scale is None) == (ckv_scale_arr is None):
        raise ValueError(
            "ckv_scale: an FP8 cache needs exactly one of ckv_scale (a float) or ckv_scale_arr (float32 "
            "per-token, per-128-column factors)"
        )
    if kpe_scale is None:
        raise ValueError("kpe_scale: required with an FP8 cache (a finite float > 0)")
    out: dict[str, Any] = (
        {"ckv_scale": checks.positive_finite("ckv_scale", ckv_scale)}
        if ckv_scale is not None
        else {"ckv_scale_arr": ckv_scale_arr}
    )
    out["kpe_scale"] = checks.positive_finite("kpe_scale", kpe_scale)
    return out


def _check_run(a: Any) -> PointerRules:
    """The run's contract against its plan (``a.context``: settings, query rows, pages in the page table)."""
    st, rows, pages = a.context
    h, ckv, kpe, ps = st.num_heads, st.head_dim_ckv, st.head_dim_kpe, st.page_size
    qd, kd, dev = st.dtype_q, st.dtype_kv, st.device
    rules = PointerRules()
    _device_tensor(rules, "q_nope", a.q_nope, (rows, h, ckv), "[rows, num_heads, head_dim_ckv]", qd, dev)
    _device_tensor(rules, "q_pe", a.q_pe, (rows, h, kpe), "[rows, num_heads, head_dim_kpe]", qd, dev)
    n = a.ckv_cache.shape[0] if a.ckv_cache.ndim == 3 else None
    _device_tensor(rules, "ckv_cache", a.ckv_cache, (n, ps, ckv), "[pages, page_size, head_dim_ckv]", kd, dev)
    _device_tensor(
        rules, "kpe_cache", a.kpe_cache, (n, ps, kpe), "[pages, page_size, head_dim_kpe] (pages as ckv_cache)", kd, dev
    )
    idx = a.kv_indices
    if idx.ndim != 1 or idx.dtype != int32:
        raise TypeError(f"kv_indices: expected a 1-D int32 tensor, got {idx.dtype.name}{list(idx.shape)}")
    _on(idx, "kv_indices", dev)
    if idx.shape[0] < pages:
        raise ValueError(
            f"kv_indices: the plan's kv_indptr ends at {pages} pages, but kv_indices has {idx.shape[0]} entries"
        )
    if idx.shape[0] > 1 and idx.strides[0] != 1:
        raise ValueError(f"kv_indices: expected a contiguous tensor, got strides {idx.strides}")
    _device_tensor(rules, "out", a.out, (rows, h, ckv), "[rows, num_heads, head_dim_ckv], q's dtype", qd, dev)
    if a.lse is not None:
        t = a.lse
        if t.shape != (rows, h):
            raise ValueError(f"lse: expected shape {(rows, h)} ([rows, num_heads]), got {t.shape}")
        if t.dtype != float32:
            raise TypeError(f"lse: expected dtype float32, got {t.dtype.name}")
        _on(t, "lse", dev)
        checks.contiguous("lse", t)  # written densely: row * num_heads + head
    arr = getattr(a, "ckv_scale_arr", None)
    if arr is not None:
        want = a.ckv_cache.shape[0] * ps * (ckv // 128)
        if arr.dtype != float32 or arr.numel != want:
            raise ValueError(
                f"ckv_scale_arr: expected float32 with {want} elements (one per token and 128 "
                f"columns), got {arr.dtype.name}{list(arr.shape)}"
            )
        _on(arr, "ckv_scale_arr", dev)
        checks.contiguous("ckv_scale_arr", arr)
    # the outputs are written while other blocks still read the queries, the caches, the page table (and the
    # FP8 scales of 0.7's declaration)
    reads = ("q_nope", "q_pe", "ckv_cache", "kpe_cache", "kv_indices", *(["ckv_scale_arr"] if arr is not None else []))
    return rules.outputs_apart(("out", "lse"), reads)


def _on(t: Tensor, name: str, device: Any) -> None:
    if t.device != device:
        if not t.device.is_cuda:
            raise ValueError(f"{name}: expected a CUDA device tensor on {device}, got one on {t.device}")
        raise ValueError(f"{name}: expected a tensor on {device} (the plan's workspace device), got {t.device}")


def _device_tensor(
    rules: PointerRules, name: str, t: Tensor, shape: tuple[int | None, ...], layout: str, dtype: DType, device: Any
) -> None:
    """Shape (None: any size), dtype, device, contiguous last dim, 16-byte aligned rows, 32-bit element offsets."""
    if t.ndim != len(shape) or any(e is not None and e != g for e, g in zip(shape, t.shape, strict=True)):
        want = "(" + ", ".join("*" if e is None else str(e) for e in shape) + ")"
        raise ValueError(f"{name}: expected shape {want} {layout}, got {t.shape}")
    if t.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {dtype.name} (the plan's), got {t.dtype.name}")
    _on(t, name, device)
    checks.last_dim_contiguous(name, t)
    checks.aligned(rules, name, t, 16 // t.dtype.itemsize)  # 128-bit loads and stores
    extent = 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.strides, strict=True) if size)
    if t.numel and extent >= _U32:
        raise ValueError(
            f"{name}: spans {extent} elements (shape {t.shape}, strides {t.strides}); the MLA kernels "
            f"use 32-bit element offsets, so at most {_U32 - 1}"
        )
