"""Gated activations on the CPU machine, against the real ``silu_and_mul`` / ``gelu_and_mul`` /
``gelu_tanh_and_mul`` modules of the extension test wheel: packing reaches each module's device check, bad
inputs are refused by our checks, naming the argument."""

from __future__ import annotations

from typing import Any

import pytest
from helpers.fakes import assert_reached_the_kernel, fake_cuda

import fi_ffi
from fi_ffi.errors import KernelError
from fi_ffi.tensor.descriptor import Tensor

pytestmark = pytest.mark.cpu_only

OPS = [fi_ffi.silu_and_mul, fi_ffi.gelu_and_mul, fi_ffi.gelu_tanh_and_mul]
IDS = [op.__name__ for op in OPS]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("op", OPS, ids=IDS)
@pytest.mark.parametrize("shape", [(4, 256), (2, 3, 64), (16,)])
def test_every_activation_reaches_its_kernel(
    kernel_modules: object, op: Any, dtype: str, shape: tuple[int, ...]
) -> None:
    x = fake_cuda(shape, dtype)
    out = fake_cuda((*shape[:-1], shape[-1] // 2), dtype)
    with pytest.raises(KernelError) as info:
        op(x, out, enable_pdl=True)
    assert_reached_the_kernel(info.value)
    assert f"{dtype}[{', '.join(map(str, shape))}] cuda:0" in str(info.value)


@pytest.mark.parametrize("op", OPS, ids=IDS)
@pytest.mark.parametrize(
    "x, out, exc, pattern",
    [
        (
            fake_cuda((4, 256), "float32"),
            fake_cuda((4, 128), "float32"),
            TypeError,
            "input: expected dtype float16, bfloat16, got float32",
        ),
        (fake_cuda((4, 255)), fake_cuda((4, 127)), ValueError, r"input: its last dimension \(255\) must be even"),
        (fake_cuda((4, 24)), fake_cuda((4, 12)), ValueError, "input: d = 12 .* must be a positive multiple of 8"),
        (fake_cuda((4, 256)), fake_cuda((4, 256)), ValueError, r"out: expected shape \(4, 128\)"),
        (fake_cuda((4, 256)), fake_cuda((2, 2, 128)), ValueError, r"out: expected shape \(4, 128\)"),
        (
            fake_cuda((4, 256)),
            fake_cuda((4, 128), "bfloat16"),
            TypeError,
            r"out: expected dtype float16 \(same as input\)",
        ),
        (fake_cuda((4, 256), strides=(512, 1)), fake_cuda((4, 128)), ValueError, "input: expected a contiguous tensor"),
        (fake_cuda((4, 256)), fake_cuda((4, 128), strides=(256, 1)), ValueError, "out: expected a contiguous tensor"),
        (fake_cuda((4, 256)), fake_cuda((4, 128), device=1), ValueError, r"out: expected a tensor on cuda:0"),
        (fake_cuda((4, 256), device="cpu"), fake_cuda((4, 128)), ValueError, "input: expected a CUDA device tensor"),
        (fake_cuda((0, 256)), fake_cuda((0, 128)), ValueError, "input: expected at least one row"),
        (
            fake_cuda((4, 256)).view((4, 256), offset=4),
            fake_cuda((4, 128)),
            ValueError,
            "input: data pointer .* must be aligned to 16 bytes",
        ),
        (
            Tensor.from_pointer(0, (4, 256), "float16", 0),
            fake_cuda((4, 128)),
            ValueError,
            "input: data pointer is NULL",
        ),
    ],
)
def test_bad_inputs_are_named(op: Any, x: Tensor, out: Tensor, exc: type, pattern: str) -> None:
    with pytest.raises(exc, match=pattern):
        op(x, out)


def test_out_is_required_and_must_not_overlap_input() -> None:
    x = fake_cuda((4, 256))
    with pytest.raises(TypeError, match="out: required .*never allocates"):
        fi_ffi.silu_and_mul(x)
    with pytest.raises(ValueError, match="out: overlaps input"):
        fi_ffi.silu_and_mul(x, x.view((4, 128)))  # writing the gate while other rows still read it


@pytest.mark.parametrize("flag, exc", [("yes", TypeError), (2, TypeError)])
def test_enable_pdl_must_be_a_bool(flag: object, exc: type) -> None:
    with pytest.raises(exc, match="enable_pdl: expected a bool"):
        fi_ffi.gelu_and_mul(fake_cuda((4, 256)), fake_cuda((4, 128)), enable_pdl=flag)  # type: ignore[arg-type]
