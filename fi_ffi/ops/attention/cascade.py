"""Merging partial attention states (cascade / split-KV attention): the ``cascade`` module.

Attention of a query over KV segments ``A`` and ``B`` can be computed per segment and merged. A segment's
*state* is its attention output ``v`` (softmax-weighted values, ``[seq_len, num_heads, head_dim]``) and the
log-sum-exp ``s`` of its scaled logits (float32 ``[seq_len, num_heads]``) **in base 2**, as FlashInfer's
attention kernels return it: ``s = log2(sum_j 2 ** (sm_scale * log2(e) * q.k_j))``. Merging gives the state
of ``A`` and ``B`` together::

    s = log2(2 ** s_a + 2 ** s_b)
    v = (2 ** (s_a - s) * v_a + 2 ** (s_b - s) * v_b)

so a shared-prefix attention and a per-request suffix attention merge into the full attention (cascade
inference). ``merge_states`` merges ``n`` states at once.

Contract (checked before the kernel): ``v`` tensors float16 or bfloat16 with head_dim 64, 128, 256 or 512,
contiguous (the kernel uses no strides), 16-byte aligned; ``s`` tensors float32 and contiguous; matching
shapes; at least one row, head and state. The kernels declare their pointers ``__restrict__``: outputs share no
memory with inputs (``merge_state_in_place`` is the in-place form); checked on the first call of each layout
combination (see :mod:`fi_ffi.launch.aliasing`). fi_ffi allocates nothing: pass the outputs.

All calls are asynchronous on ``stream`` (see :mod:`fi_ffi.tensor.streams`) and never synchronize.
"""

from __future__ import annotations

from types import SimpleNamespace

from ...abi.wire import declare, optional_tensor, tensors
from ...dtypes import bfloat16, bool_, float16, float32, uint8
from ...launch import checks
from ...launch.launcher import launcher
from ...launch.pointer_rules import PointerRules
from ...launch.registry import op
from ...tensor.descriptor import Tensor
from ...tensor.protocols import StreamLike, TensorLike, TensorT

_URI = "cascade"
_DTYPES = (float16, bfloat16)
_HEAD_DIMS = (64, 128, 256, 512)

# Wire order as in FlashInfer's csrc/flashinfer_cascade_binding.cu (same in 0.6.3 and 0.7.x).
MERGE_STATE = declare(
    "merge_state",
    [
        *tensors("v_a", "s_a", "v_b", "s_b"),
        *tensors("v_merged", "s_merged", output=True),
    ],
)
MERGE_STATE_IN_PLACE = declare(
    "merge_state_in_place",
    [
        *tensors("v", "s", output=True),
        *tensors("v_other", "s_other"),
        optional_tensor("mask", default=None),
    ],
)
MERGE_STATES = declare(
    "merge_states",
    [
        *tensors("v", "s"),
        *tensors("v_merged", "s_merged", output=True),
    ],
)
DECLARATIONS = tuple((_URI, d) for d in (MERGE_STATE, MERGE_STATE_IN_PLACE, MERGE_STATES))


