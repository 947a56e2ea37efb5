"""fi_ffi.launch.checks.device_tensor: the first checks of a kernel's tensor argument, in the order the ops report
them (dimensions, dtype, device, contiguity), each error naming the argument."""

from __future__ import annotations

import pytest
from helpers.fakes import fake_cuda

from fi_ffi.dtypes import bfloat16, float16
from fi_ffi.launch import checks
from fi_ffi.tensor.descriptor import Tensor


def test_a_matching_tensor_passes_and_rows_may_stride_only_when_allowed() -> None:
    checks.device_tensor("x", fake_cuda((4, 8)), 2, "[R, C]", (float16,))
    rows_strided = fake_cuda((4, 8), strides=(16, 1))
    checks.device_tensor("x", rows_strided, 2, "[R, C]", (float16,), strided_rows=True)
    with pytest.raises(ValueError, match=r"x: expected a contiguous tensor, got shape \(4, 8\) strides \(16, 1\)"):
        checks.device_tensor("x", rows_strided, 2, "[R, C]", (float16,))
    with pytest.raises(ValueError, match="x: the last dimension must be contiguous"):
        checks.device_tensor("x", fake_cuda((4, 8), strides=(1, 4)), 2, "[R, C]", (float16,), strided_rows=True)


def test_the_first_failing_check_is_the_one_reported_in_order() -> None:
    # a host tensor of the wrong rank and dtype: the rank is reported, then (right rank) the dtype, then the device
    host = Tensor.from_pointer(16, (4, 8, 2), "float32", "cpu")
    with pytest.raises(ValueError, match=r"x: expected a 2-D tensor \[R, C\], got shape \(4, 8, 2\)"):
        checks.device_tensor("x", host, 2, "[R, C]", (float16, bfloat16))
    host = Tensor.from_pointer(16, (4, 8), "float32", "cpu", (1, 4))
    with pytest.raises(TypeError, match="x: expected dtype float16, bfloat16, got float32"):
        checks.device_tensor("x", host, 2, "[R, C]", (float16, bfloat16))
    with pytest.raises(ValueError, match="x: expected a CUDA device tensor, got one on cpu"):
        checks.device_tensor("x", Tensor.from_pointer(16, (4, 8), "float16", "cpu", (1, 4)), 2, "", (float16,))
