"""Decode attention: one query token per request against a KV cache.

- :func:`single_decode`: one request, contiguous K/V (``single_decode_with_kv_cache_*`` ``run``).
- :func:`batch_decode_plan` then :func:`batch_decode_run`: a batch over a paged KV cache
  (``batch_decode_with_kv_cache_*`` ``plan`` / ``run``). A runtime plans once per step (the page table
  changed) and runs every layer with the same :class:`~fi_ffi.ops.plan.Plan`.

Math, per request and query head ``h`` (KV head ``h // (num_qo_heads / num_kv_heads)``), in float32:
``o[h] = softmax(sm_scale * q[h] . K^T) V`` over the request's ``kv_len`` cached tokens; ``lse[h]`` (optional)
is the log-sum-exp of the scaled logits in base 2, as FlashInfer defines it. With ``logits_soft_cap > 0``
the logits are ``cap * tanh(sm_scale * q.k / cap)``; ``window_left >= 0`` keeps the last ``window_left + 1``
tokens. RoPE and ALiBi apply only with modules compiled for them (``pos_encoding``).

Everything is asynchronous on ``stream`` (see :mod:`fi_ffi.streams`); nothing synchronizes except the one
documented wait in :mod:`fi_ffi.ops.workspace` (a plan waits for the previous plan's pinned-buffer copy).
Plan and run must use the same stream. The decode kernels support GQA group sizes 1, 2, 3, 4 and 8, and
equal q/k and v/o head dims.
"""

from __future__ import annotations

import functools
import struct
import threading
from typing import Any

from ..abi.call import Frame, Signature
from ..abi.objects import ARRAY, BOOL, DLTENSOR_PTR, FLOAT, INT, NONE
from ..dtypes import DType, int32
from ..dtypes import dtype as to_dtype
from ..streams import stream_handle
from ..tensor import Tensor
from . import checks
from . import plan as P
from .kernels import entry_point
from .plan import Memo, Plan, PlanSettings
from .variants import BATCH_DECODE, SINGLE_DECODE, Variant, resolve
from .workspace import Workspace, tmp_bytes_needed

__all__ = ["batch_decode_plan", "batch_decode_run", "single_decode"]

_T, _I, _F, _B, _N, _A = DLTENSOR_PTR, INT, FLOAT, BOOL, NONE, ARRAY

PLAN_SIG = Signature("batch_decode.plan", [
    ("float_workspace_buffer", "tensor"), ("int_workspace_buffer", "tensor"),
    ("page_locked_int_workspace_buffer", "tensor"), ("indptr", "tensor"), ("batch_size", "int"),
    ("num_qo_heads", "int"), ("num_kv_heads", "int"), ("page_size", "int"), ("enable_cuda_graph", "bool"),
    ("window_left", "int"), ("logits_soft_cap", "float"), ("head_dim_qk", "int"), ("head_dim_vo", "int"),
    ("empty_q_data", "tensor"), ("empty_kv_data", "tensor")])
RUN_SIG = Signature("batch_decode.run", [
    ("float_workspace_buffer", "tensor"), ("int_workspace_buffer", "tensor"), ("plan_info_vec", "object"),
    ("q", "tensor"), ("paged_k_cache", "tensor"), ("paged_v_cache", "tensor"), ("paged_kv_indptr", "tensor"),
    ("paged_kv_indices", "tensor"), ("paged_kv_last_page_len", "tensor"), ("o", "tensor"),
    ("maybe_lse", "tensor?"), ("kv_layout_code", "int"), ("window_left", "int"), ("enable_pdl", "bool"),
    ("maybe_alibi_slopes", "object?"), ("logits_soft_cap", "float"), ("sm_scale", "float"),
    ("rope_rcp_scale", "float"), ("rope_rcp_theta", "float")])
SINGLE_SIG = Signature("single_decode.run", [
    ("q", "tensor"), ("k", "tensor"), ("v", "tensor"), ("tmp", "tensor"), ("o", "tensor"), ("maybe_lse", "tensor?"),
    ("layout", "int"), ("window_left", "int"), ("maybe_alibi_slopes", "object?"), ("logits_soft_cap", "float"),
    ("sm_scale", "float"), ("rope_rcp_scale", "float"), ("rope_rcp_theta", "float")])
