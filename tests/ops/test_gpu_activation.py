"""Gated activations on a real GPU against float32 torch references (gated by FI_FFI_RUN_GPU_TESTS=1).

References: ``silu(x) = x * sigmoid(x)``, ``gelu`` = ``torch.nn.functional.gelu`` (erf form), ``gelu_tanh`` =
its ``approximate="tanh"`` form, all in float32 on the dtype-rounded inputs, times ``y``. Tolerances, absolute
and relative, on outputs of magnitude <= ~10: float16 1e-2, bfloat16 4e-2 (one rounding to the dtype; the kernel
uses ``__expf``).
"""

from __future__ import annotations

import os

import pytest
from helpers.gpu import require_torch

if os.environ.get("FI_FFI_RUN_GPU_TESTS") != "1":
    pytest.skip("GPU tests run only with FI_FFI_RUN_GPU_TESTS=1 on a CUDA machine", allow_module_level=True)

import fi_ffi

torch = require_torch()
F = torch.nn.functional

pytestmark = pytest.mark.gpu

TOL = {torch.float16: 1e-2, torch.bfloat16: 4e-2}
REFERENCES = {
    "silu_and_mul": lambda x: x * torch.sigmoid(x),
    "gelu_and_mul": lambda x: F.gelu(x),
    "gelu_tanh_and_mul": lambda x: F.gelu(x, approximate="tanh"),
}


def reference(name: str, inp: torch.Tensor) -> torch.Tensor:
    x, y = inp.float().chunk(2, dim=-1)
    return REFERENCES[name](x) * y


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(REFERENCES))
@pytest.mark.parametrize("shape", [(1, 16), (7, 2 * 4096), (3, 5, 2 * 1024), (2, 2 * 14336), (33, 2 * 11008)])
def test_activation_matches_reference(dtype: torch.dtype, name: str, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    inp = torch.randn(shape, dtype=dtype, device="cuda") * 2
    out = torch.full((*shape[:-1], shape[-1] // 2), float("nan"), dtype=dtype, device="cuda")
    assert getattr(fi_ffi, name)(inp, out) is out
    torch.cuda.synchronize()
    torch.testing.assert_close(out.float(), reference(name, inp), atol=TOL[dtype], rtol=TOL[dtype])


def test_enable_pdl_and_an_explicit_stream() -> None:
    inp = torch.randn(64, 2 * 4096, dtype=torch.bfloat16, device="cuda")
    out = torch.empty(64, 4096, dtype=torch.bfloat16, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    fi_ffi.silu_and_mul(inp, out, enable_pdl=True, stream=s)
    s.synchronize()
    torch.testing.assert_close(out.float(), reference("silu_and_mul", inp), atol=4e-2, rtol=4e-2)


def test_cupy_arrays() -> None:
    cp = pytest.importorskip("cupy")
    inp = cp.random.standard_normal((8, 2 * 256)).astype(cp.float16)
    out = cp.empty((8, 256), dtype=cp.float16)
    fi_ffi.gelu_tanh_and_mul(inp, out)
    cp.cuda.Device().synchronize()
    got = torch.from_numpy(cp.asnumpy(out)).float()
    want = reference("gelu_tanh_and_mul", torch.from_numpy(cp.asnumpy(inp)))
    torch.testing.assert_close(got, want, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_a_prepared_call_equals_the_op_call(name: str) -> None:
    """``fi_ffi.prepare`` of each gated activation launches the op's kernel on the op's arguments: the same bits,
    on fresh inputs written into the same buffers between calls (the packed call reads the buffers, not values)."""
    op = getattr(fi_ffi, name)
    inp = torch.empty(6, 2 * 1024, dtype=torch.bfloat16, device="cuda")
    want = torch.empty(6, 1024, dtype=torch.bfloat16, device="cuda")
    got = torch.full_like(want, 7.0)  # poisoned: every element must be written
    prepared = fi_ffi.prepare(op, inp, got)
    for seed in (0, 1):
        torch.manual_seed(seed)
        inp.copy_(torch.randn_like(inp, dtype=torch.float32) * 3)
        op(inp, out=want)
        prepared()
        torch.cuda.synchronize()
        assert torch.equal(got, want), name
        assert torch.allclose(got.float(), reference(name, inp), atol=TOL[torch.bfloat16], rtol=TOL[torch.bfloat16])
