"""Gated delta rule (GDN) prefill over packed variable-length sequences (``gdn_prefill_sm90.so``, Hopper only).

For each sequence ``n`` (tokens ``cu_seqlens[n]:cu_seqlens[n + 1]`` of the packed inputs) and each state head
``h`` (``Hs = max(Hq, Hv)`` of them), with a float32 state ``S`` of shape ``[d_v, d_k]`` (k-last) that starts
at ``initial_state[n, h]`` (zeros when it is None), token by token::

    S   = g[t, h] * S                                          # gate (decay, alpha); g is used as is, not exp'd
    S   = S + beta[t, h] * outer(v[t] - S @ k[t], k[t])         # delta-rule update
    out[t, h] = scale * (S @ q[t])
    output_state[n, h] = S                                      # after the sequence's last token

where ``q[t]``, ``k[t]``, ``v[t]`` are the rows of the heads that state head ``h`` reads:

- GQA (``Hq >= Hv``, ``Hk == Hv``, ``Hq % Hv == 0``): ``Hs = Hq``; state head ``h`` reads q head ``h`` and
  k/v head ``h // (Hq // Hv)``.
- GVA (``Hv > Hq``, ``Hk == Hq``, ``Hv % Hq == 0``): ``Hs = Hv``; state head ``h`` reads v head ``h`` and q/k
  head ``h // (Hv // Hq)``.

``g`` and ``beta`` default to ones, ``scale`` to ``1 / sqrt(d)``. q and k are used as given: the kernel
does not L2-normalize them (upstream's ``use_qk_l2norm_in_kernel`` flag never reaches it). Inputs are float16
or bfloat16; states, gates and the accumulation float32. The kernel supports ``head_dim == 128`` only
(``d = d_k = d_v``; its tiles and state layout are fixed at 128).

The kernel is built for SM90 (Hopper) only and picks its path from the *current* CUDA device, so
:func:`gdn_prefill` checks the compute capability of ``q``'s device first (raising
:class:`~fi_ffi.errors.UnsupportedDeviceError` elsewhere) and makes that device current for the call,
restoring the previous one after. All calls are asynchronous on ``stream`` and never synchronize.

**One device per process.** FlashInfer 0.6.3's ``gdn_prefill_sm90`` runs only on the first CUDA device it ran
on in a process: a launch on any other device fails inside the module ("run failed"), whatever the order. So
the first call that reaches the kernel binds the process to its device (process-wide, thread-safe: concurrent
first calls launch one at a time), and a later call with tensors on another device raises
:class:`~fi_ffi.errors.UnsupportedDeviceError` naming both devices, before anything is launched. Use one
process per device to run GDN on several GPUs.
"""

from __future__ import annotations

import threading
from types import SimpleNamespace
from typing import Any

from ..abi.wire import FLOAT, declare, optional_tensor, tensor, tensors
from ..cuda import device
from ..dtypes import Device, bfloat16, float16, float32, int64, uint8
from ..errors import KernelError, KernelNotFoundError, UnsupportedDeviceError
from ..launch import checks
from ..launch.launcher import launcher
from ..launch.pointer_rules import PointerRules
from ..launch.registry import op
from ..tensor.descriptor import Tensor
from ..tensor.protocols import StreamLike, TensorLike, TensorT
from ..tensor.streams import stream_handle
from .attention.variants import not_shipped

_URI = "gdn_prefill_sm90"
_DTYPES = (float16, bfloat16)
HEAD_DIM = 128
"""The only head dimension the kernel supports (its tile and state layout are fixed at 128)."""
WORKSPACE_BYTES_PER_SM = 128
"""Workspace the kernel needs per streaming multiprocessor: one 128-byte TMA descriptor slot per SM."""
_WORKSPACE_ALIGN = 64  # TMA descriptors in global memory must be 64-byte aligned
_TMA_ALIGN = 16  # TMA and vectorized state copies need 16-byte aligned bases
_REFUSED = ("does not support this device major version", "sm_90a is not enabled")
_DEVICE_END = 1 << 31  # CUDA device ordinals are C ints

# The CUDA ordinal the first launch of this process ran on (see "One device per process" above); None until then.
# Set once, under _bind_lock, by the call that first reaches the kernel; read without the lock afterwards.
_bound_device: int | None = None
_bind_lock = threading.Lock()

