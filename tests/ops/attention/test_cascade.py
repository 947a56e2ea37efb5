"""Attention-state merging on the CPU machine, against the real ``cascade`` module of the extension test wheel:
packing reaches the module's device check for each entry point; bad inputs are refused by our checks."""

from __future__ import annotations

from typing import Any

import pytest
from helpers.fakes import assert_reached_the_kernel, fake_cuda

import fi_ffi
from fi_ffi.errors import KernelError
from fi_ffi.tensor.descriptor import Tensor

pytestmark = pytest.mark.cpu_only

N, H, D = 6, 4, 128


def state(dtype: str = "float16", n: int = N, d: int = D) -> tuple[Tensor, Tensor]:
    return fake_cuda((n, H, d), dtype), fake_cuda((n, H), "float32")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_every_entry_point_reaches_the_kernel(kernel_modules: object, dtype: str) -> None:
    (va, sa), (vb, sb), (vm, sm) = state(dtype), state(dtype), state(dtype)
    calls = [
        lambda: fi_ffi.merge_state(va, sa, vb, sb, v_merged=vm, s_merged=sm),
        lambda: fi_ffi.merge_state_in_place(va, sa, vb, sb),
        lambda: fi_ffi.merge_state_in_place(va, sa, vb, sb, fake_cuda((N,), "bool")),
        lambda: fi_ffi.merge_state_in_place(va, sa, vb, sb, mask=fake_cuda((N,), "uint8")),
        lambda: fi_ffi.merge_states(
            fake_cuda((N, 3, H, D), dtype), fake_cuda((N, 3, H), "float32"), v_merged=vm, s_merged=sm
        ),
    ]
    for call in calls:
        with pytest.raises(KernelError) as info:
            call()
        assert_reached_the_kernel(info.value)
        assert f"{dtype}[" in str(info.value)


@pytest.mark.parametrize(
    "change, exc, pattern",
    [
        (dict(v_a=fake_cuda((N, H, D), "float32")), TypeError, "v_a: expected dtype float16, bfloat16, got float32"),
        (
            dict(v_a=fake_cuda((N, H, 96)), v_b=fake_cuda((N, H, 96)), v_merged=fake_cuda((N, H, 96))),
            ValueError,
            "v_a: head_dim 96 is not supported",
        ),
        (dict(s_a=fake_cuda((N, H), "float16")), TypeError, "s_a: expected dtype float32, got float16"),
        (dict(s_b=fake_cuda((N, H + 1), "float32")), ValueError, r"s_b: expected shape \(6, 4\)"),
        (dict(s_a=fake_cuda((N, H, 1), "float32")), ValueError, "s_a: expected a 2-D tensor"),
        (dict(v_b=fake_cuda((N + 1, H, D))), ValueError, r"v_b: expected shape \(6, 4, 128\)"),
        (dict(v_b=fake_cuda((N, H, D), "bfloat16")), TypeError, r"v_b: expected dtype float16 \(same as v_a\)"),
        (dict(v_merged=fake_cuda((N, H, D), strides=(2 * H * D, D, 1))), ValueError, "v_merged: expected a contiguous"),
        (dict(s_merged=fake_cuda((N, H), "float32", device=1)), ValueError, "s_merged: expected a tensor on cuda:0"),
        (dict(v_a=fake_cuda((N, H, D)).view((N, H, D), offset=4)), ValueError, "v_a: data pointer .* aligned to 16"),
        (
            dict(
                v_a=fake_cuda((0, H, D)),
                v_b=fake_cuda((0, H, D)),
                v_merged=fake_cuda((0, H, D)),
                s_a=fake_cuda((0, H), "float32"),
                s_b=fake_cuda((0, H), "float32"),
                s_merged=fake_cuda((0, H), "float32"),
            ),
            ValueError,
            "v_a: expected at least one row",
        ),
        (dict(v_merged=None), TypeError, "v_merged: required .*never allocates"),
    ],
)
def test_bad_merge_state_arguments_are_named(change: dict, exc: type, pattern: str) -> None:
    (va, sa), (vb, sb), (vm, sm) = state(), state(), state()
    args: dict[str, Any] = {**dict(v_a=va, s_a=sa, v_b=vb, s_b=sb, v_merged=vm, s_merged=sm), **change}
    with pytest.raises(exc, match=pattern):
        fi_ffi.merge_state(
            args["v_a"], args["s_a"], args["v_b"], args["s_b"], v_merged=args["v_merged"], s_merged=args["s_merged"]
        )