_TENSORS8 = struct.Struct("<" + "iIq" * 8).pack_into  # slots 3-10 of a run: q .. maybe_lse
_SINGLE_PACK = SINGLE_SIG.pack.pack_into


@functools.lru_cache(maxsize=256)
def variant_uri(kind: str, q: DType, kv: DType, o: DType, idx: DType | None, head_dim_qk: int, head_dim_vo: int,
                pos: int, swa: bool, cap: bool, fp16_qk: bool = False, backend: str = "fa2") -> tuple[Variant, str]:
    """(variant, URI) of the module for these settings; KernelNotFoundError if the wheels lack it."""
    v = Variant(kind, q, kv, o, head_dim_qk, head_dim_vo, idx, pos, swa, cap, fp16_qk, backend)
    return v, resolve(v)


@functools.lru_cache(maxsize=64)
def empty(dt: DType, device: Any) -> Tensor:
    """A ``[0]``-shaped descriptor with no data (for parameters that only carry a dtype, or disable scratch)."""
    return Tensor(0, (0,), dt, device)


def _dtypes(q_dtype: Any, kv_dtype: Any, o_dtype: Any) -> tuple[DType, DType, DType]:
    qd = to_dtype(q_dtype)
    kd = qd if kv_dtype is None else to_dtype(kv_dtype)
    od = qd if o_dtype is None else to_dtype(o_dtype)
    return qd, kd, od


# ------------------------------------------------------------------------------------------ batch decode


def batch_decode_plan(workspace: Any, kv_indptr: Any, num_qo_heads: int, num_kv_heads: int, head_dim: int,
                      page_size: int, *, kv_last_page_len: Any = None, q_dtype: Any = "float16",
                      kv_dtype: Any = None, o_dtype: Any = None, kv_layout: str = "NHD", pos_encoding: Any = "NONE",
                      window_left: int = -1, logits_soft_cap: float = 0.0, sm_scale: float | None = None,
                      rope_scale: float = 1.0, rope_theta: float = 1e4, alibi_slopes: Any = None,
                      enable_cuda_graph: bool = False, stream: Any = None) -> Plan:
    """Plan a batch decode step over a paged KV cache; returns the :class:`~fi_ffi.ops.plan.Plan` runs use.

    Args:
        workspace: the :class:`~fi_ffi.ops.workspace.Workspace` this plan and its runs use.
        kv_indptr: **host** int32 ``[batch + 1]``: request ``i`` owns pages ``kv_indices[kv_indptr[i]:kv_indptr[i+1]]``.
            A numpy array, a host descriptor, or a list. Starts at 0, non-decreasing.
        num_qo_heads, num_kv_heads: query and KV heads; the group size ``num_qo_heads / num_kv_heads`` must be
            1, 2, 3, 4 or 8.
        head_dim: head dimension of q, k, v and o.
        page_size: tokens per page (>= 1).
        kv_last_page_len: optional host int32 ``[batch]``, checked if given: 1..page_size for a request with
            pages, 0 for one without (the run takes the device copy).
        q_dtype, kv_dtype, o_dtype: element types (kv and o default to q's); they select the module.
        kv_layout: ``"NHD"`` (``[pages, page_size, kv_heads, dim]``) or ``"HND"`` (``[pages, kv_heads, page_size,
            dim]``), fixed for the runs of this plan.
        pos_encoding: ``"NONE"``, ``"ROPE_LLAMA"`` or ``"ALIBI"`` (selects the module).
        window_left: -1 (off) or the left window in tokens (selects a sliding-window module).
        logits_soft_cap: 0 (off) or > 0 (selects a soft-cap module).
        sm_scale: softmax scale; default ``1 / sqrt(head_dim)``.
        rope_scale, rope_theta: RoPE interpolation scale and base (the kernel takes their reciprocals).
        alibi_slopes: float32 ``[num_qo_heads]`` on the workspace's device, required with ALIBI (kept by the plan).
        enable_cuda_graph: plan for a run captured in a CUDA graph (fixed batch size; padded schedule).
        stream: the stream of the plan's asynchronous copy; its runs must use the same stream.

    The plan is valid until the next plan on the same workspace; it may be run any number of times before.
    """
    ws = workspace if type(workspace) is Workspace else P.workspace_of(workspace)
    st = settings(ws, num_qo_heads, num_kv_heads, head_dim, page_size, q_dtype, kv_dtype, o_dtype, kv_layout,
                  pos_encoding, window_left, logits_soft_cap, sm_scale, rope_scale, rope_theta, alibi_slopes,
                  enable_cuda_graph)
    indptr = P.host_array("kv_indptr", kv_indptr)
    pages = P.check_indptr("kv_indptr", indptr)
    batch = indptr.shape[0] - 1
    if kv_last_page_len is not None:
        P.check_last_page_len("kv_last_page_len", P.host_array("kv_last_page_len", kv_last_page_len), indptr,
                              st.page_size)
    values = (*st.plan_prefix, _T, 0, P.host_descriptor(0, indptr), _I, 0, batch, *st.plan_suffix)
    s = stream if stream is None or type(stream) is int else stream_handle(stream)
    info, generation = P.call_plan(ws, st.plan_ep, PLAN_SIG, values, s)
    return Plan.make(info, ws, generation, st, batch, batch, pages)


