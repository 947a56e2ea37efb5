"""FP8 batched GEMM with per-tensor scales on a real GPU against float32 torch (gated by FI_FFI_RUN_GPU_TESTS=1;
the model-family test wheel staged beside the core one, and the ``nvidia-cublas`` wheel installed: the ``gemm``
module links cuBLAS).

Inputs are quantized as flashinfer-python's docstring does (per-tensor ``scale = 448 / amax``, the kernel gets
the inverse scales); the reference is ``(A_fp8.float() @ B_fp8.float()) * A_inv * B_inv`` in float32, i.e. on the
same FP8 values, so only cuBLASLt's fast FP8 accumulation and the final rounding differ: tolerance 2e-2
absolute and relative on outputs of magnitude ~1 (bfloat16 and float16 out).
"""

from __future__ import annotations

import os

import pytest
from helpers.gpu import require_torch

if os.environ.get("FI_FFI_RUN_GPU_TESTS") != "1":
    pytest.skip("GPU tests run only with FI_FFI_RUN_GPU_TESTS=1 on a CUDA machine", allow_module_level=True)

import fi_ffi
from fi_ffi.errors import LibraryLoadError
from fi_ffi.ops.bmm_fp8 import WORKSPACE_BYTES

torch = require_torch()

# models_modules skips naming the model-family wheel when its modules are not pinned
pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("models_modules")]


def to_fp8(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    finfo = torch.finfo(dtype)
    amax = x.abs().max().clamp(min=1e-12)
    scale = finfo.max / amax
    return (x * scale).clamp(finfo.min, finfo.max).to(dtype), scale.float().reciprocal().reshape(1)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("a_dtype", "b_dtype"),
    [(torch.float8_e4m3fn, torch.float8_e4m3fn), (torch.float8_e5m2, torch.float8_e4m3fn)],
)
@pytest.mark.parametrize(("batch", "m", "k", "n"), [(1, 1, 64, 80), (16, 48, 64, 80), (4, 128, 4096, 1024)])
def test_bmm_fp8_matches_float32(
    out_dtype: torch.dtype, a_dtype: torch.dtype, b_dtype: torch.dtype, batch: int, m: int, k: int, n: int
) -> None:
    torch.manual_seed(m + k)
    a = torch.randn(batch, m, k, device="cuda")
    w = torch.randn(batch, n, k, device="cuda") / k**0.5  # column-major B: the transpose of [n, k]
    a8, a_inv = to_fp8(a, a_dtype)
    w8, w_inv = to_fp8(w, b_dtype)
    b8 = w8.transpose(-2, -1)
    out = torch.full((batch, m, n), float("nan"), dtype=out_dtype, device="cuda")
    workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device="cuda")
    try:
        got = fi_ffi.bmm_fp8(a8, b8, a_inv, w_inv, out_dtype, out, workspace_buffer=workspace)
    except LibraryLoadError as exc:
        pytest.skip(f"the gemm module needs cuBLAS (pip install 'nvidia-cublas>=13,<14'): {exc}")
    assert got is out
    torch.cuda.synchronize()
    want = (a8.float() @ b8.float()) * a_inv * w_inv
    torch.testing.assert_close(out.float(), want, atol=2e-2, rtol=2e-2)


def test_the_scales_are_read_when_the_kernel_runs() -> None:
    a8, a_inv = to_fp8(torch.randn(1, 16, 64, device="cuda"), torch.float8_e4m3fn)
    w8, w_inv = to_fp8(torch.randn(1, 32, 64, device="cuda"), torch.float8_e4m3fn)
    out = torch.empty(1, 16, 32, dtype=torch.bfloat16, device="cuda")
    workspace = torch.empty(1 << 22, dtype=torch.uint8, device="cuda")
    try:
        fi_ffi.bmm_fp8(a8, w8.transpose(-2, -1), a_inv, w_inv, out=out, workspace_buffer=workspace)
    except LibraryLoadError as exc:
        pytest.skip(f"needs cuBLAS: {exc}")
    first = out.float().clone()
    a_inv.mul_(2.0)  # same tensor, new value: the next call (same layouts, fast path) sees it
    fi_ffi.bmm_fp8(a8, w8.transpose(-2, -1), a_inv, w_inv, out=out, workspace_buffer=workspace)
    torch.cuda.synchronize()
    torch.testing.assert_close(out.float(), first * 2, atol=2e-2, rtol=2e-2)
