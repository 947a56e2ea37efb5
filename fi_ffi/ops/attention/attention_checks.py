"""Contracts of the tensors an attention run reads and writes, checked once per layout by the launchers.

Each check takes a :class:`~fi_ffi.tensor.Tensor` descriptor as an op's launcher check sees it (the launcher
describes every producer; the address is not part of it) and raises ``TypeError`` (dtype) or ``ValueError``
(rank, shape, device, strides) with a message that starts with the argument's name. What a check requires of
the data pointer (16-byte alignment for vector loads) it adds to the ``rules`` it is given; the launcher tests
those on every call, and refuses NULL pointers of non-empty tensors for every tensor.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ...dtypes import DType
from ...launch.pointer_rules import PointerRules
from ...tensor.descriptor import Tensor

__all__ = [
    "device_tensor",
    "index_tensor",
    "kv_cache",
    "lse_tensor",
    "outputs_apart",
    "scratch",
    "strides_u32",
    "vector",
]


def device_tensor(
    rules: PointerRules,
    name: str,
    t: Tensor,
    shape: tuple[int | None, ...],
    layout: str,
    dtype: DType | None,
    device: Any,
    contiguous: bool = False,
) -> None:
    """``t`` has ``len(shape)`` dims matching ``shape`` (None = any size), ``dtype``, lives on CUDA ``device``,
    has a contiguous last dimension (or is fully contiguous) and 16-byte aligned rows for vector loads (the
    pointer's alignment goes into ``rules``)."""
    if t.ndim != len(shape) or any(e is not None and e != g for e, g in zip(shape, t.shape, strict=True)):
        want = "[" + ", ".join("*" if e is None else str(e) for e in shape) + "]"
        raise ValueError(f"{name}: expected shape {want} ({layout}), got {t.shape}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {dtype.name}, got {t.dtype.name}")
    if t.device != device:
        if not t.device.is_cuda:
            raise ValueError(f"{name}: expected a CUDA device tensor on {device}, got one on {t.device}")
        raise ValueError(f"{name}: expected a tensor on {device} (the workspace's device), got {t.device}")
    if contiguous:
        if not t.is_contiguous():
            raise ValueError(f"{name}: expected a contiguous tensor, got shape {t.shape} strides {t.strides}")
    elif t.ndim and t.strides[-1] != 1 and t.shape[-1] != 1:
        raise ValueError(f"{name}: the last dimension must be contiguous (stride 1), got strides {t.strides}")
    vec = 16 // t.dtype.itemsize
    if vec > 1 and t.numel:
        rules.align(name, 16)
        for dim, stride in enumerate(t.strides[:-1]):
            if stride % vec and t.shape[dim] > 1:
                raise ValueError(
                    f"{name}: stride of dimension {dim} must be a multiple of {vec} elements (16 bytes), got {stride}"
                )


def index_tensor(name: str, t: Tensor, length: int | None, device: Any) -> None:
    """A device int32 index tensor: 1-D, contiguous, on ``device``, of ``length`` entries (None: any)."""
    if t.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D int32 tensor, got shape {t.shape}")
    if length is not None and t.shape[0] != length:
        raise ValueError(f"{name}: expected {length} entries, got {t.shape[0]}")
    if t.dtype.name != "int32":
        raise TypeError(f"{name}: expected dtype int32, got {t.dtype.name}")
    if t.device != device:
        raise ValueError(
            f"{name}: expected a device tensor on {device} (the run reads it on the GPU), got one on {t.device}"
        )
    if t.shape[0] > 1 and t.strides[0] != 1:
        raise ValueError(f"{name}: expected a contiguous tensor, got strides {t.strides}")


def kv_cache(
    rules: PointerRules,
    k: Tensor,
    v: Tensor,
    layout: str,
    num_kv_heads: int,
    page_size: int | None,
    head_dim_qk: int,
    head_dim_vo: int,
    dtype: DType,
    device: Any,
    names: tuple[str, str] = ("k_cache", "v_cache"),
) -> int:
    """Paged K/V caches (4-D, NHD ``[P, page, Hkv, d]`` / HND ``[P, Hkv, page, d]``) with identical strides.

    Returns the number of pages ``P``.
    """
    kn, vn = names
    ks: tuple[int | None, ...]
    vs: tuple[int | None, ...]
    if layout == "NHD":
        ks, vs = (None, page_size, num_kv_heads, head_dim_qk), (None, page_size, num_kv_heads, head_dim_vo)
        text = "NHD [num_pages, page_size, num_kv_heads, head_dim]"
    else:
        ks, vs = (None, num_kv_heads, page_size, head_dim_qk), (None, num_kv_heads, page_size, head_dim_vo)
        text = "HND [num_pages, num_kv_heads, page_size, head_dim]"
    device_tensor(rules, kn, k, ks, text, dtype, device)
    device_tensor(rules, vn, v, vs, text, dtype, device)
    if k.shape[0] != v.shape[0]:
        raise ValueError(f"{vn}: expected {k.shape[0]} pages (as {kn}), got {v.shape[0]}")
    if k.strides != v.strides:
        raise ValueError(
            f"{vn}: the kernels use one set of strides for both caches; {kn} has strides {k.strides},"
            f" {vn} has {v.strides}"
        )
    return k.shape[0]


def lse_tensor(name: str, t: Tensor | None, shape: tuple[int, ...], device: Any) -> None:
    """Optional float32 contiguous log-sum-exp output of ``shape`` on ``device``."""
    if t is None:
        return
    if t.shape != shape:
        raise ValueError(f"{name}: expected shape {shape}, got {t.shape}")
    if t.dtype.name != "float32":
        raise TypeError(f"{name}: expected dtype float32, got {t.dtype.name}")
    if t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device}, got one on {t.device}")
    if not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor (the kernel writes it dense), got strides {t.strides}")