def settings(ws: Workspace, *args: Any) -> PlanSettings:
    """The validated, shared settings of a batch decode plan on ``ws`` (cached per argument values and types).

    ``args``: num_qo_heads, num_kv_heads, head_dim, page_size, q_dtype, kv_dtype, o_dtype, kv_layout,
    pos_encoding, window_left, logits_soft_cap, sm_scale, rope_scale, rope_theta, alibi_slopes,
    enable_cuda_graph (as :func:`batch_decode_plan` takes them).
    """
    cacheable = args[14] is None  # ALiBi slopes are a tensor: not a cache key
    if cacheable:
        key = (BATCH_DECODE, args, tuple(map(type, args)))
        found = ws._settings.get(key)
        if found is not None:
            return found
    (num_qo_heads, num_kv_heads, head_dim, page_size, q_dtype, kv_dtype, o_dtype, kv_layout, pos_encoding,
     window_left, logits_soft_cap, sm_scale, rope_scale, rope_theta, alibi_slopes, enable_cuda_graph) = args
    hq = P.positive("num_qo_heads", num_qo_heads)
    hk = P.positive("num_kv_heads", num_kv_heads)
    d = P.positive("head_dim", head_dim)
    ps = P.positive("page_size", page_size)
    P.gqa(hq, hk, decode=True)
    layout = P.layout_name(kv_layout)
    pos = P.pos_encoding(pos_encoding)
    w = P.window(window_left)
    cap = P.soft_cap(logits_soft_cap)
    sm, rs, rt = P.scales(d, sm_scale, rope_scale, rope_theta)
    graph = checks.flag("enable_cuda_graph", enable_cuda_graph)
    qd, kd, od = _dtypes(q_dtype, kv_dtype, o_dtype)
    alibi = P.alibi(pos, alibi_slopes, hq, ws.device)
    variant, uri = variant_uri(BATCH_DECODE, qd, kd, od, int32, d, d, pos, w != -1, cap > 0)
    st = PlanSettings(kind=BATCH_DECODE, mode="paged", variant=variant, device_id=ws.device.device_id,
                      num_qo_heads=hq, num_kv_heads=hk, head_dim_qk=d, head_dim_vo=d, page_size=ps, kv_layout=layout,
                      dtype_q=qd, dtype_kv=kd, dtype_o=od, window_left=w, logits_soft_cap=cap, sm_scale=sm,
                      rope_scale=rs, rope_theta=rt, enable_cuda_graph=graph,
                      extra=(alibi,) if alibi is not None else ())
    st.plan_ep = entry_point(uri, "plan")
    st.plan_sig = PLAN_SIG
    st.plan_prefix = (_T, 0, ws.float_buffer._dl_addr, _T, 0, ws.int_buffer._dl_addr, _T, 0,
                      ws.pinned_buffer._dl_addr)
    st.plan_suffix = (_I, 0, hq, _I, 0, hk, _I, 0, ps, _B, 0, graph, _I, 0, w, _F, 0, cap, _I, 0, d, _I, 0, d,
                      _T, 0, empty(qd, "cpu")._dl_addr, _T, 0, empty(kd, "cpu")._dl_addr)
    st.ep = entry_point(uri, "run")
    st.tails = P.run_tails((_I, 0, P.LAYOUTS[layout], _I, 0, w),
                           ((alibi.type_index, 0, alibi.handle) if alibi is not None else (_N, 0, 0))
                           + (_F, 0, cap, _F, 0, sm, _F, 0, 1.0 / rs, _F, 0, 1.0 / rt, _N, 0, 0))
    if cacheable:
        if len(ws._settings) > 256:
            ws._settings.clear()
        ws._settings[key] = st
    return st


