"""Which FlashInfer release serves the modules of a GPU run (gated by FI_FFI_RUN_GPU_TESTS=1).

Default run: everything from the 0.6.3 test wheels. ``FI_FFI_TEST_RELEASE=0.7.2`` (tests/conftest.py,
``tools/gpu_run.sh``): every module the 0.7.2 test wheel has comes from it (norm, the FA2 batch prefill module
under its 0.7 name ``..._kv_stride_equal``, ...), while what 0.7.x does not prebuild (single prefill) still comes
from 0.6.3. Marked ``release_check``: a missing module fails here instead of being skipped.
"""

from __future__ import annotations

import os

import pytest
from helpers.gpu import require_torch

if os.environ.get("FI_FFI_RUN_GPU_TESTS") != "1":
    pytest.skip("GPU tests run only with FI_FFI_RUN_GPU_TESTS=1 on a CUDA machine", allow_module_level=True)

from helpers.wheels import TEST_RELEASE

import fi_ffi
from fi_ffi import dtypes, loader
from fi_ffi.ops.attention import variants as V
from fi_ffi.ops.attention.variants import Variant

torch = require_torch()

pytestmark = [pytest.mark.gpu, pytest.mark.release_check]

EXPECTED = "0.7.2.post1" if TEST_RELEASE == "0.7.2" else "0.6.3"
F16 = dtypes.float16
FA2 = Variant(V.BATCH_PREFILL, F16, F16, F16, 128, 128, dtypes.int32)
SINGLE = Variant(V.SINGLE_PREFILL, F16, F16, F16, 128, 128, None)


def test_norm_runs_from_the_tested_release() -> None:
    x = torch.randn(3, 128, dtype=torch.float16, device="cuda")
    out = torch.empty_like(x)
    fi_ffi.rmsnorm(x, torch.ones(128, dtype=torch.float16, device="cuda"), out=out)
    torch.cuda.synchronize()
    assert loader.module_release("norm") == EXPECTED
    assert ("flashinfer_jit_cache_072/" in loader.loaded_modules()["norm"]) == (TEST_RELEASE == "0.7.2")
    ref = x.float() / x.float().pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
    torch.testing.assert_close(out.float(), ref, atol=5e-3, rtol=5e-3)


def test_fa2_batch_prefill_module_is_the_tested_releases() -> None:
    chosen = V.choose_prefill(FA2, "fa2", torch.cuda.current_device())
    assert loader.module_release(chosen.uri) == EXPECTED
    assert chosen.uri.endswith("_kv_stride_equal") == (TEST_RELEASE == "0.7.2")


def test_what_072_does_not_prebuild_still_comes_from_063() -> None:
    assert loader.module_release(V.resolve(SINGLE)) == "0.6.3"