def vector(name: str, t: Tensor | None, dtype: str, length: int | None, device: Any) -> None:
    """An optional 1-D contiguous device tensor of ``dtype`` (ALiBi slopes, custom masks, mask offsets)."""
    if t is None:
        return
    if t.dtype.name != dtype:
        raise TypeError(f"{name}: expected dtype {dtype}, got {t.dtype.name}")
    if t.ndim != 1 or (length is not None and t.shape[0] != length):
        want = f"({length},)" if length is not None else "(n,)"
        raise ValueError(f"{name}: expected a 1-D tensor of shape {want}, got {t.shape}")
    if t.device != device:
        raise ValueError(f"{name}: expected a device tensor on {device}, got one on {t.device}")
    if not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor, got strides {t.strides}")


def strides_u32(name: str, t: Tensor) -> None:
    """The prefill kernels take 32-bit strides."""
    if any(s >= 1 << 32 for s in t.strides):
        raise ValueError(f"{name}: the kernel takes 32-bit strides, got {t.strides}")


def outputs_apart(rules: PointerRules, reads: Sequence[str] = ()) -> PointerRules:
    """The attention kernels' outputs do not alias what they read: ``out`` shares no byte with ``q`` (other
    blocks may still be loading q rows when one writes its output rows), and ``lse`` none with ``out`` or ``q``;
    nor do they share a byte with the optional inputs ``reads`` (custom mask, its offsets, ALiBi slopes: absent
    in the common case, where their rules cost nothing).

    The KV cache and the index arrays are not compared: a cache is gigabytes that an output of a few rows would
    have to be carved from, and testing them would cost every decode step of every layer.
    """
    rules.disjoint("out", "q").disjoint("lse", "out").disjoint("lse", "q")
    for name in reads:
        rules.disjoint("out", name).disjoint("lse", name)
    return rules


def scratch(rules: PointerRules, name: str, t: Tensor) -> None:
    """A single prefill/decode ``tmp``: when given (not empty), the kernel writes its partial outputs there in
    16-byte vectors (as it writes ``out``) and merges them into ``out``, so it is 16-byte aligned and shares no
    byte with ``q``, ``out`` or ``lse``."""
    if t.numel:
        rules.align(name, 16)
        rules.disjoint(name, "q").disjoint(name, "out").disjoint(name, "lse")