# FlashInfer's C++ names, except ``workspace`` (``workspace_buffer`` there), the public name.
GDN_PREFILL = declare(
    "gdn_prefill",
    [
        *tensors("output", "output_state", output=True),
        *tensors("q", "k", "v", "cu_seqlens"),
        optional_tensor("initial_state"),
        optional_tensor("g"),
        optional_tensor("beta"),
        ("scale", FLOAT),  # 0.0: the kernel's default 1 / sqrt(head_dim)
        tensor("workspace", output=True),
    ],
)
# (module URI pattern, declaration), checked against the modules by tests/launch/test_declarations.py
DECLARATIONS = ((_URI, GDN_PREFILL),)

__all__ = ["HEAD_DIM", "WORKSPACE_BYTES_PER_SM"]  # public here, not ops of fi_ffi; the ops: @op below


@op()
def gdn_workspace_size(device_id: int = 0) -> int:
    """Bytes of workspace :func:`gdn_prefill` needs on CUDA device ``device_id``: ``sm_count * 128``.

    Raises :class:`~fi_ffi.errors.UnsupportedDeviceError` if the device cannot be queried (no GPU or driver),
    ``TypeError``/``ValueError`` naming ``device_id`` if it is not an int in ``[0, 2**31)``.

    Raises:
        TypeError: ``device_id`` not an int.
        ValueError: ``device_id`` negative or not below 2**31.
    """
    device_id = checks.integer("device_id", device_id, 0)
    if device_id >= _DEVICE_END:
        raise ValueError(f"device_id: expected a CUDA device ordinal < 2**31, got {device_id}")
    return device.sm_count(device_id) * WORKSPACE_BYTES_PER_SM


@op(flashinfer="flashinfer.gdn_prefill.chunk_gated_delta_rule")
def gdn_prefill(
    q: TensorLike,
    k: TensorLike,
    v: TensorLike,
    g: TensorLike | None = None,
    beta: TensorLike | None = None,
    scale: float | None = None,
    initial_state: TensorLike | None = None,
    *,
    cu_seqlens: TensorLike,
    output: TensorT,
    output_state: TensorT,
    workspace: TensorLike,
    stream: StreamLike = None,
) -> tuple[TensorT, TensorT]:
    """Gated delta rule prefill of ``N`` packed sequences (see the module docstring for the math).

    flashinfer's ``chunk_gated_delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state,
    cu_seqlens, use_qk_l2norm_in_kernel, output, output_state)``: the final state is always written (into the
    required ``output_state``), and both tensors are returned.

    Shapes: ``S`` packed tokens, ``N`` sequences, ``Hq``/``Hk``/``Hv`` heads (GQA or GVA, see the module
    docstring), ``Hs = max(Hq, Hv)``, ``d = 128``. Every tensor is on the same CUDA device (an SM90 GPU) and
    contiguous. Tensors are :class:`~fi_ffi.tensor.Tensor` descriptors or any producer (torch, CuPy, JAX,
    DLPack, CUDA array interface).

    Args:
        q: ``[S, Hq, d]`` float16 or bfloat16.
        k: ``[S, Hk, d]``, ``q``'s dtype.
        v: ``[S, Hv, d]``, ``q``'s dtype.
        g: optional float32 ``[S, Hs]`` per-token decay (forget) gate, alpha, applied to the state as is (not
            exponentiated); None means ones (no decay).
        beta: optional float32 ``[S, Hs]`` per-token update strength; None means ones.
        scale: query scale, finite and > 0; None means ``1 / sqrt(d)``.
        initial_state: optional float32 ``[N, Hs, d, d]`` (k-last) initial states; None means zeros. It may be
            ``output_state`` itself (each state is read before it is overwritten, by the same threads).
        cu_seqlens: int64 ``[N + 1]``, ``N >= 1``: sequence ``n`` is tokens ``cu_seqlens[n]:cu_seqlens[n + 1]``.
            Device memory, so its values are not checked: it must start at 0, be non-decreasing and end at
            ``S``.
        output: ``[S, Hs, d]``, ``q``'s dtype; written.
        output_state: float32 ``[N, Hs, d, d]`` in k-last layout ``[N, H, V, K]``; written with each
            sequence's final state.
        workspace: uint8 ``[bytes]`` scratch of at least :func:`gdn_workspace_size` bytes, 64-byte aligned.
            The kernel keeps one TMA descriptor per SM in it, so launches that may run concurrently (on
            different streams) need distinct workspaces.
        stream: where the kernel runs; ``None`` follows ``output``'s framework (torch's or CuPy's current
            stream), or TVM-FFI's current stream of the device for descriptors.

    Returns:
        ``(output, output_state)``, as passed.

    One device per process: the first call that reaches the kernel binds this process to ``q``'s device,
    because FlashInfer 0.6.3's ``gdn_prefill_sm90`` runs only on the first CUDA device it ran on in a process
    (see the module docstring).

    Raises:
        TypeError: a dtype other than those listed, ``scale`` not a number.
        ValueError: a shape that does not fit the others (heads, ``d`` not 128, ``N``), a tensor not contiguous
            or not on ``q``'s device, ``workspace`` too small or misaligned, ``scale`` not finite and > 0.
        UnsupportedDeviceError: ``q``'s device is not SM90, or no CUDA device is available, or this process
            already ran ``gdn_prefill`` on another device (raised before the launch; the message names both).
        KernelNotFoundError: the pinned wheels have no ``gdn_prefill_sm90`` module; says which releases do.
    """
    _gdn_prefill(q, k, v, cu_seqlens, output, output_state, workspace, initial_state, g, beta, scale, stream, False)
    return output, output_state


