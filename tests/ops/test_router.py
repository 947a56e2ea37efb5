"""DeepSeek-V3 routing on the CPU machine, against the real ``dsv3_router_gemm`` and ``dsv3_fused_routing`` modules
of the model-family test wheel: each call is packed and reaches the module (which then stops at the missing
device), and every bad argument is refused by our checks before the FFI, naming the argument."""

from __future__ import annotations

from typing import Any

import pytest
from helpers.fakes import assert_reached_the_kernel, fake_cuda

import fi_ffi
from fi_ffi.errors import KernelError
from fi_ffi.ops import router
from fi_ffi.tensor.descriptor import Tensor

pytestmark = pytest.mark.cpu_only

H = router.HIDDEN


def column_major(experts: int, dtype: str = "bfloat16") -> Tensor:
    """``[7168, experts]`` with strides ``(1, 7168)``: the transpose of a contiguous ``[experts, 7168]`` weight."""
    return fake_cuda((experts, H), dtype).view((H, experts), strides=(1, H))


@pytest.mark.parametrize("tokens", [1, 7, 16])
@pytest.mark.parametrize(
    ("op", "experts", "out_dtype"),
    [(fi_ffi.mm_M1_16_K7168_N256, 256, "float32"), (fi_ffi.mm_M1_16_K7168_N128, 128, "bfloat16")],
    ids=["dsv3", "ml3"],
)
def test_router_gemm_reaches_its_kernel(
    kernel_modules: object, models_modules: object, op: Any, experts: int, out_dtype: str, tokens: int
) -> None:
    a, b, out = fake_cuda((tokens, H), "bfloat16"), column_major(experts), fake_cuda((tokens, experts), out_dtype)
    with pytest.raises(KernelError) as info:
        op(a, b, out, launch_with_pdl=True)
    assert_reached_the_kernel(info.value)
    assert f"bfloat16[{tokens}, {H}] cuda:0" in str(info.value)


# valid arguments of the DeepSeek-V3 router GEMM (2 tokens); each row of the table below changes one
A, B, OUT = fake_cuda((2, H), "bfloat16"), column_major(256), fake_cuda((2, 256), "float32")


@pytest.mark.parametrize(
    ("a", "b", "out", "exc", "pattern"),
    [
        (
            fake_cuda((17, H), "bfloat16"),
            B,
            fake_cuda((17, 256), "float32"),
            ValueError,
            r"mat_a: expected shape \[num_tokens, 7168\] with 1 <= num_tokens <= 16",
        ),
        (fake_cuda((0, H), "bfloat16"), B, fake_cuda((0, 256), "float32"), ValueError, "mat_a: expected shape"),
        (fake_cuda((2, 4096), "bfloat16"), B, OUT, ValueError, "mat_a: expected shape"),
        (fake_cuda((2, H), "float16"), B, OUT, TypeError, "mat_a: expected dtype bfloat16, got float16"),
        (A, fake_cuda((H, 256), "bfloat16"), OUT, ValueError, r"mat_b: expected a column-major \[7168, 256\] tensor"),
        (A, column_major(128), OUT, ValueError, r"mat_b: expected shape \(7168, 256\)"),
        (A, B, fake_cuda((2, 256), "bfloat16"), TypeError, "out: expected dtype float32, got bfloat16"),
        (A, B, fake_cuda((2, 128), "float32"), ValueError, r"out: expected shape \(2, 256\)"),
        (A, B, fake_cuda((2, 256), "float32", strides=(512, 1)), ValueError, "out: expected a contiguous tensor"),
        (fake_cuda((2, H), "bfloat16", strides=(8000, 1)), B, OUT, ValueError, "mat_a: expected a contiguous tensor"),
        (fake_cuda((2, H), "bfloat16", device="cpu"), B, OUT, ValueError, "mat_a: expected a CUDA device tensor"),
        (
            fake_cuda((2, H), "bfloat16").view((2, H), offset=4),
            B,
            OUT,
            ValueError,
            "mat_a: data pointer .* must be aligned to 16 bytes",
        ),
        (A, B, fake_cuda((2, 256), "float32", device=1), ValueError, "out: expected a tensor on cuda:0"),
    ],
)
def test_router_gemm_bad_inputs_are_named(a: Tensor, b: Tensor, out: Tensor, exc: type, pattern: str) -> None:
    with pytest.raises(exc, match=pattern):
        fi_ffi.mm_M1_16_K7168_N256(a, b, out)


def test_router_gemm_out_must_not_overlap_an_input() -> None:
    a = fake_cuda((2, H), "bfloat16")
    out = Tensor.from_pointer(a.data_ptr, (2, 256), "float32", 0, owner=a)
    with pytest.raises(ValueError, match="out: overlaps mat_a"):
        fi_ffi.mm_M1_16_K7168_N256(a, column_major(256), out)


def routing_args(
    tokens: int = 3, experts: int = 256, topk: int = 8, dtype: str = "float32", bias_dtype: str | None = None
) -> dict[str, Any]:
    return {
        "scores": fake_cuda((tokens, experts), dtype),
        "bias": fake_cuda((experts,), bias_dtype or dtype),
        "n_group": 8,
        "topk_group": 4,
        "topk": topk,
        "routed_scaling_factor": 2.5,
        "topk_values": fake_cuda((tokens, topk), dtype),
        "topk_indices": fake_cuda((tokens, topk), "int32"),
    }


