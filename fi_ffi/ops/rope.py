"""Rotary position embedding (RoPE) of queries and keys: the ``rope`` module.

Each op rotates the first ``rotary_dim`` elements of every head of ``q`` ``[nnz, num_qo_heads, head_dim]`` and
``k`` ``[nnz, num_kv_heads, head_dim]`` by angles ``position * freq[j]`` and copies the remaining
``head_dim - rotary_dim`` elements unchanged. Results go to ``q_rope`` / ``k_rope`` (out of place: memory of
their own) or back into ``q`` / ``k`` (the ``*_inplace`` ops). fi_ffi allocates nothing: pass the outputs.

Layout of a rotated pair (``interleave``):

- ``False`` (GPT-NeoX / Llama style): element ``i < rotary_dim / 2`` pairs with ``i + rotary_dim / 2``,
  ``out[i] = x[i] cos - x[i + r/2] sin`` and ``out[i + r/2] = x[i + r/2] cos + x[i] sin``, angle index ``i``.
- ``True`` (GPT-J style): elements ``2j`` and ``2j + 1`` pair, ``out[2j] = x[2j] cos - x[2j+1] sin``,
  ``out[2j+1] = x[2j+1] cos + x[2j] sin``, angle index ``j``.

Frequencies (radians per position), for pair index ``j < rotary_dim / 2``:
``freq[j] = rope_theta ** (-2j / rotary_dim) / rope_scale`` (``rope_scale`` > 1 interpolates positions).
The Llama 3.1 ops blend the scaled and unscaled frequency by wavelength ``2 pi / freq[j]`` (unscaled):
wavelengths below ``old_context_len / high_freq_factor`` keep the unscaled frequency, those above
``old_context_len / low_freq_factor`` take ``freq / rope_scale``, and in between
``s = (old_context_len / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)`` mixes them:
``(1 - s) * freq / rope_scale + s * freq``.

Positions: ``pos_ids`` (int32 or int64 ``[nnz]``) give each token's position; the ragged ops take ``indptr``
``[batch + 1]`` and ``offsets`` ``[batch]`` instead (token ``t`` of request ``b`` is row ``indptr[b] + t`` at
position ``offsets[b] + t``). ``apply_rope_with_cos_sin_cache`` reads precomputed ``cos``/``sin`` values.

Contract (checked before the kernel; positions and index values live on the device and are not checked):
float16 or bfloat16 ``q``/``k`` with head_dim 64, 128, 256 or 512; the last dimension contiguous, rows and
heads may be strided (q and k may be slices of one fused QKV tensor); data pointers 16-byte aligned and
strides multiples of 8 elements; ``rotary_dim`` even, at most head_dim, and a multiple of the elements one
thread rotates: ``v = max(8, head_dim / 32)`` when interleaved, ``2 v`` otherwise (so both halves start on a
vector). An output is either its input itself (in place) or shares no memory with any input; this is checked
on every call (see :mod:`fi_ffi.launch.pointer_rules`).

All calls are asynchronous on ``stream`` (see :mod:`fi_ffi.tensor.streams`) and never synchronize. Pass the float
parameters as Python floats (ints are converted), so repeated calls stay on the launcher's fast path.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

from ..abi.values import scalar_type_error
from ..abi.wire import BOOL, FLOAT, INT, Param, declare, tensor, tensors
from ..dtypes import bfloat16, float16, float32, int32, int64
from ..launch import checks
from ..launch.launcher import launcher
from ..launch.pointer_rules import PointerRules
from ..launch.registry import op
from ..tensor.descriptor import Tensor
from ..tensor.protocols import StreamLike, TensorLike, TensorT

_URI = "rope"
_DTYPES = (float16, bfloat16)
_INDEX_DTYPES = (int32, int64)
_HEAD_DIMS = (64, 128, 256, 512)  # the kernels dispatch on these (DISPATCH_HEAD_DIM)
_ALIGN_ELEMENTS = 8  # 16-byte vector loads of float16/bfloat16

_QK = (tensor("q"), tensor("k"), tensor("q_rope", output=True), tensor("k_rope", output=True))
_ROPE = (("rotary_dim", INT), ("interleave", BOOL), ("rope_scale", FLOAT), ("rope_theta", FLOAT))
_LLAMA31 = (("low_freq_factor", FLOAT), ("high_freq_factor", FLOAT), ("old_context_len", FLOAT))
_RAGGED = (tensor("indptr"), tensor("offsets"))

# Wire order as in FlashInfer's csrc/flashinfer_rope_binding.cu (same in 0.6.3 and 0.7.x).
APPLY_ROPE = declare("apply_rope", [*_QK, *_RAGGED, *_ROPE])
APPLY_LLAMA31_ROPE = declare("apply_llama31_rope", [*_QK, *_RAGGED, *_ROPE, *_LLAMA31])
APPLY_ROPE_POS_IDS = declare("apply_rope_pos_ids", [*_QK, tensor("pos_ids"), *_ROPE])
APPLY_LLAMA31_ROPE_POS_IDS = declare("apply_llama31_rope_pos_ids", [*_QK, tensor("pos_ids"), *_ROPE, *_LLAMA31])
# The cos/sin-cache op keeps flashinfer-python's public names (query, key, positions), so errors name them.
APPLY_ROPE_POS_IDS_COS_SIN_CACHE = declare(
    "apply_rope_pos_ids_cos_sin_cache",
    [
        *tensors("query", "key"),
        *tensors("query_out", "key_out", output=True),
        *tensors("cos_sin_cache", "positions"),
        Param("interleave", BOOL),
    ],
)
DECLARATIONS = tuple(
    ("rope", d)
    for d in (
        APPLY_ROPE,
        APPLY_LLAMA31_ROPE,
        APPLY_ROPE_POS_IDS,
        APPLY_LLAMA31_ROPE_POS_IDS,
        APPLY_ROPE_POS_IDS_COS_SIN_CACHE,
    )
)

# ---- contract ------------------------------------------------------------------------------------------------


def _check_heads(rules: PointerRules, a: SimpleNamespace, names: tuple[str, str, str, str]) -> tuple[int, int]:
    """q, k and their outputs; returns (nnz, head_dim)."""
    qn, kn, qrn, krn = names
    q, k, qr, kr = (getattr(a, n) for n in names)
    checks.device_tensor(qn, q, 3, "[nnz, num_qo_heads, head_dim]", _DTYPES, strided_rows=True)
    nnz, num_qo_heads, head_dim = q.shape
    if head_dim not in _HEAD_DIMS:
        raise ValueError(f"{qn}: head_dim {head_dim} is not supported; the RoPE kernels take 64, 128, 256 or 512")
    if nnz < 1 or num_qo_heads < 1:
        raise ValueError(f"{qn}: expected at least one token and one head, got shape {q.shape}")
    checks.ndim(kn, k, 3, "[nnz, num_kv_heads, head_dim]")
    if k.shape[0] != nnz or k.shape[2] != head_dim or k.shape[1] < 1:
        raise ValueError(
            f"{kn}: expected shape ({nnz}, num_kv_heads >= 1, {head_dim}) (nnz and head_dim of {qn}), got {k.shape}"
        )
    checks.same_dtype(kn, k, qn, q)
    checks.same_device(kn, k, qn, q)
    checks.cuda(kn, k)
    checks.last_dim_contiguous(kn, k)
    for name, out, ref_name, ref in ((qrn, qr, qn, q), (krn, kr, kn, k)):
        checks.shape(name, out, ref.shape, f"same as {ref_name}")
        checks.same_dtype(name, out, ref_name, ref)
        checks.same_device(name, out, qn, q)
        checks.cuda(name, out)
        checks.last_dim_contiguous(name, out)
    for name, t in zip(names, (q, k, qr, kr), strict=True):
        checks.aligned(rules, name, t, _ALIGN_ELEMENTS)
    # In place, q_rope is q and k_rope is k; then q and k may interleave (a fused QKV tensor): each element
    # is read and written by one thread. Otherwise an output shares no memory with any input or the other output.
    rules.same_or_disjoint(qrn, qn).same_or_disjoint(krn, kn)
    rules.disjoint(qrn, kn).disjoint(krn, qn).disjoint(qrn, krn)
    return nnz, head_dim


def _check_rotary_dim(name: str, rotary_dim: int, head_dim: int, interleave: bool) -> None:
    """``rotary_dim`` fits the head and the kernel's per-thread vectors (see the module docstring)."""
    if not 0 < rotary_dim <= head_dim:
        raise ValueError(f"{name}: expected 0 < rotary_dim <= head_dim ({head_dim}), got {rotary_dim}")
    if rotary_dim % 2:
        raise ValueError(f"{name}: expected an even rotary_dim (dimensions rotate in pairs), got {rotary_dim}")
    vec = max(_ALIGN_ELEMENTS, head_dim // 32)
    step = vec if interleave else 2 * vec
    if rotary_dim % step:
        layout = "interleaved" if interleave else "not interleaved (each half must start on a vector)"
        raise ValueError(
            f"{name}: expected a multiple of {step} for head_dim {head_dim}, {layout}: the kernel "
            f"rotates {vec} elements per thread; got {rotary_dim}"
        )


def _check_index(name: str, t: Any, length: int | None, layout: str, ref_name: str, ref: Any) -> None:
    checks.ndim(name, t, 1, layout)
    if length is not None and t.shape[0] != length:
        raise ValueError(f"{name}: expected shape ({length},) ({layout}), got {t.shape}")
    checks.dtype_in(name, t, _INDEX_DTYPES)
    checks.same_device(name, t, ref_name, ref)
    checks.cuda(name, t)
    checks.contiguous(name, t)


def _check_scales(a: SimpleNamespace, llama31: bool) -> None:
    checks.positive_finite("rope_scale", a.rope_scale)
    checks.positive_finite("rope_theta", a.rope_theta)
    if llama31:
        low = checks.positive_finite("low_freq_factor", a.low_freq_factor)
        high = checks.finite("high_freq_factor", a.high_freq_factor)
        if not high > low:
            raise ValueError(
                f"high_freq_factor: expected a value > low_freq_factor ({low}), got {high} (the blend "
                f"divides by high_freq_factor / low_freq_factor - 1)"
            )
        checks.positive_finite("old_context_len", a.old_context_len)


def _rope_check(ragged: bool, llama31: bool) -> Callable[[SimpleNamespace], PointerRules]:
    def check(a: SimpleNamespace) -> PointerRules:
        names = ("q", "k", "q_rope", "k_rope")
        rules = PointerRules()
        nnz, head_dim = _check_heads(rules, a, names)
        if ragged:
            _check_index("indptr", a.indptr, None, "[batch_size + 1]", "q", a.q)
            if a.indptr.shape[0] < 2:
                raise ValueError(
                    f"indptr: expected at least 2 entries ([batch_size + 1], batch_size >= 1), got "
                    f"shape {a.indptr.shape}"
                )
            _check_index("offsets", a.offsets, a.indptr.shape[0] - 1, "[batch_size]", "q", a.q)
            checks.same_dtype("offsets", a.offsets, "indptr", a.indptr)
            indices: tuple[str, ...] = ("indptr", "offsets")
        else:
            _check_index("pos_ids", a.pos_ids, nnz, "[nnz]", "q", a.q)
            indices = ("pos_ids",)
        _check_rotary_dim("rotary_dim", a.rotary_dim, head_dim, a.interleave)
        _check_scales(a, llama31)
        return rules.outputs_apart(("q_rope", "k_rope"), indices)

    check.__qualname__ = f"check_rope{'_ragged' if ragged else '_pos_ids'}{'_llama31' if llama31 else ''}"
    return check


def _check_cos_sin_cache(a: SimpleNamespace) -> PointerRules:
    names = ("query", "key", "query_out", "key_out")
    rules = PointerRules()
    nnz, head_dim = _check_heads(rules, a, names)
    cache = a.cos_sin_cache
    checks.ndim("cos_sin_cache", cache, 2, "[max_position + 1, rotary_dim]: cos then sin")
    checks.dtype_in("cos_sin_cache", cache, (float32,))
    checks.same_device("cos_sin_cache", cache, "query", a.query)
    checks.cuda("cos_sin_cache", cache)
    checks.contiguous("cos_sin_cache", cache)
    if cache.shape[0] < 1:
        raise ValueError(f"cos_sin_cache: expected at least one position, got shape {cache.shape}")
    _check_rotary_dim("cos_sin_cache: its width (rotary_dim)", cache.shape[1], head_dim, a.interleave)
    _check_index("positions", a.positions, nnz, "[nnz]", "query", a.query)
    # the kernel reads cos/sin in 16-byte vectors
    rules.align("cos_sin_cache", 16)
    return rules.outputs_apart(("query_out", "key_out"), ("cos_sin_cache", "positions"))


_apply_rope = launcher(APPLY_ROPE, _URI, _rope_check(ragged=True, llama31=False))
_apply_llama31_rope = launcher(APPLY_LLAMA31_ROPE, _URI, _rope_check(ragged=True, llama31=True))
_apply_rope_pos_ids = launcher(APPLY_ROPE_POS_IDS, _URI, _rope_check(ragged=False, llama31=False))
_apply_llama31_rope_pos_ids = launcher(APPLY_LLAMA31_ROPE_POS_IDS, _URI, _rope_check(ragged=False, llama31=True))
_apply_cos_sin_cache = launcher(APPLY_ROPE_POS_IDS_COS_SIN_CACHE, _URI, _check_cos_sin_cache)


# ---- helpers of the op functions (per call: cheap) -------------------------------------------------------------


def _head_dim(q: Any) -> int:
    """``q``'s last extent, for ``rotary_dim=None`` (every tensor producer fi_ffi reads has ``.shape``); 0 when it
    has none (a 0-d or missing ``q``: the launch's checks then name ``q``)."""
    try:
        return int(q.shape[-1])
    except Exception:
        shape = checks.tensor("q", q).shape if q is not None else ()
        return shape[-1] if shape else 0


def _f(name: str, value: Any) -> Any:
    """An int parameter as a float (the launcher's fast path keys floats by type); anything else as is (the
    launch's checks name what is not a number)."""
    if value.__class__ is int:
        try:
            return float(value)
        except OverflowError:  # 10**400
            raise ValueError(f"{name}: expected a finite float, got an int too large for a float64") from None
    return value


def _rope_values(q: Any, rotary_dim: Any, interleave: Any, rope_scale: Any, rope_theta: Any) -> tuple[Any, ...]:
    """The wire values of ``_ROPE``: ``rotary_dim`` (None: all of ``q``'s head_dim), ``interleave``, and the two
    scales as floats."""
    rotary_dim = _head_dim(q) if rotary_dim is None else rotary_dim
    return rotary_dim, interleave, _f("rope_scale", rope_scale), _f("rope_theta", rope_theta)


def _llama31_values(low_freq_factor: Any, high_freq_factor: Any, old_context_len: Any) -> tuple[Any, ...]:
    """The wire values of ``_LLAMA31``, as floats."""
    return (
        _f("low_freq_factor", low_freq_factor),
        _f("high_freq_factor", high_freq_factor),
        _f("old_context_len", old_context_len),
    )


def _outputs(
    q_rope: TensorT | None, k_rope: TensorT | None, names: tuple[str, str] = ("q_rope", "k_rope")
) -> tuple[TensorT, TensorT]:
    """The two outputs, both required (a missing one is a TypeError naming it)."""
    if q_rope is None or k_rope is None:
        missing = names[0] if q_rope is None else names[1]
        raise TypeError(
            f"{missing}: required (fi_ffi never allocates device memory); pass a tensor shaped like the "
            f"input, or use the *_inplace op"
        )
    return q_rope, k_rope


# The wire mappings of the in-place ops with position ids (the op's arguments -> its launch function's values),
# shared by the ops and fi_ffi.prepare: the op passes its launch function, prepare a packer (fi_ffi.launch.packing).
# A float argument is tested inline (`_f` only for the rest): the ops' hot path, one call fewer per scalar.


def _pos_ids_inplace(
    launch: Callable[..., Any],
    q: Any,
    k: Any,
    pos_ids: Any,
    rotary_dim: Any,
    interleave: Any,
    rope_scale: Any,
    rope_theta: Any,
    stream: Any,
) -> Any:
    """(q, k, q, k, pos_ids, rotary_dim, interleave, rope_scale, rope_theta): q_rope is q, k_rope is k."""
    return launch(
        q,
        k,
        q,
        k,
        pos_ids,
        _head_dim(q) if rotary_dim is None else rotary_dim,
        interleave,
        rope_scale if rope_scale.__class__ is float else _f("rope_scale", rope_scale),
        rope_theta if rope_theta.__class__ is float else _f("rope_theta", rope_theta),
        stream=stream,
    )


def _llama31_pos_ids_inplace(
    launch: Callable[..., Any],
    q: Any,
    k: Any,
    pos_ids: Any,
    rotary_dim: Any,
    interleave: Any,
    rope_scale: Any,
    rope_theta: Any,
    low_freq_factor: Any,
    high_freq_factor: Any,
    old_context_len: Any,
    stream: Any,
) -> Any:
    """:func:`_pos_ids_inplace`'s values, then low_freq_factor, high_freq_factor, old_context_len."""
    return launch(
        q,
        k,
        q,
        k,
        pos_ids,
        _head_dim(q) if rotary_dim is None else rotary_dim,
        interleave,
        rope_scale if rope_scale.__class__ is float else _f("rope_scale", rope_scale),
        rope_theta if rope_theta.__class__ is float else _f("rope_theta", rope_theta),
        low_freq_factor if low_freq_factor.__class__ is float else _f("low_freq_factor", low_freq_factor),
        high_freq_factor if high_freq_factor.__class__ is float else _f("high_freq_factor", high_freq_factor),
        old_context_len if old_context_len.__class__ is float else _f("old_context_len", old_context_len),
        stream=stream,
    )


# ---- ops ---------------------------------------------------------------------------------------------------------


@op(launch=_apply_rope_pos_ids, flashinfer="flashinfer.rope.apply_rope_pos_ids")
def apply_rope_pos_ids(
    q: TensorLike,
    k: TensorLike,
    pos_ids: TensorLike,
    rotary_dim: int | None = None,
    interleave: bool = False,
    rope_scale: float = 1.0,
    rope_theta: float = 1e4,
    *,
    q_rope: TensorT | None = None,
    k_rope: TensorT | None = None,
    stream: StreamLike = None,
) -> tuple[TensorT, TensorT]:
    """RoPE with per-token positions, out of place.

    Args:
        q: ``[nnz, num_qo_heads, head_dim]`` float16/bfloat16 (see the module docstring for layouts).
        k: ``[nnz, num_kv_heads, head_dim]``, same dtype.
        pos_ids: int32/int64 ``[nnz]``, contiguous: the position of each token.
        rotary_dim: elements rotated from the start of each head; None: all of head_dim.
        interleave: pairs ``(2j, 2j+1)`` (True) or ``(i, i + rotary_dim/2)`` (False).
        rope_scale: frequencies are divided by it (> 0). rope_theta: the base (> 0).
        q_rope, k_rope: outputs shaped like ``q`` / ``k`` (required).
        stream: where the kernel runs (None: the framework's current stream of ``q``).

    Returns:
        ``(q_rope, k_rope)``, as passed.

    Raises:
        TypeError: a tensor argument not a tensor (or None where required), or of a dtype other than those listed; a
            scalar of the wrong type (``rotary_dim`` not an int, ``interleave`` not a bool).
        ValueError: ``q`` / ``k`` not ``[nnz, heads, head_dim]`` with one ``nnz`` and ``head_dim`` in 64/128/256/512, an
            odd ``rotary_dim`` or one above ``head_dim``, index arrays of the wrong length, non-finite or non-positive
            scaling factors, a tensor not on ``q``'s CUDA device, a strided last dimension, misaligned data.
    """
    q_rope, k_rope = _outputs(q_rope, k_rope)
    rope = _rope_values(q, rotary_dim, interleave, rope_scale, rope_theta)
    _apply_rope_pos_ids(q, k, q_rope, k_rope, pos_ids, *rope, stream=stream)
    return q_rope, k_rope


@op(launch=_apply_rope_pos_ids, packable=_pos_ids_inplace, flashinfer="flashinfer.rope.apply_rope_pos_ids_inplace")
def apply_rope_pos_ids_inplace(
    q: TensorLike,
    k: TensorLike,
    pos_ids: TensorLike,
    rotary_dim: int | None = None,
    interleave: bool = False,
    rope_scale: float = 1.0,
    rope_theta: float = 1e4,
    *,
    stream: StreamLike = None,
) -> None:
    """:func:`apply_rope_pos_ids` writing back into ``q`` and ``k``.

    Raises:
        TypeError, ValueError: as :func:`apply_rope_pos_ids`.
    """
    _pos_ids_inplace(_apply_rope_pos_ids, q, k, pos_ids, rotary_dim, interleave, rope_scale, rope_theta, stream)


@op(launch=_apply_llama31_rope_pos_ids, flashinfer="flashinfer.rope.apply_llama31_rope_pos_ids")
def apply_llama31_rope_pos_ids(
    q: TensorLike,
    k: TensorLike,
    pos_ids: TensorLike,
    rotary_dim: int | None = None,
    interleave: bool = False,
    rope_scale: float = 8.0,
    rope_theta: float = 5e5,
    low_freq_factor: float = 1.0,
    high_freq_factor: float = 4.0,
    old_context_len: float = 8192.0,
    *,
    q_rope: TensorT | None = None,
    k_rope: TensorT | None = None,
    stream: StreamLike = None,
) -> tuple[TensorT, TensorT]:
    """Llama 3.1 RoPE with per-token positions, out of place (defaults: Llama 3.1's).

    Args as :func:`apply_rope_pos_ids`, plus ``low_freq_factor`` (> 0), ``high_freq_factor``
    (> low_freq_factor) and ``old_context_len`` (the pre-training context, in tokens): see the module docstring.

    Raises:
        TypeError, ValueError: as :func:`apply_rope_pos_ids`.
    """
    q_rope, k_rope = _outputs(q_rope, k_rope)
    rope = _rope_values(q, rotary_dim, interleave, rope_scale, rope_theta)
    llama31 = _llama31_values(low_freq_factor, high_freq_factor, old_context_len)
    _apply_llama31_rope_pos_ids(q, k, q_rope, k_rope, pos_ids, *rope, *llama31, stream=stream)
    return q_rope, k_rope


@op(
    launch=_apply_llama31_rope_pos_ids,
    packable=_llama31_pos_ids_inplace,
    flashinfer="flashinfer.rope.apply_llama31_rope_pos_ids_inplace",
)
def apply_llama31_rope_pos_ids_inplace(
    q: TensorLike,
    k: TensorLike,
    pos_ids: TensorLike,
    rotary_dim: int | None = None,
    interleave: bool = False,
    rope_scale: float = 8.0,
    rope_theta: float = 5e5,
    low_freq_factor: float = 1.0,
    high_freq_factor: float = 4.0,
    old_context_len: float = 8192.0,
    *,
    stream: StreamLike = None,
) -> None:
    """:func:`apply_llama31_rope_pos_ids` writing back into ``q`` and ``k``.

    Raises:
        TypeError, ValueError: as :func:`apply_rope_pos_ids`.
    """
    _llama31_pos_ids_inplace(
        _apply_llama31_rope_pos_ids,
        q,
        k,
        pos_ids,
        rotary_dim,
        interleave,
        rope_scale,
        rope_theta,
        low_freq_factor,
        high_freq_factor,
        old_context_len,
        stream,
    )


@op(launch=_apply_rope, flashinfer="flashinfer.rope.apply_rope")
def apply_rope(
    q: TensorLike,
    k: TensorLike,
    indptr: TensorLike,
    offsets: TensorLike,
    rotary_dim: int | None = None,
    interleave: bool = False,
    rope_scale: float = 1.0,
    rope_theta: float = 1e4,
    *,
    q_rope: TensorT | None = None,
    k_rope: TensorT | None = None,
    stream: StreamLike = None,
) -> tuple[TensorT, TensorT]:
    """RoPE of a ragged batch, out of place: request ``b`` owns rows ``indptr[b]:indptr[b+1]`` of ``q``/``k``,
    and its row ``t`` is at position ``offsets[b] + t``.

    Args:
        indptr: int32/int64 ``[batch_size + 1]``, contiguous, ``indptr[-1] <= nnz`` (not checked: device values).
        offsets: ``[batch_size]``, same dtype as ``indptr``.
        Others as :func:`apply_rope_pos_ids`.

    Raises:
        TypeError, ValueError: as :func:`apply_rope_pos_ids`.
    """
    q_rope, k_rope = _outputs(q_rope, k_rope)
    rope = _rope_values(q, rotary_dim, interleave, rope_scale, rope_theta)
    _apply_rope(q, k, q_rope, k_rope, indptr, offsets, *rope, stream=stream)
    return q_rope, k_rope


@op(launch=_apply_rope, flashinfer="flashinfer.rope.apply_rope_inplace")
def apply_rope_inplace(
    q: TensorLike,
    k: TensorLike,
    indptr: TensorLike,
    offsets: TensorLike,
    rotary_dim: int | None = None,
    interleave: bool = False,
    rope_scale: float = 1.0,
    rope_theta: float = 1e4,
    *,
    stream: StreamLike = None,
) -> None:
    """:func:`apply_rope` writing back into ``q`` and ``k``.

    Raises:
        TypeError, ValueError: as :func:`apply_rope_pos_ids`.
    """
    rope = _rope_values(q, rotary_dim, interleave, rope_scale, rope_theta)
    _apply_rope(q, k, q, k, indptr, offsets, *rope, stream=stream)


@op(launch=_apply_llama31_rope, flashinfer="flashinfer.rope.apply_llama31_rope")
def apply_llama31_rope(
    q: TensorLike,
    k: TensorLike,
    indptr: TensorLike,
    offsets: TensorLike,
    rotary_dim: int | None = None,
    interleave: bool = False,
    rope_scale: float = 8.0,
    rope_theta: float = 5e5,
    low_freq_factor: float = 1.0,
    high_freq_factor: float = 4.0,
    old_context_len: float = 8192.0,
    *,
    q_rope: TensorT | None = None,
    k_rope: TensorT | None = None,
    stream: StreamLike = None,
) -> tuple[TensorT, TensorT]:
    """Llama 3.1 RoPE of a ragged batch, out of place (see :func:`apply_rope` and
    :func:`apply_llama31_rope_pos_ids`).

    Raises:
        TypeError, ValueError: as :func:`apply_rope_pos_ids`.
    """
    q_rope, k_rope = _outputs(q_rope, k_rope)
    rope = _rope_values(q, rotary_dim, interleave, rope_scale, rope_theta)
    llama31 = _llama31_values(low_freq_factor, high_freq_factor, old_context_len)
    _apply_llama31_rope(q, k, q_rope, k_rope, indptr, offsets, *rope, *llama31, stream=stream)
    return q_rope, k_rope


@op(launch=_apply_llama31_rope, flashinfer="flashinfer.rope.apply_llama31_rope_inplace")
def apply_llama31_rope_inplace(
    q: TensorLike,
    k: TensorLike,
    indptr: TensorLike,
    offsets: TensorLike,
    rotary_dim: int | None = None,
    interleave: bool = False,
    rope_scale: float = 8.0,
    rope_theta: float = 5e5,
    low_freq_factor: float = 1.0,
    high_freq_factor: float = 4.0,
    old_context_len: float = 8192.0,
    *,
    stream: StreamLike = None,
) -> None:
    """:func:`apply_llama31_rope` writing back into ``q`` and ``k``.

    Raises:
        TypeError, ValueError: as :func:`apply_rope_pos_ids`.
    """
    rope = _rope_values(q, rotary_dim, interleave, rope_scale, rope_theta)
    llama31 = _llama31_values(low_freq_factor, high_freq_factor, old_context_len)
    _apply_llama31_rope(q, k, q, k, indptr, offsets, *rope, *llama31, stream=stream)


def _heads(name: str, x: Any, head_size: Any) -> Any:
    """``x`` as ``[nnz, heads, head_size]``: 3-D producers pass as they are (the fast path); a 2-D
    ``[nnz, heads * head_size]`` one becomes a descriptor view (a descriptor per call)."""
    if isinstance(head_size, bool) or not isinstance(head_size, int) or head_size < 1:
        raise scalar_type_error("head_size", "an int >= 1", head_size, repr(head_size))
    shape = getattr(x, "shape", None)
    if shape is not None and len(shape) == 3:
        if int(shape[2]) != head_size:
            raise ValueError(f"{name}: its last dimension ({int(shape[2])}) must equal head_size ({head_size})")
        return x
    t = checks.tensor(name, x)
    if t.ndim != 2:
        raise ValueError(
            f"{name}: expected [nnz, num_heads * head_size] or [nnz, num_heads, head_size], got shape {t.shape}"
        )
    nnz, width = t.shape
    if width % head_size:
        raise ValueError(f"{name}: its width {width} is not a multiple of head_size ({head_size})")
    if t.strides[1] != 1 and width > 1:
        raise ValueError(f"{name}: the last dimension must be contiguous (stride 1), got strides {t.strides}")
    return t.view((nnz, width // head_size, head_size), (t.strides[0], head_size, 1))


def _stream_of(x: Any, view: Tensor, stream: Any) -> Any:
    """The stream of a call on ``view`` (a descriptor made from ``x``): the one the call would have taken from
    ``x`` itself (torch's or CuPy's current stream) when ``stream`` is None."""
    if stream is not None:
        return stream
    from ..tensor import intake

    return intake.default_stream(x, view.device.device_id)


def _cos_sin_cache(
    positions: Any,
    query: Any,
    key: Any,
    query_out: Any,
    key_out: Any,
    head_size: Any,
    cos_sin_cache: Any,
    is_neox: Any,
    stream: Any,
) -> None:
    """The launch of both cos/sin-cache ops: each tensor viewed as ``[nnz, heads, head_size]`` (an output that is
    its input, in place, shares the input's view) and ``is_neox`` turned into the kernel's ``interleave``."""
    if is_neox is not True and is_neox is not False:
        is_neox = checks.flag("is_neox", is_neox)
    q, k = _heads("query", query, head_size), _heads("key", key, head_size)
    q_out = q if query_out is query else _heads("query_out", query_out, head_size)
    k_out = k if key_out is key else _heads("key_out", key_out, head_size)
    stream = stream if q is query else _stream_of(query, q, stream)
    _apply_cos_sin_cache(q, k, q_out, k_out, cos_sin_cache, positions, not is_neox, stream=stream)


@op(launch=_apply_cos_sin_cache, flashinfer="flashinfer.rope.apply_rope_with_cos_sin_cache")
def apply_rope_with_cos_sin_cache(
    positions: TensorLike,
    query: TensorLike,
    key: TensorLike,
    head_size: int,
    cos_sin_cache: TensorLike,
    is_neox: bool = True,
    *,
    query_out: TensorT | None = None,
    key_out: TensorT | None = None,
    stream: StreamLike = None,
) -> tuple[TensorT, TensorT]:
    """RoPE with precomputed cos/sin (the SGLang / vLLM form), out of place.

    Args:
        positions: int32/int64 ``[nnz]``: row of ``cos_sin_cache`` for each token (< its rows: not checked).
        query: ``[nnz, num_qo_heads * head_size]`` or ``[nnz, num_qo_heads, head_size]`` float16/bfloat16
            (the 3-D form is passed as is; the 2-D one is viewed per call).
        key: likewise with num_kv_heads.
        head_size: elements per head (64, 128, 256 or 512).
        cos_sin_cache: float32 ``[max_position + 1, rotary_dim]``, contiguous: ``cos(p * freq[j])`` for
            ``j < rotary_dim / 2``, then ``sin(p * freq[j])``. With ``is_neox=False`` the kernel reads up to
            16 bytes past the last row's sin values: allocate a little slack after the cache.
        is_neox: True: pairs ``(i, i + rotary_dim/2)``; False: interleaved pairs ``(2j, 2j+1)``.
        query_out, key_out: outputs shaped like ``query`` / ``key`` (required).

    Returns:
        ``(query_out, key_out)``, as passed.

    Raises:
        TypeError: a tensor argument not a tensor (or None where required), or of a dtype other than those listed; a
            scalar of the wrong type (``rotary_dim`` not an int, ``interleave`` not a bool).
        ValueError: ``q`` / ``k`` not ``[nnz, heads, head_dim]`` with one ``nnz`` and ``head_dim`` in 64/128/256/512, an
            odd ``rotary_dim`` or one above ``head_dim``, index arrays of the wrong length, non-finite or non-positive
            scaling factors, a tensor not on ``q``'s CUDA device, a strided last dimension, misaligned data.
    """
    query_out, key_out = _outputs(query_out, key_out, ("query_out", "key_out"))
    _cos_sin_cache(positions, query, key, query_out, key_out, head_size, cos_sin_cache, is_neox, stream)
    return query_out, key_out


@op(launch=_apply_cos_sin_cache, flashinfer="flashinfer.rope.apply_rope_with_cos_sin_cache_inplace")
def apply_rope_with_cos_sin_cache_inplace(
    positions: TensorLike,
    query: TensorLike,
    key: TensorLike,
    head_size: int,
    cos_sin_cache: TensorLike,
    is_neox: bool = True,
    *,
    stream: StreamLike = None,
) -> None:
    """:func:`apply_rope_with_cos_sin_cache` writing back into ``query`` and ``key``.

    Raises:
        TypeError, ValueError: as :func:`apply_rope_with_cos_sin_cache`.
    """
    _cos_sin_cache(positions, query, key, query, key, head_size, cos_sin_cache, is_neox, stream)
