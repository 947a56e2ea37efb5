"""Producers that misbehave are refused by name, and the per-type readers agree with as_tensor."""

from __future__ import annotations

import numpy as np
import pytest

import fi_ffi
from fi_ffi.tensor import intake


class RaisingDevice:
    def __dlpack__(self, **kwargs: object) -> None:
        raise AssertionError("never asked: the device query failed first")

    def __dlpack_device__(self) -> tuple[int, int]:
        raise RuntimeError("no device")


class HugeCAI:
    @property
    def __cuda_array_interface__(self) -> dict[str, object]:
        return {"shape": (2**63,), "typestr": "<f2", "data": (4096, False), "version": 3}


def test_a_producer_whose_device_query_raises_is_named() -> None:
    with pytest.raises(TypeError, match=r"^x: RaisingDevice.__dlpack_device__\(\) failed: RuntimeError: no device"):
        fi_ffi.as_tensor(RaisingDevice(), name="x")


def test_sizes_beyond_int64_are_refused_by_as_tensor() -> None:
    with pytest.raises(ValueError, match=r"^y: sizes and strides must be below 2\*\*63"):
        fi_ffi.as_tensor(HugeCAI(), name="y")


def test_device_ordinals_beyond_int32_are_refused() -> None:
    with pytest.raises(ValueError, match=r"^device: unsupported device"):
        fi_ffi.Tensor.from_pointer(16, (2,), "float16", fi_ffi.Device(2, 2**31))
    with pytest.raises(TypeError, match=r"^device: expected an int ordinal"):
        fi_ffi.Tensor.from_pointer(16, (2,), "float16", 2**31)


def test_big_endian_host_arrays_are_refused() -> None:
    with pytest.raises((TypeError, ValueError), match=r"^a: "):
        fi_ffi.as_tensor(np.zeros(4, dtype=">f2"), name="a")


def test_the_descriptor_reader_gives_the_interned_layout_and_pointer() -> None:
    t = fi_ffi.Tensor.from_pointer(4096, (2, 8), "float16", 0)
    key, ptr = intake.read(t, None)
    assert (key, ptr) == (t._lid, 4096)
    same = fi_ffi.Tensor.from_pointer(8192, (2, 8), "float16", 0)
    other = fi_ffi.Tensor.from_pointer(8192, (2, 8), "bfloat16", 0)
    assert intake.read(same, None)[0] == key and intake.read(other, None)[0] != key


def test_rebind_keeps_the_layout_or_changes_the_leading_dimension() -> None:
    t = fi_ffi.Tensor.from_pointer(4096, (4, 8), "float16", 0)
    moved = t.rebind(8192)
    assert (moved.data_ptr, moved.shape, moved._lid) == (8192, (4, 8), t._lid)
    shorter = t.rebind(leading=2)
    assert shorter.shape == (2, 8) and shorter.strides == (8, 1) and shorter._lid != t._lid
    with pytest.raises(ValueError, match=r"^leading: expected an int in \[0, 2\*\*63\)"):
        t.rebind(leading=-1)
    with pytest.raises(ValueError, match=r"^data_ptr: expected an address in \[0, 2\*\*64\)"):
        t.rebind(2**64)
