"""Prefill (and append) attention: many query tokens per request against a KV cache.

- :func:`single_prefill`: one request, K/V as 3-D tensors (``single_prefill_with_kv_cache_*`` ``run``, FA2).
- :func:`batch_prefill_ragged_plan` then :func:`batch_prefill_ragged_run`: a batch with ragged K/V
  (packed tokens, ``kv_indptr`` in tokens).
- :func:`batch_prefill_paged_plan` then :func:`batch_prefill_paged_run`: a batch over a paged KV cache.

The batch calls use the FA2 modules on every GPU, and the FA3 (``_sm90``) modules on SM 9.x GPUs when the
pinned wheels have the variant and the problem allows it (no custom mask, no RoPE/ALiBi, no fp16 QK
reduction): ``backend="auto"`` (default) picks, ``"fa2"``/``"fa3"`` force one. FA2 and FA3 plans do not mix;
a plan's runs always use its module and its workspace.

Math, per request, query row ``i`` (of ``qo_len``) and head ``h`` (KV head ``h // group``), in float32:
``o[i, h] = softmax_j(sm_scale * q[i, h] . k[j]) v[j]`` over the request's ``kv_len`` tokens ``j`` allowed
by the mask: all (non-causal), ``j <= i + kv_len - qo_len`` (causal, aligned to the end of the KV), or
the bits of a custom mask (row-major ``qo_len x kv_len`` bits per request, little bit order: bit ``i *
kv_len + j`` at byte ``(i * kv_len + j) // 8``, bit ``(i * kv_len + j) % 8``; :func:`pack_custom_mask`
builds it). ``window_left >= 0`` further keeps ``j >= i + kv_len - qo_len - window_left``; soft-capping
as in :mod:`fi_ffi.ops.decode`. ``lse`` (optional, float32) is the base-2 log-sum-exp of the scaled logits.

Everything is asynchronous on ``stream``; plan and run must use the same stream (see
:mod:`fi_ffi.ops.workspace` for the one documented wait).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..abi.call import Signature
from ..abi.objects import ARRAY, BOOL, DLTENSOR_PTR, FLOAT, INT, NONE
from ..dtypes import int32
from ..streams import stream_handle
from ..tensor import Tensor
from . import checks
from . import plan as P
from .decode import _dtypes, empty, variant_uri
from .kernels import entry_point
from .plan import MASK_CAUSAL, MASK_CUSTOM, MASK_NONE, Memo, Plan, PlanSettings
from .variants import BATCH_PREFILL, SINGLE_PREFILL, Variant, choose_prefill
from .workspace import Workspace, tmp_bytes_needed

__all__ = [
    "batch_prefill_paged_plan",
    "batch_prefill_paged_run",
    "batch_prefill_ragged_plan",
    "batch_prefill_ragged_run",
    "pack_custom_mask",
    "single_prefill",
]

_T, _I, _F, _B, _N, _A = DLTENSOR_PTR, INT, FLOAT, BOOL, NONE, ARRAY
_OPT = (_N, 0, 0)

_PLAN_PARAMS = [
    ("float_workspace_buffer", "tensor"), ("int_workspace_buffer", "tensor"),
    ("page_locked_int_workspace_buffer", "tensor"), ("qo_indptr", "tensor"), ("kv_indptr", "tensor"),
    ("kv_len_arr", "tensor"), ("total_num_rows", "int"), ("batch_size", "int"), ("num_qo_heads", "int"),
    ("num_kv_heads", "int"), ("page_size", "int"), ("enable_cuda_graph", "bool"), ("head_dim_qk", "int"),
    ("head_dim_vo", "int"), ("causal", "bool"), ("window_left", "int")]
FA2_PLAN_SIG = Signature("batch_prefill.plan", [*_PLAN_PARAMS, ("fixed_split_size", "int"),
                                                ("disable_split_kv", "bool"), ("num_colocated_ctas", "int")])
FA3_PLAN_SIG = Signature("batch_prefill_sm90.plan", _PLAN_PARAMS)

_RUN_HEAD = [("float_workspace_buffer", "tensor"), ("int_workspace_buffer", "tensor"), ("plan_info_vec", "object"),
             ("q", "tensor")]
_RAGGED_KV = [("k", "tensor"), ("v", "tensor"), ("qo_indptr", "tensor"), ("kv_indptr", "tensor")]
_PAGED_KV = [("paged_k_cache", "tensor"), ("paged_v_cache", "tensor"), ("qo_indptr", "tensor"),
             ("paged_kv_indptr", "tensor"), ("paged_kv_indices", "tensor"), ("paged_kv_last_page_len", "tensor")]
_RUN_MID = [("o", "tensor"), ("maybe_lse", "tensor?"), ("mask_mode_code", "int"), ("layout", "int"),
            ("window_left", "int"), ("enable_pdl", "bool")]
_MULTI_ITEM = [("maybe_prefix_len_ptr", "object?"), ("maybe_token_pos_in_items_ptr", "object?"),
               ("maybe_max_item_len_ptr", "object?")]
_FA2_TAIL = [("maybe_custom_mask", "object?"), ("maybe_mask_indptr", "object?"), ("maybe_alibi_slopes", "object?"),
             *_MULTI_ITEM, ("logits_soft_cap", "float"), ("sm_scale", "float"), ("rope_rcp_scale", "float"),
             ("rope_rcp_theta", "float"), ("token_pos_in_items_len", "int")]
_FA3_TAIL = [*_MULTI_ITEM, ("maybe_scale_v", "object?"), ("logits_soft_cap", "float"), ("sm_scale", "float"),
             ("scale_v_scalar", "float"), ("token_pos_in_items_len", "int")]
FA2_RAGGED_SIG = Signature("batch_prefill.ragged_run", _RUN_HEAD + _RAGGED_KV + _RUN_MID + _FA2_TAIL)
FA2_PAGED_SIG = Signature("batch_prefill.paged_run", _RUN_HEAD + _PAGED_KV + _RUN_MID + _FA2_TAIL)
FA3_RAGGED_SIG = Signature("batch_prefill_sm90.ragged_run", _RUN_HEAD + _RAGGED_KV + _RUN_MID + _FA3_TAIL)
FA3_PAGED_SIG = Signature("batch_prefill_sm90.paged_run", _RUN_HEAD + _PAGED_KV + _RUN_MID + _FA3_TAIL)
SINGLE_SIG = Signature("single_prefill.run", [
    ("q", "tensor"), ("k", "tensor"), ("v", "tensor"), ("tmp", "tensor"), ("o", "tensor"), ("maybe_lse", "tensor?"),
    ("mask_mode_code", "int"), ("layout", "int"), ("window_left", "int"), ("maybe_custom_mask", "object?"),
    ("maybe_alibi_slopes", "object?"), ("logits_soft_cap", "float"), ("sm_scale", "float"),
    ("rope_rcp_scale", "float"), ("rope_rcp_theta", "float")])

_TENSORS7 = struct.Struct("<" + "iIq" * 7).pack_into  # ragged run slots 3-9: q .. maybe_lse
_TENSORS9 = struct.Struct("<" + "iIq" * 9).pack_into  # paged run slots 3-11: q .. maybe_lse
_NARGS = {k: s.nargs for k, s in (((("fa2", "ragged")), FA2_RAGGED_SIG), (("fa2", "paged"), FA2_PAGED_SIG),
                                  (("fa3", "ragged"), FA3_RAGGED_SIG), (("fa3", "paged"), FA3_PAGED_SIG))}
_SINGLE_PACK = SINGLE_SIG.pack.pack_into
_U32 = 1 << 32


def pack_custom_mask(masks: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
    """Pack per-request boolean masks into the kernels' bit layout, on the host.

    Args:
        masks: one boolean array ``[qo_len_i, kv_len_i]`` per request (True = attend).

    Returns:
        ``(packed, mask_indptr)``: uint8 bytes (each request's ``qo_len * kv_len`` bits, row-major, little bit
        order, padded to a byte) and int32 ``[batch + 1]`` byte offsets of each request. Copy both to the
        device for :func:`batch_prefill_ragged_plan` / :func:`batch_prefill_paged_plan` (``custom_mask``,
        ``mask_indptr``); :func:`single_prefill` takes ``packed`` of a single mask.
    """
    parts = [np.packbits(np.asarray(m, dtype=bool).reshape(-1), bitorder="little") for m in masks]
    indptr = np.zeros(len(parts) + 1, np.int32)
    indptr[1:] = np.cumsum([p.size for p in parts])
    packed = np.concatenate(parts) if parts else np.zeros(0, np.uint8)
    return packed.astype(np.uint8), indptr


# ------------------------------------------------------------------------------------------ single prefill

_single_memo = Memo()


def single_prefill(q: Any, k: Any, v: Any, out: Any, *, tmp: Any = None, lse: Any = None, causal: bool = False,
                   kv_layout: str = "NHD", custom_mask: Any = None, pos_encoding: Any = "NONE",
                   window_left: int = -1, logits_soft_cap: float = 0.0, sm_scale: float | None = None,
                   rope_scale: float = 1.0, rope_theta: float = 1e4, alibi_slopes: Any = None,
                   use_fp16_qk_reduction: bool = False, stream: Any = None) -> Any:
    """Prefill attention of one request (FA2 module).

    Args:
        q: ``[qo_len, num_qo_heads, head_dim_qk]``; last dim contiguous, dims 0 and 1 may be strided.
        k: NHD ``[kv_len, num_kv_heads, head_dim_qk]`` or HND ``[num_kv_heads, kv_len, head_dim_qk]``; last dim
            contiguous.
        v: like ``k`` with ``head_dim_vo``; same dtype as ``k``.
        out: ``[qo_len, num_qo_heads, head_dim_vo]``, contiguous (written densely); its dtype selects the module.
        tmp: uint8 1-D device scratch for splitting long KV (upstream: 32 MiB); None: never split.
        lse: optional float32 ``[qo_len, num_qo_heads]``.
        causal: causal mask aligned to the end of the KV (ignored when ``custom_mask`` is given: exclusive).
        kv_layout: ``"NHD"`` or ``"HND"``.
        custom_mask: uint8 device ``[>= ceil(qo_len * kv_len / 8)]`` packed bits (:func:`pack_custom_mask`).
        pos_encoding, window_left, logits_soft_cap, use_fp16_qk_reduction: select the module.
        sm_scale: default ``1 / sqrt(head_dim_qk)``; rope_scale, rope_theta: RoPE parameters.
        alibi_slopes: float32 ``[num_qo_heads]`` with ALIBI.

    Returns:
        ``out``.
    """
    layout = kv_layout if kv_layout == "NHD" or kv_layout == "HND" else P.layout_name(kv_layout)
    result = out  # returned as passed, whatever it was converted to
    key = (layout, q, k, v, out, tmp, lse, custom_mask)
    if key not in _single_memo.seen:
        q, k, v, out, tmp, lse, custom_mask = _check_single(key)
    if causal is not False and causal is not True:
        causal = checks.flag("causal", causal)
    if custom_mask is not None and causal:
        raise ValueError("causal: a custom mask replaces the causal mask; pass causal=False with custom_mask")
    pos = P.pos_encoding(pos_encoding) if pos_encoding != "NONE" else 0
    w = window_left if type(window_left) is int and window_left >= -1 else P.window(window_left)
    cap = logits_soft_cap if type(logits_soft_cap) is float and logits_soft_cap == 0.0 else P.soft_cap(
        logits_soft_cap)
    f16qk = checks.flag("use_fp16_qk_reduction", use_fp16_qk_reduction)
    qo_len, hq, dqk = q.shape
    dvo = v.shape[2]
    kv_len, hk = (k.shape[0], k.shape[1]) if layout == "NHD" else (k.shape[1], k.shape[0])
    sm, rs, rt = P.scales(dqk, sm_scale, rope_scale, rope_theta)
    if tmp is not None and kv_len > 256:
        need = tmp_bytes_needed(q.device.device_id, kv_len, qo_len, hq, hk, dvo, out.dtype.itemsize, prefill=True)
        if need and tmp.shape[0] * tmp.dtype.itemsize < need:
            raise ValueError(f"tmp: the kernel may need up to {need} bytes of scratch here, got "
                             f"{tmp.shape[0] * tmp.dtype.itemsize}; pass a larger buffer (upstream uses 32 MiB) or "
                             f"None")
    mask_obj = None
    if custom_mask is not None:
        need_bytes = -(-(qo_len * kv_len) // 8)
        if custom_mask.shape[0] < need_bytes:
            raise ValueError(f"custom_mask: expected at least {need_bytes} bytes (qo_len * kv_len bits), got "
                             f"{custom_mask.shape[0]}")
        mask_obj = P.optional_object("custom_mask", custom_mask, "uint8", None, q.device)
    alibi = P.alibi(pos, alibi_slopes, hq, q.device)
    _, uri = variant_uri(SINGLE_PREFILL, q.dtype, k.dtype, out.dtype, None, dqk, dvo, pos, w >= 0, cap > 0, f16qk)
    mode = MASK_CUSTOM if mask_obj is not None else (MASK_CAUSAL if causal else MASK_NONE)
    ep = entry_point(uri, "run")
    s = stream if stream is None or type(stream) is int else stream_handle(stream)
    tmp_t = tmp if tmp is not None else empty(_u8(), q.device)
    frame = ep.frame(15)
    _SINGLE_PACK(frame.buf, 0, _T, 0, q._dl_addr, _T, 0, k._dl_addr, _T, 0, v._dl_addr, _T, 0, tmp_t._dl_addr,
                 _T, 0, out._dl_addr, *(_OPT if lse is None else (_T, 0, lse._dl_addr)), _I, 0, mode,
                 _I, 0, P.LAYOUTS[layout], _I, 0, w, *_obj(mask_obj), *_obj(alibi), _F, 0, cap, _F, 0, sm,
                 _F, 0, 1.0 / rs, _F, 0, 1.0 / rt, _N, 0, 0)
    ep.invoke(frame, q.device.device_id, s)
    return result


def _obj(o: Any) -> tuple[int, int, int]:
    return _OPT if o is None else (o.type_index, 0, o.handle)


def _u8() -> Any:
    from ..dtypes import uint8

    return uint8


def _strides_u32(name: str, t: Tensor) -> None:
    if any(s >= _U32 for s in t.strides):
        raise ValueError(f"{name}: the kernel takes 32-bit strides, got {t.strides}")


def _check_single(key: tuple[Any, ...]) -> tuple[Any, ...]:
    layout, q, k, v, out, tmp, lse, mask = key
    qt, kt, vt, ot = (x if type(x) is Tensor else checks.tensor(n, x) for n, x in (("q", q), ("k", k), ("v", v),
                                                                                       ("out", out)))
    tt = checks.optional_tensor("tmp", tmp)
    lt = checks.optional_tensor("lse", lse)
    mt = checks.optional_tensor("custom_mask", mask)
    if qt.ndim != 3:
        raise ValueError(f"q: expected a 3-D tensor [qo_len, num_qo_heads, head_dim_qk], got shape {qt.shape}")
    if not qt.device.is_cuda:
        raise ValueError(f"q: expected a CUDA device tensor, got one on {qt.device}")
    dev = qt.device
    qo_len, hq, dqk = qt.shape
    P.device_tensor("q", qt, (qo_len, hq, dqk), "[qo_len, num_qo_heads, head_dim_qk]", None, dev)
    text = "NHD [kv_len, num_kv_heads, head_dim]" if layout == "NHD" else "HND [num_kv_heads, kv_len, head_dim]"
    P.device_tensor("k", kt, (None, None, dqk), text, None, dev)
    if vt.ndim != 3:
        raise ValueError(f"v: expected shape {text}, got {vt.shape}")
    P.device_tensor("v", vt, (kt.shape[0], kt.shape[1], None), text, kt.dtype, dev)
    hk = kt.shape[1] if layout == "NHD" else kt.shape[0]
    if hk == 0:
        raise ValueError(f"k: expected at least one KV head, got shape {kt.shape}")
    P.gqa(hq, hk, decode=False)
    for name, t in (("q", qt), ("k", kt), ("v", vt)):
        _strides_u32(name, t)
    P.device_tensor("out", ot, (qo_len, hq, vt.shape[2]), "[qo_len, num_qo_heads, head_dim_vo]", None, dev,
                    contiguous=True)
    if tt is not None:
        if tt.ndim != 1 or not tt.is_contiguous():
            raise ValueError(f"tmp: expected a contiguous 1-D scratch buffer, got shape {tt.shape}")
        if tt.device != dev:
            raise ValueError(f"tmp: expected a device buffer on {dev}, got one on {tt.device}")
    P.lse_tensor("lse", lt, (qo_len, hq), dev)
    if mt is not None:
        P.optional_object("custom_mask", mt, "uint8", None, dev)
    args = (qt, kt, vt, ot, tt, lt, mt)
    if all(type(x) is Tensor or x is None for x in key[1:]):
        _single_memo.add(key)
    return args


# ------------------------------------------------------------------------------------------ batch prefill plans


def batch_prefill_ragged_plan(workspace: Any, qo_indptr: Any, kv_indptr: Any, num_qo_heads: int, num_kv_heads: int,
                              head_dim_qk: int, *, head_dim_vo: int | None = None, q_dtype: Any = "float16",
                              kv_dtype: Any = None, o_dtype: Any = None, kv_layout: str = "NHD", causal: bool = False,
                              custom_mask: Any = None, mask_indptr: Any = None, pos_encoding: Any = "NONE",
                              window_left: int = -1, logits_soft_cap: float = 0.0, sm_scale: float | None = None,
                              rope_scale: float = 1.0, rope_theta: float = 1e4, alibi_slopes: Any = None,
                              use_fp16_qk_reduction: bool = False, backend: str = "auto",
                              enable_cuda_graph: bool = False, max_total_num_rows: int | None = None,
                              fixed_split_size: int | None = None, disable_split_kv: bool = False,
                              stream: Any = None) -> Plan:
    """Plan batch prefill over ragged K/V: request ``i``'s keys are rows ``kv_indptr[i]:kv_indptr[i+1]``.

    Args:
        workspace: the :class:`~fi_ffi.ops.workspace.Workspace` of this plan and its runs.
        qo_indptr: host int32 ``[batch + 1]``: request ``i``'s query rows are ``qo_indptr[i]:qo_indptr[i+1]``.
        kv_indptr: host int32 ``[batch + 1]``, in tokens.
        num_qo_heads, num_kv_heads: heads (``num_qo_heads`` a multiple of ``num_kv_heads``).
        head_dim_qk, head_dim_vo: head dims (vo defaults to qk).
        q_dtype, kv_dtype, o_dtype: element types (kv and o default to q's).
        kv_layout: ``"NHD"`` (``[nnz_kv, kv_heads, d]``) or ``"HND"`` (``[kv_heads, nnz_kv, d]``; FA2 only).
        causal: causal mask (per request, aligned to the end of its KV).
        custom_mask, mask_indptr: a custom mask (uint8 device packed bits and int32 device ``[batch + 1]`` byte
            offsets, :func:`pack_custom_mask`); FA2 only. Kept by the plan; read at run time.
        pos_encoding, window_left, logits_soft_cap, use_fp16_qk_reduction: select the module.
        sm_scale: default ``1 / sqrt(head_dim_qk)``; rope_scale, rope_theta: RoPE parameters.
        alibi_slopes: float32 ``[num_qo_heads]`` with ALIBI (kept by the plan).
        backend: ``"auto"``, ``"fa2"`` or ``"fa3"``.
        enable_cuda_graph: plan for runs captured in a CUDA graph; ``max_total_num_rows`` then bounds the rows
            of every later plan replayed into the same graph (default ``qo_indptr[-1]``).
        fixed_split_size, disable_split_kv: FA2 split-KV controls (deterministic reductions); ignored by FA3.
        stream: the stream of the plan's asynchronous copy; runs must use the same stream.
    """
    return _plan("ragged", workspace, qo_indptr, kv_indptr, None, max_total_num_rows, stream,
                 (num_qo_heads, num_kv_heads, head_dim_qk, 1, head_dim_vo, q_dtype, kv_dtype, o_dtype, kv_layout,
                  causal, custom_mask, mask_indptr, pos_encoding, window_left, logits_soft_cap, sm_scale,
                  rope_scale, rope_theta, alibi_slopes, use_fp16_qk_reduction, backend, enable_cuda_graph,
                  fixed_split_size, disable_split_kv))


def batch_prefill_paged_plan(workspace: Any, qo_indptr: Any, kv_indptr: Any, kv_last_page_len: Any,
                             num_qo_heads: int, num_kv_heads: int, head_dim_qk: int, page_size: int, *,
                             head_dim_vo: int | None = None, q_dtype: Any = "float16", kv_dtype: Any = None,
                             o_dtype: Any = None, kv_layout: str = "NHD", causal: bool = False,
                             custom_mask: Any = None, mask_indptr: Any = None, pos_encoding: Any = "NONE",
                             window_left: int = -1, logits_soft_cap: float = 0.0, sm_scale: float | None = None,
                             rope_scale: float = 1.0, rope_theta: float = 1e4, alibi_slopes: Any = None,
                             use_fp16_qk_reduction: bool = False, backend: str = "auto",
                             enable_cuda_graph: bool = False, max_total_num_rows: int | None = None,
                             fixed_split_size: int | None = None, disable_split_kv: bool = False,
                             stream: Any = None) -> Plan:
    """Plan batch prefill over a paged KV cache.

    Args are those of :func:`batch_prefill_ragged_plan`, except:
        kv_indptr: host int32 ``[batch + 1]`` in **pages**: request ``i`` owns
            ``kv_indices[kv_indptr[i]:kv_indptr[i+1]]``.
        kv_last_page_len: host int32 ``[batch]``: tokens in each request's last page (1..page_size; 0 for a
            request without pages). FA3 plans from the resulting lengths; the run takes the device copy.
        page_size: tokens per page.
        kv_layout: NHD ``[pages, page_size, kv_heads, d]`` or HND ``[pages, kv_heads, page_size, d]``.
    """
    return _plan("paged", workspace, qo_indptr, kv_indptr, kv_last_page_len, max_total_num_rows, stream,
                 (num_qo_heads, num_kv_heads, head_dim_qk, page_size, head_dim_vo, q_dtype, kv_dtype, o_dtype,
                  kv_layout, causal, custom_mask, mask_indptr, pos_encoding, window_left, logits_soft_cap, sm_scale,
                  rope_scale, rope_theta, alibi_slopes, use_fp16_qk_reduction, backend, enable_cuda_graph,
                  fixed_split_size, disable_split_kv))


def _plan(mode: str, workspace: Any, qo_indptr: Any, kv_indptr: Any, kv_last_page_len: Any,
          max_total_num_rows: Any, stream: Any, args: tuple[Any, ...]) -> Plan:
    ws = workspace if type(workspace) is Workspace else P.workspace_of(workspace)
    st = settings(ws, mode, *args)
    qo = P.host_array("qo_indptr", qo_indptr)
    rows = P.check_indptr("qo_indptr", qo)
    batch = qo.shape[0] - 1
    kv = P.host_array("kv_indptr", kv_indptr)
    extent = P.check_indptr("kv_indptr", kv, batch)
    if mode == "paged":
        if kv_last_page_len is None:
            raise ValueError("kv_last_page_len: required for a paged plan (host int32 [batch_size])")
        kv_lens = P.check_last_page_len("kv_last_page_len", P.host_array("kv_last_page_len", kv_last_page_len), kv,
                                        st.page_size, lengths=True)
    else:
        kv_lens = kv[1:] - kv[:-1]
    total_rows = rows
    if max_total_num_rows is not None:
        total_rows = P.positive("max_total_num_rows", max_total_num_rows)
        if not st.enable_cuda_graph:
            raise ValueError("max_total_num_rows: only meaningful with enable_cuda_graph=True")
        if total_rows < rows:
            raise ValueError(f"max_total_num_rows: must be >= qo_indptr[-1] = {rows}, got {total_rows}")
    if st.mask_mode == MASK_CUSTOM:
        need = int(np.sum(((qo[1:] - qo[:-1]).astype(np.int64) * kv_lens.astype(np.int64) + 7) // 8))
        have = st.extra[0].shape[0]
        if have < need:
            raise ValueError(f"custom_mask: expected at least {need} bytes (sum of ceil(qo_len * kv_len / 8)), got "
                             f"{have}")
        if st.extra[1].shape[0] != batch + 1:
            raise ValueError(f"mask_indptr: expected {batch + 1} entries ([batch_size + 1]), got "
                             f"{st.extra[1].shape[0]}")
    values = (*st.plan_prefix, _T, 0, P.host_descriptor(0, qo), _T, 0, P.host_descriptor(1, kv),
              _T, 0, P.host_descriptor(2, kv_lens), _I, 0, total_rows, _I, 0, batch, *st.plan_suffix)
    s = stream if stream is None or type(stream) is int else stream_handle(stream)
    info, generation = P.call_plan(ws, st.plan_ep, st.plan_sig, values, s)
    return Plan.make(info, ws, generation, st, batch, rows, extent)


def settings(ws: Workspace, mode: str, *args: Any) -> PlanSettings:
    """The validated, shared settings of a batch prefill plan on ``ws`` (cached per argument values and types).

    ``args``: num_qo_heads, num_kv_heads, head_dim_qk, page_size, head_dim_vo, q_dtype, kv_dtype, o_dtype,
    kv_layout, causal, custom_mask, mask_indptr, pos_encoding, window_left, logits_soft_cap, sm_scale, rope_scale,
    rope_theta, alibi_slopes, use_fp16_qk_reduction, backend, enable_cuda_graph, fixed_split_size,
    disable_split_kv. The backend is chosen here (see :func:`fi_ffi.ops.variants.choose_prefill`).
    """
    cacheable = args[10] is None and args[11] is None and args[18] is None  # tensors are not cache keys
    if cacheable:
        key = (BATCH_PREFILL, mode, args, tuple(map(type, args)))
        found = ws._settings.get(key)
        if found is not None:
            return found
    (num_qo_heads, num_kv_heads, head_dim_qk, page_size, head_dim_vo, q_dtype, kv_dtype, o_dtype, kv_layout, causal,
     custom_mask, mask_indptr, pos_encoding, window_left, logits_soft_cap, sm_scale, rope_scale, rope_theta,
     alibi_slopes, fp16_qk, backend, enable_cuda_graph, fixed_split_size, disable_split_kv) = args
    dev = ws.device
    hq = P.positive("num_qo_heads", num_qo_heads)
    hk = P.positive("num_kv_heads", num_kv_heads)
    dqk = P.positive("head_dim_qk", head_dim_qk)
    dvo = dqk if head_dim_vo is None else P.positive("head_dim_vo", head_dim_vo)
    ps = P.positive("page_size", page_size)
    P.gqa(hq, hk, decode=False)
    layout = P.layout_name(kv_layout)
    causal = checks.flag("causal", causal)
    pos = P.pos_encoding(pos_encoding)
    w = P.window(window_left)
    cap = P.soft_cap(logits_soft_cap)
    sm, rs, rt = P.scales(dqk, sm_scale, rope_scale, rope_theta)
    f16qk = checks.flag("use_fp16_qk_reduction", fp16_qk)
    graph = checks.flag("enable_cuda_graph", enable_cuda_graph)
    no_split = checks.flag("disable_split_kv", disable_split_kv)
    split = -1 if fixed_split_size is None else P.positive("fixed_split_size", fixed_split_size)
    qd, kd, od = _dtypes(q_dtype, kv_dtype, o_dtype)
    if (custom_mask is None) != (mask_indptr is None):
        raise ValueError("custom_mask, mask_indptr: pass both (packed bits and per-request byte offsets) or neither")
    if custom_mask is not None and causal:
        raise ValueError("causal: a custom mask replaces the causal mask; pass causal=False with custom_mask")
    mask_obj = indptr_obj = None
    if custom_mask is not None:
        mask_obj = P.optional_object("custom_mask", custom_mask, "uint8", None, dev)
        indptr_obj = P.optional_object("mask_indptr", mask_indptr, "int32", None, dev)
    alibi = P.alibi(pos, alibi_slopes, hq, dev)
    custom = mask_obj is not None
    if backend not in ("auto", "fa2", "fa3"):
        raise ValueError(f"backend: expected 'auto', 'fa2' or 'fa3', got {backend!r}")
    if mode == "ragged" and layout == "HND":
        if backend == "fa3":
            raise ValueError("backend: 'fa3' ragged runs read K/V as NHD only ([nnz_kv, num_kv_heads, head_dim]); "
                             "use kv_layout='NHD' or backend 'fa2'")
        backend = "fa2"
    base = Variant(BATCH_PREFILL, qd, kd, od, dqk, dvo, int32, pos, w >= 0, cap > 0, f16qk, "fa2")
    variant = choose_prefill(base, backend, dev.device_id, custom)
    fa3 = variant.backend == "fa3"
    uri = variant.uri
    mask_mode = MASK_CUSTOM if custom else (MASK_CAUSAL if causal else MASK_NONE)
    st = PlanSettings(kind=BATCH_PREFILL, mode=mode, variant=variant, device_id=dev.device_id, num_qo_heads=hq,
                      num_kv_heads=hk, head_dim_qk=dqk, head_dim_vo=dvo, page_size=ps, kv_layout=layout, dtype_q=qd,
                      dtype_kv=kd, dtype_o=od, mask_mode=mask_mode, window_left=w, logits_soft_cap=cap,
                      sm_scale=sm, rope_scale=rs, rope_theta=rt, enable_cuda_graph=graph,
                      extra=tuple(x for x in (mask_obj, indptr_obj, alibi) if x is not None))
    st.plan_ep = entry_point(uri, "plan")
    st.plan_sig = FA3_PLAN_SIG if fa3 else FA2_PLAN_SIG
    st.plan_prefix = (_T, 0, ws.float_buffer._dl_addr, _T, 0, ws.int_buffer._dl_addr, _T, 0,
                      ws.pinned_buffer._dl_addr)
    st.plan_suffix = (_I, 0, hq, _I, 0, hk, _I, 0, ps, _B, 0, graph, _I, 0, dqk, _I, 0, dvo, _B, 0, causal, _I, 0, w)
    if not fa3:
        st.plan_suffix += (_I, 0, split, _B, 0, no_split, _I, 0, 0)
    st.ep = entry_point(uri, "ragged_run" if mode == "ragged" else "paged_run")
    mid = (_I, 0, mask_mode, _I, 0, P.LAYOUTS[layout], _I, 0, w)
    if fa3:
        tail = (*_OPT, *_OPT, *_OPT, *_OPT, _F, 0, cap, _F, 0, sm, _F, 0, 1.0, _I, 0, 0, _N, 0, 0)
    else:
        tail = (*_obj(mask_obj), *_obj(indptr_obj), *_obj(alibi), *_OPT, *_OPT, *_OPT, _F, 0, cap, _F, 0, sm,
                _F, 0, 1.0 / rs, _F, 0, 1.0 / rt, _I, 0, 0, _N, 0, 0)
    st.tails = P.run_tails(mid, tail)
    if cacheable:
        if len(ws._settings) > 256:
            ws._settings.clear()
        ws._settings[key] = st
    return st


# ------------------------------------------------------------------------------------------ batch prefill runs

_ragged_memo = Memo()
_paged_memo = Memo()


def batch_prefill_ragged_run(plan: Plan, q: Any, k: Any, v: Any, qo_indptr: Any, kv_indptr: Any, out: Any, *,
                             lse: Any = None, enable_pdl: bool = False, stream: Any = None) -> Any:
    """Run batch prefill over ragged K/V with a plan from :func:`batch_prefill_ragged_plan`.

    Args:
        plan: a live ragged prefill plan.
        q: ``[>= qo_indptr[-1], num_qo_heads, head_dim_qk]``; last dim contiguous, rows may be strided.
        k, v: NHD ``[>= kv_indptr[-1], num_kv_heads, head_dim]`` / HND ``[num_kv_heads, >= kv_indptr[-1], head_dim]``
            (qk and vo head dims), the plan's kv dtype; last dim contiguous.
        qo_indptr, kv_indptr: device int32 ``[batch + 1]`` copies of the plan's host arrays.
        out: ``[q.shape[0], num_qo_heads, head_dim_vo]`` of the plan's o dtype, contiguous.
        lse: optional float32 ``[q.shape[0], num_qo_heads]``.
        enable_pdl: programmatic dependent launch (SM90+).
        stream: the plan's stream.

    Returns:
        ``out``.
    """
    if type(plan) is not Plan:
        raise TypeError(f"plan: expected a Plan from batch_prefill_ragged_plan, got {type(plan).__name__}")
    st = plan._s
    if st.mode != "ragged" or st.kind != BATCH_PREFILL or not plan._info.handle or \
            plan.workspace._generation != plan._generation:
        plan.check_runnable(BATCH_PREFILL, "ragged")
    result = out  # returned as passed, whatever it was converted to
    key = (plan._key, q, k, v, qo_indptr, kv_indptr, out, lse)
    if key not in _ragged_memo.seen:
        q, k, v, qo_indptr, kv_indptr, out, lse = _check_ragged(plan, key)
    if q.shape[0] < plan.num_rows:
        raise ValueError(f"q: the plan's qo_indptr ends at {plan.num_rows} rows, but q has {q.shape[0]}")
    nnz_kv = k.shape[0] if st.kv_layout == "NHD" else k.shape[1]
    if nnz_kv < plan.kv_extent:
        raise ValueError(f"k: the plan's kv_indptr ends at {plan.kv_extent} tokens, but k has {nnz_kv}")
    if enable_pdl is not False and enable_pdl is not True:
        enable_pdl = checks.flag("enable_pdl", enable_pdl)
    s = stream if stream is None or type(stream) is int else stream_handle(stream)
    ep = st.ep
    frame = ep.frame(_NARGS[(st.backend, "ragged")])
    buf = frame.buf
    buf[0:48] = plan._head  # the frame in three pieces: head and tail were packed at plan time
    _TENSORS7(buf, 48, _T, 0, q._dl_addr, _T, 0, k._dl_addr, _T, 0, v._dl_addr, _T, 0, qo_indptr._dl_addr,
              _T, 0, kv_indptr._dl_addr, _T, 0, out._dl_addr, _N if lse is None else _T, 0,
              0 if lse is None else lse._dl_addr)
    buf[160:] = st.tails[enable_pdl]
    ep.invoke(frame, st.device_id, s)
    return result


def batch_prefill_paged_run(plan: Plan, q: Any, k_cache: Any, v_cache: Any, qo_indptr: Any, kv_indptr: Any,
                            kv_indices: Any, kv_last_page_len: Any, out: Any, *, lse: Any = None,
                            enable_pdl: bool = False, stream: Any = None) -> Any:
    """Run batch prefill over a paged KV cache with a plan from :func:`batch_prefill_paged_plan`.

    Args:
        plan: a live paged prefill plan.
        q: ``[>= qo_indptr[-1], num_qo_heads, head_dim_qk]``; last dim contiguous, rows may be strided.
        k_cache, v_cache: NHD ``[pages, page_size, num_kv_heads, head_dim]`` / HND ``[pages, num_kv_heads,
            page_size, head_dim]``, the plan's kv dtype, identical strides.
        qo_indptr, kv_indptr, kv_last_page_len: device int32 copies of the plan's host arrays (FA3 reads the
            lengths from the plan, FA2 from these).
        kv_indices: device int32 ``[>= kv_indptr[-1]]`` page ids.
        out: ``[q.shape[0], num_qo_heads, head_dim_vo]`` of the plan's o dtype, contiguous.
        lse: optional float32 ``[q.shape[0], num_qo_heads]``.

    Returns:
        ``out``.
    """
    if type(plan) is not Plan:
        raise TypeError(f"plan: expected a Plan from batch_prefill_paged_plan, got {type(plan).__name__}")
    st = plan._s
    if st.mode != "paged" or st.kind != BATCH_PREFILL or not plan._info.handle or \
            plan.workspace._generation != plan._generation:
        plan.check_runnable(BATCH_PREFILL, "paged")
    result = out  # returned as passed, whatever it was converted to
    key = (plan._key, q, k_cache, v_cache, qo_indptr, kv_indptr, kv_indices, kv_last_page_len, out, lse)
    if key not in _paged_memo.seen:
        q, k_cache, v_cache, qo_indptr, kv_indptr, kv_indices, kv_last_page_len, out, lse = _check_paged(plan, key)
    if q.shape[0] < plan.num_rows:
        raise ValueError(f"q: the plan's qo_indptr ends at {plan.num_rows} rows, but q has {q.shape[0]}")
    if kv_indices.shape[0] < plan.kv_extent:
        raise ValueError(f"kv_indices: the plan's kv_indptr ends at {plan.kv_extent} pages, but kv_indices has "
                         f"{kv_indices.shape[0]} entries")
    if enable_pdl is not False and enable_pdl is not True:
        enable_pdl = checks.flag("enable_pdl", enable_pdl)
    s = stream if stream is None or type(stream) is int else stream_handle(stream)
    ep = st.ep
    frame = ep.frame(_NARGS[(st.backend, "paged")])
    buf = frame.buf
    buf[0:48] = plan._head  # the frame in three pieces: head and tail were packed at plan time
    _TENSORS9(buf, 48, _T, 0, q._dl_addr, _T, 0, k_cache._dl_addr, _T, 0, v_cache._dl_addr, _T, 0, qo_indptr._dl_addr,
              _T, 0, kv_indptr._dl_addr, _T, 0, kv_indices._dl_addr, _T, 0, kv_last_page_len._dl_addr,
              _T, 0, out._dl_addr, _N if lse is None else _T, 0, 0 if lse is None else lse._dl_addr)
    buf[192:] = st.tails[enable_pdl]
    ep.invoke(frame, st.device_id, s)
    return result


def _convert(pairs: Sequence[tuple[str, Any]]) -> list[Any]:
    return [x if type(x) is Tensor or x is None else checks.tensor(n, x) for n, x in pairs]


def _check_q_out_lse(plan: Plan, q: Tensor, out: Tensor, lse: Tensor | None, dev: Any) -> None:
    hq, dqk, dvo = plan.num_qo_heads, plan.head_dim_qk, plan.head_dim_vo
    P.device_tensor("q", q, (None, hq, dqk), "[nnz_qo, num_qo_heads, head_dim_qk]", plan.dtype_q, dev)
    P.device_tensor("out", out, (q.shape[0], hq, dvo), "[nnz_qo, num_qo_heads, head_dim_vo]", plan.dtype_o, dev,
                    contiguous=True)
    P.lse_tensor("lse", lse, (q.shape[0], hq), dev)


def _check_ragged(plan: Plan, key: tuple[Any, ...]) -> tuple[Any, ...]:
    _, q, k, v, qo_indptr, kv_indptr, out, lse = key
    q, k, v, qo_indptr, kv_indptr, out, lse = _convert((("q", q), ("k", k), ("v", v), ("qo_indptr", qo_indptr),
                                                         ("kv_indptr", kv_indptr), ("out", out), ("lse", lse)))
    dev = plan.workspace.device
    hk, dqk, dvo = plan.num_kv_heads, plan.head_dim_qk, plan.head_dim_vo
    _check_q_out_lse(plan, q, out, lse, dev)
    if plan.kv_layout == "NHD":
        text = "NHD [nnz_kv, num_kv_heads, head_dim]"
        P.device_tensor("k", k, (None, hk, dqk), text, plan.dtype_kv, dev)
        P.device_tensor("v", v, (k.shape[0], hk, dvo), text, plan.dtype_kv, dev)
    else:
        text = "HND [num_kv_heads, nnz_kv, head_dim]"
        P.device_tensor("k", k, (hk, None, dqk), text, plan.dtype_kv, dev)
        P.device_tensor("v", v, (hk, k.shape[1], dvo), text, plan.dtype_kv, dev)
    for name, t in (("q", q), ("k", k), ("v", v)):
        _strides_u32(name, t)
    P.index_tensor("qo_indptr", qo_indptr, plan.batch_size + 1, dev)
    P.index_tensor("kv_indptr", kv_indptr, plan.batch_size + 1, dev)
    args = (q, k, v, qo_indptr, kv_indptr, out, lse)
    if all(type(x) is Tensor or x is None for x in key[1:]):
        _ragged_memo.add(key)
    return args


def _check_paged(plan: Plan, key: tuple[Any, ...]) -> tuple[Any, ...]:
    _, q, k, v, qo_indptr, kv_indptr, kv_indices, last, out, lse = key
    q, k, v, qo_indptr, kv_indptr, kv_indices, last, out, lse = _convert((
        ("q", q), ("k_cache", k), ("v_cache", v), ("qo_indptr", qo_indptr), ("kv_indptr", kv_indptr),
        ("kv_indices", kv_indices), ("kv_last_page_len", last), ("out", out), ("lse", lse)))
    dev = plan.workspace.device
    _check_q_out_lse(plan, q, out, lse, dev)
    P.kv_cache(k, v, plan.kv_layout, plan.num_kv_heads, plan.page_size, plan.head_dim_qk, plan.head_dim_vo,
               plan.dtype_kv, dev)
    P.index_tensor("qo_indptr", qo_indptr, plan.batch_size + 1, dev)
    P.index_tensor("kv_indptr", kv_indptr, plan.batch_size + 1, dev)
    P.index_tensor("kv_indices", kv_indices, None, dev)
    P.index_tensor("kv_last_page_len", last, plan.batch_size, dev)
    args = (q, k, v, qo_indptr, kv_indptr, kv_indices, last, out, lse)
    if all(type(x) is Tensor or x is None for x in key[1:]):
        _paged_memo.add(key)
    return args
