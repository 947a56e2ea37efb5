"""FP8 batched GEMM with per-tensor scales on cuBLASLt: ``bmm_fp8`` (``gemm`` module, entry ``bmm_fp8``).

Math, per batch ``b``: ``out[b] = (A[b] @ B[b]) * A_scale * B_scale``, float32 accumulation (cuBLASLt's fast FP8
accumulation), rounded once to ``out``'s dtype. ``A`` ``[batch, m, k]`` row-major, ``B`` ``[batch, k, n]``
column-major (each ``B[b]`` the transpose of a contiguous ``[n, k]``: a linear layer's weight), ``out``
``[batch, m, n]`` row-major. ``A``/``B`` are float8 e4m3 or e5m2 (not both e5m2); ``out`` float16 or bfloat16;
the scales are float32 device scalars (one element each), read when the kernel runs (so a CUDA graph replays
the current scale).

Differences from flashinfer-python: ``out`` and ``workspace_buffer`` are required (fi_ffi never allocates;
upstream uses a 32 MiB buffer, :data:`WORKSPACE_BYTES`), and the cuBLASLt handle is fi_ffi's own per device
(:mod:`fi_ffi.launch.cublaslt`) unless ``cublas_handle`` is given. The module needs cuBLAS (``nvidia-cublas`` wheel
or a CUDA toolkit; the loader loads it).

Contract (checked before the FFI): shapes and layouts above, one device; ``k`` a multiple of 16 and ``n`` a
multiple of 8 (cuBLASLt's FP8 leading dimensions are 16-byte multiples); 16-byte aligned ``A``, ``B``, ``out``
and workspace pointers (tested on every call); ``workspace_buffer`` 1-D, one byte per element (the module passes
its element count as its byte size); ``out`` shares no memory with ``A``, ``B``, the scales or the workspace.
"""

from __future__ import annotations

from types import SimpleNamespace

from ..abi.wire import INT, declare, tensor, tensors
from ..dtypes import DTypeLike, bfloat16, float8_e4m3fn, float8_e5m2, float16, float32, int8, uint8
from ..dtypes import dtype as dtype_of
from ..launch import checks
from ..launch.launcher import launcher
from ..launch.pointer_rules import PointerRules
from ..launch.registry import op
from ..tensor.protocols import StreamLike, TensorLike, TensorT

__all__ = ["WORKSPACE_BYTES"]  # public here, not ops of fi_ffi; the ops: @op below

BMM_FP8 = declare(
    "bmm_fp8",
    [
        *tensors("A", "B"),
        tensor("out", output=True),  # FlashInfer's D; named as the public argument, which messages name
        *tensors("A_scale", "B_scale"),
        tensor("workspace_buffer", output=True),
        ("cublas_handle", INT),
    ],
)
DECLARATIONS = (("gemm", BMM_FP8),)
WORKSPACE_BYTES = 32 << 20  # flashinfer-python's bmm_fp8 workspace
_FP8 = (float8_e4m3fn, float8_e5m2)
_OUT = (float16, bfloat16)
_ALIGN = 16


