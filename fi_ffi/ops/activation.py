"""Gated activations of an MLP: ``silu_and_mul``, ``gelu_and_mul``, ``gelu_tanh_and_mul`` (one module each).

Each row of ``input`` ``[..., 2 * d]`` holds the gate ``x = input[..., :d]`` and the up projection
``y = input[..., d:]``; the op writes ``out[..., i] = act(x[..., i]) * y[..., i]`` (computed in float32,
rounded once to the dtype) into ``out`` ``[..., d]``. fi_ffi allocates nothing: pass ``out``.

- ``silu(x) = x / (1 + exp(-x))``
- ``gelu(x) = x / 2 * (1 + erf(x / sqrt(2)))``
- ``gelu_tanh(x) = x / 2 * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 x**3)))``

Contract (checked before the kernel): float16 or bfloat16; ``input`` and ``out`` contiguous (the kernel uses
no strides) with the same dtype, device and leading dimensions; at least one row; ``d`` a multiple of 8
(16-byte vector loads of both halves; flashinfer-python asks only ``2 d`` to be, which misaligns ``y``);
16-byte aligned data pointers; ``out`` shares no memory with ``input``.

All calls are asynchronous on ``stream`` (see :mod:`fi_ffi.tensor.streams`) and never synchronize. Each op can be
checked and packed once by :func:`fi_ffi.prepare` (a runtime's per-layer MLP activation over buffers that do not
move: about one FFI call per launch).
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any, NoReturn

from ..abi.wire import BOOL, Declaration, declare, tensor
from ..dtypes import bfloat16, float16
from ..launch import checks
from ..launch.launcher import launcher
from ..launch.pointer_rules import PointerRules
from ..launch.registry import op
from ..tensor.protocols import StreamLike, TensorLike, TensorT

_DTYPES = (float16, bfloat16)
_VECTOR_BYTES = 16


def _act(entry: str) -> Declaration:
    # void <act>_and_mul(TensorView out, TensorView input, bool enable_pdl): 0.6.3 and 0.7.x alike
    return declare(entry, [tensor("out", output=True), tensor("input"), ("enable_pdl", BOOL)])


SILU_AND_MUL = _act("silu_and_mul")
GELU_AND_MUL = _act("gelu_and_mul")
GELU_TANH_AND_MUL = _act("gelu_tanh_and_mul")
# each activation is a module of its own, named like its entry point
DECLARATIONS = tuple((d.entry, d) for d in (SILU_AND_MUL, GELU_AND_MUL, GELU_TANH_AND_MUL))


def _check(a: SimpleNamespace) -> PointerRules:
    x, o = a.input, a.out
    if x.ndim < 1:
        raise ValueError(f"input: expected a tensor [..., 2 * d], got shape {x.shape}")
    checks.dtype_in("input", x, _DTYPES)
    checks.cuda("input", x)
    checks.contiguous("input", x)
    width = x.shape[-1]
    if width % 2:
        raise ValueError(
            f"input: its last dimension ({width}) must be even: [..., 2 * d] holds the gate, then the up projection"
        )
    d = width // 2
    vec = _VECTOR_BYTES // x.dtype.itemsize
    if d % vec or d == 0:
        raise ValueError(
            f"input: d = {d} (half the last dimension) must be a positive multiple of {vec}: the kernel "
            f"loads both halves in {_VECTOR_BYTES}-byte vectors"
        )
    if x.numel == 0:
        raise ValueError(f"input: expected at least one row, got shape {x.shape}")
    checks.shape("out", o, (*x.shape[:-1], d), "[..., d]")
    checks.same_dtype("out", o, "input", x)
    checks.same_device("out", o, "input", x)
    checks.cuda("out", o)
    checks.contiguous("out", o)
    # a thread reads its gate and up elements, then writes one output element: out must be memory of its own
    return PointerRules({"input": _VECTOR_BYTES, "out": _VECTOR_BYTES}).disjoint("out", "input")


_silu_and_mul = launcher(SILU_AND_MUL, "silu_and_mul", _check)
_gelu_and_mul = launcher(GELU_AND_MUL, "gelu_and_mul", _check)
_gelu_tanh_and_mul = launcher(GELU_TANH_AND_MUL, "gelu_tanh_and_mul", _check)


def _need_out(out: None) -> NoReturn:
    raise TypeError(
        "out: required (fi_ffi never allocates device memory); pass a contiguous tensor "
        "[..., d] of input's dtype, d = input.shape[-1] // 2"
    )


def _gated(launch: Callable[..., Any], input: Any, out: Any, enable_pdl: Any, stream: Any) -> Any:
    """A gated activation's arguments as its launch takes them, ``(out, input, enable_pdl)``: the op's call and its
    packed form (``fi_ffi.prepare``, which calls this alone: hence the ``out`` check here too) alike."""
    if out is None:
        _need_out(out)
    return launch(out, input, enable_pdl, stream=stream)


@op(launch=_silu_and_mul, packable=_gated, flashinfer="flashinfer.activation.silu_and_mul")
def silu_and_mul(
    input: TensorLike, out: TensorT | None = None, enable_pdl: bool | None = None, *, stream: StreamLike = None
) -> TensorT:
    """``out = silu(input[..., :d]) * input[..., d:]``.

    Args:
        input: ``[..., 2 * d]`` float16/bfloat16 on a CUDA device, contiguous, ``d`` a multiple of 8.
        out: ``[..., d]``, same dtype and device, contiguous (required). Written asynchronously.
        enable_pdl: launch with programmatic dependent launch (SM90+); None: where the device supports it.
        stream: where the kernel runs (None: the framework's current stream of ``out``).

    Returns:
        ``out``, as passed.

    Raises:
        TypeError: a dtype other than float16/bfloat16, ``out`` not ``input``'s dtype, ``enable_pdl`` not a bool.
        ValueError: ``input`` without a last dimension of even size ``2 * d`` or without rows, ``out`` not ``[..., d]``,
            a tensor not contiguous or not on ``input``'s CUDA device, misaligned data.
    """
    if out is None:
        _need_out(out)
    _gated(_silu_and_mul, input, out, enable_pdl, stream)
    return out


@op(launch=_gelu_and_mul, packable=_gated, flashinfer="flashinfer.activation.gelu_and_mul")
def gelu_and_mul(
    input: TensorLike, out: TensorT | None = None, enable_pdl: bool | None = None, *, stream: StreamLike = None
) -> TensorT:
    """``out = gelu(input[..., :d]) * input[..., d:]`` (erf form); arguments as :func:`silu_and_mul`.

    Raises:
        TypeError, ValueError: as :func:`silu_and_mul`.
    """
    if out is None:
        _need_out(out)
    _gated(_gelu_and_mul, input, out, enable_pdl, stream)
    return out


@op(launch=_gelu_tanh_and_mul, packable=_gated, flashinfer="flashinfer.activation.gelu_tanh_and_mul")
def gelu_tanh_and_mul(
    input: TensorLike, out: TensorT | None = None, enable_pdl: bool | None = None, *, stream: StreamLike = None
) -> TensorT:
    """``out = gelu_tanh(input[..., :d]) * input[..., d:]`` (tanh approximation); arguments as
    :func:`silu_and_mul`.

    Raises:
        TypeError, ValueError: as :func:`silu_and_mul`.
    """
    if out is None:
        _need_out(out)
    _gated(_gelu_tanh_and_mul, input, out, enable_pdl, stream)
    return out
