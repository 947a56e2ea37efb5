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

import inspect
import threading
from collections.abc import Callable
from math import gcd
from typing import Any

from ..abi.call import EntryPoint, Frame, PreparedCall, Signature
from ..dtypes import bfloat16, float16
from ..streams import stream_handle
from ..tensor import Tensor
from . import checks
from .kernels import entry_point

_URI = "norm"
_DTYPES = (float16, bfloat16)
# Every norm entry point takes (tensor, tensor, tensor, eps: float, enable_pdl: bool).
_SIG = Signature("norm", [("a", "tensor"), ("b", "tensor"), ("weight", "tensor"), ("eps", "float"),
                          ("enable_pdl", "bool")])

__all__ = ["fused_add_rmsnorm", "gemma_fused_add_rmsnorm", "gemma_rmsnorm", "prepare", "qk_rmsnorm", "rmsnorm"]


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
    _run(_RMSNORM, input, weight, out, eps, enable_pdl, stream)
    return out


def qk_rmsnorm(input: Any, weight: Any, out: Any, *, eps: float = 1e-6, enable_pdl: bool = False,
               stream: Any = None) -> Any:
    """Per-head RMSNorm (the fused QK norm): ``out[b, h, :] = input[b, h, :] / RMS(...) * weight``.

    Args:
        input: ``[B, H, D]``; dimensions 0 and 1 may be strided (q or k slices of a fused QKV tensor),
            the last is contiguous.
        weight: ``[D]``, shared by every head.
        out: ``[B, H, D]``, same dtype and device; may be strided like ``input``.
    """
    _run(_QK_RMSNORM, input, weight, out, eps, enable_pdl, stream)
    return out


def gemma_rmsnorm(input: Any, weight: Any, out: Any, *, eps: float = 1e-6, enable_pdl: bool = False,
                  stream: Any = None) -> Any:
    """Gemma RMSNorm: ``out = input / RMS(input) * (1 + weight)``, shapes as :func:`rmsnorm` (2-D only)."""
    _run(_GEMMA_RMSNORM, input, weight, out, eps, enable_pdl, stream)
    return out


def fused_add_rmsnorm(input: Any, residual: Any, weight: Any, *, eps: float = 1e-6, enable_pdl: bool = False,
                      stream: Any = None) -> None:
    """In place: ``residual += input``, then ``input = residual / RMS(residual) * weight``.

    Args:
        input: ``[B, D]``, overwritten with the normalized rows.
        residual: ``[B, D]``, overwritten with ``residual + input``.
        weight: ``[D]``.
    """
    _run(_FUSED_ADD_RMSNORM, input, weight, residual, eps, enable_pdl, stream)


def gemma_fused_add_rmsnorm(input: Any, residual: Any, weight: Any, *, eps: float = 1e-6,
                            enable_pdl: bool = False, stream: Any = None) -> None:
    """In place, Gemma form: ``residual += input``, then ``input = residual / RMS(residual) * (1 + weight)``."""
    _run(_GEMMA_FUSED_ADD_RMSNORM, input, weight, residual, eps, enable_pdl, stream)


class _Op:
    """One public norm op: its entry point, argument layout and the last argument triple that passed checks.

    Descriptors are immutable, so a triple that passed the checks once passes again: ``last`` lets a runtime
    that calls again with the same buffers skip re-validation (three identity comparisons). ``local`` holds
    this thread's argument frame.
    """

    __slots__ = ("entry", "in_place", "last", "local", "name", "other_name", "rank")

    def __init__(self, name: str, rank: int, in_place: bool) -> None:
        self.name = name
        self.rank = rank
        self.in_place = in_place
        self.other_name = "residual" if in_place else "out"
        self.last: tuple[Tensor, Tensor, Tensor] | None = None
        self.entry: EntryPoint | None = None
        self.local = threading.local()


_RMSNORM = _Op("rmsnorm", 2, False)
_QK_RMSNORM = _Op("rmsnorm", 3, False)
_GEMMA_RMSNORM = _Op("gemma_rmsnorm", 2, False)
_FUSED_ADD_RMSNORM = _Op("fused_add_rmsnorm", 2, True)
_GEMMA_FUSED_ADD_RMSNORM = _Op("gemma_fused_add_rmsnorm", 2, True)
_INF = float("inf")