@pytest.mark.parametrize(
    ("dtype", "bias_dtype"), [("float32", "float32"), ("bfloat16", "float32"), ("float16", "bfloat16")]
)
@pytest.mark.parametrize(("experts", "n_group", "topk_group", "topk"), [(256, 8, 4, 8), (64, 1, 1, 6), (384, 1, 1, 8)])
def test_fused_routing_reaches_its_kernel(
    kernel_modules: object,
    models_modules: object,
    dtype: str,
    bias_dtype: str,
    experts: int,
    n_group: int,
    topk_group: int,
    topk: int,
) -> None:
    args = routing_args(5, experts, topk, dtype, bias_dtype)
    args.update(n_group=n_group, topk_group=topk_group)
    # NoAuxTc ignores the launch error (no device here), so the call returns: the module accepted the packed
    # argument list (a wire mismatch would be a KernelError of kind TypeError from TVM-FFI's own check)
    before = router._noaux_tc.launcher.slow_calls  # type: ignore[attr-defined]
    assert fi_ffi.fused_topk_deepseek(**args) == (args["topk_values"], args["topk_indices"])
    assert router._noaux_tc.launcher.slow_calls == before + 1  # type: ignore[attr-defined]


def test_fused_routing_with_no_tokens_checks_and_launches_nothing(
    kernel_modules: object, models_modules: object
) -> None:
    args = routing_args(tokens=0)
    values, indices = fi_ffi.fused_topk_deepseek(**args)
    assert values is args["topk_values"] and indices is args["topk_indices"]
    args["topk_indices"] = fake_cuda((0, 8), "int64")
    with pytest.raises(TypeError, match="topk_indices: expected dtype int32, got int64"):
        fi_ffi.fused_topk_deepseek(**args)


@pytest.mark.parametrize(
    ("change", "exc", "pattern"),
    [
        ({"n_group": 7}, ValueError, r"n_group: expected a divisor of num_experts \(256\) in \[1, 32\], got 7"),
        ({"n_group": 64, "topk_group": 4}, ValueError, "n_group: expected a divisor"),
        ({"n_group": 4, "topk_group": 2}, ValueError, "64 per group; the kernel allows at most 32"),
        ({"topk_group": 5, "n_group": 16}, ValueError, "topk_group: expected at most 4"),
        ({"topk_group": 9}, ValueError, r"topk_group: expected 1..n_group \(8\), got 9"),
        ({"topk_group": 0}, ValueError, "topk_group: expected 1..n_group"),
        ({"n_group": 1, "topk_group": 1}, None, ""),
        ({"n_group": "8"}, TypeError, "n_group: expected an int"),
        ({"routed_scaling_factor": float("nan")}, ValueError, "routed_scaling_factor: expected a finite value"),
        ({"routed_scaling_factor": "2"}, TypeError, "routed_scaling_factor"),
        ({"scores": fake_cuda((3, 256), "int32")}, TypeError, "scores: expected dtype float32, float16, bfloat16"),
        ({"scores": fake_cuda((3, 16, 16))}, ValueError, "scores: expected a 2-D tensor"),
        ({"scores": fake_cuda((3, 256), strides=(300, 1))}, ValueError, "scores: expected a contiguous tensor"),
        ({"bias": fake_cuda((255,))}, ValueError, r"bias: expected shape \(256,\)"),
        ({"bias": fake_cuda((256,), "int32")}, TypeError, "bias: expected dtype"),
        ({"bias": fake_cuda((256,), device=1)}, ValueError, "bias: expected a tensor on cuda:0"),
        (
            {"topk_values": fake_cuda((3, 8), "bfloat16")},
            TypeError,
            r"topk_values: expected dtype float32 \(same as scores\)",
        ),
        ({"topk_values": fake_cuda((3, 4))}, ValueError, r"topk_values: expected shape \(3, 8\)"),
        ({"topk_indices": fake_cuda((3, 8), "int64")}, TypeError, "topk_indices: expected dtype int32"),
        (
            {"topk_indices": fake_cuda((3, 8), "int32", strides=(16, 1))},
            ValueError,
            "topk_indices: expected a contiguous",
        ),
    ],
)
def test_fused_routing_bad_inputs_are_named(
    kernel_modules: object, models_modules: object, change: dict[str, Any], exc: type | None, pattern: str
) -> None:
    args = routing_args()
    args.update(change)
    if exc is None:  # a valid variation: accepted and passed to the module (see above)
        fi_ffi.fused_topk_deepseek(**args)
        return
    with pytest.raises(exc, match=pattern):
        fi_ffi.fused_topk_deepseek(**args)


@pytest.mark.parametrize(
    ("experts", "n_group", "topk_group", "topk", "pattern"),
    [
        (256, 8, 4, 9, r"topk: expected 1..8"),
        (256, 8, 4, 0, r"topk: expected 1..8"),
        (385, 1, 1, 8, "with n_group = 1 the kernel routes at most 384"),
        (288, 9, 4, 8, "with n_group > 1 the kernel routes at most 256"),
        (64, 32, 1, 4, "hold fewer than topk = 4"),
        (0, 1, 1, 1, "at least one expert"),
    ],
)
def test_routing_limits_are_refused(experts: int, n_group: int, topk_group: int, topk: int, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        router.routing_limits(experts, n_group, topk_group, topk)


def test_fused_routing_outputs_must_not_overlap_the_scores() -> None:
    args = routing_args()
    s = args["scores"]
    args["topk_values"] = Tensor.from_pointer(s.data_ptr, (3, 8), "float32", 0, owner=s)
    with pytest.raises(ValueError, match="topk_values: overlaps scores"):
        fi_ffi.fused_topk_deepseek(**args)
