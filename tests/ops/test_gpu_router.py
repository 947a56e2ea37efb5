"""DeepSeek-V3 routing on a real GPU (gated by FI_FFI_RUN_GPU_TESTS=1; modules of the model-family test wheel,
staged beside the core wheel so that the session lock pins it).

- Router GEMM (``mm_M1_16_K7168_N256`` / ``_N128``) against ``a.float() @ w.float().T``: float32 out within
  1e-3 (absolute and relative; the sums of 7168 products differ only in accumulation order), bfloat16 out within
  2e-2 (one rounding).
- Fused routing (``fused_topk_deepseek``) against a numpy implementation of the same rule (float64): with float32
  scores the chosen experts are exactly numpy's (compared as sets per token, order-free) and their weights
  within 1e-5; with bfloat16 scores the experts of the bfloat16-rounded inputs and weights within 1e-2. Random
  inputs make ties (where the kernel and numpy may choose differently) improbable.
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


@pytest.mark.parametrize("tokens", [1, 5, 16])
@pytest.mark.parametrize(
    ("op", "experts", "out_dtype", "tol"),
    [(fi_ffi.mm_M1_16_K7168_N256, 256, torch.float32, 1e-3), (fi_ffi.mm_M1_16_K7168_N128, 128, torch.bfloat16, 2e-2)],
    ids=["dsv3", "ml3"],
)
def test_router_gemm_matches_float32(op, experts: int, out_dtype: torch.dtype, tol: float, tokens: int) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(tokens)
    a = torch.randn(tokens, 7168, dtype=torch.bfloat16, device="cuda")
    w = (torch.randn(experts, 7168, device="cuda") * 0.02).to(torch.bfloat16)  # the router weight [E, hidden]
    out = torch.full((tokens, experts), float("nan"), dtype=out_dtype, device="cuda")
    assert op(a, w.T, out) is out
    torch.cuda.synchronize()
    want = a.float() @ w.float().T
    torch.testing.assert_close(out.float(), want, atol=tol, rtol=tol)


def reference_routing(
    scores: np.ndarray, bias: np.ndarray, n_group: int, topk_group: int, topk: int, scale: float
) -> tuple[np.ndarray, np.ndarray]:
    """DeepSeek-V3's noaux_tc routing in float64: (weights [T, topk], experts [T, topk]) in decreasing biased score."""
    tokens, experts = scores.shape
    s = 1.0 / (1.0 + np.exp(-scores.astype(np.float64)))
    b = s + bias.astype(np.float64)
    per_group = experts // n_group
    weights = np.zeros((tokens, topk))
    chosen = np.zeros((tokens, topk), np.int64)
    for t in range(tokens):
        allowed = np.ones(experts, bool)
        if n_group > 1:
            groups = b[t].reshape(n_group, per_group)
            top2 = np.sort(groups, axis=1)[:, -2:].sum(axis=1)
            keep = np.argsort(-top2, kind="stable")[:topk_group]
            allowed = np.zeros(experts, bool)
            for g in keep:
                allowed[g * per_group : (g + 1) * per_group] = True
        candidates = np.where(allowed, b[t], -np.inf)
        idx = np.argsort(-candidates, kind="stable")[:topk]
        chosen[t] = idx
        weights[t] = s[t, idx] / s[t, idx].sum() * scale
    return weights, chosen


def by_expert(values: np.ndarray, experts: np.ndarray) -> list[dict[int, float]]:
    return [dict(zip(e.tolist(), v.tolist(), strict=True)) for v, e in zip(values, experts, strict=True)]


@pytest.mark.parametrize("tokens", [1, 37, 300])
@pytest.mark.parametrize(
    ("experts", "n_group", "topk_group", "topk"),
    [(256, 8, 4, 8), (128, 4, 2, 8), (64, 1, 1, 6), (384, 1, 1, 8)],
    ids=["deepseek_v3", "grouped_128", "ungrouped_64", "kimi_k2_384"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_routing_matches_numpy(
    dtype: torch.dtype, experts: int, n_group: int, topk_group: int, topk: int, tokens: int
) -> None:
    gen = torch.Generator(device="cpu").manual_seed(experts + tokens)
    scores = (torch.randn(tokens, experts, generator=gen) * 2).to(dtype).cuda()
    bias = (torch.randn(experts, generator=gen) * 0.1).float().cuda()
    values = torch.full((tokens, topk), float("nan"), dtype=dtype, device="cuda")
    indices = torch.full((tokens, topk), -1, dtype=torch.int32, device="cuda")
    fi_ffi.fused_topk_deepseek(scores, bias, n_group, topk_group, topk, 2.5, values, indices)
    torch.cuda.synchronize()
    want_w, want_e = reference_routing(scores.float().cpu().numpy(), bias.cpu().numpy(), n_group, topk_group, topk, 2.5)
    got_e = indices.cpu().numpy()
    got_w = values.float().cpu().numpy()
    assert [set(r) for r in got_e.tolist()] == [set(r) for r in want_e.tolist()]
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    got, want = by_expert(got_w, got_e), by_expert(want_w, want_e)
    for g, w in zip(got, want, strict=True):
        for e in w:
            assert abs(g[e] - w[e]) <= tol * max(1.0, abs(w[e])), (e, g[e], w[e])


def test_fused_routing_on_cupy_arrays_and_an_explicit_stream() -> None:
    cp = pytest.importorskip("cupy")
    rng = np.random.default_rng(0)
    scores = cp.asarray(rng.standard_normal((9, 256)).astype(np.float32))
    bias = cp.asarray((rng.standard_normal(256) * 0.1).astype(np.float32))
    values = cp.empty((9, 8), cp.float32)
    indices = cp.empty((9, 8), cp.int32)
    stream = cp.cuda.Stream(non_blocking=True)
    fi_ffi.fused_topk_deepseek(scores, bias, 8, 4, 8, 1.0, values, indices, stream=stream.ptr)
    stream.synchronize()
    want_w, want_e = reference_routing(cp.asnumpy(scores), cp.asnumpy(bias), 8, 4, 8, 1.0)
    assert [set(r) for r in cp.asnumpy(indices).tolist()] == [set(r) for r in want_e.tolist()]
    np.testing.assert_allclose(np.sort(cp.asnumpy(values), axis=1), np.sort(want_w, axis=1), rtol=1e-5, atol=1e-6)