def _gdn_prefill(
    q: Any,
    k: Any,
    v: Any,
    cu_seqlens: Any,
    output: Any,
    output_state: Any,
    workspace: Any,
    initial_state: Any,
    g: Any,
    beta: Any,
    scale: Any,
    stream: Any,
    skip_arch_check: bool,
) -> None:
    """The body of :func:`gdn_prefill`.

    Internal: ``skip_arch_check=True`` exists only for the CPU tests, which must reach the kernel module's own
    argument checks on a machine without a GPU. It skips the compute-capability check, the workspace-size
    check (both in :func:`_check`, told by the launch's ``context``) and making ``q``'s device current (all
    three need a CUDA driver). Never use it elsewhere. The one-device rule applies either way (it needs no
    driver): a call that reaches the module binds the process to ``q``'s device.
    """
    if scale is None:
        sc = 0.0  # the kernel's "default": 1 / sqrt(head_dim)
    elif scale.__class__ is float and 0.0 < scale < float("inf"):
        sc = scale
    else:
        sc = checks.positive_finite("scale", scale)
    args = (output, output_state, q, k, v, cu_seqlens, initial_state, g, beta, sc, workspace)
    dev = _device_of(q)
    try:
        bound = _bound_device
        if bound is None:
            with _bind_lock:  # the process's first launch: one caller at a time, so exactly one device binds
                if _bound_device is None:
                    _run(args, dev, stream, skip_arch_check)
                    return
                bound = _bound_device
        if dev.is_cuda and dev.device_id != bound:  # a non-CUDA q is named by the launch's checks
            raise UnsupportedDeviceError(
                f"gdn_prefill: q is on {dev}, but this process already ran gdn_prefill on cuda:{bound}; "
                f"FlashInfer 0.6.3's gdn_prefill_sm90 kernel runs only on the first CUDA device it ran on in a "
                f"process (on another it fails with 'run failed'). Run every gdn_prefill of this process on "
                f"cuda:{bound}, or use one process per device"
            )
        _run(args, dev, stream, skip_arch_check)
    except KernelNotFoundError as err:
        raise KernelNotFoundError(f"gdn_prefill: {err}\n{not_shipped('gdn_prefill')}") from err