def test_merge_state_outputs_must_not_alias_inputs(kernel_modules: object) -> None:
    (va, sa), (vb, sb), (vm, sm) = state(), state(), state()
    with pytest.raises(KernelError):  # these layouts pass, and are remembered
        fi_ffi.merge_state(va, sa, vb, sb, v_merged=vm, s_merged=sm)
    with pytest.raises(ValueError, match="v_merged: overlaps v_a"):
        fi_ffi.merge_state(va, sa, vb, sb, v_merged=va, s_merged=sm)  # __restrict__: use merge_state_in_place
    with pytest.raises(ValueError, match="s_merged: overlaps s_b"):
        fi_ffi.merge_state(va, sa, vb, sb, v_merged=vm, s_merged=sb)


@pytest.mark.parametrize(
    "mask, other, exc, pattern",
    [
        (fake_cuda((N,), "int32"), None, TypeError, "mask: expected dtype bool, uint8, got int32"),
        (fake_cuda((N + 1,), "bool"), None, ValueError, r"mask: expected shape \(6,\)"),
        (fake_cuda((N,), "bool", device="cpu"), None, ValueError, "mask: expected a tensor on cuda:0"),
        (None, fake_cuda((N, H, 64)), ValueError, r"v_other: expected shape \(6, 4, 128\)"),
    ],
)
def test_bad_merge_state_in_place_arguments_are_named(mask: Any, other: Any, exc: type, pattern: str) -> None:
    v, s = state()
    vo, so = state()
    with pytest.raises(exc, match=pattern):
        fi_ffi.merge_state_in_place(v, s, other if other is not None else vo, so, mask)


def test_merge_state_in_place_refuses_the_other_state_overlapping_the_updated_one(kernel_modules: object) -> None:
    v, s = state()
    with pytest.raises(KernelError):
        fi_ffi.merge_state_in_place(v, s, *state())
    with pytest.raises(ValueError, match="v: overlaps v_other"):
        fi_ffi.merge_state_in_place(v, s, v, fake_cuda((N, H), "float32"))


@pytest.mark.parametrize(
    "v, s, vm, sm, exc, pattern",
    [
        (fake_cuda((N, H, D)), fake_cuda((N, H), "float32"), None, None, ValueError, "v: expected a 4-D tensor"),
        (
            fake_cuda((N, 2, H, D)),
            fake_cuda((N, 3, H), "float32"),
            None,
            None,
            ValueError,
            r"s: expected shape \(6, 2, 4\)",
        ),
        (
            fake_cuda((N, 0, H, D)),
            fake_cuda((N, 0, H), "float32"),
            None,
            None,
            ValueError,
            "v: expected at least one row",
        ),
        (
            fake_cuda((N, 2, H, D)),
            fake_cuda((N, 2, H), "float32"),
            fake_cuda((N, 2, H, D)),
            None,
            ValueError,
            "v_merged: expected a 3-D tensor",
        ),
        (
            fake_cuda((N, 2, H, D)),
            fake_cuda((N, 2, H), "float32"),
            None,
            fake_cuda((N, H)),
            TypeError,
            "s_merged: expected dtype float32",
        ),
    ],
)
def test_bad_merge_states_arguments_are_named(v: Tensor, s: Tensor, vm: Any, sm: Any, exc: type, pattern: str) -> None:
    with pytest.raises(exc, match=pattern):
        fi_ffi.merge_states(
            v,
            s,
            v_merged=vm if vm is not None else fake_cuda((N, H, D)),
            s_merged=sm if sm is not None else fake_cuda((N, H), "float32"),
        )