def _check_v(
    rules: PointerRules, name: str, v: Tensor, rank: int, layout: str, ref: tuple[str, Tensor] | None = None
) -> None:
    checks.ndim(name, v, rank, layout)
    if ref is None:
        checks.dtype_in(name, v, _DTYPES)
    else:
        checks.shape(name, v, ref[1].shape, layout)
        checks.same_dtype(name, v, *ref)
        checks.same_device(name, v, *ref)
    checks.cuda(name, v)
    checks.contiguous(name, v)
    head_dim = v.shape[-1]
    if head_dim not in _HEAD_DIMS:
        raise ValueError(f"{name}: head_dim {head_dim} is not supported; the merge kernels take 64, 128, 256 or 512")
    if v.shape[0] < 1 or any(n < 1 for n in v.shape[1:-1]):
        raise ValueError(f"{name}: expected at least one row and one head, got shape {v.shape}")
    checks.aligned(rules, name, v, 16 // v.dtype.itemsize)


def _check_s(name: str, s: Tensor, shape: tuple[int, ...], layout: str, v_name: str, v: Tensor) -> None:
    checks.ndim(name, s, len(shape), layout)
    checks.shape(name, s, shape, layout)
    checks.dtype_in(name, s, (float32,))
    checks.same_device(name, s, v_name, v)
    checks.cuda(name, s)
    checks.contiguous(name, s)


_STATE_LAYOUTS = ("[seq_len, num_heads, head_dim]", "[seq_len, num_heads] float32, base-2 LSE")


def _check_states(rules: PointerRules, a: SimpleNamespace, names: tuple[str, ...]) -> None:
    """States ``(v, s)`` of one shape, named in pairs ``(v, s, v2, s2, ...)``: the first sets the shape, dtype
    and device of the others."""
    layout, s_layout = _STATE_LAYOUTS
    first = names[0]
    v0 = getattr(a, first)
    _check_v(rules, first, v0, 3, layout)
    rows = v0.shape[:2]
    for i in range(0, len(names), 2):
        v, s = names[i], names[i + 1]
        if i:
            _check_v(rules, v, getattr(a, v), 3, layout, (first, v0))
        _check_s(s, getattr(a, s), rows, s_layout, first, v0)


def _check_pair(a: SimpleNamespace) -> PointerRules:
    rules = PointerRules()
    _check_states(rules, a, ("v_a", "s_a", "v_b", "s_b", "v_merged", "s_merged"))
    # the kernels declare every pointer __restrict__: no output shares memory with an input or the other output
    # (merge_state_in_place is the in-place form)
    return rules.outputs_apart(("v_merged", "s_merged"), ("v_a", "s_a", "v_b", "s_b"))


def _check_in_place(a: SimpleNamespace) -> PointerRules:
    rules = PointerRules()
    _check_states(rules, a, ("v", "s", "v_other", "s_other"))
    if a.mask is not None:
        checks.ndim("mask", a.mask, 1, "[seq_len] bool")
        checks.shape("mask", a.mask, (a.v.shape[0],), "[seq_len] bool")
        checks.dtype_in("mask", a.mask, (bool_, uint8))
        checks.same_device("mask", a.mask, "v", a.v)
        checks.cuda("mask", a.mask)
        checks.contiguous("mask", a.mask)
    return rules.outputs_apart(("v", "s"), ("v_other", "s_other", "mask"))


def _check_many(a: SimpleNamespace) -> PointerRules:
    rules = PointerRules()
    _check_v(rules, "v", a.v, 4, "[seq_len, num_states, num_heads, head_dim]")
    seq_len, _, num_heads, head_dim = a.v.shape
    _check_s("s", a.s, a.v.shape[:3], "[seq_len, num_states, num_heads] float32, base-2 LSE", "v", a.v)
    layout = "[seq_len, num_heads, head_dim]"
    checks.ndim("v_merged", a.v_merged, 3, layout)
    checks.shape("v_merged", a.v_merged, (seq_len, num_heads, head_dim), layout)
    checks.same_dtype("v_merged", a.v_merged, "v", a.v)
    checks.same_device("v_merged", a.v_merged, "v", a.v)
    checks.cuda("v_merged", a.v_merged)
    checks.contiguous("v_merged", a.v_merged)
    checks.aligned(rules, "v_merged", a.v_merged, 16 // a.v.dtype.itemsize)
    _check_s("s_merged", a.s_merged, (seq_len, num_heads), "[seq_len, num_heads] float32", "v", a.v)
    return rules.outputs_apart(("v_merged", "s_merged"), ("v", "s"))


_merge_state = launcher(MERGE_STATE, _URI, _check_pair)
_merge_state_in_place = launcher(MERGE_STATE_IN_PLACE, _URI, _check_in_place)
_merge_states = launcher(MERGE_STATES, _URI, _check_many)


def _outputs(v_merged: TensorT | None, s_merged: TensorT | None) -> tuple[TensorT, TensorT]:
    """Both outputs, required (fi_ffi never allocates device memory): a missing one is a TypeError naming it."""
    if v_merged is None or s_merged is None:
        name, layout = (
            ("v_merged", "[seq_len, num_heads, head_dim]")
            if v_merged is None
            else ("s_merged", "float32 [seq_len, num_heads]")
        )
        raise TypeError(f"{name}: required (fi_ffi never allocates device memory); pass a contiguous {layout} tensor")
    return v_merged, s_merged


@op(launch=_merge_state, flashinfer="flashinfer.cascade.merge_state")
def merge_state(
    v_a: TensorLike,
    s_a: TensorLike,
    v_b: TensorLike,
    s_b: TensorLike,
    *,
    v_merged: TensorT | None = None,
    s_merged: TensorT | None = None,
    stream: StreamLike = None,
) -> tuple[TensorT, TensorT]:
    """Merge the states of two KV segments (see the module docstring).

    Args:
        v_a, v_b: ``[seq_len, num_heads, head_dim]`` float16/bfloat16, contiguous.
        s_a, s_b: float32 ``[seq_len, num_heads]``, base-2 log-sum-exp.
        v_merged: ``[seq_len, num_heads, head_dim]`` like ``v_a`` (required), memory of its own.
        s_merged: float32 ``[seq_len, num_heads]`` (required), memory of its own.
        stream: where the kernel runs (None: the framework's current stream of ``v_a``).

    Returns:
        ``(v_merged, s_merged)``, as passed.

    Raises:
        TypeError, ValueError: a tensor of the wrong shape, dtype, device or layout, or outputs overlapping the
            inputs, named (before the module is looked up).
        LoaderError: the cascade module cannot be loaded (the kernel wheel absent offline, a damaged cache).
        KernelError: the kernel failed.
    """
    v_merged, s_merged = _outputs(v_merged, s_merged)
    _merge_state(v_a, s_a, v_b, s_b, v_merged, s_merged, stream=stream)
    return v_merged, s_merged


@op(launch=_merge_state_in_place, flashinfer="flashinfer.cascade.merge_state_in_place")
def merge_state_in_place(
    v: TensorLike,
    s: TensorLike,
    v_other: TensorLike,
    s_other: TensorLike,
    mask: TensorLike | None = None,
    *,
    stream: StreamLike = None,
) -> None:
    """Merge ``(v_other, s_other)`` into ``(v, s)`` in place.

    Args:
        v: ``[seq_len, num_heads, head_dim]`` float16/bfloat16, contiguous; updated.
        s: float32 ``[seq_len, num_heads]``; updated.
        v_other, s_other: the other state, same shapes.
        mask: optional bool (or uint8 0/1) ``[seq_len]``: rows where it is false are left as they are (a CUDA
            graph can keep a fixed batch and switch rows off).
        stream: where the kernel runs (None: the framework's current stream of ``v``).

    Raises:
        TypeError, ValueError, LoaderError, KernelError: as :func:`merge_state`.
    """
    _merge_state_in_place(v, s, v_other, s_other, mask=mask, stream=stream)


@op(launch=_merge_states, flashinfer="flashinfer.cascade.merge_states")
def merge_states(
    v: TensorLike,
    s: TensorLike,
    *,
    v_merged: TensorT | None = None,
    s_merged: TensorT | None = None,
    stream: StreamLike = None,
) -> tuple[TensorT, TensorT]:
    """Merge ``num_states`` states per row.

    Args:
        v: ``[seq_len, num_states, num_heads, head_dim]`` float16/bfloat16, contiguous.
        s: float32 ``[seq_len, num_states, num_heads]``.
        v_merged: ``[seq_len, num_heads, head_dim]`` (required). s_merged: float32 ``[seq_len, num_heads]``
            (required). Neither may overlap ``v`` or ``s``. ``num_states >= 1``.

    Returns:
        ``(v_merged, s_merged)``, as passed.

    Raises:
        TypeError, ValueError, LoaderError, KernelError: as :func:`merge_state`.
    """
    v_merged, s_merged = _outputs(v_merged, s_merged)
    _merge_states(v, s, v_merged, s_merged, stream=stream)
    return v_merged, s_merged
