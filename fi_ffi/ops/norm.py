"""The RMSNorm family of ``norm.so``: RMSNorm, fused QK RMSNorm, Gemma RMSNorm and the fused-add variants.

All calls are asynchronous on ``stream`` (see :mod:`fi_ffi.streams`) and never synchronize. Tensors are
:class:`~fi_ffi.tensor.Tensor` descriptors or DLPack / CUDA-array-interface producers (torch, CuPy,
cuda.core). Supported dtypes: float16 and bfloat16; ``weight`` (and ``out``) must have ``input``'s dtype.

Math, per row ``x`` of ``D`` elements (accumulated in float32):

- ``rmsnorm``:  ``out = x / sqrt(mean(x**2) + eps) * weight``
- ``gemma_rmsnorm``: ``out = x / sqrt(mean(x**2) + eps) * (1 + weight)``
- ``fused_add_rmsnorm`` (in place): ``residual += input; input = rmsnorm(residual)``
"""

from __future__ import annotations

from collections.abc import Callable
from math import gcd
from types import SimpleNamespace
from typing import Any

from ..abi.wire import BOOL, FLOAT, Declaration, Param, declare, tensor
from ..dtypes import bfloat16, float16
from ..launch import checks
from ..launch.launcher import PreparedCall, launcher
from ..launch.pointer_rules import PointerRules
from ..typing import StreamLike, TensorLike, TensorT

_URI = "norm"
_DTYPES = (float16, bfloat16)


def _norm(entry: str, first: Param, second: Param) -> Declaration:
    return declare(entry, [first, second, tensor("weight"), ("eps", FLOAT), ("enable_pdl", BOOL)])


# Out of place: (out, input, weight, eps, enable_pdl); in place: (input, residual, weight, eps, enable_pdl).
RMSNORM = _norm("rmsnorm", tensor("out", output=True), tensor("input"))
GEMMA_RMSNORM = _norm("gemma_rmsnorm", tensor("out", output=True), tensor("input"))
FUSED_ADD_RMSNORM = _norm("fused_add_rmsnorm", tensor("input", output=True), tensor("residual", output=True))
GEMMA_FUSED_ADD_RMSNORM = _norm(
    "gemma_fused_add_rmsnorm", tensor("input", output=True), tensor("residual", output=True)
)
# (module URI pattern, declaration), checked against the modules by tests/test_declarations.py
DECLARATIONS = tuple(("norm", d) for d in (RMSNORM, GEMMA_RMSNORM, FUSED_ADD_RMSNORM, GEMMA_FUSED_ADD_RMSNORM))

__all__ = ["fused_add_rmsnorm", "gemma_fused_add_rmsnorm", "gemma_rmsnorm", "prepare", "qk_rmsnorm", "rmsnorm"]


def rmsnorm(
    input: TensorLike,
    weight: TensorLike,
    out: TensorT,
    *,
    eps: float = 1e-6,
    enable_pdl: bool = False,
    stream: StreamLike = None,
) -> TensorT:
    """RMSNorm of each row: ``out[b, :] = input[b, :] / RMS(input[b, :]) * weight``.

    Args:
        input: ``[B, D]`` float16/bfloat16 on a CUDA device; last dimension contiguous, rows may be strided.
        weight: ``[D]``, same dtype and device.
        out: ``[B, D]``, same dtype and device; last dimension contiguous. Written asynchronously.
        eps: added to the mean square, finite and > 0.
        enable_pdl: launch with programmatic dependent launch (SM90+).
        stream: where the kernel runs; ``None`` follows ``input``'s framework (torch's or CuPy's current
            stream), or TVM-FFI's current stream of the device for descriptors.

    Returns:
        ``out``, as passed.
    """
    _rmsnorm(out, input, weight, eps, enable_pdl, stream=stream)
    return out


def qk_rmsnorm(
    input: TensorLike,
    weight: TensorLike,
    out: TensorT,
    *,
    eps: float = 1e-6,
    enable_pdl: bool = False,
    stream: StreamLike = None,
) -> TensorT:
    """Per-head RMSNorm (the fused QK norm): ``out[b, h, :] = input[b, h, :] / RMS(...) * weight``.

    Args:
        input: ``[B, H, D]``; dimensions 0 and 1 may be strided (q or k slices of a fused QKV tensor),
            the last is contiguous.
        weight: ``[D]``, shared by every head.
        out: ``[B, H, D]``, same dtype and device; may be strided like ``input``.
    """
    _qk_rmsnorm(out, input, weight, eps, enable_pdl, stream=stream)
    return out


def gemma_rmsnorm(
    input: TensorLike,
    weight: TensorLike,
    out: TensorT,
    *,
    eps: float = 1e-6,
    enable_pdl: bool = False,
    stream: StreamLike = None,
) -> TensorT:
    """Gemma RMSNorm: ``out = input / RMS(input) * (1 + weight)``, shapes as :func:`rmsnorm` (2-D only)."""
    _gemma_rmsnorm(out, input, weight, eps, enable_pdl, stream=stream)
    return out


def fused_add_rmsnorm(
    input: TensorLike,
    residual: TensorLike,
    weight: TensorLike,
    *,
    eps: float = 1e-6,
    enable_pdl: bool = False,
    stream: StreamLike = None,
) -> None:
    """In place: ``residual += input``, then ``input = residual / RMS(residual) * weight``.

    Args:
        input: ``[B, D]``, overwritten with the normalized rows.
        residual: ``[B, D]``, overwritten with ``residual + input``.
        weight: ``[D]``.
    """
    _fused_add_rmsnorm(input, residual, weight, eps, enable_pdl, stream=stream)