_batch_memo = Memo()
_run_frames = threading.local()
_batch_seen = _batch_memo.seen  # bound once: the run's fast path tests membership directly


def batch_decode_run(plan: Plan, q: Any, k_cache: Any, v_cache: Any, kv_indptr: Any, kv_indices: Any,
                     kv_last_page_len: Any, out: Any, *, lse: Any = None, enable_pdl: bool = False,
                     stream: Any = None) -> Any:
    """Run batch decode attention with a plan from :func:`batch_decode_plan`.

    Args:
        plan: a live plan (not released, not superseded by a later plan on its workspace).
        q: ``[batch, num_qo_heads, head_dim]`` of the plan's q dtype; last dim contiguous (rows may be strided).
        k_cache, v_cache: the paged cache in the plan's layout (NHD ``[pages, page_size, num_kv_heads, head_dim]``
            or HND ``[pages, num_kv_heads, page_size, head_dim]``), kv dtype, identical strides.
        kv_indptr: device int32 ``[batch + 1]`` (the same values the plan saw).
        kv_indices: device int32 ``[>= kv_indptr[-1]]``: page ids.
        kv_last_page_len: device int32 ``[batch]``.
        out: ``[batch, num_qo_heads, head_dim]`` of the plan's o dtype, contiguous (written densely).
        lse: optional float32 ``[batch, num_qo_heads]``, contiguous.
        enable_pdl: programmatic dependent launch (SM90+).
        stream: the plan's stream (None: TVM-FFI's current stream of the device).

    Returns:
        ``out``.
    """
    if type(plan) is not Plan:
        raise TypeError(f"plan: expected a Plan from batch_decode_plan, got {type(plan).__name__}")
    st = plan._s
    if st.kind != BATCH_DECODE or not plan._info.handle or plan.workspace._generation != plan._generation:
        plan.check_runnable(BATCH_DECODE, "paged")
    result = out  # returned as passed, whatever it was converted to
    key = (plan._key, q, k_cache, v_cache, kv_indptr, kv_indices, kv_last_page_len, out, lse)
    if key not in _batch_seen:
        q, k_cache, v_cache, kv_indptr, kv_indices, kv_last_page_len, out, lse = _check_batch_run(plan, key)
    if kv_indices.shape[0] < plan.kv_extent:
        raise ValueError(f"kv_indices: the plan's kv_indptr ends at {plan.kv_extent} pages, but kv_indices has "
                         f"{kv_indices.shape[0]} entries")
    if enable_pdl is not False and enable_pdl is not True:
        enable_pdl = checks.flag("enable_pdl", enable_pdl)
    ep = st.ep
    # This thread's frame keeps the plan's head (workspaces, plan Array) and tail (scalars) from the last
    # run; they are copied again only when another plan or enable_pdl value comes along.
    frames = _run_frames.__dict__
    cached = frames.get(ep)
    if cached is None or cached[1] is not plan or cached[2] is not enable_pdl:
        frame = cached[0] if cached is not None else Frame(19)  # our own: nothing else writes it
        buf = frame.buf
        buf[0:48] = plan._head
        _TENSORS8(buf, 48, *(_T, 0, 0) * 8)
        buf[176:320] = st.tails[enable_pdl]
        frames[ep] = cached = (frame, plan, enable_pdl)
    frame = cached[0]
    w = frame.q  # slot i: type word 2i, payload word 2i + 1
    w[7] = q._dl_addr
    w[9] = k_cache._dl_addr
    w[11] = v_cache._dl_addr
    w[13] = kv_indptr._dl_addr
    w[15] = kv_indices._dl_addr
    w[17] = kv_last_page_len._dl_addr
    w[19] = out._dl_addr
    if lse is None:
        w[20] = _N
        w[21] = 0
    else:
        w[20] = _T
        w[21] = lse._dl_addr
    w[38] = _N  # result
    if stream is None:
        if ep._call(ep._self, frame.args, 19, frame.result):
            ep.raise_error(frame)
    else:
        ep.invoke(frame, st.device_id, stream if type(stream) is int else stream_handle(stream))
    return result


