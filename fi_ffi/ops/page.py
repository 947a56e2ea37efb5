"""Appending new tokens to a paged KV cache (``page.so``), plus the host-side index helpers runtimes need.

The cache of a batch of requests is a pool of pages. Request ``b`` owns the pages
``kv_indices[kv_indptr[b]:kv_indptr[b + 1]]`` (in order), all full except the last, which holds
``kv_last_page_len[b]`` tokens, so it holds ``seq_len[b] = (pages - 1) * page_size + kv_last_page_len[b]``
tokens (see :func:`get_seq_lens`). Appended token ``i`` goes to request ``batch_indices[i]`` at position
``positions[i]`` of that request, that is page ``kv_indices[kv_indptr[b] + positions[i] // page_size]``, slot
``positions[i] % page_size``. The page table must already include the appended tokens: grow ``kv_indptr``,
``kv_indices`` and ``kv_last_page_len`` first, then append. :func:`get_batch_indices_positions` derives
``batch_indices`` and ``positions`` from the append lengths and the new sequence lengths.

What is checked before the kernel is called: ranks, shapes (tokens vs pages vs heads vs head_dim), dtypes,
int32 index dtypes (the kernel reads every index array as int32 without looking), devices, contiguity,
alignment and the cache layout. The checks depend only on the arguments' layouts (shape, strides, dtype,
device) and the cache layout, so the launcher (:mod:`fi_ffi.launch.launcher`) remembers them by value: a runtime
that passes another cache at every layer (same layout) stays on the fast path. The index arrays live in device
memory, so their *values* cannot be checked without a device-to-host copy (and a sync): positions past a
request's pages or page ids past the pool are not detected and corrupt memory. Runtimes that keep host copies
of their index arrays (they usually build them on the host) can check the values with
:func:`check_append_positions`.

The host helpers take "host integer arrays": numpy arrays (any byte order), CPU tensors, or lists/tuples of
ints. Every value must fit in int32 (the type of the device arrays they describe); floats, strings, bools and
larger ints are refused with a message naming the argument, never parsed or truncated.

All calls are asynchronous on ``stream`` (see :mod:`fi_ffi.tensor.streams`) and never synchronize.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Literal

import numpy as np

from ..abi.wire import INT, declare, tensors
from ..dtypes import bfloat16, float8_e4m3fn, float8_e5m2, float16, int32
from ..launch import checks
from ..launch.launcher import launcher
from ..launch.pointer_rules import PointerRules
from ..launch.registry import op
from ..tensor.descriptor import Tensor
from ..tensor.protocols import IndexLike, StreamLike, TensorLike
from .attention.plan_settings import LAYOUTS  # the KV layout codes the kernels take, stated once

_URI = "page"
_LAYOUT_SHAPES = {  # what kv_layout means, for the message that suggests the other one
    "NHD": "[num_pages, page_size, num_kv_heads, head_dim]",
    "HND": "[num_pages, num_kv_heads, page_size, head_dim]",
}
KVLayout = Literal["NHD", "HND"]  # the order of a paged cache's dimensions (page, token, head): see LAYOUTS
_CACHE_DTYPES = (float16, bfloat16, float8_e4m3fn, float8_e5m2)
_HEAD_DIMS = (64, 128, 256, 512)
_MLA_CKV_DIM, _MLA_KPE_DIM = 512, 64
_STRIDE_LIMIT = 1 << 32  # the kernel keeps cache strides in uint32
_MAX_THREADS = 1024
_INT32_END = 1 << 31

# The caches are the kernels' outputs; names are the public ones (FlashInfer's C++ names are paged_k_cache,
# paged_v_cache): every error message names the argument as the caller passed it.
APPEND_PAGED_KV_CACHE = declare(
    "append_paged_kv_cache",
    [
        *tensors("append_key", "append_value", "batch_indices", "positions"),
        *tensors("k_cache", "v_cache", output=True),
        *tensors("kv_indices", "kv_indptr", "kv_last_page_len"),
        ("layout", INT),  # 0: NHD, 1: HND
    ],
)
APPEND_PAGED_MLA_KV_CACHE = declare(
    "append_paged_mla_kv_cache",
    [
        *tensors("append_ckv", "append_kpe", "batch_indices", "positions"),
        *tensors("ckv_cache", "kpe_cache", output=True),
        *tensors("kv_indices", "kv_indptr", "kv_last_page_len"),
    ],
)
# (module URI pattern, declaration), checked against the modules by tests/launch/test_declarations.py
DECLARATIONS = (("page", APPEND_PAGED_KV_CACHE), ("page", APPEND_PAGED_MLA_KV_CACHE))

__all__ = ["check_append_positions", "get_seq_lens"]  # host helpers of the family; its ops: @op below


def _rows(t: Any) -> int:
    """The leading dimension (``nnz``) of a tensor argument of any producer, read without a descriptor.

    -1 when the producer has no ``.shape`` or no dimension: the launch then reads it properly and names
    what is wrong.
    """
    try:
        return int(t.shape[0])
    except Exception:
        return -1


def _check_like(name: str, t: Any, ref_name: str, ref: Any) -> None:
    """``t`` has ``ref``'s dtype, is on its CUDA device and has a contiguous last dimension (rows may be strided)."""
    checks.same_dtype(name, t, ref_name, ref)
    checks.same_device(name, t, ref_name, ref)
    checks.cuda(name, t)
    checks.last_dim_contiguous(name, t)


