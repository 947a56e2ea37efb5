"""Mamba-2 selective state update on a real GPU against the recurrence in numpy (gated by FI_FFI_RUN_GPU_TESTS=1;
modules of the model-family test wheel, staged beside the core wheel).

Reference, in float64 on the dtype-rounded inputs (see fi_ffi.ops.mamba for the math): the new state and ``out``.
Tolerances: ``out`` (bfloat16) 2e-2 absolute and relative; the new state 1e-4 in float32 (the kernels use
``__expf``), 2e-2 in bfloat16/float16 (one rounding). Padding requests (``pad_slot_id``) leave their state row
untouched, as do all rows with ``disable_state_update``. Both modules: ``simple`` and (on SM 9.x) ``sm90``, which
refuses ``dim = 256`` (FlashInfer 0.6.3's SM90 kernel writes ``out`` for 128 rows per head only; see
fi_ffi.ops.mamba): those cases check the refusal, then run ``backend="auto"`` (the simple module).
"""

from __future__ import annotations

import os

import pytest
from helpers.gpu import require_torch

if os.environ.get("FI_FFI_RUN_GPU_TESTS") != "1":
    pytest.skip("GPU tests run only with FI_FFI_RUN_GPU_TESTS=1 on a CUDA machine", allow_module_level=True)

import numpy as np

import fi_ffi

torch = require_torch()

# models_modules skips naming the model-family wheel when its modules are not pinned
pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("models_modules")]
PAD = -1


def softplus(x: np.ndarray) -> np.ndarray:
    return np.where(x <= 20.0, np.log1p(np.exp(np.minimum(x, 20.0))), x)


def reference(state, x, dt, A, B, C, D, z, dt_bias, softplus_on, indices, update):  # type: ignore[no-untyped-def]
    """(out [b, h, dim], new state) of one step; all numpy float64, per-head vectors for A, D, dt, dt_bias."""
    state = state.copy()
    batch, heads, dim = x.shape
    groups = B.shape[1]
    out = np.zeros((batch, heads, dim))
    for b in range(batch):
        s = indices[b]
        for h in range(heads):
            g = h // (heads // groups)
            d_t = dt[b, h] + (dt_bias[h] if dt_bias is not None else 0.0)
            if softplus_on:
                d_t = softplus(np.array(d_t))
            decay = np.exp(A[h] * d_t)
            old = state[s, h] if s != PAD else np.zeros((dim, B.shape[2]))
            new = old * decay + (B[b, g] * d_t)[None, :] * x[b, h][:, None]
            if s != PAD and update:
                state[s, h] = new
            y = new @ C[b, g] + D[h] * x[b, h]
            if z is not None:
                y = y * (z[b, h] / (1.0 + np.exp(-z[b, h])))
            out[b, h] = y
    return out, state


def f64(t: torch.Tensor) -> np.ndarray:
    return t.float().cpu().numpy().astype(np.float64)


@pytest.mark.parametrize("backend", ["simple", "sm90"])
@pytest.mark.parametrize(
    ("state_dtype", "weight_dtype"), [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16)]
)
@pytest.mark.parametrize(("dim", "dstate"), [(64, 128), (128, 64), (256, 256)])
@pytest.mark.parametrize("options", ["full", "plain", "no_update"])
def test_selective_state_update_matches_the_recurrence(
    backend: str, state_dtype: torch.dtype, weight_dtype: torch.dtype, dim: int, dstate: int, options: str
) -> None:
    if backend == "sm90" and torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the sm90 module runs on SM 9.x only")
    torch.manual_seed(dim + dstate)
    refused = backend == "sm90" and dim > 128  # its kernel writes out for 128 rows per head only: refused by name
    if refused:
        backend = "auto"  # ... and "auto" runs dim 256 on the simple module
    batch, heads, groups, cache = 4, 8, 2, 7
    dev = "cuda"
    state = (torch.randn(cache, heads, dim, dstate, device=dev) * 0.5).to(state_dtype)
    x = torch.randn(batch, heads, dim, device=dev).to(torch.bfloat16)
    dt_h = (torch.randn(batch, heads, device=dev) * 0.5).to(weight_dtype)
    A_h = -torch.exp(torch.randn(heads, device=dev) * 0.5)
    D_h = torch.randn(heads, device=dev).to(weight_dtype)
    bias_h = (torch.randn(heads, device=dev) * 0.1).to(weight_dtype)
    B = torch.randn(batch, groups, dstate, device=dev).to(torch.bfloat16)
    C = torch.randn(batch, groups, dstate, device=dev).to(torch.bfloat16)
    z = torch.randn(batch, heads, dim, device=dev).to(torch.bfloat16)
    full = options == "full"
    indices = torch.tensor([5, PAD, 0, 3], dtype=torch.int32, device=dev) if full else None
    out = torch.full((batch, heads, dim), float("nan"), dtype=torch.bfloat16, device=dev)
    before = state.clone()
    if refused:
        with pytest.raises(ValueError, match=f"state: dim = {dim} is not supported by the SM90 module"):
            fi_ffi.selective_state_update(state, x, dt_h[:, :, None].expand(batch, heads, dim),
                                          A_h[:, None, None].expand(heads, dim, dstate), B, C,
                                          D_h[:, None].expand(heads, dim), out=out, backend="sm90")  # fmt: skip
        assert torch.equal(state, before) and torch.isnan(out).all()  # refused before the FFI
    fi_ffi.selective_state_update(
        state,
        x,
        dt_h[:, :, None].expand(batch, heads, dim),
        A_h[:, None, None].expand(heads, dim, dstate),
        B,
        C,
        D_h[:, None].expand(heads, dim),
        z=z if full else None,
        dt_bias=bias_h[:, None].expand(heads, dim) if full else None,
        dt_softplus=full,
        state_batch_indices=indices,
        pad_slot_id=PAD,
        out=out,
        disable_state_update=options == "no_update",
        backend=backend,
    )
    torch.cuda.synchronize()
    want_out, want_state = reference(
        f64(before),
        f64(x),
        f64(dt_h),
        f64(A_h),
        f64(B),
        f64(C),
        f64(D_h),
        f64(z) if full else None,
        f64(bias_h) if full else None,
        full,
        indices.cpu().numpy() if full else np.arange(batch),
        options != "no_update",
    )
    rows = [5, 0, 3] if full else list(range(batch))
    np.testing.assert_allclose(
        f64(out)[[0, 2, 3] if full else slice(None)], want_out[[0, 2, 3] if full else slice(None)], atol=2e-2, rtol=2e-2
    )
    tol = 1e-4 if state_dtype == torch.float32 else 2e-2
    np.testing.assert_allclose(f64(state), want_state, atol=tol, rtol=tol)
    untouched = [r for r in range(cache) if r not in rows or options == "no_update"]
    assert torch.equal(state[untouched], before[untouched])  # padding, unused and not-updated rows