def _check_batch_run(plan: Plan, key: tuple[Any, ...]) -> tuple[Any, ...]:
    _, q, k, v, indptr, indices, last, out, lse = key
    conv = [x if type(x) is Tensor else checks.tensor(n, x) for n, x in (
        ("q", q), ("k_cache", k), ("v_cache", v), ("kv_indptr", indptr), ("kv_indices", indices),
        ("kv_last_page_len", last), ("out", out))]
    lse_t = checks.optional_tensor("lse", lse)
    q, k, v, indptr, indices, last, out = conv
    dev = plan.workspace.device
    b, hq, hk, d = plan.batch_size, plan.num_qo_heads, plan.num_kv_heads, plan.head_dim_qk
    P.device_tensor("q", q, (b, hq, d), "[batch, num_qo_heads, head_dim]", plan.dtype_q, dev)
    P.kv_cache(k, v, plan.kv_layout, hk, plan.page_size, d, d, plan.dtype_kv, dev)
    P.index_tensor("kv_indptr", indptr, b + 1, dev)
    P.index_tensor("kv_indices", indices, None, dev)
    P.index_tensor("kv_last_page_len", last, b, dev)
    P.device_tensor("out", out, (b, hq, d), "[batch, num_qo_heads, head_dim]", plan.dtype_o, dev, contiguous=True)
    P.lse_tensor("lse", lse_t, (b, hq), dev)
    args = (q, k, v, indptr, indices, last, out, lse_t)
    if all(type(x) is Tensor for x in key[1:8]) and (lse is None or type(lse) is Tensor):
        _batch_memo.add(key)
    return args


# ------------------------------------------------------------------------------------------ single decode

_single_memo = Memo()


def single_decode(q: Any, k: Any, v: Any, out: Any, *, tmp: Any = None, lse: Any = None, kv_layout: str = "NHD",
                  pos_encoding: Any = "NONE", window_left: int = -1, logits_soft_cap: float = 0.0,
                  sm_scale: float | None = None, rope_scale: float = 1.0, rope_theta: float = 1e4,
                  alibi_slopes: Any = None, stream: Any = None) -> Any:
    """Decode attention of one request: ``out[h] = softmax(sm_scale * q[h] . K^T) V``.

    Args:
        q: ``[num_qo_heads, head_dim]``, contiguous, float16/bfloat16 (or the dtype of an available module).
        k, v: NHD ``[kv_len, num_kv_heads, head_dim]`` or HND ``[num_kv_heads, kv_len, head_dim]``, contiguous,
            one dtype.
        out: ``[num_qo_heads, head_dim]``, contiguous; its dtype selects the module (usually q's).
        tmp: uint8 1-D device scratch for splitting long KV across CTAs (upstream uses 32 MiB,
            :data:`~fi_ffi.ops.workspace.TMP_BYTES`; a workspace's ``float_buffer`` serves on the same stream).
            None: never split (slower for long ``kv_len``, no scratch). A scratch smaller than the split may
            need is a ValueError stating the bytes.
        lse: optional float32 ``[num_qo_heads]``.
        kv_layout: ``"NHD"`` or ``"HND"``.
        pos_encoding, window_left, logits_soft_cap: select the module (see :func:`batch_decode_plan`).
        sm_scale: default ``1 / sqrt(head_dim)``; rope_scale, rope_theta: RoPE parameters.
        alibi_slopes: float32 ``[num_qo_heads]`` with ALIBI.
        stream: where the kernel runs.

    Returns:
        ``out``.
    """
    layout = kv_layout if kv_layout == "NHD" or kv_layout == "HND" else P.layout_name(kv_layout)
    result = out  # returned as passed, whatever it was converted to
    key = (layout, q, k, v, out, tmp, lse)
    if key not in _single_memo.seen:
        q, k, v, out, tmp, lse = _check_single(key)
    pos = P.pos_encoding(pos_encoding) if pos_encoding != "NONE" else 0
    w = window_left if type(window_left) is int and window_left >= -1 else P.window(window_left)
    cap = logits_soft_cap if type(logits_soft_cap) is float and logits_soft_cap == 0.0 else P.soft_cap(
        logits_soft_cap)
    d = q.shape[1]
    sm, rs, rt = P.scales(d, sm_scale, rope_scale, rope_theta)
    kv_len = k.shape[0] if layout == "NHD" else k.shape[1]
    if tmp is not None and kv_len > 256:
        need = tmp_bytes_needed(q.device.device_id, kv_len, 1, q.shape[0], k.shape[1] if layout == "NHD" else
                                k.shape[0], d, out.dtype.itemsize, prefill=False)
        if need and tmp.shape[0] * tmp.dtype.itemsize < need:
            raise ValueError(f"tmp: the kernel may need up to {need} bytes of scratch for kv_len {kv_len}, got "
                             f"{tmp.shape[0] * tmp.dtype.itemsize}; pass a larger buffer (upstream uses 32 MiB) or "
                             f"None")
    alibi = P.alibi(pos, alibi_slopes, q.shape[0], q.device)
    _, uri = variant_uri(SINGLE_DECODE, q.dtype, k.dtype, out.dtype, None, d, d, pos, w != -1, cap > 0)
    ep = entry_point(uri, "run")
    s = stream if stream is None or type(stream) is int else stream_handle(stream)
    tmp_t = tmp if tmp is not None else empty(_uint8(), q.device)
    frame = ep.frame(13)
    _SINGLE_PACK(frame.buf, 0, _T, 0, q._dl_addr, _T, 0, k._dl_addr, _T, 0, v._dl_addr, _T, 0, tmp_t._dl_addr,
                 _T, 0, out._dl_addr, *((_N, 0, 0) if lse is None else (_T, 0, lse._dl_addr)),
                 _I, 0, P.LAYOUTS[layout], _I, 0, w,
                 *((_N, 0, 0) if alibi is None else (alibi.type_index, 0, alibi.handle)),
                 _F, 0, cap, _F, 0, sm, _F, 0, 1.0 / rs, _F, 0, 1.0 / rt, _N, 0, 0)
    ep.invoke(frame, q.device.device_id, s)
    return result


