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
as in :mod:`fi_ffi.ops.attention.decode`. ``lse`` (optional, float32) is the base-2 log-sum-exp of the scaled logits.

FP8: an FP8 KV cache (``kv_data_type="float8_e4m3fn"``) with 16-bit queries is served by the FA2 modules built for
it (their kernels take no scales: fold ``k_scale`` into the plan's ``sm_scale`` and multiply the output by
``v_scale``, as flashinfer-python's wrappers do); float8 q, k and v (``q_data_type="float8_e4m3fn"``,
``o_data_type="bfloat16"``) by the FA3 FP8 modules, whose runs take per-tensor ``q_scale``/``k_scale``/``v_scale``.

Everything is asynchronous on ``stream``; plan and run must use the same stream (see
:mod:`fi_ffi.ops.attention.workspace` for the one documented wait). Every kernel call goes through a launcher
(:mod:`fi_ffi.launch.launcher`) of the declarations below (FA2 and FA3 modules take different argument lists).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import numpy as np

from ... import caches
from ...abi.wire import ARRAY, BOOL, FLOAT, INT, OPT_FFI_TENSOR, Param, declare, optional_tensor, tensor, tensors
from ...dtypes import int32, uint8
from ...launch import checks
from ...launch.launcher import launcher
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
    check_kv_tokens,
    check_module_dtype,
    check_pages,
    check_rows,
    check_tmp,
    check_workspace,
    early_alibi,
    empty,
    kv_pair,
    layout_key,
    runnable,
    variant_uri,
)
from .host_index import check_indices, check_indptr, check_last_page_len, host_array, host_tensor
from .plan import Plan
from .plan_call import call_plan
from .plan_settings import (
    LAYOUTS,
    MASK_CAUSAL,
    MASK_CUSTOM,
    MASK_NONE,
    AttentionBackend,
    AttentionDType,
    KVLayout,
    PlanSettings,
    PosEncodingMode,
)
from .variants import BATCH_PREFILL, SINGLE_PREFILL, Variant, choose_prefill
from .workspace import Workspace

# ---- declarations (FlashInfer csrc/batch_prefill*.cu, single_prefill.cu; public names where 1:1) ---------------
# FlashInfer 0.7 renamed the FA2 batch prefill modules (``..._kv_stride_equal``) and changed their argument lists:
# the plan takes ``uniform_q_len`` last, the runs take the k/v cache scale factors (packed FP4 caches) after the
# multi-item inputs. Both argument lists are declared; the launcher binds the one the module states (FA2_*S
# tuples). The 0.7 additions default to 0.6.3's behaviour (no promise of uniform query lengths, no scale factors).
# FA3 and single prefill are unchanged where they exist (0.7.x prebuilds no single prefill module).

Params = Param | tuple[str, str]  # a declared parameter, or (name, wire type)
_PLAN_PARAMS: list[Params] = [
    *tensors("float_workspace_buffer", "int_workspace_buffer", "page_locked_int_workspace_buffer"),
    *tensors("qo_indptr", "kv_indptr", "kv_len_arr"),
    ("total_num_rows", INT),
    ("batch_size", INT),
    ("num_qo_heads", INT),
    ("num_kv_heads", INT),
    ("page_size", INT),
    ("enable_cuda_graph", BOOL),
    ("head_dim_qk", INT),
    ("head_dim_vo", INT),
    ("causal", BOOL),
    ("window_left", INT),
]
_FA2_SPLIT: list[Params] = [
    Param("fixed_split_size", INT, default=-1),
    Param("disable_split_kv", BOOL, default=False),
    Param("num_colocated_ctas", INT, default=0),
]
FA2_PLAN = declare("plan", [*_PLAN_PARAMS, *_FA2_SPLIT], returns=ARRAY, release="0.6.3")
# uniform_q_len: 0 = no promise; n > 0 = every request has n query rows (the CUDA-graph planner sizes tiles for it)
FA2_PLAN_072 = declare(
    "plan", [*_PLAN_PARAMS, *_FA2_SPLIT, Param("uniform_q_len", INT, default=0)], returns=ARRAY, release="0.7.2"
)
FA3_PLAN = declare("plan", _PLAN_PARAMS, returns=ARRAY, release="0.6.3, 0.7.2")
FA3_FP8_PLAN = declare("plan", _PLAN_PARAMS, returns=ARRAY, release="0.6.3")  # FA3's plan; the 0.6.3 FP8 wheel's

# The run parameters shared with the sink modules (:mod:`.sink` builds its runs on them): public for that.
RUN_HEAD: list[Params] = [
    *tensors("float_workspace_buffer", "int_workspace_buffer"),
    ("plan_info_vec", ARRAY),
    tensor("q"),
]
RAGGED_KV: list[Params] = [tensor("k"), tensor("v"), tensor("qo_indptr"), tensor("kv_indptr")]
PAGED_KV: list[Params] = [*tensors("k_cache", "v_cache", "qo_indptr", "kv_indptr", "kv_indices", "kv_last_page_len")]
RUN_MID: list[Params] = [
    tensor("out", output=True),
    optional_tensor("lse", output=True),
    ("mask_mode_code", INT),
    ("kv_layout_code", INT),
    ("window_left", INT),
    ("enable_pdl", BOOL),
]
# multi-item scoring inputs: fi_ffi does not expose them (always None / 0)
_ITEMS: list[Params] = [
    Param("maybe_prefix_len_ptr", OPT_FFI_TENSOR, default=None),
    Param("maybe_token_pos_in_items_ptr", OPT_FFI_TENSOR, default=None),
    Param("maybe_max_item_len_ptr", OPT_FFI_TENSOR, default=None),
]
# 0.7: per-block scale factors of packed FP4 K/V caches (uint8); fi_ffi selects no FP4 cache module: always None
_CACHE_SF: list[Params] = [
    Param("maybe_k_cache_sf", OPT_FFI_TENSOR, default=None),
    Param("maybe_v_cache_sf", OPT_FFI_TENSOR, default=None),
]
_FA2_INPUTS: list[Params] = [
    Param("custom_mask", OPT_FFI_TENSOR),
    Param("mask_indptr", OPT_FFI_TENSOR),
    Param("alibi_slopes", OPT_FFI_TENSOR),
    *_ITEMS,
]
_FA2_SCALARS: list[Params] = [
    ("logits_soft_cap", FLOAT),
    ("sm_scale", FLOAT),
    ("rope_rcp_scale", FLOAT),
    ("rope_rcp_theta", FLOAT),
    Param("token_pos_in_items_len", INT, default=0),
]
_FA3_TAIL: list[Params] = [
    *_ITEMS,
    Param("maybe_scale_v", OPT_FFI_TENSOR, default=None),
    ("logits_soft_cap", FLOAT),
    ("sm_scale", FLOAT),
    Param("scale_v_scalar", FLOAT, default=1.0),
    Param("token_pos_in_items_len", INT, default=0),
]
FA2_RAGGED = declare("ragged_run", [*RUN_HEAD, *RAGGED_KV, *RUN_MID, *_FA2_INPUTS, *_FA2_SCALARS], release="0.6.3")
FA2_PAGED = declare("paged_run", [*RUN_HEAD, *PAGED_KV, *RUN_MID, *_FA2_INPUTS, *_FA2_SCALARS], release="0.6.3")
FA2_RAGGED_072 = declare(
    "ragged_run", [*RUN_HEAD, *RAGGED_KV, *RUN_MID, *_FA2_INPUTS, *_CACHE_SF, *_FA2_SCALARS], release="0.7.2"
)
FA2_PAGED_072 = declare(
    "paged_run", [*RUN_HEAD, *PAGED_KV, *RUN_MID, *_FA2_INPUTS, *_CACHE_SF, *_FA2_SCALARS], release="0.7.2"
)
FA3_RAGGED = declare("ragged_run", RUN_HEAD + RAGGED_KV + RUN_MID + _FA3_TAIL, release="0.6.3, 0.7.2")
FA3_PAGED = declare("paged_run", RUN_HEAD + PAGED_KV + RUN_MID + _FA3_TAIL, release="0.6.3, 0.7.2")
# FA3 FP8 (e4m3/e5m2 q, k, v; 16-bit out): FlashInfer's ``DefaultFP8Attention`` variant takes no multi-item inputs and
# no soft cap, but dequantization scales of q, k and v: an optional float32 tensor of one scale per head (q: per query
# head, k/v: per KV head), else the scalar. The kernel multiplies the logits by scale_q * scale_k * sm_scale and the
# output by scale_v (flashinfer/attention/hopper/variants.cuh ``StandardFP8Attention``). fi_ffi passes the scalars
# (per-tensor scales, as flashinfer-python's float arguments do) and no tensors.
_FA3_FP8_TAIL: list[Params] = [
    Param("maybe_scale_q", OPT_FFI_TENSOR, default=None),
    Param("maybe_scale_k", OPT_FFI_TENSOR, default=None),
    Param("maybe_scale_v", OPT_FFI_TENSOR, default=None),
    ("sm_scale", FLOAT),
    Param("scale_q_scalar", FLOAT, default=1.0),
    Param("scale_k_scalar", FLOAT, default=1.0),
    Param("scale_v_scalar", FLOAT, default=1.0),
]
FA3_FP8_RAGGED = declare("ragged_run", RUN_HEAD + RAGGED_KV + RUN_MID + _FA3_FP8_TAIL, release="0.6.3")
FA3_FP8_PAGED = declare("paged_run", RUN_HEAD + PAGED_KV + RUN_MID + _FA3_FP8_TAIL, release="0.6.3")
SINGLE = declare(
    "run",
    [
        *tensors("q", "k", "v"),
        *tensors("tmp", "out", output=True),
        optional_tensor("lse", output=True),
        ("mask_mode_code", INT),
        ("kv_layout_code", INT),
        ("window_left", INT),
        Param("custom_mask", OPT_FFI_TENSOR),
        Param("alibi_slopes", OPT_FFI_TENSOR),
        ("logits_soft_cap", FLOAT),
        ("sm_scale", FLOAT),
        ("rope_rcp_scale", FLOAT),
        ("rope_rcp_theta", FLOAT),
    ],
    release="0.6.3",
)
# one entry point, both releases: the launcher binds the declaration the module's own signature matches
FA2_PLANS = (FA2_PLAN, FA2_PLAN_072)
FA2_RAGGED_RUNS = (FA2_RAGGED, FA2_RAGGED_072)
FA2_PAGED_RUNS = (FA2_PAGED, FA2_PAGED_072)
_FA2_URI = r"batch_prefill_with_kv_cache_.*_f16qk_(True|False)"  # the 0.6.x FA2 names (untagged)
_FA2_URI_072 = _FA2_URI + "_kv_stride_equal"  # 0.7.x (the default paged-KV stride mode)
_FA3_URI = r"batch_prefill_with_kv_cache_dtype_q_(f16|bf16)_.*_sm90"  # 16-bit q
_FA3_FP8_URI = r"batch_prefill_with_kv_cache_dtype_q_(e4m3|e5m2)_.*_sm90"  # FP8 q, k, v (the plan is FA3's)
# (module URI pattern, declaration) of every release; tests/launch/test_declarations.py checks each against every module
# of the releases its ``release`` names that the pattern matches
DECLARATIONS = (
    (_FA2_URI, FA2_PLAN),
    (_FA2_URI, FA2_RAGGED),
    (_FA2_URI, FA2_PAGED),
    (_FA2_URI_072, FA2_PLAN_072),
    (_FA2_URI_072, FA2_RAGGED_072),
    (_FA2_URI_072, FA2_PAGED_072),
    (_FA3_URI, FA3_PLAN),
    (_FA3_URI, FA3_RAGGED),
    (_FA3_URI, FA3_PAGED),
    (_FA3_FP8_URI, FA3_FP8_PLAN),
    (_FA3_FP8_URI, FA3_FP8_RAGGED),
    (_FA3_FP8_URI, FA3_FP8_PAGED),
    (r"single_prefill_with_kv_cache_.*", SINGLE),
)


