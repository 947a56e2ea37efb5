"""The fast producer paths (issue 21): each gives the descriptor the slow path gives, and keeps nothing alive.

- ``as_tensor(torch tensor)`` remembers a layout under torch's own (shape, stride(), dtype, device) and then reads
  only those and ``data_ptr()``: compared here field by field with the full description, for every dtype fi_ffi
  knows and strided, sliced, transposed and empty views;
- a type with ``__cuda_array_interface__`` (and no DLPack) is read by the launcher from its interface alone: a
  warm call stays on the fast path, a changed layout or dtype is checked again and refused by name.
"""

from __future__ import annotations

import gc
import weakref
from typing import Any

import numpy as np
import pytest

import fi_ffi
from fi_ffi import interop, producers
from fi_ffi.ops import norm
from fi_ffi.tensor import Tensor

torch = pytest.importorskip("torch")

TORCH_DTYPES = ["float16", "bfloat16", "float32", "int8", "int32", "int64", "uint8", "bool"]


def fields(t: Tensor) -> tuple[Any, ...]:
    return (t.data_ptr, t.shape, t.strides, t.dtype, t.device, t.ndim, t._lid, t.owner)


def views(dtype: str) -> list[Any]:
    base = torch.zeros(6, 10, dtype=getattr(torch, dtype))
    return [base, base[1:4, 2:9], base.t(), base[:, ::3], base[2], base[0:0], base.reshape(3, 2, 10)[:, 1]]


@pytest.mark.parametrize("dtype", TORCH_DTYPES)
def test_the_warm_torch_path_describes_as_the_full_one(dtype: str) -> None:
    for x in views(dtype):
        full = interop._describe_torch(x, "x", -1)
        first = fi_ffi.as_tensor(x)  # remembers the layout
        warm = fi_ffi.as_tensor(x)  # from the remembered layout
        assert fields(first) == fields(full) == fields(warm), x
        # another tensor of the same layout elsewhere: its own pointer and owner, the same layout
        other = x.clone() if x.is_contiguous() else None
        if other is not None:
            assert fields(fi_ffi.as_tensor(other))[1:7] == fields(full)[1:7]
            assert fi_ffi.as_tensor(other).data_ptr == other.data_ptr() and fi_ffi.as_tensor(other).owner is other


def test_the_warm_torch_path_still_refuses_what_the_full_one_refuses() -> None:
    x = torch.ones(4, 8, dtype=torch.float16)
    fi_ffi.as_tensor(x)
    fi_ffi.as_tensor(x)
    with pytest.raises(ValueError, match=r"^x: the tensor is a lazily negated view"):
        fi_ffi.as_tensor(torch._neg_view(x), name="x")  # same shape, strides, dtype, device
    sparse = x.to_sparse()
    with pytest.raises((TypeError, ValueError), match=r"^s: "):
        fi_ffi.as_tensor(sparse, name="s")
    meta = torch.empty(4, 8, dtype=torch.float16, device="meta")  # get_device() is -1, as for the CPU
    with pytest.raises(ValueError, match=r"^m: torch tensors on meta are not supported"):
        fi_ffi.as_tensor(meta, name="m")


def test_nothing_the_fast_paths_remember_holds_the_tensor() -> None:
    x = torch.zeros(3, 16, dtype=torch.bfloat16)
    ref = weakref.ref(x)
    t = fi_ffi.as_tensor(x)
    t = fi_ffi.as_tensor(x)
    assert t.owner is x
    del x, t
    gc.collect()
    assert ref() is None
    assert not any(isinstance(v, torch.Tensor) for key in interop._layouts for v in key)


class TypeCAI:
    """A producer whose type has ``__cuda_array_interface__`` (and no DLPack), over aligned host memory (a CPU
    machine takes CAI pointers as cuda:0)."""

    def __init__(self, shape: tuple[int, ...], typestr: str = "<f2") -> None:
        n = int(np.prod(shape))
        self.host = np.zeros(n + 256, dtype=np.float16)
        offset = (-self.host.ctypes.data % 256) // 2
        self.ptr = self.host[offset:].ctypes.data
        self.shape, self.typestr = shape, typestr

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:
        return {"shape": self.shape, "typestr": self.typestr, "data": (self.ptr, False), "version": 3, "strides": None}


def test_a_cai_type_is_read_from_its_interface_and_stays_on_the_fast_path(kernel_modules: list[str]) -> None:
    x, w, out = TypeCAI((4, 128)), TypeCAI((128,)), TypeCAI((4, 128))
    assert producers.reader(TypeCAI) is producers._read_cai
    key, ptr = producers.read(x, None)
    assert ptr == x.ptr and key == ((4, 128), None, "<f2", None, fi_ffi.as_tensor(x).device)
    launch = norm._rmsnorm
    for _ in range(2):
        with pytest.raises(fi_ffi.errors.KernelError):  # passed every check, stopped by the module (no GPU)
            fi_ffi.rmsnorm(x, w, out)
    before = launch.launcher.slow_calls
    with pytest.raises(fi_ffi.errors.KernelError):
        fi_ffi.rmsnorm(x, w, out)
    assert launch.launcher.slow_calls == before  # warm: read from the interfaces alone
    # another dtype in the same shape is checked again, and refused by name
    with pytest.raises(TypeError, match=r"^input: expected dtype float16, bfloat16, got float32"):
        fi_ffi.rmsnorm(TypeCAI((4, 128), "<f4"), w, out)
    # a misaligned pointer of the validated layout is refused by the pointer rules, not let through
    x.ptr += 2
    with pytest.raises(ValueError, match=r"^input: "):
        fi_ffi.rmsnorm(x, w, out)
