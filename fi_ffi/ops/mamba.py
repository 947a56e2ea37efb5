"""Mamba-2 selective state update (one decode step of a selective state-space layer): ``selective_state_update``.

Modules: ``mamba_selective_state_update_sm90`` (TMA producer/consumer kernel, SM 9.x; needs the driver library
``libcuda.so.1``) and ``mamba_selective_state_update`` (the simple kernel, any architecture the wheel has).
``backend="auto"`` picks the SM90 module on an SM 9.x GPU for ``dim <= 128``, the simple one otherwise.

The SM90 module of FlashInfer 0.6.3 serves ``dim`` 64 and 128 only: its kernel writes ``out`` from its four
consumer warps, one row per thread (``d = warp * 32 + lane``), so for ``dim = 256`` rows 128..255 of every head's
``out`` are never written (the state itself is updated in full). fi_ffi refuses ``dim = 256`` on that module by
name and routes it to the simple kernel under ``"auto"``.

Math, per request ``b`` (its state row ``s = state_batch_indices[b]``, or ``b``), head ``h``, row ``d`` of the
head's ``dim`` and state column ``n`` of ``dstate``, with ``g = h // (nheads // ngroups)`` (float32 inside)::

    dt' = dt[b, h] + dt_bias[h]            (dt_bias optional)
    dt' = softplus(dt') if dt_softplus      (softplus(x) = log(1 + exp(x)); x > 20 passes through)
    state[s, h, d, n] = state[s, h, d, n] * exp(A[h] * dt') + B[b, g, n] * dt' * x[b, h, d]
    out[b, h, d] = sum_n state[s, h, d, n] * C[b, g, n] + D[h] * x[b, h, d]
    out[b, h, d] *= silu(z[b, h, d])        (z optional)

``A``, ``D``, ``dt`` and ``dt_bias`` hold one value per head, broadcast over ``dim`` (and ``dstate``) with stride
0, as Mamba-2 stores them (torch: ``A[:, None, None].expand(nheads, dim, dstate)``). A request whose index is
``pad_slot_id`` reads and writes no state. ``disable_state_update=True`` computes ``out`` without writing
the new state back (speculative verification).

Contract (checked before the FFI): ``x``, ``B``, ``C``, ``z``, ``out`` bfloat16; ``dt``, ``D``, ``dt_bias``
bfloat16 or float32 (one dtype); ``A`` float32; ``state`` bfloat16, float16 or float32; ``dim`` and ``dstate``
each 64, 128 or 256 (``dim`` 64 or 128 on the SM90 module); ``nheads`` a multiple of ``ngroups``; rows of
``x``, ``z``, ``B``, ``C`` 16-byte aligned (pointer and batch stride); ``state`` rows (``[nheads, dim, dstate]``)
contiguous and 16-byte aligned (128 bytes for the SM90 module's TMA). Only the single-token form is bound (``x``
``[batch, nheads, dim]``); the multi-token form (``cache_steps``, intermediate states) is refused by name.
``out`` must not overlap any input or ``state``; ``state`` must not overlap the inputs (it is read and written in
place).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Literal

from ..abi.wire import BOOL, INT, declare, optional_tensor, tensor, tensors
from ..dtypes import bfloat16, float16, float32, int32, int64
from ..launch import checks
from ..launch.launcher import launcher
from ..launch.pointer_rules import PointerRules
from ..launch.registry import op
from ..tensor.descriptor import Tensor
from ..tensor.protocols import StreamLike, TensorLike, TensorT

SELECTIVE_STATE_UPDATE = declare(
    "selective_state_update",
    [
        tensor("state", output=True),
        *tensors("x", "dt", "A", "B", "C", "D"),
        optional_tensor("z"),
        optional_tensor("dt_bias"),
        ("dt_softplus", BOOL),
        optional_tensor("state_batch_indices"),
        ("pad_slot_id", INT),
        tensor("out", output=True),
        ("disable_state_update", BOOL),
        optional_tensor("intermediate_states_buffer", output=True),
        optional_tensor("intermediate_state_indices"),
        ("cache_steps", INT),
    ],
)
_BASE, _SM90 = "mamba_selective_state_update", "mamba_selective_state_update_sm90"
DECLARATIONS = ((_BASE, SELECTIVE_STATE_UPDATE), (_SM90, SELECTIVE_STATE_UPDATE))

SIZES = (64, 128, 256)  # the dim and dstate values the kernels are compiled for
# The SM90 kernel's output store covers 4 consumer warps x 32 lanes = 128 rows of each head (module docstring)
SM90_MAX_DIM = 128
_VECTOR = 16  # bytes of one vector load of x, z, B, C and of state
_TMA = 128  # the SM90 module loads state tiles with TMA from a 128-byte aligned base
_STATE_DTYPES = (bfloat16, float16, float32)
_WEIGHT_DTYPES = (bfloat16, float32)


def _per_head(name: str, t: Tensor, shape: tuple[int, ...], strides: tuple[int, ...], text: str) -> None:
    """A per-head value broadcast over the trailing dims: exactly ``shape`` with ``strides`` (0 = broadcast)."""
    checks.shape(name, t, shape, text)
    if t.strides[1:] != strides[1:] or (shape[0] > 1 and t.strides[0] != strides[0]):
        raise ValueError(
            f"{name}: expected one value per head broadcast with strides {strides} ({text}; torch: "
            f"{name}[:, None].expand(...)), got strides {t.strides}"
        )


def _rows16(name: str, t: Tensor) -> None:
    """The rows of ``t`` (``[batch, ...]``, inner dims contiguous) start 16-byte aligned at every batch index."""
    if t.shape[0] > 1 and (t.strides[0] * t.dtype.itemsize) % _VECTOR:
        raise ValueError(
            f"{name}: the batch stride ({t.strides[0]} elements) must be a multiple of {_VECTOR} bytes "
            f"({_VECTOR // t.dtype.itemsize} elements): the kernel loads rows in {_VECTOR}-byte vectors"
        )


def _check(sm90: bool) -> Any:
    def check(a: SimpleNamespace) -> PointerRules:
        state, x, dt = a.state, a.x, a.dt
        if a.intermediate_states_buffer is not None or a.intermediate_state_indices is not None or a.cache_steps:
            name = (
                "intermediate_states_buffer"
                if a.intermediate_states_buffer is not None
                else ("intermediate_state_indices" if a.intermediate_state_indices is not None else "cache_steps")
            )
            raise ValueError(
                f"{name}: the multi-token (speculative) form is not bound by fi_ffi; pass single-token inputs "
                "x [batch, nheads, dim] with cache_steps=0 and no intermediate states"
            )
        checks.ndim("state", state, 4, "[state_cache_size, nheads, dim, dstate]")
        checks.dtype_in("state", state, _STATE_DTYPES)
        checks.cuda("state", state)
        cache, heads, dim, dstate = state.shape
        if dim not in SIZES or dstate not in SIZES:
            which = "dim" if dim not in SIZES else "dstate"
            raise ValueError(
                f"state: {which} = {dim if which == 'dim' else dstate} is not one the kernels are compiled for "
                f"({', '.join(map(str, SIZES))}); shape {state.shape} is [state_cache_size, nheads, dim, dstate]"
            )
        if sm90 and dim > SM90_MAX_DIM:
            raise ValueError(
                f"state: dim = {dim} is not supported by the SM90 module (mamba_selective_state_update_sm90): its "
                f"kernel writes out for the first {SM90_MAX_DIM} rows of each head only, leaving the rest unwritten; "
                f"use backend='simple' (backend='auto' picks it for dim > {SM90_MAX_DIM})"
            )
        if heads == 0:
            raise ValueError(f"state: expected at least one head, got shape {state.shape}")
        if state.strides[1:] != (dim * dstate, dstate, 1):
            raise ValueError(
                f"state: each row [nheads, dim, dstate] must be contiguous (strides (..., {dim * dstate}, "
                f"{dstate}, 1)), got strides {state.strides}"
            )
        _rows16("state", state)
        checks.ndim("x", x, 3, "[batch, nheads, dim]")
        checks.dtype_in("x", x, (bfloat16,))
        batch = x.shape[0]
        checks.shape("x", x, (batch, heads, dim), "[batch, nheads, dim]")
        if x.strides[1:] != (dim, 1):
            raise ValueError(f"x: each row [nheads, dim] must be contiguous, got strides {x.strides}")
        _rows16("x", x)
        if batch > cache:
            raise ValueError(f"x: batch {batch} exceeds the state's {cache} rows (state_cache_size)")
        checks.ndim("dt", dt, 3, "[batch, nheads, dim]")
        checks.dtype_in("dt", dt, _WEIGHT_DTYPES)
        checks.shape("dt", dt, (batch, heads, dim), "[batch, nheads, dim]")
        if dt.strides[1:] != (1, 0) and not (heads == 1 and dt.strides[2] == 0):
            raise ValueError(
                f"dt: expected one value per (request, head) broadcast over dim, strides (batch_stride, 1, 0) "
                f"(torch: dt[:, :, None].expand(batch, nheads, dim)), got strides {dt.strides}"
            )
        checks.ndim("A", a.A, 3, "[nheads, dim, dstate]")
        checks.dtype_in("A", a.A, (float32,))
        _per_head("A", a.A, (heads, dim, dstate), (1, 0, 0), "[nheads, dim, dstate]")
        checks.ndim("D", a.D, 2, "[nheads, dim]")
        checks.dtype_in("D", a.D, (dt.dtype,))
        _per_head("D", a.D, (heads, dim), (1, 0), "[nheads, dim]")
        if a.dt_bias is not None:
            checks.ndim("dt_bias", a.dt_bias, 2, "[nheads, dim]")
            checks.dtype_in("dt_bias", a.dt_bias, (dt.dtype,))
            _per_head("dt_bias", a.dt_bias, (heads, dim), (1, 0), "[nheads, dim]")
        checks.ndim("B", a.B, 3, "[batch, ngroups, dstate]")
        groups = a.B.shape[1]
        if groups == 0 or heads % groups:
            raise ValueError(f"B: ngroups = {groups} (dimension 1) must divide nheads = {heads}")
        for name in ("B", "C"):
            t = getattr(a, name)
            checks.ndim(name, t, 3, "[batch, ngroups, dstate]")
            checks.shape(name, t, (batch, groups, dstate), "[batch, ngroups, dstate]")
            checks.same_dtype(name, t, "x", x)
            if t.strides[1:] != (dstate, 1):
                raise ValueError(f"{name}: each row [ngroups, dstate] must be contiguous, got strides {t.strides}")
            _rows16(name, t)
        if a.z is not None:
            checks.shape("z", a.z, (batch, heads, dim), "[batch, nheads, dim]")
            checks.same_dtype("z", a.z, "x", x)
            if a.z.strides[1:] != (dim, 1):
                raise ValueError(f"z: each row [nheads, dim] must be contiguous, got strides {a.z.strides}")
            _rows16("z", a.z)
        out = a.out
        checks.shape("out", out, (batch, heads, dim), "[batch, nheads, dim]")
        checks.same_dtype("out", out, "x", x)
        checks.contiguous("out", out)
        idx = a.state_batch_indices
        if idx is not None:
            checks.ndim("state_batch_indices", idx, 1, "[batch]")
            checks.shape("state_batch_indices", idx, (batch,), "[batch]")
            checks.dtype_in("state_batch_indices", idx, (int32, int64))
            checks.contiguous("state_batch_indices", idx)
        if not -(1 << 31) <= a.pad_slot_id < 1 << 31:
            raise ValueError(f"pad_slot_id: expected an int32 value, got {a.pad_slot_id}")
        named = {
            "state": state, "x": x, "dt": dt, "A": a.A, "B": a.B, "C": a.C, "D": a.D, "z": a.z,
            "dt_bias": a.dt_bias, "state_batch_indices": idx, "out": out,
        }  # fmt: skip
        for name, t in named.items():
            if t is not None:
                checks.cuda(name, t)
                checks.same_device(name, t, "state", state)
        need = PointerRules({"x": _VECTOR, "B": _VECTOR, "C": _VECTOR, "state": _TMA if sm90 else _VECTOR})
        if a.z is not None:
            need.align("z", _VECTOR)
        # state is updated in place while other blocks read the inputs; out is written: neither may overlap them
        inputs = [n for n, t in named.items() if t is not None and n not in ("state", "out")]
        return need.outputs_apart(["state", "out"], inputs)

    check.__qualname__ = f"check_selective_state_update{'_sm90' if sm90 else ''}"
    return check


_launch = {
    _BASE: launcher(SELECTIVE_STATE_UPDATE, _BASE, _check(False)),
    _SM90: launcher(SELECTIVE_STATE_UPDATE, _SM90, _check(True)),
}
BACKENDS = ("auto", "sm90", "simple")
MambaBackend = Literal["auto", "sm90", "simple"]  # BACKENDS, as a type


@op(flashinfer="flashinfer.mamba.selective_state_update.selective_state_update")
def selective_state_update(
    state: TensorLike,
    x: TensorLike,
    dt: TensorLike,
    A: TensorLike,
    B: TensorLike,
    C: TensorLike,
    D: TensorLike,
    z: TensorLike | None = None,
    dt_bias: TensorLike | None = None,
    dt_softplus: bool = False,
    state_batch_indices: TensorLike | None = None,
    pad_slot_id: int = -1,
    out: TensorT | None = None,
    disable_state_update: bool = False,
    intermediate_states_buffer: TensorLike | None = None,
    intermediate_state_indices: TensorLike | None = None,
    cache_steps: int = 0,
    *,
    backend: MambaBackend = "auto",
    stream: StreamLike = None,
) -> TensorT:
    """One Mamba-2 decode step (see the module docstring for the math and the contract).

    Args:
        state: ``[state_cache_size, nheads, dim, dstate]``, updated in place (unless ``disable_state_update``).
        x: bfloat16 ``[batch, nheads, dim]``.
        dt: ``[batch, nheads, dim]`` with strides ``(.., 1, 0)`` (one value per head).
        A: float32 ``[nheads, dim, dstate]`` with strides ``(1, 0, 0)``.
        B, C: ``[batch, ngroups, dstate]``, x's dtype.
        D: ``[nheads, dim]`` with strides ``(1, 0)``, dt's dtype.
        z: optional gate ``[batch, nheads, dim]``, x's dtype.
        dt_bias: optional ``[nheads, dim]`` with strides ``(1, 0)``, dt's dtype.
        dt_softplus: apply softplus to ``dt + dt_bias``.
        state_batch_indices: optional int32/int64 device ``[batch]``: the state row of each request.
        pad_slot_id: an index value marking padding requests (no state read or written).
        out: ``[batch, nheads, dim]``, x's dtype, contiguous (required: fi_ffi allocates nothing); written.
        disable_state_update: compute ``out`` only.
        intermediate_states_buffer, intermediate_state_indices, cache_steps: the multi-token form; refused.
        backend: ``"auto"`` (SM90 module on SM 9.x for ``dim <= 128``, else the simple one), ``"sm90"`` or
            ``"simple"``.

    Returns:
        ``out``.

    Raises:
        TypeError: a tensor argument not a tensor (or None where required), or of a dtype other than those listed,
            ``backend`` not a string.
        ValueError: a shape that does not fit the state's (``batch``, ``nheads``, ``dim``, ``dstate``, groups), a batch
            larger than the state cache, rows not contiguous, a tensor not on ``state``'s CUDA device, an unknown
            ``backend`` or one the shapes do not fit.
    """
    if out is None:
        raise TypeError(
            "out: required (fi_ffi never allocates device memory); pass a contiguous [batch, nheads, dim] tensor of "
            "x's dtype"
        )
    launch = _launch[_module(backend, state)]
    launch(
        state,
        x,
        dt,
        A,
        B,
        C,
        D,
        z,
        dt_bias,
        dt_softplus,
        state_batch_indices,
        pad_slot_id,
        out,
        disable_state_update,
        intermediate_states_buffer,
        intermediate_state_indices,
        cache_steps,
        stream=stream,
    )
    return out


def _module(backend: Any, state: Any) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend != "auto":
        return module_for(backend, None, 0)
    from .attention.variants import sm_major

    t = checks.tensor("state", state)
    sm = sm_major(t.device.device_id) if t.device.is_cuda else None
    return module_for("auto", sm, t.shape[2] if len(t.shape) == 4 else 0)


def module_for(backend: str, sm: int | None, dim: int) -> str:
    """The module a call runs on: ``backend`` ``"sm90"``/``"simple"`` as named; ``"auto"`` the SM90 module on
    compute capability 9.x (``sm``, None when unknown) for ``dim <= SM90_MAX_DIM``, else the simple one."""
    if backend == "sm90":
        return _SM90
    if backend == "simple":
        return _BASE
    return _SM90 if sm == 9 and dim <= SM90_MAX_DIM else _BASE