def _run(op: _Op, input: Any, weight: Any, other: Any, eps: Any, enable_pdl: Any, stream: Any,
         into: Frame | None = None) -> tuple[Tensor, Tensor, Tensor] | None:
    """Check (unless this exact triple passed before), pack and call. The hot path of every norm op.

    With ``into``, pack that frame instead of this thread's and return the checked descriptors without
    calling (see :func:`prepare`).
    """
    x = input if type(input) is Tensor else checks.tensor("input", input)
    w = weight if type(weight) is Tensor else checks.tensor("weight", weight)
    o = other if type(other) is Tensor else checks.tensor(op.other_name, other)
    last = op.last
    if last is None or last[0] is not x or last[1] is not w or last[2] is not o:
        _check_rows(op.rank, x, w, o, op.other_name)
        op.last = (x, w, o)
    if type(eps) is not float or not 0.0 < eps < _INF:
        eps = checks.positive_finite("eps", eps)
    if type(enable_pdl) is not bool:
        enable_pdl = checks.flag("enable_pdl", enable_pdl)
    if into is None:
        try:
            ep, frame = op.local.bound
        except AttributeError:
            ep, frame = op.local.bound = _bind(op)
    else:
        frame = into
    q = frame.q
    # Argument order: (out, input, weight) for out-of-place kernels, (input, residual, weight) in place.
    if op.in_place:
        q[1] = x._dl_addr
        q[3] = o._dl_addr
    else:
        q[1] = o._dl_addr
        q[3] = x._dl_addr
    q[5] = w._dl_addr
    frame.d[7] = eps
    q[9] = enable_pdl
    q[10] = 0  # result: None
    if into is not None:
        return x, w, o
    if stream is None:
        if ep._call(ep._self, frame.args, 5, frame.result):
            ep.raise_error(frame)
    else:
        ep.invoke(frame, x.device.device_id, stream if type(stream) is int else stream_handle(stream))
    return None


_OPS = {}  # public function -> its _Op, for prepare()


def prepare(function: Callable[..., Any], *args: Any, **kwargs: Any) -> PreparedCall:
    """Check and pack one norm call once; the returned :class:`~fi_ffi.abi.call.PreparedCall` launches it.

    ``function`` is one of this module's ops, ``args``/``kwargs`` exactly what it takes. Calling the result
    launches the kernel again with the same arguments (same buffers, eps, stream) and costs about one FFI
    call: the per-step path of a runtime whose buffers do not move::

        step_norm = fi_ffi.prepare(fi_ffi.rmsnorm, x, w, out, eps=1e-6)
        for _ in range(steps):
            ...
            step_norm()

    The prepared call keeps its descriptors (and what they keep alive) referenced.
    """
    op = _OPS.get(function)
    if op is None:
        raise TypeError(f"function: expected one of {', '.join(f.__name__ for f in _OPS)}, got {function!r}")
    bound = inspect.signature(function).bind(*args, **kwargs)
    bound.apply_defaults()
    a = bound.arguments
    first, second = ("input", "residual") if op.in_place else ("input", "out")
    other = a[second]
    ep = op.entry or _bind(op)[0]
    frame = Frame(5, _SIG.kinds)
    keep = _run(op, a[first], a["weight"], other, a["eps"], a["enable_pdl"], None, into=frame)
    assert keep is not None
    stream = a["stream"]
    handle = stream if stream is None or type(stream) is int else stream_handle(stream)
    return PreparedCall(ep, frame, keep, keep[0].device.device_id, handle)


def _bind(op: _Op) -> tuple[EntryPoint, Frame]:
    if op.entry is None:
        op.entry = entry_point(_URI, op.name)
    return op.entry, op.entry.frame_for(_SIG)


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


_OPS.update({rmsnorm: _RMSNORM, qk_rmsnorm: _QK_RMSNORM, gemma_rmsnorm: _GEMMA_RMSNORM,
             fused_add_rmsnorm: _FUSED_ADD_RMSNORM, gemma_fused_add_rmsnorm: _GEMMA_FUSED_ADD_RMSNORM})
