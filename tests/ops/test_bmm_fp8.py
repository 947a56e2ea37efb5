"""FP8 batched GEMM on the CPU machine, against the real ``gemm`` module of the model-family test wheel (it links
cuBLAS: loaded from the ``nvidia-cublas`` wheel when installed, otherwise the tests that load it skip saying
so): a packed call reaches the module (which stops at the missing device before it touches the cuBLASLt
handle), and every bad argument is refused before the FFI, naming the argument."""

from __future__ import annotations

from typing import Any

import pytest
from helpers.fakes import assert_reached_the_kernel, fake_cuda

import fi_ffi
from fi_ffi.errors import KernelError, LibraryLoadError, UnsupportedDeviceError
from fi_ffi.tensor.descriptor import Tensor

pytestmark = pytest.mark.cpu_only
HANDLE = 0x1000  # never dereferenced here: the module stops at the device guard, before any cuBLASLt call


def column_major(batch: int, k: int, n: int, dtype: str = "float8_e4m3fn") -> Tensor:
    return fake_cuda((batch, n, k), dtype).view((batch, k, n), strides=(n * k, 1, k))


def args(**change: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "A": fake_cuda((2, 48, 64), "float8_e4m3fn"),
        "B": column_major(2, 64, 80),
        "A_scale": fake_cuda((1,), "float32"),
        "B_scale": fake_cuda((1,), "float32"),
        "dtype": "bfloat16",
        "out": fake_cuda((2, 48, 80), "bfloat16"),
        "workspace_buffer": fake_cuda((1 << 16,), "uint8"),
        "cublas_handle": HANDLE,
    }
    out.update(change)
    return out


@pytest.mark.parametrize(
    ("a_dtype", "b_dtype", "out_dtype"),
    [
        ("float8_e4m3fn", "float8_e4m3fn", "bfloat16"),
        ("float8_e5m2", "float8_e4m3fn", "float16"),
        ("float8_e4m3fn", "float8_e5m2", "bfloat16"),
    ],
)
@pytest.mark.parametrize("batch", [1, 3])
def test_bmm_fp8_reaches_its_kernel(
    kernel_modules: object, models_modules: object, a_dtype: str, b_dtype: str, out_dtype: str, batch: int
) -> None:
    call = args(
        A=fake_cuda((batch, 48, 64), a_dtype),
        B=column_major(batch, 64, 80, b_dtype),
        out=fake_cuda((batch, 48, 80), out_dtype),
        dtype=out_dtype,
    )
    try:
        with pytest.raises(KernelError) as info:
            fi_ffi.bmm_fp8(**call)
    except LibraryLoadError as exc:
        assert "nvidia-cublas" in str(exc)
        pytest.skip(f"the gemm module needs cuBLAS (pip install 'nvidia-cublas>=13,<14'): {exc}")
    assert_reached_the_kernel(info.value)
    assert f"gemm.bmm_fp8(DLTensor*({a_dtype}[{batch}, 48, 64] cuda:0)" in str(info.value)
    assert f"{HANDLE})" in str(info.value)  # the handle is the last (int) argument


def test_without_a_handle_one_is_made_for_the_device(kernel_modules: object, models_modules: object) -> None:
    call = args()
    del call["cublas_handle"]
    try:  # no GPU here: making the device current for cublasLtCreate is what fails, with a typed error
        with pytest.raises(UnsupportedDeviceError, match="no CUDA device"):
            fi_ffi.bmm_fp8(**call)
    except LibraryLoadError as exc:
        pytest.skip(f"needs cuBLAS (pip install 'nvidia-cublas>=13,<14'): {exc}")


@pytest.mark.parametrize(
    ("change", "exc", "pattern"),
    [
        ({"out": None}, TypeError, "out: required"),
        ({"dtype": "float16"}, TypeError, "dtype: float16 differs from out's dtype bfloat16"),
        ({"dtype": "nonsense"}, TypeError, "dtype: unsupported dtype"),
        ({"A": fake_cuda((2, 48, 64), "bfloat16")}, TypeError, "A: expected dtype float8_e4m3fn, float8_e5m2"),
        (
            {"A": fake_cuda((2, 48, 64), "float8_e5m2"), "B": column_major(2, 64, 80, "float8_e5m2")},
            TypeError,
            "B: A and B cannot both be float8_e5m2",
        ),
        ({"A": fake_cuda((48, 64), "float8_e4m3fn")}, ValueError, "A: expected a 3-D tensor"),
        ({"B": fake_cuda((2, 64, 80), "float8_e4m3fn")}, ValueError, r"B: expected column-major \[batch, k, n\]"),
        ({"B": column_major(2, 32, 80)}, ValueError, r"B: expected shape \(2, 64, n\)"),
        ({"B": column_major(3, 64, 80)}, ValueError, r"B: expected shape \(2, 64, n\)"),
        (
            {"A": fake_cuda((2, 48, 40), "float8_e4m3fn"), "B": column_major(2, 40, 80)},
            ValueError,
            "A: k = 40 must be a positive multiple of 16",
        ),
        (
            {"B": column_major(2, 64, 84), "out": fake_cuda((2, 48, 84), "bfloat16")},
            ValueError,
            "B: n = 84 must be a positive multiple of 8",
        ),
        ({"out": fake_cuda((2, 48, 80), "float32"), "dtype": None}, TypeError, "out: expected dtype float16, bfloat16"),
        ({"out": fake_cuda((2, 48, 96), "bfloat16")}, ValueError, r"out: expected shape \(2, 48, 80\)"),
        ({"A_scale": fake_cuda((2,), "float32")}, ValueError, "A_scale: expected a single float32 value"),
        ({"B_scale": fake_cuda((1,), "float16")}, TypeError, "B_scale: expected dtype float32"),
        ({"A_scale": fake_cuda((1,), "float32", device="cpu")}, ValueError, "A_scale: expected a tensor on cuda:0"),
        (
            {"workspace_buffer": fake_cuda((1 << 10,), "float32")},
            TypeError,
            "workspace_buffer: expected dtype uint8, int8",
        ),
        ({"workspace_buffer": fake_cuda((8, 128), "uint8")}, ValueError, "workspace_buffer: expected a 1-D tensor"),
        (
            {"workspace_buffer": fake_cuda((1 << 10,), "uint8").view((1000,), offset=3)},
            ValueError,
            "workspace_buffer: data pointer .* aligned to 16 bytes",
        ),
        (
            {"A": fake_cuda((2, 49, 64), "float8_e4m3fn").view((2, 48, 64), offset=8)},
            ValueError,
            "A: data pointer .* aligned to 16 bytes",
        ),
        ({"cublas_handle": 0}, ValueError, "cublas_handle: expected a cublasLtHandle_t"),
        ({"cublas_handle": "h"}, TypeError, "cublas_handle"),
        ({"out": fake_cuda((2, 48, 80), "bfloat16", device=1)}, ValueError, "out: expected a tensor on cuda:0"),
    ],
)
def test_bad_inputs_are_named(change: dict[str, Any], exc: type, pattern: str) -> None:
    with pytest.raises(exc, match=pattern):
        fi_ffi.bmm_fp8(**args(**change))


def test_out_must_not_overlap_the_inputs() -> None:
    call = args()
    a = call["A"]
    call["out"] = Tensor.from_pointer(a.data_ptr, (2, 48, 80), "bfloat16", 0, owner=a)
    with pytest.raises(ValueError, match="out: overlaps A"):
        fi_ffi.bmm_fp8(**call)
