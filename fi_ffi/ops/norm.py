"""The RMSNorm family of ``norm.so``: RMSNorm, fused QK RMSNorm, Gemma RMSNorm and the fused-add variants.

All calls are asynchronous on ``stream`` (see :mod:`fi_ffi.tensor.streams`) and never synchronize. Tensors are
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
from typing import Any, NoReturn

from ..abi.wire import BOOL, FLOAT, Declaration, Param, declare, tensor
from ..dtypes import bfloat16, float16
from ..launch import checks
from ..launch.launcher import launcher
from ..launch.pointer_rules import PointerRules
from ..launch.registry import op
from ..tensor.protocols import StreamLike, TensorLike, TensorT

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
# (module URI pattern, declaration), checked against the modules by tests/launch/test_declarations.py
DECLARATIONS = tuple(("norm", d) for d in (RMSNORM, GEMMA_RMSNORM, FUSED_ADD_RMSNORM, GEMMA_FUSED_ADD_RMSNORM))


def _need_out(name: str, eps: Any) -> NoReturn:
    """The error for an out-of-place norm called without ``out`` (flashinfer allocates it when omitted); a tensor
    as ``eps`` is ``out`` given by position one place early (``rmsnorm(x, w, out)``), and that error comes first."""
    checks.positive_finite("eps", eps)
    raise TypeError(
        f"out: required (fi_ffi never allocates device memory); pass a tensor of input's shape, dtype and device, "
        f"as {name}(input, weight, eps, out) or out=..."
    )


# The wire mappings (the op's arguments -> its launch function's values), shared by the ops and fi_ffi.prepare: the
# op passes its launch function, prepare a packer (fi_ffi.launch.packing).
def _out_first(
    launch: Callable[..., Any], input: Any, weight: Any, eps: Any, out: Any, enable_pdl: Any, stream: Any
) -> Any:
    """An out-of-place norm: (out, input, weight, eps, enable_pdl)."""
    return launch(out, input, weight, eps, enable_pdl, stream=stream)


def _in_place(
    launch: Callable[..., Any], input: Any, residual: Any, weight: Any, eps: Any, enable_pdl: Any, stream: Any
) -> Any:
    """A fused-add norm, in place: (input, residual, weight, eps, enable_pdl)."""
    return launch(input, residual, weight, eps, enable_pdl, stream=stream)


_LAYOUTS = {2: "[B, D]", 3: "[B, H, D]"}


def _rows(ranks: tuple[int, ...], other: str) -> Callable[[SimpleNamespace], PointerRules]:
    """The contract of a norm call whose rows are ``input`` and ``other`` (``out`` or ``residual``), for an
    ``input`` of one of ``ranks`` (2: ``[B, D]``; 3: ``[B, H, D]``, one row per head, the first two dimensions
    strided as they come: the kernel entry point takes both ranks and reads both strides)."""

    def check(a: SimpleNamespace) -> PointerRules:
        x, w, o = a.input, a.weight, getattr(a, other)
        if len(ranks) == 1:
            checks.ndim("input", x, ranks[0], _LAYOUTS[ranks[0]])
        elif x.ndim not in ranks:
            expected = " or ".join(f"{r}-D {_LAYOUTS[r]}" for r in ranks)
            raise ValueError(f"input: expected a {expected} tensor, got shape {x.shape}")
        layout = _LAYOUTS[x.ndim]
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

    check.__qualname__ = f"check_norm_rank{'_or_'.join(map(str, ranks))}_{other}"
    return check


_check_2d_out, _check_3d_out, _check_2d_residual = _rows((2,), "out"), _rows((3,), "out"), _rows((2,), "residual")
_check_2d_or_3d_out = _rows((2, 3), "out")
_rmsnorm = launcher(RMSNORM, _URI, _check_2d_or_3d_out)
_qk_rmsnorm = launcher(RMSNORM, _URI, _check_3d_out)
# 0.6.3's gemma_rmsnorm entry point checks a 2-D input (its rmsnorm takes 3-D as well): 2-D only, as flashinfer
_gemma_rmsnorm = launcher(GEMMA_RMSNORM, _URI, _check_2d_out)
_fused_add_rmsnorm = launcher(FUSED_ADD_RMSNORM, _URI, _check_2d_residual)
_gemma_fused_add_rmsnorm = launcher(GEMMA_FUSED_ADD_RMSNORM, _URI, _check_2d_residual)


# ---- ops: each states its launch function and, for fi_ffi.prepare, its wire mapping (fi_ffi.launch.registry)


@op(launch=_rmsnorm, packable=_out_first, flashinfer="flashinfer.norm.rmsnorm")
def rmsnorm(
    input: TensorLike,
    weight: TensorLike,
    eps: float = 1e-6,
    out: TensorT | None = None,
    enable_pdl: bool | None = False,
    *,
    stream: StreamLike = None,
) -> TensorT:
    """RMSNorm of each row: ``out[..., :] = input[..., :] / RMS(input[..., :]) * weight``.

    flashinfer's ``rmsnorm(input, weight, eps, out, enable_pdl)``, in its order (``out`` positional or a keyword);
    ``out`` is required (fi_ffi never allocates).

    Args:
        input: ``[B, D]`` (one row per token) or ``[B, H, D]`` (QK RMSNorm: one row per head, as Qwen3 and Gemma 3
            normalize q and k), float16/bfloat16 on a CUDA device; the last dimension contiguous, the others may
            be strided (rows of a larger buffer, the q or k slice of a fused QKV tensor).
        weight: ``[D]``, same dtype and device, shared by every row.
        eps: added to the mean square, finite and > 0.
        out: ``input``'s shape, dtype and device; last dimension contiguous, may be strided like ``input`` or be
            ``input`` itself (in place). Written asynchronously.
        enable_pdl: launch with programmatic dependent launch (SM90+); None: where the device supports it.
        stream: where the kernel runs; ``None`` follows ``input``'s framework (torch's or CuPy's current
            stream), or TVM-FFI's current stream of the device for descriptors.

    Returns:
        ``out``, as passed.

    Raises:
        TypeError: a tensor of another dtype than float16/bfloat16 or than ``input``'s, or not a tensor.
        ValueError: ``input`` not 2-D or 3-D, ``weight`` not ``[D]``, ``out`` not ``input``'s shape, a tensor
            not on the CUDA device of ``input`` or with a strided last dimension, a misaligned row, ``out``
            overlapping ``input`` other than being it, or ``eps`` not finite and > 0.
    """
    if out is None:
        _need_out("rmsnorm", eps)
    _out_first(_rmsnorm, input, weight, eps, out, enable_pdl, stream)
    return out


@op(launch=_qk_rmsnorm, packable=_out_first)
def qk_rmsnorm(
    input: TensorLike,
    weight: TensorLike,
    eps: float = 1e-6,
    *,
    out: TensorT,
    enable_pdl: bool | None = False,
    stream: StreamLike = None,
) -> TensorT:
    """Per-head RMSNorm (QK RMSNorm): :func:`rmsnorm` restricted to a 3-D ``input``.

    ``rmsnorm`` takes ``[B, H, D]`` as well (flashinfer's order); this op refuses a 2-D input, for callers that
    want the per-head layout checked.

    Args:
        input: ``[B, H, D]``; dimensions 0 and 1 may be strided (q or k slices of a fused QKV tensor),
            the last is contiguous.
        weight: ``[D]``, shared by every head.
        eps: added to the mean square, finite and > 0.
        out: ``[B, H, D]``, same dtype and device; may be strided like ``input``.
        enable_pdl: launch with programmatic dependent launch (SM90+); None: where the device supports it.
        stream: as :func:`rmsnorm`.

    Returns:
        ``out``, as passed.

    Raises:
        TypeError: as :func:`rmsnorm`.
        ValueError: ``input`` not 3-D, else as :func:`rmsnorm`.
    """
    _out_first(_qk_rmsnorm, input, weight, eps, out, enable_pdl, stream)
    return out


@op(launch=_gemma_rmsnorm, packable=_out_first, flashinfer="flashinfer.norm.gemma_rmsnorm")
def gemma_rmsnorm(
    input: TensorLike,
    weight: TensorLike,
    eps: float = 1e-6,
    out: TensorT | None = None,
    enable_pdl: bool | None = False,
    *,
    stream: StreamLike = None,
) -> TensorT:
    """Gemma RMSNorm: ``out = input / RMS(input) * (1 + weight)``, arguments as :func:`rmsnorm`, 2-D only.

    flashinfer 0.6.3's ``gemma_rmsnorm`` kernel entry point takes ``[B, D]`` only (its ``rmsnorm`` takes 3-D as
    well): normalize per head with a ``[B * H, D]`` view of a contiguous ``[B, H, D]`` tensor.

    Raises:
        TypeError: as :func:`rmsnorm`.
        ValueError: ``input`` not 2-D, else as :func:`rmsnorm`.
    """
    if out is None:
        _need_out("gemma_rmsnorm", eps)
    _out_first(_gemma_rmsnorm, input, weight, eps, out, enable_pdl, stream)
    return out


@op(launch=_fused_add_rmsnorm, packable=_in_place, flashinfer="flashinfer.norm.fused_add_rmsnorm")
def fused_add_rmsnorm(
    input: TensorLike,
    residual: TensorLike,
    weight: TensorLike,
    eps: float = 1e-6,
    enable_pdl: bool | None = False,
    *,
    stream: StreamLike = None,
) -> None:
    """In place: ``residual += input``, then ``input = residual / RMS(residual) * weight``.

    flashinfer's ``fused_add_rmsnorm(input, residual, weight, eps, enable_pdl)``.

    Args:
        input: ``[B, D]`` float16/bfloat16 on a CUDA device, overwritten with the normalized rows.
        residual: ``[B, D]``, same dtype and device, overwritten with ``residual + input``.
        weight: ``[D]``.
        eps: added to the mean square, finite and > 0.
        enable_pdl: launch with programmatic dependent launch (SM90+); None: where the device supports it.
        stream: as :func:`rmsnorm`.

    Raises:
        TypeError: a tensor of another dtype than float16/bfloat16 or than ``input``'s, or not a tensor.
        ValueError: ``input`` or ``residual`` not ``[B, D]`` of one shape, ``weight`` not ``[D]``, a tensor not
            on ``input``'s CUDA device or with a strided last dimension, a misaligned row, overlapping
            ``input`` / ``residual`` / ``weight``, or ``eps`` not finite and > 0.
    """
    _in_place(_fused_add_rmsnorm, input, residual, weight, eps, enable_pdl, stream)


@op(launch=_gemma_fused_add_rmsnorm, packable=_in_place, flashinfer="flashinfer.norm.gemma_fused_add_rmsnorm")
def gemma_fused_add_rmsnorm(
    input: TensorLike,
    residual: TensorLike,
    weight: TensorLike,
    eps: float = 1e-6,
    enable_pdl: bool | None = False,
    *,
    stream: StreamLike = None,
) -> None:
    """In place, Gemma form: ``residual += input``, then ``input = residual / RMS(residual) * (1 + weight)``;
    arguments as :func:`fused_add_rmsnorm`.

    Raises:
        TypeError: as :func:`fused_add_rmsnorm`.
        ValueError: as :func:`fused_add_rmsnorm`.
    """
    _in_place(_gemma_fused_add_rmsnorm, input, residual, weight, eps, enable_pdl, stream)