def _check_cache(name: str, cache: Any, tokens_name: str, tokens: Any) -> None:
    """A cache and the tokens appended to it: :func:`_check_like`, with the dtype refused as the tokens' fault."""
    if cache.dtype != tokens.dtype:
        raise TypeError(
            f"{tokens_name}: expected {name}'s dtype {cache.dtype.name} (the kernel reads the new tokens "
            f"as the cache's type), got {tokens.dtype.name}"
        )
    _check_like(name, cache, tokens_name, tokens)


def _check_kv(a: SimpleNamespace) -> PointerRules:
    """The contract of ``append_paged_kv_cache`` (layouts and the cache layout code only)."""
    ak, av, kc, vc, code = a.append_key, a.append_value, a.k_cache, a.v_cache, a.layout
    tokens = "[nnz, num_kv_heads, head_dim]"
    checks.device_tensor("append_key", ak, 3, tokens, _CACHE_DTYPES, strided_rows=True)
    checks.shape("append_value", av, ak.shape, tokens)
    _check_like("append_value", av, "append_key", ak)
    nhd = code == LAYOUTS["NHD"]
    pages = (
        "[num_pages, page_size, num_kv_heads, head_dim]" if nhd else "[num_pages, num_kv_heads, page_size, head_dim]"
    )
    checks.ndim("k_cache", kc, 4, pages)
    _check_cache("k_cache", kc, "append_key", ak)
    checks.shape("v_cache", vc, kc.shape, pages)
    checks.same_dtype("v_cache", vc, "k_cache", kc)
    checks.same_device("v_cache", vc, "k_cache", kc)
    checks.cuda("v_cache", vc)
    if vc.strides != kc.strides:
        raise ValueError(
            f"v_cache: expected the same strides as k_cache {kc.strides} (the kernel addresses both "
            f"with k_cache's), got {vc.strides}"
        )
    if nhd:
        _, page_size, heads, head_dim = kc.shape
    else:
        _, heads, page_size, head_dim = kc.shape
    if page_size < 1 or heads < 1:
        raise ValueError(f"k_cache: expected page_size >= 1 and num_kv_heads >= 1 in {pages}, got shape {kc.shape}")
    if head_dim not in _HEAD_DIMS:
        raise ValueError(f"k_cache: expected head_dim (last dimension) in {_HEAD_DIMS}, got {head_dim}")
    if ak.shape[1] != heads or ak.shape[2] != head_dim:
        layout, other = ("NHD", "HND") if nhd else ("HND", "NHD")
        if ak.shape[1] == page_size and ak.shape[2] == head_dim:  # the cache fits the other layout: say so
            raise ValueError(
                f"kv_layout: {layout!r} reads k_cache {kc.shape} as {heads} heads of pages of {page_size} tokens, "
                f"but append_key {ak.shape} has {ak.shape[1]} heads: the cache is laid out {other} "
                f"({_LAYOUT_SHAPES[other]}); pass kv_layout={other!r}"
            )
        raise ValueError(
            f"append_key: expected [nnz, {heads}, {head_dim}] to match k_cache {kc.shape} ({layout}), got {ak.shape}"
        )
    _fits_uint32("k_cache", kc)
    itemsize = ak.dtype.itemsize
    vec = max(16 // itemsize, head_dim // 32)
    threads = head_dim // vec * heads
    if threads > _MAX_THREADS:
        raise ValueError(
            f"append_key: too many heads for the kernel: num_kv_heads {heads} x head_dim {head_dim} "
            f"needs {threads} threads per block (head_dim / {vec} per head), at most {_MAX_THREADS}"
        )
    align = min(vec, 16 // itemsize)  # the kernel moves `vec` elements per thread in 16-byte pieces
    rules = PointerRules()
    for name, t in (("append_key", ak), ("append_value", av), ("k_cache", kc), ("v_cache", vc)):
        checks.aligned(rules, name, t, align)
    _check_indices(a, ak, "append_key")
    return rules


def _check_mla(a: SimpleNamespace) -> PointerRules:
    """The contract of ``append_paged_mla_kv_cache`` (layouts only)."""
    ac, ap, cc, pc = a.append_ckv, a.append_kpe, a.ckv_cache, a.kpe_cache
    checks.device_tensor("append_ckv", ac, 2, "[nnz, 512]", _CACHE_DTYPES, strided_rows=True)
    nnz = ac.shape[0]
    if ac.shape[1] != _MLA_CKV_DIM:
        raise ValueError(f"append_ckv: the kernel supports ckv_dim {_MLA_CKV_DIM} only, got shape {ac.shape}")
    checks.shape("append_kpe", ap, (nnz, _MLA_KPE_DIM), "[nnz, 64]; the kernel supports kpe_dim 64 only")
    _check_like("append_kpe", ap, "append_ckv", ac)
    checks.ndim("ckv_cache", cc, 3, "[num_pages, page_size, 512]")
    _check_cache("ckv_cache", cc, "append_ckv", ac)
    num_pages, page_size, ckv_dim = cc.shape
    if ckv_dim != _MLA_CKV_DIM:
        raise ValueError(f"ckv_cache: expected [num_pages, page_size, {_MLA_CKV_DIM}], got shape {cc.shape}")
    if page_size < 1:
        raise ValueError(f"ckv_cache: expected page_size >= 1, got shape {cc.shape}")
    checks.shape("kpe_cache", pc, (num_pages, page_size, _MLA_KPE_DIM), "[num_pages, page_size, 64]")
    _check_like("kpe_cache", pc, "ckv_cache", cc)
    _fits_uint32("ckv_cache", cc)
    _fits_uint32("kpe_cache", pc)
    names = ("append_ckv", "append_kpe", "ckv_cache", "kpe_cache")
    rules = PointerRules()
    for name, t in zip(names, (ac, ap, cc, pc), strict=True):
        checks.aligned(rules, name, t, 2)  # two elements per thread
    _check_indices(a, ac, "append_ckv")
    return rules


def _fits_uint32(name: str, t: Tensor) -> None:
    if any(s >= _STRIDE_LIMIT for s in t.strides):
        raise ValueError(
            f"{name}: strides must be < 2**32 elements (the kernel keeps cache strides in 32 bits), got {t.strides}"
        )


def _check_indices(a: SimpleNamespace, ref: Tensor, ref_name: str) -> None:
    nnz = ref.shape[0]
    bi, po, ki, kp, kl = a.batch_indices, a.positions, a.kv_indices, a.kv_indptr, a.kv_last_page_len
    _index("batch_indices", bi, ref, ref_name, "[nnz]")
    _index("positions", po, ref, ref_name, "[nnz]")
    _index("kv_indices", ki, ref, ref_name, "[total_pages]")
    _index("kv_last_page_len", kl, ref, ref_name, "[batch]")
    _index("kv_indptr", kp, ref, ref_name, "[batch + 1]")
    checks.shape("batch_indices", bi, (nnz,), f"[nnz], nnz = {ref_name}.shape[0]")
    checks.shape("positions", po, (nnz,), f"[nnz], nnz = {ref_name}.shape[0]")
    batch = kl.shape[0]
    checks.shape("kv_indptr", kp, (batch + 1,), "[batch + 1], batch = kv_last_page_len.shape[0]")


def _index(name: str, t: Tensor, ref: Tensor, ref_name: str, layout: str) -> None:
    checks.ndim(name, t, 1, layout)
    if t.dtype != int32:
        raise TypeError(
            f"{name}: expected dtype int32 (the kernel reads every index array as int32), got {t.dtype.name}"
        )
    checks.same_device(name, t, ref_name, ref)
    checks.cuda(name, t)
    checks.contiguous(name, t)


# The launch functions (wire order; ``.launcher.slow_calls`` counts calls that were validated from scratch).
_append: Any = launcher(APPEND_PAGED_KV_CACHE, _URI, _check_kv)
_append_mla: Any = launcher(APPEND_PAGED_MLA_KV_CACHE, _URI, _check_mla)


# The wire mapping of append_paged_kv_cache (its arguments -> the launch function's values), shared by the op and
# fi_ffi.prepare: the op passes its launch function (or _append_checks), prepare a packer (fi_ffi.launch.packing).
def _append_wire(
    launch: Any,
    append_key: Any,
    append_value: Any,
    batch_indices: Any,
    positions: Any,
    paged_kv_cache: Any,
    kv_indices: Any,
    kv_indptr: Any,
    kv_last_page_len: Any,
    kv_layout: Any,
    stream: Any,
) -> Any:
    """(append_key, append_value, batch_indices, positions, k_cache, v_cache, kv_indices, kv_indptr,
    kv_last_page_len, layout code)."""
    code = LAYOUTS.get(kv_layout) if kv_layout.__class__ is str or isinstance(kv_layout, str) else None
    if code is None:
        raise (ValueError if isinstance(kv_layout, str) else TypeError)(
            f"kv_layout: expected 'NHD' or 'HND', got {kv_layout!r}"
        )
    if paged_kv_cache.__class__ is tuple and len(paged_kv_cache) == 2:  # the common form: one test, no copy
        k_cache, v_cache = paged_kv_cache
    else:
        k_cache, v_cache = _split_paged_kv_cache(paged_kv_cache, kv_layout)
    return launch(
        append_key,
        append_value,
        batch_indices,
        positions,
        k_cache,
        v_cache,
        kv_indices,
        kv_indptr,
        kv_last_page_len,
        code,
        stream=stream,
    )


def _split_paged_kv_cache(paged_kv_cache: Any, kv_layout: str) -> tuple[Any, Any]:
    """The key and value caches of ``paged_kv_cache`` as flashinfer takes it: a ``(k_cache, v_cache)`` tuple, or
    one tensor ``[num_pages, 2, page_size, num_kv_heads, head_dim]`` (``"NHD"``; ``"HND"``: ``[num_pages, 2,
    num_kv_heads, page_size, head_dim]``) whose ``[:, 0]`` is the key cache and ``[:, 1]`` the value cache, or a
    4-D one without the ``page_size`` dimension (page size 1), as flashinfer expands it.

    Raises:
        TypeError: neither a tuple of two tensors nor a tensor.
        ValueError: a one-tensor cache not 4-D or 5-D, or its dimension 1 not 2.
    """
    if isinstance(paged_kv_cache, tuple):
        if len(paged_kv_cache) != 2:
            raise ValueError(
                f"paged_kv_cache: expected a (k_cache, v_cache) tuple or one tensor, got a tuple of "
                f"{len(paged_kv_cache)}"
            )
        return paged_kv_cache[0], paged_kv_cache[1]
    if isinstance(paged_kv_cache, (list, str, bytes)) or paged_kv_cache is None:
        raise TypeError(
            f"paged_kv_cache: expected a (k_cache, v_cache) tuple or one tensor [num_pages, 2, ...], got "
            f"{type(paged_kv_cache).__name__}"
        )
    kv = checks.tensor("paged_kv_cache", paged_kv_cache)
    nhd = kv_layout == "NHD"
    layout = (
        "[num_pages, 2, page_size, num_kv_heads, head_dim]"
        if nhd
        else "[num_pages, 2, num_kv_heads, page_size, head_dim]"
    )
    if kv.ndim == 4:  # page size 1, its dimension left out: put it back (any stride fits a dimension of 1)
        at = 2 if nhd else 3
        kv = kv.view((*kv.shape[:at], 1, *kv.shape[at:]), (*kv.strides[:at], kv.strides[at], *kv.strides[at:]))
    if kv.ndim != 5 or kv.shape[1] != 2:
        raise ValueError(
            f"paged_kv_cache: expected one tensor {layout} or a (k_cache, v_cache) tuple, got shape {kv.shape}"
        )
    shape = (kv.shape[0], *kv.shape[2:])
    strides = (kv.strides[0], *kv.strides[2:])
    return kv.view(shape, strides), kv.view(shape, strides, offset=kv.strides[1])


def _append_checks(*values: Any, stream: Any = None) -> None:
    """The append launch's checks without the launch (an empty append)."""
    _append.launcher.slow(values, stream, None, remember=False)


@op(launch=_append, packable=_append_wire, nonempty="append_key", flashinfer="flashinfer.page.append_paged_kv_cache")
def append_paged_kv_cache(
    append_key: TensorLike,
    append_value: TensorLike,
    batch_indices: TensorLike,
    positions: TensorLike,
    paged_kv_cache: tuple[TensorLike, TensorLike] | TensorLike,
    kv_indices: TensorLike,
    kv_indptr: TensorLike,
    kv_last_page_len: TensorLike,
    kv_layout: KVLayout = "NHD",
    *,
    stream: StreamLike = None,
) -> None:
    """Write ``nnz`` new key/value tokens of several requests into a paged K/V cache.

    flashinfer's ``append_paged_kv_cache``, same arguments (plus ``stream``).

    Args:
        append_key: ``[nnz, num_kv_heads, head_dim]``, float16/bfloat16/float8_e4m3fn/float8_e5m2 (the cache's
            dtype), on a CUDA device; last dimension contiguous, the other two may be strided (slices of a fused
            QKV tensor). ``head_dim`` is 64, 128, 256 or 512.
        append_value: same shape, dtype and device as ``append_key``.
        batch_indices: int32 ``[nnz]``, contiguous, device memory: the request of each token.
        positions: int32 ``[nnz]``, contiguous, device memory: the position of each token in its request
            (0-based, counting every token the request holds, appended ones included).
        paged_kv_cache: the cache, written in place, as flashinfer takes it: a tuple ``(k_cache, v_cache)`` of
            ``[num_pages, page_size, num_kv_heads, head_dim]`` (``kv_layout="NHD"``) or ``[num_pages,
            num_kv_heads, page_size, head_dim]`` (``"HND"``) tensors with **identical strides** (last dimension
            contiguous, the others may be strided), or one tensor ``[num_pages, 2, page_size, num_kv_heads,
            head_dim]`` (``"HND"``: ``[num_pages, 2, num_kv_heads, page_size, head_dim]``), keys at ``[:, 0]``,
            values at ``[:, 1]`` (4-D without the page dimension: page size 1). The tuple is the fast form: the
            one tensor is described anew at each call. Errors about the caches name them ``k_cache`` and
            ``v_cache``.
        kv_indices: int32 ``[total_pages]``, contiguous, device memory: the page ids of all requests.
        kv_indptr: int32 ``[batch + 1]``, contiguous, device memory: request ``b``'s pages are
            ``kv_indices[kv_indptr[b]:kv_indptr[b + 1]]``.
        kv_last_page_len: int32 ``[batch]``, contiguous, device memory: tokens in each request's last page.
        kv_layout: ``"NHD"`` or ``"HND"``, the order of the page, head and token dimensions of the caches.
        stream: where the kernel runs; ``None`` follows ``append_key``'s framework (torch's or CuPy's current
            stream), or TVM-FFI's current stream of the device for descriptors.

    Tensors are :class:`~fi_ffi.tensor.Tensor` descriptors or any producer (torch, CuPy, JAX, DLPack, CUDA
    array interface). The index arrays' values are not checked (they are device memory): positions must fit
    the pages listed and page ids must be ``< num_pages``, or the kernel writes out of bounds. See
    :func:`check_append_positions`. ``nnz == 0`` checks every argument (and ``stream``) and launches nothing.

    Raises:
        TypeError: a dtype other than those listed (index arrays: int32 only; ``append_key`` must have the
            cache's dtype), ``paged_kv_cache`` neither a tuple nor a tensor, ``kv_layout`` not a string.
        ValueError: ``kv_layout`` not ``"NHD"`` / ``"HND"``; a rank or shape that does not fit the others
            (tokens vs pages vs heads vs head_dim; ``head_dim`` not 64/128/256/512); caches with different
            strides or strides of 2**32 elements or more; a tensor not on ``append_key``'s CUDA device, a strided
            last dimension or index array; misaligned data; more heads than one block of the kernel can hold.
    """
    # nnz read inline (a call of _rows per layer otherwise): an int for descriptors, torch tensors, CuPy arrays
    try:
        nnz = append_key.shape[0]  # type: ignore[union-attr]
    except Exception:
        nnz = -1  # no shape: the launch names what is wrong
    if nnz.__class__ is not int:
        nnz = _rows(append_key)
    # nnz == 0: the kernel cannot launch an empty grid; check everything (stream included), launch nothing
    _append_wire(
        _append if nnz else _append_checks,
        append_key,
        append_value,
        batch_indices,
        positions,
        paged_kv_cache,
        kv_indices,
        kv_indptr,
        kv_last_page_len,
        kv_layout,
        stream,
    )


@op(launch=_append_mla, flashinfer="flashinfer.page.append_paged_mla_kv_cache")
def append_paged_mla_kv_cache(
    append_ckv: TensorLike,
    append_kpe: TensorLike,
    batch_indices: TensorLike,
    positions: TensorLike,
    ckv_cache: TensorLike,
    kpe_cache: TensorLike,
    kv_indices: TensorLike,
    kv_indptr: TensorLike,
    kv_last_page_len: TensorLike,
    *,
    stream: StreamLike = None,
) -> None:
    """Write ``nnz`` new MLA tokens (compressed KV and its RoPE part) into a paged MLA cache.

    Args:
        append_ckv: ``[nnz, 512]`` compressed KV, float16/bfloat16/float8_e4m3fn/float8_e5m2 (the caches'
            dtype), on a CUDA device; last dimension contiguous, rows may be strided.
        append_kpe: ``[nnz, 64]`` RoPE part of the keys, same dtype and device.
        batch_indices, positions, kv_indices, kv_indptr, kv_last_page_len: as for
            :func:`append_paged_kv_cache` (int32, contiguous, device memory; values not checked).
        ckv_cache: ``[num_pages, page_size, 512]``, written in place; last dimension contiguous.
        kpe_cache: ``[num_pages, page_size, 64]``, same dtype and device; its strides may differ from
            ``ckv_cache``'s.
        stream: as for :func:`append_paged_kv_cache`.

    The kernel only supports ``ckv_dim == 512`` and ``kpe_dim == 64`` (DeepSeek MLA). ``nnz == 0`` checks every
    argument and launches nothing.

    Raises:
        TypeError: a tensor argument not a tensor (or None where required), or of a dtype other than those listed (index
            arrays: int32 only; ``append_ckv`` must have the cache's dtype).
        ValueError: a dimension other than 512 / 64, a rank or shape that does not fit the others, a tensor not on
            ``append_ckv``'s CUDA device or with a strided last dimension or index array, cache strides of 2**32
            elements or more, misaligned data.
    """
    args = (
        append_ckv,
        append_kpe,
        batch_indices,
        positions,
        ckv_cache,
        kpe_cache,
        kv_indices,
        kv_indptr,
        kv_last_page_len,
    )
    if _rows(append_ckv):
        _append_mla(*args, stream=stream)
    else:  # nnz == 0: the kernel cannot launch an empty grid; check everything (stream included), launch nothing
        _append_mla.launcher.slow(args, stream, None, remember=False)


# --- host-side helpers (numpy) -------------------------------------------------------------------------------


def _host_ints(name: str, value: Any) -> np.ndarray:
    """``value`` as a 1-D int64 numpy array read on the host, every value within int32 (the kernels' index type).

    Lists and tuples are read element by element: each must be an int (Python or numpy, not bool), so strings,
    floats and ints beyond int64 are refused instead of being parsed, truncated or wrapped by numpy. Arrays
    (numpy, CPU tensors, anything with ``__array__``) must have an integer dtype; byte order is honoured.
    """
    if isinstance(value, Tensor) or hasattr(value, "__cuda_array_interface__"):
        raise TypeError(
            f"{name}: expected a host array (numpy array, list, CPU tensor), got a device tensor; "
            f"keep a host copy of the index arrays for this helper"
        )
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{name}: expected a 1-D integer array, got {type(value).__name__} {value!r}")
    device = getattr(value, "device", None)
    if device is not None and getattr(device, "type", "cpu") != "cpu":
        raise TypeError(f"{name}: expected a host array (numpy array, list, CPU tensor), got one on {device}")
    if isinstance(value, (list, tuple)):
        return _int_list(name, value)
    try:
        arr = np.asarray(value)
    except Exception as exc:  # whatever the producer raises, the message names the argument
        raise TypeError(f"{name}: expected a 1-D integer array, got {type(value).__name__} ({exc})") from exc
    if arr.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array, got shape {arr.shape}")
    if arr.dtype.kind not in "iu" and not (arr.size == 0 and arr.dtype.kind == "f"):
        raise TypeError(f"{name}: expected an integer array, got dtype {arr.dtype}")
    if arr.size:
        low, high = int(arr.min()), int(arr.max())  # Python ints: exact for every integer dtype
        if low < -_INT32_END or high >= _INT32_END:
            i = int(np.argmax(arr == (low if low < -_INT32_END else high)))
            raise ValueError(
                f"{name}: values must fit in int32 (the kernels' index type), got {name}[{i}] = {int(arr[i])}"
            )
    return arr.astype(np.int64)


def _int_list(name: str, value: list[Any] | tuple[Any, ...]) -> np.ndarray:
    """A list or tuple of ints as an int64 array, each element checked (see :func:`_host_ints`)."""
    for i, v in enumerate(value):
        if isinstance(v, (list, tuple)):
            raise ValueError(f"{name}: expected a 1-D array, got a nested sequence at {name}[{i}]")
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
            raise TypeError(f"{name}: expected integers, got {name}[{i}] = {v!r} ({type(v).__name__})")
        if not -_INT32_END <= int(v) < _INT32_END:
            raise ValueError(f"{name}: values must fit in int32 (the kernels' index type), got {name}[{i}] = {v}")
    return np.array([int(v) for v in value], dtype=np.int64)


def _bounded(name: str, value: Any, minimum: int) -> int:
    """An int in ``[minimum, 2**31)`` (the kernels' int32), else TypeError/ValueError naming ``name``."""
    value = checks.integer(name, value, minimum)
    if value >= _INT32_END:
        raise ValueError(f"{name}: expected an int < 2**31 (the kernels' int32), got {value}")
    return value


def _indptr(name: str, value: Any) -> np.ndarray:
    arr = _host_ints(name, value)
    if arr.size == 0:
        raise ValueError(f"{name}: expected [batch + 1] offsets (at least one entry), got an empty array")
    if arr[0] != 0:
        raise ValueError(f"{name}: expected offsets starting at 0, got {name}[0] = {arr[0]}")
    steps = np.diff(arr)
    if (steps < 0).any():
        b = int(np.argmax(steps < 0))
        raise ValueError(
            f"{name}: expected non-decreasing offsets, got {name}[{b}] = {arr[b]} > {name}[{b + 1}] = {arr[b + 1]}"
        )
    return arr


def get_seq_lens(kv_indptr: Any, kv_last_page_len: Any, page_size: int) -> np.ndarray:
    """Tokens held by each request: ``(pages - 1) * page_size + kv_last_page_len`` (0 for a request with no page).

    Args:
        kv_indptr: host integer array ``[batch + 1]``, page offsets per request (starts at 0, non-decreasing).
        kv_last_page_len: host integer array ``[batch]``, each in ``[1, page_size]`` for a request with pages.
        page_size: tokens per page, in ``[1, 2**31)``.

    Returns:
        int32 numpy array ``[batch]``.
    """
    page_size = _bounded("page_size", page_size, 1)
    indptr = _indptr("kv_indptr", kv_indptr)
    last = _host_ints("kv_last_page_len", kv_last_page_len)
    if last.shape != (indptr.size - 1,):
        raise ValueError(
            f"kv_last_page_len: expected shape ({indptr.size - 1},) to match kv_indptr [batch + 1], got {last.shape}"
        )
    pages = np.diff(indptr)
    if (b := _first((pages > 0) & ((last < 1) | (last > page_size)))) is not None:
        raise ValueError(
            f"kv_last_page_len: expected values in [1, {page_size}] (page_size) for requests with "
            f"pages, got kv_last_page_len[{b}] = {last[b]}"
        )
    seq = np.where(pages > 0, (pages - 1) * page_size + last, 0)
    return _int32("seq_lens", seq)


@op(flashinfer="flashinfer.page.get_batch_indices_positions")
def get_batch_indices_positions(
    append_indptr: IndexLike,
    seq_lens: IndexLike,
    nnz: int | None = None,
    *,
    batch_indices: np.ndarray | None = None,
    positions: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Request and position of every appended token, from the append offsets and the new sequence lengths.

    Request ``b`` appends the tokens ``append_indptr[b]:append_indptr[b + 1]``; they are the *last*
    ``n_b = append_indptr[b + 1] - append_indptr[b]`` tokens of the request, which holds ``seq_lens[b]`` tokens
    once they are appended. So for token ``i`` of request ``b``::

        batch_indices[i] = b
        positions[i]     = seq_lens[b] - append_indptr[b + 1] + i      # seq_lens[b] - n_b, ..., seq_lens[b] - 1

    (the same mapping as upstream ``flashinfer.page.get_batch_indices_positions``). Example: ``append_indptr
    = [0, 1, 3, 6, 10]``, ``seq_lens = [5, 5, 5, 5]`` gives ``batch_indices = [0, 1, 1, 2, 2, 2, 3, 3, 3, 3]``,
    ``positions = [4, 3, 4, 2, 3, 4, 1, 2, 3, 4]``.

    Args:
        append_indptr: host integer array ``[batch + 1]``: starts at 0, non-decreasing.
        seq_lens: host integer array ``[batch]``: tokens of each request *after* the append (see
            :func:`get_seq_lens`); ``seq_lens[b] >= n_b``.
        nnz: optional total number of appended tokens; if given it must equal ``append_indptr[-1]``.
        batch_indices, positions: optional int32 numpy arrays ``[nnz]`` to write into (no allocation for the
            results; reuse them every step). They must be C-contiguous and writeable.

    Returns:
        ``(batch_indices, positions)``, int32 numpy arrays ``[nnz]`` (the ones passed, if any). Upload them to
        the device for :func:`append_paged_kv_cache`.

    Raises:
        TypeError: an array that is not a host integer array (floats, strings, bools, device tensors).
        ValueError: ``seq_lens`` not ``[batch]`` for ``append_indptr`` ``[batch + 1]``, a decreasing ``append_indptr``,
            ``nnz`` not ``append_indptr[-1]``, values outside int32, output arrays of the wrong shape or dtype.
    """
    indptr = _indptr("append_indptr", append_indptr)
    seq = _host_ints("seq_lens", seq_lens)
    batch = indptr.size - 1
    if seq.shape != (batch,):
        raise ValueError(f"seq_lens: expected shape ({batch},) to match append_indptr [batch + 1], got {seq.shape}")
    total = int(indptr[-1])
    if nnz is not None and checks.integer("nnz", nnz, 0) != total:
        raise ValueError(f"nnz: expected append_indptr[-1] = {total}, got {nnz}")
    lens = np.diff(indptr)
    short = seq < lens
    if short.any():
        b = int(np.argmax(short))
        raise ValueError(
            f"seq_lens: request {b} appends {lens[b]} tokens but seq_lens[{b}] = {seq[b]}; seq_lens "
            f"must count the appended tokens too"
        )
    bi = _out("batch_indices", batch_indices, total)
    po = _out("positions", positions, total)
    owner = np.repeat(np.arange(batch, dtype=np.int64), lens)
    bi[:] = owner
    # positions[i] = i - (append_indptr[b + 1] - seq_lens[b]) for the request b that owns token i
    po[:] = np.arange(total, dtype=np.int64) - (indptr[1:] - seq)[owner]
    return bi, po


def check_append_positions(
    batch_indices: Any,
    positions: Any,
    kv_indices: Any,
    kv_indptr: Any,
    kv_last_page_len: Any,
    page_size: int,
    num_pages: int | None = None,
) -> None:
    """Check on the host that every appended token lands in a page its request owns (debug aid).

    :func:`append_paged_kv_cache` cannot read its device index arrays; a runtime that keeps host copies of them
    can call this with the copies before the append. Checks: ``kv_indptr`` starts at 0, is non-decreasing and
    stays within ``kv_indices``; ``kv_last_page_len`` fits ``page_size``; every ``batch_indices[i]`` is a
    request of the batch; every ``positions[i]`` is in ``[0, seq_len)`` of its request; and, if ``num_pages``
    is given, every page id used is in ``[0, num_pages)``.

    Args:
        batch_indices, positions: host integer arrays ``[nnz]``.
        kv_indices, kv_indptr, kv_last_page_len: host integer arrays, as for :func:`append_paged_kv_cache`.
        page_size: tokens per page, in ``[1, 2**31)``.
        num_pages: pages in the cache (``k_cache.shape[0]``), or None to skip the page-id check.

    Raises:
        ValueError naming the first offending token, request or page.
    """
    page_size = _bounded("page_size", page_size, 1)
    bi = _host_ints("batch_indices", batch_indices)
    po = _host_ints("positions", positions)
    if po.shape != bi.shape:
        raise ValueError(f"positions: expected shape {bi.shape} (same as batch_indices), got {po.shape}")
    indices = _host_ints("kv_indices", kv_indices)
    indptr = _indptr("kv_indptr", kv_indptr)
    if indptr[-1] > indices.size:
        raise ValueError(f"kv_indptr: the last offset {indptr[-1]} exceeds the {indices.size} entries of kv_indices")
    seq = get_seq_lens(indptr, kv_last_page_len, page_size).astype(np.int64)
    batch = seq.size
    if (i := _first((bi < 0) | (bi >= batch))) is not None:
        raise ValueError(f"batch_indices: token {i} names request {bi[i]}, but the batch has {batch} requests")
    limit = seq[bi]
    if (i := _first((po < 0) | (po >= limit))) is not None:
        raise ValueError(
            f"positions: token {i} of request {bi[i]} has position {po[i]}, but the request's pages "
            f"hold {limit[i]} tokens (kv_indptr, kv_last_page_len, page_size {page_size})"
        )
    if num_pages is not None:
        num_pages = _bounded("num_pages", num_pages, 0)
        pages = indices[indptr[bi] + po // page_size]
        if (i := _first((pages < 0) | (pages >= num_pages))) is not None:
            raise ValueError(
                f"kv_indices: token {i} (request {bi[i]}, position {po[i]}) goes to page {pages[i]}, "
                f"outside the cache's {num_pages} pages"
            )


def _first(bad: np.ndarray) -> int | None:
    """The index of the first True entry of ``bad`` (the token or request an error names); None if none is."""
    return int(np.argmax(bad)) if bad.any() else None


def _out(name: str, value: np.ndarray | None, n: int) -> np.ndarray:
    if value is None:
        return np.empty(n, dtype=np.int32)
    if not isinstance(value, np.ndarray):
        raise TypeError(f"{name}: expected an int32 numpy array [{n}], got {type(value).__name__}")
    if value.dtype != np.int32:
        raise TypeError(f"{name}: expected dtype int32, got {value.dtype}")
    if value.shape != (n,):
        raise ValueError(f"{name}: expected shape ({n},), got {value.shape}")
    if not value.flags.c_contiguous or not value.flags.writeable:
        raise ValueError(f"{name}: expected a C-contiguous, writeable array")
    return value


def _int32(name: str, arr: np.ndarray) -> np.ndarray:
    if arr.size and (arr.max() > np.iinfo(np.int32).max or arr.min() < np.iinfo(np.int32).min):
        raise ValueError(f"{name}: values do not fit in int32")
    return arr.astype(np.int32)
