"""Bit packing on the CPU machine, against the real ``quantization`` module of the extension test wheel:
packing reaches the module's device check; bad inputs (dtype, shape, bitorder...) are refused by our checks."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from helpers.fakes import assert_reached_the_kernel, fake_cuda

import fi_ffi
from fi_ffi.errors import KernelError

pytestmark = pytest.mark.cpu_only


@pytest.mark.parametrize("bitorder", ["big", "little"])
def test_packbits_and_segment_packbits_reach_the_kernel(kernel_modules: object, bitorder: str) -> None:
    with pytest.raises(KernelError) as info:
        fi_ffi.packbits(fake_cuda((20,), "bool"), bitorder, out=fake_cuda((3,), "uint8"))
    assert_reached_the_kernel(info.value)
    assert "bool[20] cuda:0" in str(info.value)
    with pytest.raises(KernelError) as info:
        fi_ffi.packbits(fake_cuda((4, 5), "bool"), bitorder=bitorder, out=fake_cuda((3,), "uint8"))
    assert_reached_the_kernel(info.value)
    # FlashInfer's segment_packbits binding ignores the launch status (0.6.3 and 0.7.2): with no GPU the
    # failed launch goes unreported, so a call that passed the module's signature and argument checks returns.
    # A wrong argument list would have raised KernelError (TypeError) at the module's signature check.
    out, output_indptr = fake_cuda((3,), "uint8"), fake_cuda((4,), "int32")
    got = fi_ffi.segment_packbits(
        fake_cuda((11,), "bool"), fake_cuda((4,), "int32"), bitorder, output_indptr=output_indptr, out=out
    )
    assert got[0] is out and got[1] is output_indptr


# valid x and out of the refusal table below: 20 bits pack into 3 bytes
BITS, PACKED = fake_cuda((20,), "bool"), fake_cuda((3,), "uint8")


@pytest.mark.parametrize(
    "x, bitorder, out, exc, pattern",
    [
        (BITS, "middle", PACKED, ValueError, "bitorder: expected 'big' or 'little', got 'middle'"),
        (BITS, "BIG", PACKED, ValueError, "bitorder: expected 'big' or 'little'"),
        (BITS, 1, PACKED, TypeError, "bitorder: expected a str, got int"),
        (BITS, "big\0", PACKED, ValueError, "bitorder: text must not contain NUL"),
        (fake_cuda((20,), "uint8"), "big", PACKED, TypeError, "x: expected dtype bool, got uint8"),
        (BITS, "big", fake_cuda((2,), "uint8"), ValueError, r"out: expected shape \(3,\)"),
        (BITS, "big", fake_cuda((3,), "int8"), TypeError, "out: expected dtype uint8"),
        (fake_cuda((20,), "bool", strides=(2,)), "big", PACKED, ValueError, "x: expected a contiguous tensor"),
        (fake_cuda((0,), "bool"), "big", fake_cuda((0,), "uint8"), ValueError, "x: expected at least one element"),
        (BITS, "big", fake_cuda((3,), "uint8", device="cpu"), ValueError, "out: expected a tensor on cuda:0"),
    ],
)
def test_bad_packbits_arguments_are_named(x: Any, bitorder: Any, out: Any, exc: type, pattern: str) -> None:
    with pytest.raises(exc, match=pattern):
        fi_ffi.packbits(x, bitorder, out=out)


def test_packbits_out_is_required_and_must_not_overlap_x() -> None:
    x = fake_cuda((64,), "bool")
    with pytest.raises(TypeError, match="out: required .*never allocates"):
        fi_ffi.packbits(x)
    with pytest.raises(ValueError, match="out: overlaps x"):
        fi_ffi.packbits(x, out=x.view((8,)).__class__.from_pointer(x.data_ptr, (8,), "uint8", 0))


@pytest.mark.parametrize(
    "indptr, output_indptr, exc, pattern",
    [
        (fake_cuda((4,), "int64"), fake_cuda((4,), "int32"), TypeError, "indptr: expected dtype int32, got int64"),
        (fake_cuda((4,), "int32"), fake_cuda((4,), "int64"), TypeError, "output_indptr: expected dtype int32"),
        (fake_cuda((4,), "int32"), fake_cuda((3,), "int32"), ValueError, r"output_indptr: expected shape \(4,\)"),
        (fake_cuda((1,), "int32"), fake_cuda((1,), "int32"), ValueError, "indptr: expected .* batch_size >= 1"),
        (fake_cuda((4, 1), "int32"), fake_cuda((4,), "int32"), ValueError, "indptr: expected a 1-D tensor"),
        (None, fake_cuda((4,), "int32"), TypeError, "indptr: expected a tensor, got None"),
    ],
)
def test_bad_segment_packbits_arguments_are_named(indptr: Any, output_indptr: Any, exc: type, pattern: str) -> None:
    with pytest.raises(exc, match=pattern):
        fi_ffi.segment_packbits(
            fake_cuda((11,), "bool"), indptr, output_indptr=output_indptr, out=fake_cuda((3,), "uint8")
        )


def test_segment_packbits_requires_its_outputs() -> None:
    with pytest.raises(TypeError, match="output_indptr: required .*segment_packbits_indptr"):
        fi_ffi.segment_packbits(fake_cuda((11,), "bool"), fake_cuda((4,), "int32"), out=fake_cuda((3,), "uint8"))
    with pytest.raises(ValueError, match="x: expected a 1-D tensor"):
        fi_ffi.segment_packbits(
            fake_cuda((11, 1), "bool"),
            fake_cuda((4,), "int32"),
            output_indptr=fake_cuda((4,), "int32"),
            out=fake_cuda((3,), "uint8"),
        )


def test_segment_packbits_indptr_matches_flashinfers_definition() -> None:
    assert fi_ffi.segment_packbits_indptr([0, 4, 7, 11]) == [0, 1, 2, 3]
    assert fi_ffi.segment_packbits_indptr([0, 0, 9, 25]) == [0, 0, 2, 4]
    assert fi_ffi.segment_packbits_indptr([3]) == [0]
    with pytest.raises(ValueError, match=r"indptr: must be non-decreasing, got indptr\[1\] = 5 > indptr\[2\] = 4"):
        fi_ffi.segment_packbits_indptr([0, 5, 4])
    with pytest.raises(TypeError, match="indptr: expected an int"):
        fi_ffi.segment_packbits_indptr([0, 1.5])
    with pytest.raises(ValueError, match="indptr: expected at least one entry"):
        fi_ffi.segment_packbits_indptr([])


def test_segment_packbits_indptr_takes_sequences_and_integer_arrays_only() -> None:
    assert fi_ffi.segment_packbits_indptr(np.array([0, 4, 7], np.int64)) == [0, 1, 2]
    assert fi_ffi.segment_packbits_indptr((0, np.int32(9))) == [0, 2]
    for bad in ({0, 8}, b"\x00\x08", "08", None, 5, np.array(3), np.array([0.0, 8.0]), {0: 1}):
        with pytest.raises(TypeError, match=r"^indptr: expected a list, tuple or 1-D numpy integer array"):
            fi_ffi.segment_packbits_indptr(bad)  # type: ignore[arg-type]
    for bad_values in ([0, 2**31], [-1, 4], [0, 10**400]):
        with pytest.raises(ValueError, match=r"^indptr: expected offsets in \[0, 2\*\*31\)"):
            fi_ffi.segment_packbits_indptr(bad_values)


def test_pack_custom_mask_device_packs_through_segment_packbits(kernel_modules: list[str]) -> None:
    from fi_ffi.ops import quantization

    mask, indptr = fake_cuda((20,), "bool"), fake_cuda((3,), "int32")
    out, out_indptr = fake_cuda((3,), "uint8"), fake_cuda((3,), "int32")
    before = quantization._segment_packbits.launcher.slow_calls
    assert fi_ffi.pack_custom_mask_device(mask, indptr, out=out, output_indptr=out_indptr) == (out, out_indptr)
    assert quantization._segment_packbits.launcher.slow_calls == before + 1  # through segment_packbits
    with pytest.raises(TypeError, match=r"^mask: expected dtype bool"):  # its own name, not segment_packbits' x
        fi_ffi.pack_custom_mask_device(fake_cuda((20,), "uint8"), indptr, out=out, output_indptr=out_indptr)
    with pytest.raises(TypeError, match=r"^mask: expected a tensor, got None"):
        fi_ffi.pack_custom_mask_device(None, indptr, out=out, output_indptr=out_indptr)
