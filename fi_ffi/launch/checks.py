"""Contract checks shared by the ops, run before anything crosses the FFI.

Each check raises ``TypeError`` (wrong kind of value, wrong dtype) or ``ValueError`` (wrong shape, device,
strides, out-of-range scalar) with a message that starts with the argument's name and says what was expected and
what was given; scalars follow the one packer's rules (:mod:`fi_ffi.abi.values`: ``ArgumentTypeError`` /
``ArgumentRangeError``, which are a ``TypeError`` / ``ValueError``). Checks run inside an op's launcher check see no
addresses (its verdict is cached per layout): what they require of a data pointer goes into a
:class:`~fi_ffi.launch.pointer_rules.PointerRules`, which the launcher tests on every call. NULL pointers of
non-empty tensors are refused by the launcher for every tensor; :func:`not_null` is for descriptors used outside a
launcher (host reads, workspace buffers).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from ..abi.values import scalar_type_error, to_float, to_index
from ..dtypes import DType
from ..tensor.descriptor import Tensor
from .pointer_rules import PointerRules


def tensor(name: str, value: Any, host: bool = False) -> Tensor:
    """``value`` as a :class:`Tensor` descriptor (DLPack / CUDA-array-interface producers are converted)."""
    if type(value) is Tensor:
        return value
    if value is None:
        raise TypeError(f"{name}: expected a tensor, got None")
    from ..tensor.intake import as_tensor

    return as_tensor(value, name=name)


def optional_tensor(name: str, value: Any) -> Tensor | None:
    """Like :func:`tensor` but None passes through."""
    return None if value is None else tensor(name, value)


def ndim(name: str, t: Tensor, expected: int, layout: str = "") -> None:
    if t.ndim != expected:
        what = f" {layout}" if layout else ""
        raise ValueError(f"{name}: expected a {expected}-D tensor{what}, got shape {t.shape}")


def shape(name: str, t: Tensor, expected: tuple[int, ...], layout: str = "") -> None:
    if t.shape != expected:
        what = f" ({layout})" if layout else ""
        raise ValueError(f"{name}: expected shape {expected}{what}, got {t.shape}")


def dtype_in(name: str, t: Tensor, allowed: Iterable[DType]) -> None:
    allowed = tuple(allowed)
    if t.dtype not in allowed:
        names = ", ".join(d.name for d in allowed)
        raise TypeError(f"{name}: expected dtype {names}, got {t.dtype.name}")


def same_dtype(name: str, t: Tensor, ref_name: str, ref: Tensor) -> None:
    if t.dtype != ref.dtype:
        raise TypeError(f"{name}: expected dtype {ref.dtype.name} (same as {ref_name}), got {t.dtype.name}")


def cuda(name: str, t: Tensor) -> None:
    """``t`` is device memory of a CUDA device."""
    if not t.device.is_cuda:
        raise ValueError(f"{name}: expected a CUDA device tensor, got one on {t.device}")


def host(name: str, t: Tensor) -> None:
    """``t`` is host memory (plain or page-locked) the CPU can read."""
    if not t.device.is_host:
        raise ValueError(f"{name}: expected a host (CPU) tensor, got one on {t.device}")


def not_null(name: str, t: Tensor) -> None:
    """``t``'s data pointer is not NULL (empty tensors excepted): for descriptors used outside a launcher."""
    if not t.data_ptr and t.numel:
        raise ValueError(f"{name}: data pointer is NULL")


def same_device(name: str, t: Tensor, ref_name: str, ref: Tensor) -> None:
    """Same memory space and ordinal (managed counts as device memory, pinned host as host memory)."""
    a, b = t.device, ref.device
    if a != b and (a.is_cuda != b.is_cuda or a.is_host != b.is_host or a.device_id != b.device_id):
        raise ValueError(f"{name}: expected a tensor on {ref.device} (same as {ref_name}), got {t.device}")


def last_dim_contiguous(name: str, t: Tensor) -> None:
    if t.ndim and t.strides[-1] != 1 and t.shape[-1] != 1:
        raise ValueError(f"{name}: the last dimension must be contiguous (stride 1), got strides {t.strides}")


def contiguous(name: str, t: Tensor) -> None:
    if not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor, got shape {t.shape} strides {t.strides}")


def device_tensor(
    name: str, t: Tensor, dims: int, layout: str, dtypes: Iterable[DType], *, strided_rows: bool = False
) -> None:
    """The first checks of a tensor a kernel reads or writes, in the order the ops report them: ``dims``
    dimensions (``layout`` names them, e.g. ``"[R, V]"``), a dtype of ``dtypes``, CUDA device memory, contiguous
    (``strided_rows``: only the last dimension need be, as :func:`last_dim_contiguous`)."""
    ndim(name, t, dims, layout)
    dtype_in(name, t, dtypes)
    cuda(name, t)
    if strided_rows:
        last_dim_contiguous(name, t)
    else:
        contiguous(name, t)


def aligned(rules: PointerRules, name: str, t: Tensor, elements: int) -> None:
    """Vector loads of ``elements`` elements: every outer stride is a multiple of ``elements`` (checked here) and
    the data pointer of a non-empty ``t`` a multiple of ``elements * itemsize`` bytes (added to ``rules``)."""
    if elements <= 1:
        return
    if t.numel:
        rules.align(name, elements * t.dtype.itemsize)
    for dim, stride in enumerate(t.strides[:-1]):
        if stride % elements and t.shape[dim] > 1:
            raise ValueError(
                f"{name}: stride of dimension {dim} must be a multiple of {elements} elements, got {stride}"
            )


def row_vector_bytes(t: Tensor) -> int:
    """Alignment (bytes) of vector loads along the rows of ``t``: ``gcd(16 B / itemsize, row length)`` elements
    (a row whose length is not a multiple of the full vector is loaded in smaller pieces)."""
    size = t.dtype.itemsize
    return math.gcd(16 // size, t.shape[-1]) * size


def positive_finite(name: str, value: Any) -> float:
    """``value`` as a float that is finite and > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise scalar_type_error(name, "a float", value)
    value = to_float(name, value)
    if not (value > 0.0 and math.isfinite(value)):
        raise ValueError(f"{name}: expected a finite value > 0, got {value}")
    return value


def finite(name: str, value: Any) -> float:
    """``value`` as a finite float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise scalar_type_error(name, "a float", value)
    value = to_float(name, value)
    if not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite value, got {value}")
    return value


def integer(name: str, value: Any, minimum: int | None = None) -> int:
    """``value`` as a Python int (an int, or anything with ``__index__``, not a bool: the type rule of
    :func:`fi_ffi.abi.values.to_int`), at least ``minimum``. No int64 bound here: each caller states its own, tighter
    one (an int32 size, a vocabulary), and the one packer refuses what still exceeds int64 when the call is packed."""
    value = to_index(name, value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")
    return value


def flag(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, int)) or (isinstance(value, int) and value not in (0, 1)):
        raise scalar_type_error(name, "a bool", value, repr(value))
    return bool(value)