def _uint8() -> DType:
    from ..dtypes import uint8

    return uint8


def _check_single(key: tuple[Any, ...]) -> tuple[Any, ...]:
    layout, q, k, v, out, tmp, lse = key
    qt, kt, vt, ot = (x if type(x) is Tensor else checks.tensor(n, x) for n, x in (("q", q), ("k", k), ("v", v),
                                                                                       ("out", out)))
    tt = checks.optional_tensor("tmp", tmp)
    lt = checks.optional_tensor("lse", lse)
    if qt.ndim != 2:
        raise ValueError(f"q: expected a 2-D tensor [num_qo_heads, head_dim], got shape {qt.shape}")
    if not qt.device.is_cuda:
        raise ValueError(f"q: expected a CUDA device tensor, got one on {qt.device}")
    dev = qt.device
    hq, d = qt.shape
    P.device_tensor("q", qt, (hq, d), "[num_qo_heads, head_dim]", None, dev, contiguous=True)
    text = "NHD [kv_len, num_kv_heads, head_dim]" if layout == "NHD" else "HND [num_kv_heads, kv_len, head_dim]"
    P.device_tensor("k", kt, (None, None, d), text, None, dev, contiguous=True)
    P.device_tensor("v", vt, kt.shape, text, kt.dtype, dev, contiguous=True)
    hk = kt.shape[1] if layout == "NHD" else kt.shape[0]
    if hk == 0:
        raise ValueError(f"k: expected at least one KV head, got shape {kt.shape}")
    P.gqa(hq, hk, decode=True)
    P.device_tensor("out", ot, (hq, d), "[num_qo_heads, head_dim]", None, dev, contiguous=True)
    if tt is not None:
        if tt.ndim != 1 or not tt.is_contiguous():
            raise ValueError(f"tmp: expected a contiguous 1-D scratch buffer, got shape {tt.shape}")
        if tt.device != dev:
            raise ValueError(f"tmp: expected a device buffer on {dev}, got one on {tt.device}")
    P.lse_tensor("lse", lt, (hq,), dev)
    args = (qt, kt, vt, ot, tt, lt)
    if all(type(x) is Tensor or x is None for x in key[1:]):
        _single_memo.add(key)
    return args