def gemma_fused_add_rmsnorm(
    input: TensorLike,
    residual: TensorLike,
    weight: TensorLike,
    *,
    eps: float = 1e-6,
    enable_pdl: bool = False,
    stream: StreamLike = None,
) -> None:
    """In place, Gemma form: ``residual += input``, then ``input = residual / RMS(residual) * (1 + weight)``;
    arguments as :func:`fused_add_rmsnorm`."""
    _gemma_fused_add_rmsnorm(input, residual, weight, eps, enable_pdl, stream=stream)


def _rows(rank: int, other: str) -> Callable[[SimpleNamespace], PointerRules]:
    """The contract of a norm call whose rows are ``input`` and ``other`` (``out`` or ``residual``)."""
    layout = "[B, D]" if rank == 2 else "[B, H, D]"

    def check(a: SimpleNamespace) -> PointerRules:
        x, w, o = a.input, a.weight, getattr(a, other)
        checks.ndim("input", x, rank, layout)
        checks.dtype_in("input", x, _DTYPES)
        checks.cuda("input", x)
        checks.last_dim_contiguous("input", x)
        d = x.shape[-1]
        checks.ndim("weight", w, 1, "[D]")
        checks.shape("weight", w, (d,), "[D]")
        checks.same_dtype("weight", w, "input", x)
        checks.same_device("weight", w, "input", x)
        checks.cuda("weight", w)
        checks.last_dim_contiguous("weight", w)
        checks.shape(other, o, x.shape, layout)
        checks.same_dtype(other, o, "input", x)
        checks.same_device(other, o, "input", x)
        checks.cuda(other, o)
        checks.last_dim_contiguous(other, o)
        checks.positive_finite("eps", a.eps)
        vec = gcd(16 // x.dtype.itemsize, d)  # the kernels load gcd(16 B / itemsize, D) elements at a time
        rules = PointerRules()
        for name, t in (("input", x), ("weight", w), (other, o)):
            checks.aligned(rules, name, t, vec)
        # a block reads its row of every operand before it writes that row: `out` may be `input` itself (in place)
        # but no other overlap; with a residual both rows are written in place, so they are apart from each other
        # and from the weight
        if other == "out":
            return rules.same_or_disjoint("out", "input").disjoint("out", "weight")
        return rules.outputs_apart(("input", "residual"), ("weight",))

    check.__qualname__ = f"check_norm_rank{rank}_{other}"
    return check


_check_2d_out, _check_3d_out, _check_2d_residual = _rows(2, "out"), _rows(3, "out"), _rows(2, "residual")
_rmsnorm = launcher(RMSNORM, _URI, _check_2d_out)
_qk_rmsnorm = launcher(RMSNORM, _URI, _check_3d_out)
_gemma_rmsnorm = launcher(GEMMA_RMSNORM, _URI, _check_2d_out)
_fused_add_rmsnorm = launcher(FUSED_ADD_RMSNORM, _URI, _check_2d_residual)
_gemma_fused_add_rmsnorm = launcher(GEMMA_FUSED_ADD_RMSNORM, _URI, _check_2d_residual)

# public op -> (its launch function, the public names of the wire arguments in order)
_PREPARABLE: dict[Callable[..., Any], tuple[Callable[..., Any], tuple[str, ...]]] = {
    rmsnorm: (_rmsnorm, ("out", "input", "weight", "eps", "enable_pdl")),
    qk_rmsnorm: (_qk_rmsnorm, ("out", "input", "weight", "eps", "enable_pdl")),
    gemma_rmsnorm: (_gemma_rmsnorm, ("out", "input", "weight", "eps", "enable_pdl")),
    fused_add_rmsnorm: (_fused_add_rmsnorm, ("input", "residual", "weight", "eps", "enable_pdl")),
    gemma_fused_add_rmsnorm: (_gemma_fused_add_rmsnorm, ("input", "residual", "weight", "eps", "enable_pdl")),
}


def prepare(function: Callable[..., Any], *args: Any, **kwargs: Any) -> PreparedCall:
    """Check and pack one norm call once; the returned :class:`~fi_ffi.launch.launcher.PreparedCall` launches it.

    ``function`` is one of this module's ops, ``args``/``kwargs`` exactly what it takes. Calling the result
    launches the kernel again with the same arguments (same buffers, eps, stream) and costs about one FFI
    call: the per-step path of a runtime whose buffers do not move::

        step_norm = fi_ffi.prepare(fi_ffi.rmsnorm, x, w, out, eps=1e-6)
        for _ in range(steps):
            ...
            step_norm()

    The prepared call keeps its arguments referenced until it is dropped.
    """
    import inspect

    found = _PREPARABLE.get(function)
    if found is None:
        raise TypeError(f"function: expected one of {', '.join(f.__name__ for f in _PREPARABLE)}, got {function!r}")
    launch, names = found
    try:
        bound = inspect.signature(function).bind(*args, **kwargs)
    except TypeError as exc:
        raise TypeError(f"{function.__name__}: {exc}") from None
    bound.apply_defaults()
    a = bound.arguments
    return launch.launcher.prepare([a[n] for n in names], a["stream"])  # type: ignore[attr-defined,no-any-return]