@op()
def pack_custom_mask(masks: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
    """Pack per-request boolean masks into the kernels' bit layout, on the host.

    Args:
        masks: a sequence with one boolean array ``[qo_len_i, kv_len_i]`` per request (True = attend): numpy
            bool arrays, nested lists of bools, or host array producers of dtype bool.

    Returns:
        ``(packed, mask_indptr)``: uint8 bytes (each request's ``qo_len * kv_len`` bits, row-major, little bit
        order, padded to a byte) and int32 ``[batch + 1]`` byte offsets of each request. Copy both to the
        device for :func:`batch_prefill_ragged_plan` / :func:`batch_prefill_paged_plan` (``custom_mask``,
        ``mask_indptr``); :func:`single_prefill` takes ``packed`` of a single mask. Masks already on the
        device: :func:`pack_custom_mask_device`.

    Raises:
        TypeError: ``masks`` is not a sequence, or a mask is not boolean (compare it, e.g. ``mask > 0``).
        ValueError: a mask is not 2-D.
    """
    if isinstance(masks, (str, bytes)) or (not isinstance(masks, Sequence) and not isinstance(masks, np.ndarray)):
        raise TypeError(f"masks: expected a sequence of boolean [qo_len, kv_len] arrays, got {type(masks).__name__}")
    parts = []
    for i, m in enumerate(masks):
        try:
            arr = np.asarray(m)
        except Exception as exc:  # a device tensor, an object numpy cannot read
            raise TypeError(f"masks[{i}]: expected a host boolean array, got {type(m).__name__} ({exc})") from None
        if arr.dtype != np.bool_:
            raise TypeError(
                f"masks[{i}]: expected a boolean array (True = attend), got dtype {arr.dtype}; pass e.g. mask > 0"
            )
        if arr.ndim != 2:
            raise ValueError(f"masks[{i}]: expected a 2-D [qo_len, kv_len] mask, got shape {arr.shape}")
        parts.append(np.packbits(arr.reshape(-1), bitorder="little"))
    indptr = np.zeros(len(parts) + 1, np.int64)
    indptr[1:] = np.cumsum([p.size for p in parts])
    if indptr[-1] >= 1 << 31:
        raise ValueError(f"masks: {int(indptr[-1])} packed bytes do not fit the kernels' int32 offsets")
    packed = np.concatenate(parts) if parts else np.zeros(0, np.uint8)
    return packed.astype(np.uint8), indptr.astype(np.int32)


@op()
def pack_custom_mask_device(
    mask: TensorLike, indptr: TensorLike, *, out: TensorT, output_indptr: TensorT, stream: StreamLike = None
) -> tuple[TensorT, TensorT]:
    """Pack masks already on the GPU into the kernels' bit layout (``segment_packbits``, little bit order).

    Args:
        mask: bool ``[sum(qo_len_i * kv_len_i)]`` on a CUDA device: each request's ``[qo_len, kv_len]`` mask
            flattened row-major, requests one after another.
        indptr: int32 ``[batch + 1]`` on the device: element offsets of each request's mask in ``mask``.
        out: uint8 ``[output_indptr[-1]]`` on the device, written: the packed bytes (``custom_mask`` of the plans).
        output_indptr: int32 ``[batch + 1]`` on the device with the byte offsets of each packed request
            (``mask_indptr`` of the plans); compute it on the host with
            :func:`fi_ffi.segment_packbits_indptr` from the host copy of ``indptr`` and copy it over.
        stream: where the kernel runs (None: the framework's current stream of ``mask``).

    Returns:
        ``(out, output_indptr)``, as passed. Asynchronous: nothing is copied back.

    Raises:
        TypeError, ValueError: a tensor of the wrong shape, dtype or device, named (by ``segment_packbits``'s
            checks, before its module is looked up).
        LoaderError: the quantization module cannot be loaded.
        KernelError: the kernel failed.
    """
    from ..quantization import segment_packbits

    try:
        return segment_packbits(mask, indptr, "little", output_indptr=output_indptr, out=out, stream=stream)
    except (TypeError, ValueError) as err:  # segment_packbits calls the mask x; this op's callers know it as mask
        text = str(err)
        if not text.startswith("x: "):
            raise
        raise type(err)(f"mask: {text[3:]}") from None


# ------------------------------------------------------------------------------------------ single prefill

# (layout keys of q, k, v, out; pos_encoding, window, cap, fp16 qk) -> (launch, head_dim_qk, empty tmp): values only
_single: dict[tuple[Any, ...], tuple[Any, int, Tensor]] = {}
_single_lock = threading.Lock()
_MAX_SINGLE = 1024


@op(flashinfer="flashinfer.prefill.single_prefill_with_kv_cache")
def single_prefill(
    q: TensorLike,
    k: TensorLike,
    v: TensorLike,
    *,
    out: TensorT,
    tmp: TensorLike | None = None,
    lse: TensorLike | None = None,
    packed_custom_mask: TensorLike | None = None,
    causal: bool = False,
    kv_layout: KVLayout = "NHD",
    pos_encoding_mode: PosEncodingMode = "NONE",
    use_fp16_qk_reduction: bool = False,
    sm_scale: float | None = None,
    window_left: int = -1,
    logits_soft_cap: float | None = 0.0,
    rope_scale: float | None = 1.0,
    rope_theta: float | None = 1e4,
    alibi_slopes: TensorLike | None = None,
    stream: StreamLike = None,
) -> TensorT:
    """Prefill attention of one request (FA2 module).

    flashinfer-python's ``single_prefill_with_kv_cache(q, k, v, ...)`` with its keywords, writing into ``out``
    (fi_ffi allocates nothing: no unpacked ``custom_mask`` (pack it with :func:`pack_custom_mask`), no FP8
    ``scale_q``/``scale_k``/``scale_v``, ``lse`` in place of ``return_lse``).

    Args:
        q: ``[qo_len, num_qo_heads, head_dim_qk]``; last dim contiguous, dims 0 and 1 may be strided.
        k: NHD ``[kv_len, num_kv_heads, head_dim_qk]`` or HND ``[num_kv_heads, kv_len, head_dim_qk]``; last dim
            contiguous.
        v: like ``k`` with ``head_dim_vo``; same dtype as ``k``.
        out: ``[qo_len, num_qo_heads, head_dim_vo]``, contiguous (written densely); its dtype selects the module.
        tmp: uint8 1-D device scratch for splitting long KV (upstream: 32 MiB); None: never split.
        lse: optional float32 ``[qo_len, num_qo_heads]``.
        packed_custom_mask: uint8 device ``[>= ceil(qo_len * kv_len / 8)]`` packed bits (:func:`pack_custom_mask`),
            passed to the kernel as a TVM-FFI Tensor made for this call.
        causal: causal mask aligned to the end of the KV (a custom mask replaces it: pass one or the other).
        kv_layout: ``"NHD"`` or ``"HND"``.
        pos_encoding_mode, window_left, logits_soft_cap, use_fp16_qk_reduction: select the module.
        sm_scale: default ``1 / sqrt(head_dim_qk)``; rope_scale, rope_theta: RoPE parameters (None: 1.0, 1e4).
        alibi_slopes: float32 ``[num_qo_heads]`` with ALIBI.
        stream: where the kernel runs.

    Returns:
        ``out``.

    Raises:
        TypeError, ValueError: an argument of the wrong type, shape, dtype or value, named, before any module is
            looked up.
        KernelNotFoundError: no pinned module for these dtypes, head dims and options.
        LoaderError: the module cannot be loaded (the kernel wheel absent offline, a damaged cache).
        KernelError: the kernel failed.
    """
    custom_mask = packed_custom_mask
    pos_encoding = pos_encoding_mode
    layout = LAYOUTS.get(kv_layout) if kv_layout.__class__ is str else None
    if layout is None:
        layout = LAYOUTS[S.layout_name(kv_layout)]
    if causal is not False and causal is not True:
        causal = checks.flag("causal", causal)
    if custom_mask is not None and causal:
        raise ValueError("causal: a custom mask replaces the causal mask; pass causal=False with packed_custom_mask")
    pos = POS_NONE if pos_encoding.__class__ is str and pos_encoding == "NONE" else S.pos_encoding(pos_encoding)
    w = window_left if window_left.__class__ is int and -1 <= window_left < 1 << 31 else S.window(window_left)
    cap = 0.0 if logits_soft_cap.__class__ is float and logits_soft_cap == 0.0 else S.soft_cap(logits_soft_cap)
    f16qk = (
        use_fp16_qk_reduction
        if use_fp16_qk_reduction.__class__ is bool
        else checks.flag("use_fp16_qk_reduction", use_fp16_qk_reduction)
    )
    if (pos == POS_ALIBI) != (alibi_slopes is not None):
        raise alibi_error(pos)
    key = (
        layout_key("q", q, stream),
        layout_key("k", k, stream),
        layout_key("v", v, stream),
        layout_key("out", out, stream),
        pos,
        w >= 0,
        cap > 0,
        f16qk,
    )
    found = _single.get(key)
    if found is None:
        rest = (tmp, lse, mode_of(custom_mask, causal), layout, w, custom_mask, alibi_slopes, sm_scale, rope_scale,
                rope_theta)  # fmt: skip
        found = _single_variant(q, k, v, out, key, rest)
    launch, dqk, no_tmp = found
    sm, rs, rt = S.scales(dqk, sm_scale, rope_scale, rope_theta)
    mode = mode_of(custom_mask, causal)
    launch(
        q,
        k,
        v,
        no_tmp if tmp is None else tmp,
        out,
        lse,
        mode,
        layout,
        w,
        custom_mask,
        alibi_slopes,
        cap,
        sm,
        1.0 / rs,
        1.0 / rt,
        stream=stream,
    )
    return out


def mode_of(custom_mask: Any, causal: bool) -> int:
    """The mask mode code of a single prefill call."""
    return MASK_CUSTOM if custom_mask is not None else (MASK_CAUSAL if causal else MASK_NONE)


def _single_variant(
    q: Any, k: Any, v: Any, out: Any, key: tuple[Any, ...], rest: tuple[Any, ...]
) -> tuple[Any, int, Tensor]:
    """The module of a single prefill call (dtypes and head dims of q, k, v, out), remembered by value.

    ``rest`` is the call's other arguments (tmp, lse, mask mode, layout code, window, custom mask, ALiBi slopes,
    sm_scale, rope_scale, rope_theta): the whole call is checked before the module is looked up (which may fetch
    the kernel wheel)."""
    qt, kt, vt, ot = (checks.tensor(n, x) for n, x in (("q", q), ("k", k), ("v", v), ("out", out)))
    kv_text = "NHD [kv_len, num_kv_heads, head_dim] or HND [num_kv_heads, kv_len, head_dim]"
    for name, t, text in (("q", qt, "[qo_len, num_qo_heads, head_dim_qk]"), ("k", kt, kv_text), ("v", vt, kv_text)):
        if t.ndim != 3:
            raise ValueError(f"{name}: expected a 3-D tensor {text}, got shape {t.shape}")
    if not qt.device.is_cuda:
        raise ValueError(f"q: expected a CUDA device tensor, got one on {qt.device}")
    dqk, dvo = qt.shape[2], vt.shape[2]
    if dqk == 0 or dvo == 0:
        raise ValueError(
            f"{'q' if dqk == 0 else 'v'}: head_dim (the last dimension) must be > 0, got shape "
            f"{(qt if dqk == 0 else vt).shape}"
        )
    want = (qt.shape[0], qt.shape[1], dvo)
    if ot.shape != want:  # before the module is looked up: out's head dim is v's
        raise ValueError(
            f"out: expected shape [{want[0]}, {want[1]}, {want[2]}] ([qo_len, num_qo_heads, head_dim_vo]),"
            f" got {ot.shape}"
        )
    for name, t in (("q", qt), ("k", kt), ("out", ot)):
        check_module_dtype(name, t)
    tmp, lse, mode, layout, w, custom_mask, alibi_slopes, sm_scale, rope_scale, rope_theta = rest
    S.scales(dqk, sm_scale, rope_scale, rope_theta)
    _check_single(
        SimpleNamespace(
            q=qt,
            k=kt,
            v=vt,
            out=ot,
            tmp=empty(uint8, qt.device) if tmp is None else checks.tensor("tmp", tmp),
            lse=None if lse is None else checks.tensor("lse", lse),
            mask_mode_code=mode,
            kv_layout_code=layout,
            window_left=w,
            custom_mask=None if custom_mask is None else checks.tensor("packed_custom_mask", custom_mask),
            alibi_slopes=None if alibi_slopes is None else checks.tensor("alibi_slopes", alibi_slopes),
        )
    )
    pos, swa, cap, f16qk = key[4:]
    _, uri = variant_uri(SINGLE_PREFILL, qt.dtype, kt.dtype, ot.dtype, None, dqk, dvo, pos, swa, cap, f16qk)
    found = (launcher(SINGLE, uri, _check_single), dqk, empty(uint8, qt.device))
    with _single_lock:
        if len(_single) >= _MAX_SINGLE:
            _single.clear()
        _single[key] = found
    return found


def _check_single(a: SimpleNamespace) -> PointerRules:
    """The contract of a single prefill call."""
    q, k, v, out = a.q, a.k, a.v, a.out
    if q.ndim != 3:
        raise ValueError(f"q: expected a 3-D tensor [qo_len, num_qo_heads, head_dim_qk], got shape {q.shape}")
    if not q.device.is_cuda:
        raise ValueError(f"q: expected a CUDA device tensor, got one on {q.device}")
    dev = q.device
    qo_len, hq, dqk = q.shape
    rules = PointerRules()
    AC.device_tensor(rules, "q", q, (qo_len, hq, dqk), "[qo_len, num_qo_heads, head_dim_qk]", None, dev)
    nhd = a.kv_layout_code == LAYOUTS["NHD"]
    text = "NHD [kv_len, num_kv_heads, head_dim]" if nhd else "HND [num_kv_heads, kv_len, head_dim]"
    AC.device_tensor(rules, "k", k, (None, None, dqk), text, None, dev)
    if v.ndim != 3:
        raise ValueError(f"v: expected shape {text}, got {v.shape}")
    AC.device_tensor(rules, "v", v, (k.shape[0], k.shape[1], None), text, k.dtype, dev)
    hk, kv_len = (k.shape[1], k.shape[0]) if nhd else (k.shape[0], k.shape[1])
    if hk == 0:
        raise ValueError(f"k: expected at least one KV head, got shape {k.shape}")
    S.gqa(hq, hk, decode=False, where=f"k (shape {k.shape} read as kv_layout {text})")
    for name, t in (("q", q), ("k", k), ("v", v)):
        AC.strides_u32(name, t)
    AC.device_tensor(
        rules, "out", out, (qo_len, hq, v.shape[2]), "[qo_len, num_qo_heads, head_dim_vo]", None, dev, contiguous=True
    )
    check_tmp(a.tmp, dev, kv_len, qo_len, hq, hk, v.shape[2], out.dtype.itemsize, prefill=True)
    AC.scratch(rules, "tmp", a.tmp)
    AC.lse_tensor("lse", a.lse, (qo_len, hq), dev)
    mask = a.custom_mask
    if mask is not None:
        AC.vector("packed_custom_mask", mask, "uint8", None, dev)
        need = -(-(qo_len * kv_len) // 8)
        if mask.shape[0] < need:
            raise ValueError(
                f"packed_custom_mask: expected at least {need} bytes (qo_len * kv_len bits), got {mask.shape[0]}"
            )
    AC.vector("alibi_slopes", a.alibi_slopes, "float32", hq, dev)
    return AC.outputs_apart(rules, ("custom_mask", "alibi_slopes"))


caches.register("single prefill modules (by layout values)", _single.clear)


# ------------------------------------------------------------------------------------------ batch prefill plans


@op(flashinfer="flashinfer.prefill.BatchPrefillWithRaggedKVCacheWrapper.plan")
def batch_prefill_ragged_plan(
    qo_indptr: IndexLike,
    kv_indptr: IndexLike,
    num_qo_heads: int,
    num_kv_heads: int,
    head_dim_qk: int,
    head_dim_vo: int | None = None,
    *,
    workspace: Workspace,
    packed_custom_mask: TensorLike | None = None,
    mask_indptr: TensorLike | None = None,
    causal: bool = False,
    pos_encoding_mode: PosEncodingMode = "NONE",
    use_fp16_qk_reduction: bool = False,
    window_left: int = -1,
    logits_soft_cap: float | None = 0.0,
    sm_scale: float | None = None,
    rope_scale: float | None = 1.0,
    rope_theta: float | None = 1e4,
    q_data_type: AttentionDType = "float16",
    kv_data_type: AttentionDType | None = None,
    o_data_type: AttentionDType | None = None,
    fixed_split_size: int | None = None,
    disable_split_kv: bool = False,
    kv_layout: KVLayout = "NHD",
    alibi_slopes: TensorLike | None = None,
    backend: AttentionBackend = "auto",
    enable_cuda_graph: bool = False,
    max_total_num_rows: int | None = None,
    uniform_q_len: int | None = None,
    stream: StreamLike = None,
) -> Plan:
    """Plan batch prefill over ragged K/V: request ``i``'s keys are rows ``kv_indptr[i]:kv_indptr[i+1]``.

    flashinfer-python's ``BatchPrefillWithRaggedKVCacheWrapper(workspace, kv_layout, backend=...).plan(qo_indptr,
    kv_indptr, num_qo_heads, num_kv_heads, head_dim_qk, head_dim_vo, ...)`` as a function of the workspace
    (docs/porting.md): its keywords, less an unpacked ``custom_mask`` (fi_ffi takes the packed bits and their
    offsets, :func:`pack_custom_mask`); ``kv_layout``, ``backend`` and CUDA-graph mode are keywords here.

    Args:
        workspace: the :class:`~fi_ffi.ops.attention.workspace.Workspace` of this plan and its runs.
        qo_indptr: host int32 ``[batch + 1]``: request ``i``'s query rows are ``qo_indptr[i]:qo_indptr[i+1]``.
        kv_indptr: host int32 ``[batch + 1]``, in tokens.
        num_qo_heads, num_kv_heads: heads (``num_qo_heads`` a multiple of ``num_kv_heads``).
        head_dim_qk, head_dim_vo: head dims (vo defaults to qk).
        packed_custom_mask, mask_indptr: a custom mask (uint8 device packed bits and int32 device ``[batch + 1]``
            byte offsets, :func:`pack_custom_mask`); FA2 only. The plan refers to them until released and
            passes them to every run.
        causal: causal mask (per request, aligned to the end of its KV).
        pos_encoding_mode, window_left, logits_soft_cap, use_fp16_qk_reduction: select the module.
        sm_scale: default ``1 / sqrt(head_dim_qk)``; rope_scale, rope_theta: RoPE parameters (None: 1.0, 1e4).
        q_data_type, kv_data_type, o_data_type: element types, names or dtype objects (kv and o default to q's).
        fixed_split_size, disable_split_kv: FA2 split-KV controls (deterministic reductions); ignored by FA3.
            With ``enable_cuda_graph`` on a module of FlashInfer before 0.7.2 they are refused (ValueError): that
            planner masks a CUDA-graph launch's padding blocks only when it splits, so an unsplit schedule's
            padding blocks would read stale indices.
        kv_layout: ``"NHD"`` (``[nnz_kv, kv_heads, d]``) or ``"HND"`` (``[kv_heads, nnz_kv, d]``; FA2 only).
        alibi_slopes: float32 ``[num_qo_heads]`` with ALIBI (referred to by the plan, like the mask).
        backend: ``"auto"``, ``"fa2"`` or ``"fa3"``.
        enable_cuda_graph: plan for runs captured in a CUDA graph; ``max_total_num_rows`` then bounds the rows
            of every later plan replayed into the same graph (default ``qo_indptr[-1]``).
        uniform_q_len: a promise that every request has exactly this many query rows (``qo_indptr`` is checked
            against it), which FlashInfer >= 0.7's FA2 planner uses to size the query tiles of CUDA-graph plans
            (``enable_cuda_graph=True``; every later plan replayed into the graph must keep it). None or 0: no
            promise. Ignored by FA3 (as upstream); refused by name on a FlashInfer 0.6.3 FA2 module, which has
            no such argument.
        stream: the stream of the plan's asynchronous copy; runs must use the same stream.

    Returns:
        the :class:`~fi_ffi.ops.attention.plan.Plan`; earlier plans on ``workspace`` become stale.

    Raises:
        TypeError, ValueError: an argument of the wrong type or value, named, before any module is looked up (an
            index list's dtype, length, order; a head count, dtype, layout, mask, position encoding, scale); a
            split-KV control that the bound module cannot honour in CUDA-graph mode, named, before the plan call.
        KernelNotFoundError: no pinned module for these settings (names the closest ones).
        UnsupportedDeviceError: ``backend="fa3"`` on a GPU that is not SM 9.x.
        LoaderError: the module cannot be loaded (the kernel wheel absent offline, a damaged cache).
    """
    custom_mask, pos_encoding = packed_custom_mask, pos_encoding_mode
    q_dtype, kv_dtype, o_dtype = q_data_type, kv_data_type, o_data_type
    return _plan(
        "ragged",
        workspace,
        qo_indptr,
        kv_indptr,
        None,
        max_total_num_rows,
        uniform_q_len,
        stream,
        (custom_mask, mask_indptr, alibi_slopes),
        None,
        (
            num_qo_heads,
            num_kv_heads,
            head_dim_qk,
            1,
            head_dim_vo,
            q_dtype,
            kv_dtype,
            o_dtype,
            kv_layout,
            causal,
            custom_mask is not None,
            pos_encoding,
            window_left,
            logits_soft_cap,
            sm_scale,
            rope_scale,
            rope_theta,
            use_fp16_qk_reduction,
            backend,
            enable_cuda_graph,
            fixed_split_size,
            disable_split_kv,
        ),
    )


@op(flashinfer="flashinfer.prefill.BatchPrefillWithPagedKVCacheWrapper.plan")
def batch_prefill_paged_plan(
    qo_indptr: IndexLike,
    paged_kv_indptr: IndexLike,
    paged_kv_indices: IndexLike | None,
    paged_kv_last_page_len: IndexLike,
    num_qo_heads: int,
    num_kv_heads: int,
    head_dim_qk: int,
    page_size: int,
    head_dim_vo: int | None = None,
    *,
    workspace: Workspace,
    packed_custom_mask: TensorLike | None = None,
    mask_indptr: TensorLike | None = None,
    causal: bool = False,
    pos_encoding_mode: PosEncodingMode = "NONE",
    use_fp16_qk_reduction: bool = False,
    sm_scale: float | None = None,
    window_left: int = -1,
    logits_soft_cap: float | None = 0.0,
    rope_scale: float | None = 1.0,
    rope_theta: float | None = 1e4,
    q_data_type: AttentionDType = "float16",
    kv_data_type: AttentionDType | None = None,
    o_data_type: AttentionDType | None = None,
    fixed_split_size: int | None = None,
    disable_split_kv: bool = False,
    kv_layout: KVLayout = "NHD",
    alibi_slopes: TensorLike | None = None,
    backend: AttentionBackend = "auto",
    enable_cuda_graph: bool = False,
    max_total_num_rows: int | None = None,
    uniform_q_len: int | None = None,
    stream: StreamLike = None,
) -> Plan:
    """Plan batch prefill over a paged KV cache.

    flashinfer-python's ``BatchPrefillWithPagedKVCacheWrapper(...).plan(qo_indptr, paged_kv_indptr,
    paged_kv_indices, paged_kv_last_page_len, num_qo_heads, num_kv_heads, head_dim_qk, page_size, ...)``; the
    other arguments are those of :func:`batch_prefill_ragged_plan`, and:

    Args:
        paged_kv_indptr: host int32 ``[batch + 1]`` in **pages**: request ``i`` owns
            ``kv_indices[paged_kv_indptr[i]:paged_kv_indptr[i+1]]``.
        paged_kv_indices: host int32 page ids ``[>= paged_kv_indptr[-1]]``, checked if given (>= 0); None: not
            checked. The run takes the device copy (``kv_indices``).
        paged_kv_last_page_len: host int32 ``[batch]``: tokens in each request's last page (1..page_size; 0 for
            a request without pages). FA3 plans from the resulting lengths; the run takes the device copy.
        page_size: tokens per page.
        kv_layout: NHD ``[pages, page_size, kv_heads, d]`` or HND ``[pages, kv_heads, page_size, d]``.

    Returns:
        the :class:`~fi_ffi.ops.attention.plan.Plan`; earlier plans on ``workspace`` become stale.

    Raises:
        TypeError, ValueError: an argument of the wrong type or value, named, before any module is looked up (an
            index list's dtype, length, order; a head count, dtype, layout, mask, position encoding, scale); a
            split-KV control that the bound module cannot honour in CUDA-graph mode, named, before the plan call.
        KernelNotFoundError: no pinned module for these settings (names the closest ones).
        UnsupportedDeviceError: ``backend="fa3"`` on a GPU that is not SM 9.x.
        LoaderError: the module cannot be loaded (the kernel wheel absent offline, a damaged cache).
    """
    custom_mask, pos_encoding = packed_custom_mask, pos_encoding_mode
    q_dtype, kv_dtype, o_dtype = q_data_type, kv_data_type, o_data_type
    return _plan(
        "paged",
        workspace,
        qo_indptr,
        paged_kv_indptr,
        paged_kv_last_page_len,
        max_total_num_rows,
        uniform_q_len,
        stream,
        (custom_mask, mask_indptr, alibi_slopes),
        paged_kv_indices,
        (
            num_qo_heads,
            num_kv_heads,
            head_dim_qk,
            page_size,
            head_dim_vo,
            q_dtype,
            kv_dtype,
            o_dtype,
            kv_layout,
            causal,
            custom_mask is not None,
            pos_encoding,
            window_left,
            logits_soft_cap,
            sm_scale,
            rope_scale,
            rope_theta,
            use_fp16_qk_reduction,
            backend,
            enable_cuda_graph,
            fixed_split_size,
            disable_split_kv,
        ),
    )


def plan_lengths(
    mode: str, qo_indptr: Any, kv_indptr: Any, kv_indices: Any, kv_last_page_len: Any, page_size: Any
) -> tuple[Any, int, int, Any, int, Any]:
    """A batch prefill plan's host arrays, checked: ``(qo, rows, batch_size, kv, kv_extent, kv_lens)``.

    ``qo``/``kv``: the indptr arrays (``kv`` counts pages in ``"paged"`` mode, tokens in ``"ragged"``); ``rows``:
    ``qo[-1]``; ``kv_extent``: ``kv[-1]``; ``kv_lens``: each request's KV length in tokens (int32 ``[batch_size]``,
    from ``kv_last_page_len`` and ``page_size`` in paged mode). ``kv_indices`` (paged, optional) is checked
    against the extent.
    """
    qo = host_array("qo_indptr", qo_indptr)
    rows = check_indptr("qo_indptr", qo)
    batch = qo.shape[0] - 1
    kv_name = "paged_kv_indptr" if mode == "paged" else "kv_indptr"
    kv = host_array(kv_name, kv_indptr)
    extent = check_indptr(kv_name, kv, batch)
    if mode != "paged":
        return qo, rows, batch, kv, extent, kv[1:] - kv[:-1]
    if kv_indices is not None:
        check_indices("paged_kv_indices", host_array("paged_kv_indices", kv_indices), extent)
    if kv_last_page_len is None:
        raise ValueError("paged_kv_last_page_len: required for a paged plan (host int32 [batch_size])")
    last = host_array("paged_kv_last_page_len", kv_last_page_len)
    kv_lens = check_last_page_len("paged_kv_last_page_len", last, kv, S.count("page_size", page_size), lengths=True)
    assert kv_lens is not None
    return qo, rows, batch, kv, extent, kv_lens


def call_prefill_plan(
    ws: Workspace,
    s: PlanSettings,
    stream: Any,
    qo: Any,
    kv: Any,
    kv_lens: Any,
    total_rows: int,
    batch: int,
    extra: dict[str, Any],
) -> tuple[Any, int]:
    """The batch prefill plan call of settings ``s`` on ``ws`` (arrays from :func:`plan_lengths`; ``total_rows``:
    the rows the schedule covers; ``extra``: the FA2 planner's keyword arguments): ``(info, generation)`` as
    :func:`~.plan_call.call_plan` returns them."""
    return call_plan(
        ws,
        s.plan,
        stream,
        ws.float_buffer,
        ws.int_buffer,
        ws.pinned_buffer,
        host_tensor(qo),
        host_tensor(kv),
        host_tensor(kv_lens),
        total_rows,
        batch,
        s.num_qo_heads,
        s.num_kv_heads,
        s.page_size,
        s.enable_cuda_graph,
        s.head_dim_qk,
        s.head_dim_vo,
        s.mask_mode == MASK_CAUSAL,
        s.window_left,
        **extra,
    )


def _plan(
    mode: str,
    workspace: Workspace,
    qo_indptr: Any,
    kv_indptr: Any,
    kv_last_page_len: Any,
    max_total_num_rows: Any,
    uniform_q_len: Any,
    stream: Any,
    inputs: tuple[Any, Any, Any],
    kv_indices: Any,
    args: tuple[Any, ...],
) -> Plan:
    """A batch prefill plan: host arrays and the mask's size checked, settings (by value), the plan call."""
    ws = workspace if workspace.__class__ is Workspace else check_workspace(workspace)
    custom_mask, mask_indptr, alibi_slopes = inputs
    alibi_required(args[11], alibi_slopes)
    if (custom_mask is None) != (mask_indptr is None):
        raise ValueError(
            "packed_custom_mask, mask_indptr: pass both (packed bits and per-request byte offsets) or neither"
        )
    # every argument is checked before the settings resolve the module (which may fetch the kernel wheel)
    qo, rows, batch, kv, extent_, kv_lens = plan_lengths(
        mode, qo_indptr, kv_indptr, kv_indices, kv_last_page_len, args[3]
    )
    total_rows = rows
    if max_total_num_rows is not None:
        total_rows = S.count("max_total_num_rows", max_total_num_rows)
        if not checks.flag("enable_cuda_graph", args[19]):
            raise ValueError("max_total_num_rows: only meaningful with enable_cuda_graph=True")
        if total_rows < rows:
            raise ValueError(f"max_total_num_rows: must be >= qo_indptr[-1] = {rows}, got {total_rows}")
    if custom_mask is not None:
        _check_mask(custom_mask, mask_indptr, qo, kv_lens, batch, ws.device)
    if alibi_slopes is not None:
        early_alibi(args[0], alibi_slopes, ws.device)
    if uniform_q_len is not None:
        _uniform_lengths(uniform_q_len, qo)
    device_id = ws.device.device_id
    s = S.cached(
        (BATCH_PREFILL, mode, device_id, args, tuple(map(type, args))), lambda: _settings(mode, device_id, args)
    )
    if alibi_slopes is not None or s.pos_encoding == POS_ALIBI:
        check_alibi(s, alibi_slopes, ws.device)
    if s.enable_cuda_graph and s.backend != "fa3" and (s.disable_split_kv or s.fixed_split_size > 0):
        _check_graph_split(s)
    extra = (
        {} if s.backend == "fa3" else {"fixed_split_size": s.fixed_split_size, "disable_split_kv": s.disable_split_kv}
    )
    if uniform_q_len is not None:
        uniform = _uniform_q_len(uniform_q_len, qo, s)
        if uniform:
            extra["uniform_q_len"] = uniform
    info, generation = call_prefill_plan(ws, s, stream, qo, kv, kv_lens, total_rows, batch, extra)
    return Plan.make(info, ws, generation, s, batch, rows, extent_, inputs)


# The first FlashInfer release whose FA2 prefill planner masks a CUDA-graph launch's padding blocks whether or not
# it splits the keys (before it, the mask exists only for a split schedule).
_GRAPH_MASK_RELEASE = "0.7.2"


def _check_graph_split(s: PlanSettings) -> None:
    """Refuse, before the plan call, a CUDA-graph FA2 prefill plan with split-KV turned off (``disable_split_kv``,
    or a ``fixed_split_size`` that leaves every request in one chunk) on a module older than 0.7.2: its planner
    launches ``padded_batch_size`` blocks but writes their indices only for the real ones and, unsplit, no mask
    telling the others to stop, so the padding blocks read indices an earlier plan left in the workspace and the
    run reads and writes out of bounds (an illegal address that ends the process's CUDA context)."""
    from ...launch.kernels import module_release
    from ...loader.lockfile import release_key

    release = module_release(s.uri)
    if release and release_key(release) >= release_key(_GRAPH_MASK_RELEASE):
        return
    name = "disable_split_kv" if s.disable_split_kv else "fixed_split_size"
    value = "True" if s.disable_split_kv else str(s.fixed_split_size)
    raise ValueError(
        f"{name}: {value} with enable_cuda_graph=True is unsafe on FlashInfer {release or '(release not recorded)'}'s "
        f"FA2 prefill module {s.uri}: its CUDA-graph schedule leaves the padding blocks unmasked unless the keys "
        f"are split, and those blocks read stale indices; keep split-KV on in CUDA-graph mode (disable_split_kv="
        f"False, fixed_split_size=None), plan without enable_cuda_graph, or pin FlashInfer >= {_GRAPH_MASK_RELEASE}"
    )


def _uniform_q_len(value: Any, qo: np.ndarray, s: PlanSettings) -> int:
    """The checked ``uniform_q_len`` promise for the FA2 plan (0 for FA3, which takes none), refused before the
    plan call (which marks the workspace's earlier plans stale) when the bound FA2 module has no such argument."""
    n = _uniform_lengths(value, qo)
    if n == 0:
        return 0
    if s.backend == "fa3":
        return 0  # the FA3 planner has no such hint (flashinfer-python drops it too)
    decl = s.plan.launcher.decl
    if "uniform_q_len" not in decl.names:
        raise ValueError(
            f"uniform_q_len: not supported by the bound module's entry point {s.plan.launcher.name} "
            f"(FlashInfer {decl.release}); pin FlashInfer >= 0.7 for this module, or pass None"
        )
    return n


def _uniform_lengths(value: Any, qo: np.ndarray) -> int:
    """``uniform_q_len`` checked against ``qo_indptr`` (0: no promise), before any module is looked up."""
    n = checks.integer("uniform_q_len", value, 0)
    if n == 0:
        return 0
    lengths = qo[1:] - qo[:-1]
    if lengths.size and not (lengths == n).all():
        i = int(np.argmax(lengths != n))
        raise ValueError(
            f"uniform_q_len: promises {n} query rows per request, but qo_indptr gives request {i} "
            f"{int(lengths[i])}; pass None for batches of mixed lengths"
        )
    return n


def _check_mask(
    custom_mask: Any, mask_indptr: Any, qo: np.ndarray, kv_lens: np.ndarray, batch: int, device: Any
) -> None:
    """The packed mask covers every request's ``qo_len * kv_len`` bits; offsets are int32 ``[batch + 1]``."""
    mask = checks.tensor("packed_custom_mask", custom_mask)
    offsets = checks.tensor("mask_indptr", mask_indptr)
    AC.vector("packed_custom_mask", mask, "uint8", None, device)
    AC.vector("mask_indptr", offsets, "int32", None, device)
    need = int(np.sum(((qo[1:] - qo[:-1]).astype(np.int64) * kv_lens.astype(np.int64) + 7) // 8))
    if mask.shape[0] < need:
        raise ValueError(
            f"packed_custom_mask: expected at least {need} bytes (sum of ceil(qo_len * kv_len / 8)), "
            f"got {mask.shape[0]}"
        )
    if offsets.shape[0] != batch + 1:
        raise ValueError(f"mask_indptr: expected {batch + 1} entries ([batch_size + 1]), got {offsets.shape[0]}")


def _settings(mode: str, device_id: int, args: tuple[Any, ...]) -> PlanSettings:
    """Validate the settings arguments of the batch prefill plans (see ``_plan``'s callers) into a PlanSettings.

    The backend is chosen here (see :func:`fi_ffi.ops.attention.variants.choose_prefill`).
    """
    (
        num_qo_heads,
        num_kv_heads,
        head_dim_qk,
        page_size,
        head_dim_vo,
        q_dtype,
        kv_dtype,
        o_dtype,
        kv_layout,
        causal,
        custom,
        pos_encoding,
        window_left,
        logits_soft_cap,
        sm_scale,
        rope_scale,
        rope_theta,
        fp16_qk,
        backend,
        enable_cuda_graph,
        fixed_split_size,
        disable_split_kv,
    ) = args
    hq = S.count("num_qo_heads", num_qo_heads)
    hk = S.count("num_kv_heads", num_kv_heads)
    dqk = S.count("head_dim_qk", head_dim_qk)
    dvo = dqk if head_dim_vo is None else S.count("head_dim_vo", head_dim_vo)
    ps = S.count("page_size", page_size)
    S.gqa(hq, hk, decode=False)
    layout = S.layout_name(kv_layout)
    causal = checks.flag("causal", causal)
    pos = S.pos_encoding(pos_encoding)
    w = S.window(window_left)
    cap = S.soft_cap(logits_soft_cap)
    sm, rs, rt = S.scales(dqk, sm_scale, rope_scale, rope_theta)
    f16qk = checks.flag("use_fp16_qk_reduction", fp16_qk)
    graph = checks.flag("enable_cuda_graph", enable_cuda_graph)
    no_split = checks.flag("disable_split_kv", disable_split_kv)
    split = -1 if fixed_split_size is None else S.count("fixed_split_size", fixed_split_size)
    qd, kd, od = S.dtypes(q_dtype, kv_dtype, o_dtype)
    if custom and causal:
        raise ValueError("causal: a custom mask replaces the causal mask; pass causal=False with packed_custom_mask")
    if backend.__class__ is not str or backend not in ("auto", "fa2", "fa3"):
        raise ValueError(f"backend: expected 'auto', 'fa2' or 'fa3', got {backend!r}")
    if mode == "ragged" and layout == "HND":
        if backend == "fa3":
            raise ValueError(
                "backend: 'fa3' ragged runs read K/V as NHD only ([nnz_kv, num_kv_heads, head_dim]); "
                "use kv_layout='NHD' or backend 'fa2'"
            )
        backend = "fa2"
    base = Variant(BATCH_PREFILL, qd, kd, od, dqk, dvo, int32, pos, w >= 0, cap > 0, f16qk, "fa2")
    variant = choose_prefill(base, backend, device_id, custom)
    fa3 = variant.backend == "fa3"
    uri = variant.uri
    if fa3:
        if qd.itemsize == 1:  # FP8 q/k/v: the DefaultFP8Attention variant's argument list
            plan_decl, runs = FA3_FP8_PLAN, (FA3_FP8_RAGGED, FA3_FP8_PAGED)
        else:
            plan_decl, runs = FA3_PLAN, (FA3_RAGGED, FA3_PAGED)
        plan, run = (
            launcher(plan_decl, uri),
            launcher(
                runs[0] if mode == "ragged" else runs[1],
                uri,
                check_ragged_run if mode == "ragged" else check_paged_run,
            ),
        )
    else:
        plan, run = (
            launcher(FA2_PLANS, uri),
            launcher(
                FA2_RAGGED_RUNS if mode == "ragged" else FA2_PAGED_RUNS,
                uri,
                check_ragged_run if mode == "ragged" else check_paged_run,
            ),
        )
    return PlanSettings(
        kind=BATCH_PREFILL,
        mode=mode,
        variant=variant,
        device_id=device_id,
        num_qo_heads=hq,
        num_kv_heads=hk,
        head_dim_qk=dqk,
        head_dim_vo=dvo,
        page_size=ps,
        kv_layout=layout,
        dtype_q=qd,
        dtype_kv=kd,
        dtype_o=od,
        mask_mode=MASK_CUSTOM if custom else (MASK_CAUSAL if causal else MASK_NONE),
        pos_encoding=pos,
        window_left=w,
        logits_soft_cap=cap,
        sm_scale=sm,
        rope_scale=rs,
        rope_theta=rt,
        enable_cuda_graph=graph,
        use_fp16_qk_reduction=f16qk,
        fixed_split_size=split,
        disable_split_kv=no_split,
        plan=plan,
        run=run,
    )


# ------------------------------------------------------------------------------------------ batch prefill runs


_NO_SCALES = (None, None, None)


def _fp8_fa3(s: PlanSettings) -> bool:
    """Whether the plan's module is an FA3 FP8 one (float8 q: its runs take the dequantization scales)."""
    return s.backend == "fa3" and s.dtype_q is not None and s.dtype_q.itemsize == 1


def fp8_scales(plan: Plan, q_scale: Any, k_scale: Any, v_scale: Any) -> tuple[float, float, float]:
    """The dequantization scales of an FA3 FP8 run (each None: 1.0), checked: finite floats > 0, and only for a plan
    whose module takes them (FP8 q). Other plans refuse them by name: an FP8 KV cache read with 16-bit queries (the
    FA2 and decode modules) takes k's scale folded into the plan's ``sm_scale`` and v's as a multiply of the output,
    as flashinfer-python's wrappers do."""
    s = plan._s if plan.__class__ is Plan else None
    values = []
    for name, value in (("q_scale", q_scale), ("k_scale", k_scale), ("v_scale", v_scale)):
        if value is None:
            values.append(1.0)
            continue
        if s is None or not _fp8_fa3(s):
            raise ValueError(
                f"{name}: only the FA3 FP8 prefill modules (float8 q, k and v) take dequantization scales; with "
                f"16-bit queries over an FP8 KV cache plan with sm_scale = sm_scale * k_scale and multiply the "
                f"output by v_scale"
            )
        values.append(checks.positive_finite(name, value))
    return values[0], values[1], values[2]


def _launch(
    plan: Plan,
    ws: Any,
    tensors: tuple[Any, ...],
    out: Any,
    lse: Any,
    enable_pdl: Any,
    stream: Any,
    scales: tuple[Any, Any, Any] = _NO_SCALES,
) -> None:
    """One batch prefill run: the plan's settings as wire scalars (FA2, FA3 and FA3 FP8 take different ones)."""
    s = plan._s
    if scales is not _NO_SCALES:  # FA3 FP8: sm_scale and the three dequantization scales
        sq, sk, sv = fp8_scales(plan, *scales)
    elif _fp8_fa3(s):
        sq = sk = sv = 1.0
    else:
        sq = 0.0
    if sq:
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
            enable_pdl,
            s.sm_scale,
            stream=stream,
            context=plan._context,
            scale_q_scalar=sq,
            scale_k_scalar=sk,
            scale_v_scalar=sv,
        )
    elif s.backend == "fa3":
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
            enable_pdl,
            s.logits_soft_cap,
            s.sm_scale,
            stream=stream,
            context=plan._context,
        )
    else:
        mask, mask_indptr, alibi = plan._inputs
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
            enable_pdl,
            mask,
            mask_indptr,
            alibi,
            s.logits_soft_cap,
            s.sm_scale,
            s.rope_rcp_scale,
            s.rope_rcp_theta,
            stream=stream,
            context=plan._context,
        )


@op(flashinfer="flashinfer.prefill.BatchPrefillWithRaggedKVCacheWrapper.run")
def batch_prefill_ragged_run(
    q: TensorLike,
    k: TensorLike,
    v: TensorLike,
    *,
    plan: Plan,
    qo_indptr: TensorLike,
    kv_indptr: TensorLike,
    out: TensorT,
    lse: TensorLike | None = None,
    enable_pdl: bool | None = False,
    q_scale: float | None = None,
    k_scale: float | None = None,
    v_scale: float | None = None,
    stream: StreamLike = None,
) -> TensorT:
    """Run batch prefill over ragged K/V with a plan from :func:`batch_prefill_ragged_plan`.

    flashinfer-python's ``wrapper.run(q, k, v, out=..., lse=...)``; the indptrs' device copies, which the wrapper
    makes at plan time, are keywords here, and ``out`` is required (fi_ffi allocates nothing).

    Args:
        plan: a live ragged prefill plan.
        q: ``[>= qo_indptr[-1], num_qo_heads, head_dim_qk]``; last dim contiguous, rows may be strided.
        k, v: NHD ``[>= kv_indptr[-1], num_kv_heads, head_dim]`` / HND ``[num_kv_heads, >= kv_indptr[-1], head_dim]``
            (qk and vo head dims), the plan's kv dtype; last dim contiguous.
        qo_indptr, kv_indptr: device int32 ``[batch + 1]`` copies of the plan's host arrays.
        out: ``[q.shape[0], num_qo_heads, head_dim_vo]`` of the plan's o dtype, contiguous.
        lse: optional float32 ``[q.shape[0], num_qo_heads]``.
        enable_pdl: programmatic dependent launch (SM90+); None: where the device supports it.
        q_scale, k_scale, v_scale: FA3 FP8 plans only (float8 q, k and v): per-tensor dequantization scales
            (None: 1.0; flashinfer-python's float arguments of these names), passed to the kernel's
            ``scale_q/k/v_scalar``: it scales the logits by ``q_scale * k_scale * sm_scale`` and the output by
            ``v_scale``. Any other plan refuses them by name (16-bit queries over an FP8 KV cache, where
            flashinfer-python folds them in around the kernel: plan with ``sm_scale * k_scale``, multiply the output
            by ``v_scale``).
        stream: the plan's stream.

    Returns:
        ``out``.

    Raises:
        TypeError, ValueError: a plan that is not a live plan of this kind; a tensor of the wrong shape, dtype,
            device or layout for the plan, named; a scale that is not a finite float > 0, or given to a plan
            whose module takes none.
        KernelError: the kernel failed (a CUDA error of the launch).
    """
    ws = runnable(plan, BATCH_PREFILL, "ragged", "batch_prefill_ragged_plan")
    check_rows(plan, q)
    check_kv_tokens(plan, k)
    scales = _NO_SCALES if q_scale is None and k_scale is None and v_scale is None else (q_scale, k_scale, v_scale)
    _launch(plan, ws, (q, k, v, qo_indptr, kv_indptr), out, lse, enable_pdl, stream, scales)
    return out


@op(flashinfer="flashinfer.prefill.BatchPrefillWithPagedKVCacheWrapper.run")
def batch_prefill_paged_run(
    q: TensorLike,
    paged_kv_cache: tuple[TensorLike, TensorLike],
    *,
    plan: Plan,
    qo_indptr: TensorLike,
    kv_indptr: TensorLike,
    kv_indices: TensorLike,
    kv_last_page_len: TensorLike,
    out: TensorT,
    lse: TensorLike | None = None,
    enable_pdl: bool | None = False,
    q_scale: float | None = None,
    k_scale: float | None = None,
    v_scale: float | None = None,
    stream: StreamLike = None,
) -> TensorT:
    """Run batch prefill over a paged KV cache with a plan from :func:`batch_prefill_paged_plan`.

    flashinfer-python's ``wrapper.run(q, paged_kv_cache, out=..., lse=...)``; the page table's device arrays are
    keywords here, and ``out`` is required (fi_ffi allocates nothing).

    Args:
        plan: a live paged prefill plan.
        q: ``[>= qo_indptr[-1], num_qo_heads, head_dim_qk]``; last dim contiguous, rows may be strided.
        paged_kv_cache: ``(k_cache, v_cache)``: NHD ``[pages, page_size, num_kv_heads, head_dim]`` / HND
            ``[pages, num_kv_heads, page_size, head_dim]``, the plan's kv dtype, identical strides.
        qo_indptr, kv_indptr, kv_last_page_len: device int32 copies of the plan's host arrays (FA3 reads the
            lengths from the plan, FA2 from these).
        kv_indices: device int32 ``[>= kv_indptr[-1]]`` page ids.
        out: ``[q.shape[0], num_qo_heads, head_dim_vo]`` of the plan's o dtype, contiguous.
        lse: optional float32 ``[q.shape[0], num_qo_heads]``.
        enable_pdl: programmatic dependent launch (SM90+); None: where the device supports it.
        q_scale, k_scale, v_scale: FA3 FP8 plans only (float8 q, k and v): per-tensor dequantization scales
            (None: 1.0; flashinfer-python's float arguments of these names), passed to the kernel's
            ``scale_q/k/v_scalar``: it scales the logits by ``q_scale * k_scale * sm_scale`` and the output by
            ``v_scale``. Any other plan refuses them by name (16-bit queries over an FP8 KV cache, where
            flashinfer-python folds them in around the kernel: plan with ``sm_scale * k_scale``, multiply the output
            by ``v_scale``).
        stream: the plan's stream.

    Returns:
        ``out``.

    Raises:
        TypeError, ValueError: a plan that is not a live plan of this kind; a tensor of the wrong shape, dtype,
            device or layout for the plan, named; a scale that is not a finite float > 0, or given to a plan
            whose module takes none.
        KernelError: the kernel failed (a CUDA error of the launch).
    """
    k_cache, v_cache = kv_pair(paged_kv_cache)
    ws = runnable(plan, BATCH_PREFILL, "paged", "batch_prefill_paged_plan")
    check_rows(plan, q)
    check_pages(plan, kv_indices)
    scales = _NO_SCALES if q_scale is None and k_scale is None and v_scale is None else (q_scale, k_scale, v_scale)
    _launch(
        plan,
        ws,
        (q, k_cache, v_cache, qo_indptr, kv_indptr, kv_indices, kv_last_page_len),
        out,
        lse,
        enable_pdl,
        stream,
        scales,
    )
    return out


def _check_q_out_lse(rules: PointerRules, s: PlanSettings, a: SimpleNamespace, dev: Any) -> None:
    hq, dqk, dvo = s.num_qo_heads, s.head_dim_qk, s.head_dim_vo
    AC.device_tensor(rules, "q", a.q, (None, hq, dqk), "[nnz_qo, num_qo_heads, head_dim_qk]", s.dtype_q, dev)
    AC.device_tensor(
        rules,
        "out",
        a.out,
        (a.q.shape[0], hq, dvo),
        "[nnz_qo, num_qo_heads, head_dim_vo]",
        s.dtype_o,
        dev,
        contiguous=True,
    )
    AC.lse_tensor("lse", a.lse, (a.q.shape[0], hq), dev)
    # the plan's custom mask and ALiBi slopes (FA2 declarations only)
    AC.outputs_apart(rules, tuple(n for n in ("custom_mask", "mask_indptr", "alibi_slopes") if hasattr(a, n)))


def _check_inputs(s: PlanSettings, a: SimpleNamespace, b: int, dev: Any) -> None:
    """The plan's custom mask and ALiBi slopes (FA2 runs only take them)."""
    AC.vector("custom_mask", getattr(a, "custom_mask", None), "uint8", None, dev)
    AC.vector("mask_indptr", getattr(a, "mask_indptr", None), "int32", b + 1, dev)
    AC.vector("alibi_slopes", getattr(a, "alibi_slopes", None), "float32", s.num_qo_heads, dev)


def check_ragged_run(a: SimpleNamespace) -> PointerRules:
    """The contract of a ragged batch prefill run, against the plan's settings and batch size (``a.context``)."""
    s, b = a.context
    dev = a.float_workspace_buffer.device
    hk, dqk, dvo = s.num_kv_heads, s.head_dim_qk, s.head_dim_vo
    rules = PointerRules()
    _check_q_out_lse(rules, s, a, dev)
    k, v = a.k, a.v
    if s.kv_layout == "NHD":
        text = "NHD [nnz_kv, num_kv_heads, head_dim]"
        AC.device_tensor(rules, "k", k, (None, hk, dqk), text, s.dtype_kv, dev)
        AC.device_tensor(rules, "v", v, (k.shape[0], hk, dvo), text, s.dtype_kv, dev)
    else:
        text = "HND [num_kv_heads, nnz_kv, head_dim]"
        AC.device_tensor(rules, "k", k, (hk, None, dqk), text, s.dtype_kv, dev)
        AC.device_tensor(rules, "v", v, (hk, k.shape[1], dvo), text, s.dtype_kv, dev)
    for name, t in (("q", a.q), ("k", k), ("v", v)):
        AC.strides_u32(name, t)
    AC.index_tensor("qo_indptr", a.qo_indptr, b + 1, dev)
    AC.index_tensor("kv_indptr", a.kv_indptr, b + 1, dev)
    _check_inputs(s, a, b, dev)
    return rules


def check_paged_run(a: SimpleNamespace) -> PointerRules:
    """The contract of a paged batch prefill run, against the plan's settings and batch size (``a.context``)."""
    s, b = a.context
    dev = a.float_workspace_buffer.device
    rules = PointerRules()
    _check_q_out_lse(rules, s, a, dev)
    AC.kv_cache(
        rules,
        a.k_cache,
        a.v_cache,
        s.kv_layout,
        s.num_kv_heads,
        s.page_size,
        s.head_dim_qk,
        s.head_dim_vo,
        s.dtype_kv,
        dev,
    )
    AC.index_tensor("qo_indptr", a.qo_indptr, b + 1, dev)
    AC.index_tensor("kv_indptr", a.kv_indptr, b + 1, dev)
    AC.index_tensor("kv_indices", a.kv_indices, None, dev)
    AC.index_tensor("kv_last_page_len", a.kv_last_page_len, b, dev)
    _check_inputs(s, a, b, dev)
    return rules
