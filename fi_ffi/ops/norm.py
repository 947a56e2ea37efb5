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

from math import gcd
from typing import Any

from ..abi.call import Signature
from ..abi.objects import BOOL, DLTENSOR_PTR, FLOAT
from ..dtypes import CUDA, bfloat16, float16
from ..streams import stream_handle
from ..tensor import Tensor
from . import checks
from .kernels import entry_point

_URI = "norm"
_DTYPES = (float16, bfloat16)
_T, _F, _B = DLTENSOR_PTR, FLOAT, BOOL
# Every norm entry point takes (tensor, tensor, tensor, eps: float, enable_pdl: bool).
_SIG = Signature("norm", [("a", "tensor"), ("b", "tensor"), ("weight", "tensor"), ("eps", "float"),
                          ("enable_pdl", "bool")]).pack

__all__ = ["fused_add_rmsnorm", "gemma_fused_add_rmsnorm", "gemma_rmsnorm", "qk_rmsnorm", "rmsnorm"]


def rmsnorm(input: Any, weight: Any, out: Any, *, eps: float = 1e-6, enable_pdl: bool = False,
            stream: Any = None) -> Any:
    """RMSNorm of each row: ``out[b, :] = input[b, :] / RMS(input[b, :]) * weight``.

    Args:
        input: ``[B, D]`` float16/bfloat16 on a CUDA device; last dimension contiguous, rows may be strided.
        weight: ``[D]``, same dtype and device.
        out: ``[B, D]``, same dtype and device; last dimension contiguous. Written asynchronously.
        eps: added to the mean square, finite and > 0.
        enable_pdl: launch with programmatic dependent launch (SM90+).
        stream: where the kernel runs; ``None`` means TVM-FFI's current stream for the device.

    Returns:
        ``out``, as passed.
    """
    return _launch("rmsnorm", _prepare_rows(2, input, weight, out, "out"), eps, enable_pdl, stream, out)


def qk_rmsnorm(input: Any, weight: Any, out: Any, *, eps: float = 1e-6, enable_pdl: bool = False,
               stream: Any = None) -> Any:
    """Per-head RMSNorm (the fused QK norm): ``out[b, h, :] = input[b, h, :] / RMS(...) * weight``.

    Args:
        input: ``[B, H, D]``; dimensions 0 and 1 may be strided (q or k slices of a fused QKV tensor),
            the last is contiguous.
        weight: ``[D]``, shared by every head.
        out: ``[B, H, D]``, same dtype and device; may be strided like ``input``.
    """
    return _launch("rmsnorm", _prepare_rows(3, input, weight, out, "out"), eps, enable_pdl, stream, out)


def gemma_rmsnorm(input: Any, weight: Any, out: Any, *, eps: float = 1e-6, enable_pdl: bool = False,
                  stream: Any = None) -> Any:
    """Gemma RMSNorm: ``out = input / RMS(input) * (1 + weight)``, shapes as :func:`rmsnorm` (2-D only)."""
    return _launch("gemma_rmsnorm", _prepare_rows(2, input, weight, out, "out"), eps, enable_pdl, stream, out)


def fused_add_rmsnorm(input: Any, residual: Any, weight: Any, *, eps: float = 1e-6, enable_pdl: bool = False,
                      stream: Any = None) -> None:
    """In place: ``residual += input``, then ``input = residual / RMS(residual) * weight``.

    Args:
        input: ``[B, D]``, overwritten with the normalized rows.
        residual: ``[B, D]``, overwritten with ``residual + input``.
        weight: ``[D]``.
    """
    _launch("fused_add_rmsnorm", _prepare_rows(2, input, weight, residual, "residual", in_place=True), eps,
            enable_pdl, stream, None)


def gemma_fused_add_rmsnorm(input: Any, residual: Any, weight: Any, *, eps: float = 1e-6,
                            enable_pdl: bool = False, stream: Any = None) -> None:
    """In place, Gemma form: ``residual += input``, then ``input = residual / RMS(residual) * (1 + weight)``."""
    _launch("gemma_fused_add_rmsnorm", _prepare_rows(2, input, weight, residual, "residual", in_place=True),
            eps, enable_pdl, stream, None)


# Descriptors are immutable, so a triple that passed the checks once passes again: remember the last one
# per (kind, rank) and skip re-validation when a runtime calls again with the same buffers.
_validated: dict[tuple[int, bool], tuple[Tensor, Tensor, Tensor]] = {}


def _prepare_rows(rank: int, input: Any, weight: Any, other: Any, other_name: str,
                  in_place: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Checked descriptors ``(first, second, weight)`` in the kernel's argument order.

    For out-of-place kernels the order is (out, input, weight); for in-place ones (input, residual, weight).
    """
    x = input if type(input) is Tensor else checks.tensor("input", input)
    w = weight if type(weight) is Tensor else checks.tensor("weight", weight)
    o = other if type(other) is Tensor else checks.tensor(other_name, other)
    key = (rank, in_place)
    last = _validated.get(key)
    if last is None or last[0] is not x or last[1] is not o or last[2] is not w:
        _check_rows(rank, x, w, o, other_name)
        _validated[key] = (x, o, w)
    return (x, o, w) if in_place else (o, x, w)


def _check_rows(rank: int, x: Tensor, w: Tensor, o: Tensor, other_name: str) -> None:
    layout = "[B, D]" if rank == 2 else "[B, H, D]"
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
    checks.shape(other_name, o, x.shape, layout)
    checks.same_dtype(other_name, o, "input", x)
    checks.same_device(other_name, o, "input", x)
    checks.cuda(other_name, o)
    checks.last_dim_contiguous(other_name, o)
    vec = gcd(16 // x.dtype.itemsize, d)  # the kernels load gcd(16 B / itemsize, D) elements at a time
    for name, t in (("input", x), ("weight", w), (other_name, o)):
        checks.aligned(name, t, vec)


def _launch(name: str, tensors: tuple[Tensor, Tensor, Tensor], eps: Any, enable_pdl: Any, stream: Any,
            result: Any) -> Any:
    if type(eps) is not float or not 0.0 < eps < float("inf"):
        eps = checks.positive_finite("eps", eps)
    if type(enable_pdl) is not bool:
        enable_pdl = checks.flag("enable_pdl", enable_pdl)
    s = stream if stream is None or type(stream) is int else stream_handle(stream)
    a, b, w = tensors
    ep = entry_point(_URI, name)
    frame = ep.frame(5)
    _SIG.pack_into(frame.buf, 0, _T, 0, a._dl_addr, _T, 0, b._dl_addr, _T, 0, w._dl_addr, _F, 0, eps,
                   _B, 0, enable_pdl, 0, 0, 0)
    ep.invoke(frame, a.device.device_id if a.device.device_type == CUDA else 0, s)
    return result