def _run(args: tuple[Any, ...], dev: Device, stream: Any, skip_arch_check: bool) -> None:
    """Make ``dev`` current, launch, put the previous device back; bind the process to ``dev`` once the call has
    reached the kernel (launched, or failed inside the module other than by refusing the architecture)."""
    previous = -1 if skip_arch_check else _make_current(dev, args, stream)
    try:
        _launch(*args, stream=stream, context=skip_arch_check)
    except KernelError as err:
        if any(text in err.message for text in _REFUSED):
            raise UnsupportedDeviceError(
                f"gdn_prefill: the GDN prefill kernel refused the current CUDA device ({err.message.strip()}); "
                f"it runs on SM90 (Hopper) GPUs only"
            ) from err
        _bind(dev)  # the module may have run far enough to keep its per-process state: bind conservatively
        raise
    finally:
        if previous >= 0:
            device.restore(previous)
    _bind(dev)


def _bind(dev: Device) -> None:
    """Record ``dev`` as the process's GDN device if none is yet (callers hold ``_bind_lock`` while it is None)."""
    global _bound_device
    if _bound_device is None and dev.is_cuda:
        _bound_device = dev.device_id


def _make_current(dev: Device, args: tuple[Any, ...], stream: Any) -> int:
    """Make ``dev`` current (the kernel picks its path from the current device); see device.make_current.

    Without a usable device the arguments are checked first, so a bad one is named before the device is
    refused (the check's architecture test refuses it).
    """
    try:
        return device.make_current(dev.device_id)
    except UnsupportedDeviceError:
        if stream is not None:
            stream_handle(stream)  # the architecture check below would refuse the device before the stream
        _launch.launcher.slow(args, stream, False, remember=False)  # binds the module only if they pass
        raise


def _device_of(q: Any) -> Device:
    """The device ``q`` claims, read without a descriptor where the producer says it (DLPack device)."""
    if q.__class__ is Tensor:
        return q.device  # type: ignore[no-any-return]
    try:
        kind, ordinal = q.__dlpack_device__()  # torch gives an IntEnum kind
        if isinstance(kind, int) and ordinal.__class__ is int and 0 <= ordinal < _DEVICE_END:
            return Device(int(kind), ordinal)
    except Exception:  # no DLPack device: read it like the launch does (and name a bad q)
        pass
    return checks.tensor("q", q).device


def _check_arch(qt: Tensor) -> None:
    dev = qt.device.device_id
    try:
        major, minor = device.compute_capability(dev)
    except UnsupportedDeviceError as err:
        raise UnsupportedDeviceError(f"gdn_prefill: cannot run on {qt.device}: {err}") from err
    if major != 9:
        raise UnsupportedDeviceError(
            f"gdn_prefill: the GDN prefill kernel runs on SM90 (Hopper, compute capability 9.x) only; "
            f"{qt.device} has compute capability {major}.{minor}"
        )


