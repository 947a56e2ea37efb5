"""Element types and devices, as DLPack encodes them.

A :class:`DType` is the DLPack triple ``(code, bits, lanes)`` plus a name; kernels compare the whole triple,
so lanes is always 1 here. A :class:`Device` is the DLPack pair ``(device_type, device_id)``.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, TypeAlias

if TYPE_CHECKING:  # numpy only for the annotation: importing fi_ffi imports no numpy
    import numpy as np

# DLPack device types (dlpack.h DLDeviceType).
CPU = 1
CUDA = 2
CUDA_HOST = 3
CUDA_MANAGED = 13

_DEVICE_NAMES = {CPU: "cpu", CUDA: "cuda", CUDA_HOST: "cuda_host", CUDA_MANAGED: "cuda_managed"}


class Device(NamedTuple):
    """A DLPack device: ``device_type`` (1 CPU, 2 CUDA, 3 CUDA pinned host, 13 CUDA managed) and ordinal."""

    device_type: int
    device_id: int

    @property
    def is_cuda(self) -> bool:
        """True for memory a CUDA kernel can address directly as device memory (CUDA or managed)."""
        return self.device_type in (CUDA, CUDA_MANAGED)

    @property
    def is_host(self) -> bool:
        """True for memory the CPU can read (plain or page-locked host memory)."""
        return self.device_type in (CPU, CUDA_HOST)

    def __str__(self) -> str:
        name = _DEVICE_NAMES.get(self.device_type, f"device_type={self.device_type}")
        return name if self.device_type == CPU else f"{name}:{self.device_id}"


def cuda(device_id: int = 0) -> Device:
    """The CUDA device ``device_id``."""
    return Device(CUDA, device_id)


def cpu() -> Device:
    """Host memory."""
    return Device(CPU, 0)


class DType(NamedTuple):
    """A DLPack element type. ``itemsize`` is in bytes; ``short`` is the name used in kernel-module URIs."""

    name: str
    code: int
    bits: int
    lanes: int
    short: str

    @property
    def itemsize(self) -> int:
        return self.bits * self.lanes // 8

    def __str__(self) -> str:
        return self.name


float16 = DType("float16", 2, 16, 1, "f16")
bfloat16 = DType("bfloat16", 4, 16, 1, "bf16")
float32 = DType("float32", 2, 32, 1, "f32")
float8_e4m3fn = DType("float8_e4m3fn", 10, 8, 1, "e4m3")
float8_e5m2 = DType("float8_e5m2", 12, 8, 1, "e5m2")
int8 = DType("int8", 0, 8, 1, "i8")
int32 = DType("int32", 0, 32, 1, "i32")
int64 = DType("int64", 0, 64, 1, "i64")
uint8 = DType("uint8", 1, 8, 1, "u8")
uint16 = DType("uint16", 1, 16, 1, "u16")
uint32 = DType("uint32", 1, 32, 1, "u32")
bool_ = DType("bool", 6, 8, 1, "bool")

ALL: tuple[DType, ...] = (
    float16,
    bfloat16,
    float32,
    float8_e4m3fn,
    float8_e5m2,
    int8,
    int32,
    int64,
    uint8,
    uint16,
    uint32,
    bool_,
)
_BY_NAME: dict[str, DType] = {d.name: d for d in ALL}
_BY_NAME.update(
    {
        "f16": float16,
        "half": float16,
        "bf16": bfloat16,
        "f32": float32,
        "float": float32,
        "e4m3": float8_e4m3fn,
        "float8_e4m3": float8_e4m3fn,
        "e5m2": float8_e5m2,
        "i32": int32,
        "i64": int64,
        "u8": uint8,
        "bool_": bool_,
    }
)
_BY_TRIPLE: dict[tuple[int, int, int], DType] = {(d.code, d.bits, d.lanes): d for d in ALL}


class FrameworkDType(Protocol):
    """A framework's dtype object seen structurally (torch.dtype: torch is optional, so not named here)."""

    @property
    def itemsize(self) -> int: ...

    @property
    def is_floating_point(self) -> bool: ...


# What a dtype argument accepts (see :func:`dtype`): a DType, a name ("float16", "bf16"), a DLPack (code, bits,
# lanes) triple, a numpy dtype or scalar type (CuPy, JAX and ml_dtypes use numpy's), or a torch dtype.
DTypeLike: TypeAlias = "DType | str | tuple[int, int, int] | np.dtype[Any] | type[np.generic] | FrameworkDType"


def dtype(value: Any) -> DType:
    """Normalise ``value`` to a :class:`DType`.

    Accepts a DType, a name (``"float16"``, ``"bf16"``...), a ``(code, bits, lanes)`` triple, a numpy dtype
    or anything ``numpy.dtype`` accepts, a torch dtype, or an ml_dtypes/CuPy dtype whose ``str`` is a known name.
    """
    if isinstance(value, DType):
        return value
    if isinstance(value, str):
        found = _BY_NAME.get(value)
        if found is not None:
            return found
    elif isinstance(value, tuple):
        # a DLPack (code, bits, lanes) triple of ints; anything else (floats, strings, other lengths) is refused
        if len(value) == 3 and all(v.__class__ is int for v in value):
            found = _BY_TRIPLE.get(value)  # type: ignore[arg-type]
            if found is not None:
                return found
    else:
        # torch.float16 -> "torch.float16"; numpy dtype("float16") -> "float16"; ml_dtypes bfloat16 -> "bfloat16"
        text = str(value).removeprefix("torch.")
        found = _BY_NAME.get(text)
        if found is None:
            name = getattr(value, "name", None)
            found = _BY_NAME.get(name) if isinstance(name, str) else None
        if found is None and isinstance(value, type):
            found = _numpy_scalar_type(value)
        if found is not None:
            return found
    known = ", ".join(d.name for d in ALL)
    raise TypeError(f"unsupported dtype {value!r}: expected one of {known}")


def _numpy_scalar_type(value: type) -> DType | None:
    """The DType of a numpy scalar type (``numpy.float16``, ``ml_dtypes.bfloat16``), as ``numpy.dtype`` names it;
    None for any other class. numpy is looked up, not imported: where such a type exists, numpy is loaded."""
    numpy: Any = sys.modules.get("numpy")
    if numpy is None or not issubclass(value, numpy.generic):
        return None
    try:
        return _BY_NAME.get(numpy.dtype(value).name)
    except TypeError:  # numpy.generic itself and other abstract scalar types have no dtype
        return None


def from_dlpack(code: int, bits: int, lanes: int) -> DType:
    """The :class:`DType` of a DLPack triple; ``TypeError`` if fi_ffi does not support it."""
    found = _BY_TRIPLE.get((code, bits, lanes))
    if found is None:
        raise TypeError(f"unsupported DLPack dtype (code={code}, bits={bits}, lanes={lanes})")
    return found
