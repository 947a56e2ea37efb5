"""Bit packing on a real GPU against ``numpy.packbits`` (exact; gated by FI_FFI_RUN_GPU_TESTS=1)."""

from __future__ import annotations

import os

import numpy as np
import pytest
from helpers.gpu import require_torch

if os.environ.get("FI_FFI_RUN_GPU_TESTS") != "1":
    pytest.skip("GPU tests run only with FI_FFI_RUN_GPU_TESTS=1 on a CUDA machine", allow_module_level=True)

import fi_ffi

torch = require_torch()

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("bitorder", ["big", "little"])
@pytest.mark.parametrize("n", [1, 7, 8, 9, 2048, 2049, 100_003])
def test_packbits_equals_numpy(bitorder: str, n: int) -> None:
    rng = np.random.default_rng(n)
    bits = rng.random(n) < 0.3
    x = torch.from_numpy(bits).cuda()
    out = torch.full(((n + 7) // 8,), 0xAB, dtype=torch.uint8, device="cuda")
    assert fi_ffi.packbits(x, bitorder, out=out) is out
    torch.cuda.synchronize()
    np.testing.assert_array_equal(out.cpu().numpy(), np.packbits(bits, bitorder=bitorder))


@pytest.mark.parametrize("bitorder", ["big", "little"])
def test_segment_packbits_equals_numpy_per_segment(bitorder: str) -> None:
    rng = np.random.default_rng(7)
    lengths = [11, 0, 8, 1, 3000, 17, 64]
    bounds = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    bits = rng.random(int(bounds[-1])) < 0.5
    packed = fi_ffi.segment_packbits_indptr(bounds.tolist())
    out = torch.full((packed[-1],), 0xAB, dtype=torch.uint8, device="cuda")
    output_indptr = torch.tensor(packed, dtype=torch.int32, device="cuda")
    got, got_indptr = fi_ffi.segment_packbits(
        torch.from_numpy(bits).cuda(), torch.from_numpy(bounds).cuda(), bitorder, output_indptr=output_indptr, out=out
    )
    assert got is out and got_indptr is output_indptr
    torch.cuda.synchronize()
    y = out.cpu().numpy()
    for i in range(len(lengths)):
        want = np.packbits(bits[bounds[i] : bounds[i + 1]], bitorder=bitorder)
        np.testing.assert_array_equal(y[packed[i] : packed[i + 1]], want, err_msg=f"segment {i}")