def _check(a: SimpleNamespace) -> PointerRules:
    """The contract of ``gdn_prefill`` (layouts only); ``a.context`` is True to skip the device queries."""
    qt, kt, vt, cu, ot, st = a.q, a.k, a.v, a.cu_seqlens, a.output, a.output_state
    ws, it, at, bt = a.workspace, a.initial_state, a.g, a.beta
    checks.ndim("q", qt, 3, "[S, Hq, d]")
    checks.dtype_in("q", qt, _DTYPES)
    checks.ndim("k", kt, 3, "[S, Hk, d]")
    checks.same_dtype("k", kt, "q", qt)
    checks.ndim("v", vt, 3, "[S, Hv, d]")
    checks.same_dtype("v", vt, "q", qt)
    packed, hq, d = qt.shape
    hk, hv = kt.shape[1], vt.shape[1]
    if d != HEAD_DIM:
        raise ValueError(f"q: the kernel supports head_dim {HEAD_DIM} only, got shape {qt.shape}")
    if packed < 1:
        raise ValueError(f"q: expected at least one packed token, got shape {qt.shape}")
    if kt.shape[0] != packed or kt.shape[2] != d:
        raise ValueError(f"k: expected [{packed}, Hk, {d}] (S and d of q), got {kt.shape}")
    if vt.shape[0] != packed or vt.shape[2] != d:
        raise ValueError(f"v: expected [{packed}, Hv, {d}] (S and d of q), got {vt.shape}")
    if hq < 1 or hk < 1 or hv < 1:
        raise ValueError(f"q, k, v: expected at least one head each, got Hq={hq}, Hk={hk}, Hv={hv}")
    if hq >= hv:  # GQA: groups of q heads share one k/v head
        if hk != hv or hq % hv:
            raise ValueError(
                f"k, v: with Hq >= Hv (GQA) the kernel needs Hk == Hv and Hq a multiple of Hv, got "
                f"Hq={hq}, Hk={hk}, Hv={hv}"
            )
    elif hk != hq or hv % hq:  # GVA: groups of v heads share one q/k head
        raise ValueError(
            f"k, v: with Hv > Hq (GVA) the kernel needs Hk == Hq and Hv a multiple of Hq, got Hq={hq}, Hk={hk}, Hv={hv}"
        )
    _dense("q", qt, qt)
    _dense("k", kt, qt)
    _dense("v", vt, qt)
    hs = max(hq, hv)
    checks.ndim("cu_seqlens", cu, 1, "[N + 1]")
    if cu.dtype != int64:
        raise TypeError(f"cu_seqlens: expected dtype int64 (the kernel reads it as int64), got {cu.dtype.name}")
    _dense("cu_seqlens", cu, qt)
    nseq = cu.shape[0] - 1
    if nseq < 1:
        raise ValueError(f"cu_seqlens: expected [N + 1] offsets with N >= 1 sequences, got shape {cu.shape}")
    checks.shape("output", ot, (packed, hs, d), "[S, max(Hq, Hv), d]")
    checks.same_dtype("output", ot, "q", qt)
    _dense("output", ot, qt)
    state = (nseq, hs, d, d)
    checks.shape("output_state", st, state, "[N, max(Hq, Hv), d, d]")
    if st.dtype != float32:
        raise TypeError(f"output_state: expected dtype float32, got {st.dtype.name}")
    _dense("output_state", st, qt)
    if it is not None:
        checks.shape("initial_state", it, state, "[N, max(Hq, Hv), d, d]")
        if it.dtype != float32:
            raise TypeError(f"initial_state: expected dtype float32, got {it.dtype.name}")
        _dense("initial_state", it, qt)
    for name, gate in (("g", at), ("beta", bt)):
        if gate is not None:
            checks.shape(name, gate, (packed, hs), "[S, max(Hq, Hv)]")
            if gate.dtype != float32:
                raise TypeError(f"{name}: expected dtype float32, got {gate.dtype.name}")
            _dense(name, gate, qt)
    checks.ndim("workspace", ws, 1, "[bytes]")
    if ws.dtype != uint8:
        raise TypeError(f"workspace: expected dtype uint8, got {ws.dtype.name}")
    _dense("workspace", ws, qt)
    if not a.context:  # device queries: the tensors' device (part of their layout) is an SM90 GPU
        _check_arch(qt)
        dev = qt.device.device_id
        need = device.sm_count(dev) * WORKSPACE_BYTES_PER_SM
        if ws.shape[0] < need:
            raise ValueError(
                f"workspace: expected at least {need} bytes (gdn_workspace_size({dev}): "
                f"{WORKSPACE_BYTES_PER_SM} per SM), got {ws.shape[0]}"
            )
    # TMA loads and stores need 16-byte aligned tensors; the workspace holds TMA descriptors (64-byte aligned)
    rules = PointerRules({name: _TMA_ALIGN for name in ("q", "k", "v", "output", "output_state", "initial_state")})
    rules.align("workspace", _WORKSPACE_ALIGN)
    # the outputs (and the per-SM TMA descriptors the kernel writes into the workspace) are written while q, k, v
    # and the gates are still read by other blocks; the state may be updated in place (each block reads its
    # head's state before it writes it)
    rules.outputs_apart(("output", "output_state", "workspace"), ("q", "k", "v", "g", "beta", "cu_seqlens"))
    rules.disjoint("output", "initial_state").disjoint("workspace", "initial_state")
    return rules.same_or_disjoint("output_state", "initial_state")


def _dense(name: str, t: Tensor, ref: Tensor) -> None:
    """``t`` is on ``ref``'s CUDA device and contiguous (the kernel derives every stride from the shapes)."""
    checks.same_device(name, t, "q", ref)
    checks.cuda(name, t)
    checks.contiguous(name, t)


# The launch function (wire order); ``.launcher.slow_calls`` counts calls validated from scratch.
_launch: Any = launcher(GDN_PREFILL, _URI, _check)