def _check(a: SimpleNamespace) -> PointerRules:
    A, B, D = a.A, a.B, a.out
    checks.device_tensor("A", A, 3, "[batch, m, k]", _FP8)
    batch, m, k = A.shape
    checks.ndim("B", B, 3, "[batch, k, n]")
    checks.dtype_in("B", B, _FP8)
    if A.dtype == float8_e5m2 and B.dtype == float8_e5m2:
        raise TypeError("B: A and B cannot both be float8_e5m2 (cuBLASLt has no e5m2 x e5m2 FP8 GEMM); use e4m3")
    checks.same_device("B", B, "A", A)
    checks.cuda("B", B)
    if B.shape[0] != batch or B.shape[1] != k:
        raise ValueError(f"B: expected shape ({batch}, {k}, n) ([batch, k, n], k = A.shape[2]), got {B.shape}")
    n = B.shape[2]
    if B.strides[1:] != (1, k) or (batch > 1 and B.strides[0] != k * n):
        raise ValueError(
            f"B: expected column-major [batch, k, n] (strides ({k * n}, 1, {k}): each B[b] the transpose of a "
            f"contiguous [n, k] weight), got strides {B.strides}"
        )
    if k % 16 or k == 0:
        raise ValueError(f"A: k = {k} must be a positive multiple of 16 (cuBLASLt FP8 leading dimension)")
    if n % 8 or n == 0:
        raise ValueError(f"B: n = {n} must be a positive multiple of 8 (16-byte rows of out)")
    checks.shape("out", D, (batch, m, n), "[batch, m, n]")
    checks.dtype_in("out", D, _OUT)
    checks.same_device("out", D, "A", A)
    checks.cuda("out", D)
    checks.contiguous("out", D)
    for name in ("A_scale", "B_scale"):
        s = getattr(a, name)
        if s.numel != 1:
            raise ValueError(f"{name}: expected a single float32 value (per-tensor scale), got shape {s.shape}")
        checks.dtype_in(name, s, (float32,))
        checks.same_device(name, s, "A", A)
        checks.cuda(name, s)
    ws = a.workspace_buffer
    checks.ndim("workspace_buffer", ws, 1, "[bytes]")
    checks.dtype_in("workspace_buffer", ws, (uint8, int8))
    checks.contiguous("workspace_buffer", ws)
    checks.same_device("workspace_buffer", ws, "A", A)
    checks.cuda("workspace_buffer", ws)
    if not 0 < a.cublas_handle < 1 << 64:
        raise ValueError(f"cublas_handle: expected a cublasLtHandle_t (a non-zero address), got {a.cublas_handle}")
    rules = PointerRules({"A": _ALIGN, "B": _ALIGN, "out": _ALIGN, "workspace_buffer": _ALIGN})
    return rules.outputs_apart(["out", "workspace_buffer"], ["A", "B", "A_scale", "B_scale"])


_bmm_fp8 = launcher(BMM_FP8, "gemm", _check)


@op(launch=_bmm_fp8, flashinfer="flashinfer.gemm.gemm_base.bmm_fp8")
def bmm_fp8(
    A: TensorLike,
    B: TensorLike,
    A_scale: TensorLike,
    B_scale: TensorLike,
    dtype: DTypeLike | None = None,
    out: TensorT | None = None,
    *,
    workspace_buffer: TensorLike,
    cublas_handle: int | None = None,
    stream: StreamLike = None,
) -> TensorT:
    """``out[b] = A[b] @ B[b] * A_scale * B_scale`` (see the module docstring).

    Args:
        A: float8 ``[batch, m, k]``, contiguous.
        B: float8 ``[batch, k, n]``, column-major (``W.transpose(-2, -1)`` of a contiguous ``[batch, n, k]``).
        A_scale, B_scale: float32 device scalars (one element).
        dtype: ``out``'s dtype (float16 or bfloat16), checked against ``out`` when given.
        out: ``[batch, m, n]``, contiguous (required).
        workspace_buffer: uint8 ``[bytes]`` device scratch for cuBLASLt (:data:`WORKSPACE_BYTES` recommended).
        cublas_handle: a ``cublasLtHandle_t`` (int) to use instead of fi_ffi's own for ``A``'s device.
        stream: where it runs (None: A's framework's current stream, else TVM-FFI's current stream).

    Returns:
        ``out``.

    Raises:
        TypeError: ``out`` missing, ``dtype`` not a dtype or not ``out``'s, ``A`` / ``B`` not float8 or of
            different float8 kinds, scales not float32, ``workspace_buffer`` not uint8, ``cublas_handle`` not an int.
        ValueError: a shape that does not fit the others (batch, m, k, n), ``B`` not column-major, a tensor not on
            ``A``'s CUDA device or misaligned, ``out`` overlapping an input, ``cublas_handle`` zero.
    """
    if out is None:
        raise TypeError("out: required (fi_ffi never allocates device memory); pass a contiguous [batch, m, n] tensor")
    if dtype is not None:
        try:
            want = dtype_of(dtype)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"dtype: {exc}") from None
        got = checks.tensor("out", out).dtype
        if want != got:
            raise TypeError(f"dtype: {want.name} differs from out's dtype {got.name}; pass one or the other")
    if cublas_handle is None:
        from ..launch.cublaslt import handle

        at = checks.tensor("A", A)
        if not at.device.is_cuda:
            raise ValueError(f"A: expected a CUDA device tensor, got one on {at.device}")
        cublas_handle = handle(at.device.device_id)
    _bmm_fp8(A, B, out, A_scale, B_scale, workspace_buffer, cublas_handle, stream=stream)
    return out
