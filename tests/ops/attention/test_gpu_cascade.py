"""Cascade merging on a real GPU (gated by FI_FFI_RUN_GPU_TESTS=1): a two-level attention (a prefix shared by
every request + each request's own suffix, computed separately and merged with ``merge_state``) equals one
full attention over prefix + suffix.

Partial states come from the float32 torch reference (``helpers.attention_reference.reference``: output and base-2
log-sum-exp) rounded to the dtype, and from fi_ffi's own ``single_prefill`` with ``lse``. Tolerances, absolute
and relative, on outputs of magnitude <= ~3: float16 5e-3, bfloat16 3e-2; merged LSE (base 2) 2e-2.
"""

from __future__ import annotations

import os

import pytest
from helpers.gpu import require_torch

if os.environ.get("FI_FFI_RUN_GPU_TESTS") != "1":
    pytest.skip("GPU tests run only with FI_FFI_RUN_GPU_TESTS=1 on a CUDA machine", allow_module_level=True)

from helpers.attention_reference import DTYPES, LSE_TOL, close, reference

import fi_ffi

torch = require_torch()

pytestmark = pytest.mark.gpu

PREFIX = 300
REQUESTS = [(5, 40), (1, 1), (17, 130)]  # (query tokens, suffix KV tokens >= query tokens)
HQ, HK = 8, 2


def kv(n: int, d: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.randn(n, HK, d, dtype=dtype, device="cuda"), torch.randn(n, HK, d, dtype=dtype, device="cuda"))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_shared_prefix_plus_suffix_merged_equals_full_attention(dtype: torch.dtype, head_dim: int) -> None:
    torch.manual_seed(0)
    kp, vp = kv(PREFIX, head_dim, dtype)
    for qo, sfx in REQUESTS:
        q = torch.randn(qo, HQ, head_dim, dtype=dtype, device="cuda")
        ks, vs = kv(sfx, head_dim, dtype)
        # level 1: every query sees the whole shared prefix; level 2: its suffix, causally (aligned to its end)
        o1, s1 = reference(q, kp, vp)
        o2, s2 = reference(q, ks, vs, causal=True)
        v_merged = torch.empty(qo, HQ, head_dim, dtype=dtype, device="cuda")
        s_merged = torch.empty(qo, HQ, dtype=torch.float32, device="cuda")
        got = fi_ffi.merge_state(
            o1.to(dtype).contiguous(),
            s1.contiguous(),
            o2.to(dtype).contiguous(),
            s2.contiguous(),
            v_merged=v_merged,
            s_merged=s_merged,
        )
        assert got[0] is v_merged and got[1] is s_merged
        torch.cuda.synchronize()
        want_o, want_s = reference(q, torch.cat([kp, ks]), torch.cat([vp, vs]), causal=True)
        close(v_merged, want_o, dtype, "merged output")
        torch.testing.assert_close(s_merged, want_s, atol=LSE_TOL, rtol=LSE_TOL)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_cascade_with_fi_ffi_prefills_equals_one_prefill(dtype: torch.dtype, head_dim: int) -> None:
    torch.manual_seed(1)
    kp, vp = kv(PREFIX, head_dim, dtype)
    qo, sfx = 24, 64
    q = torch.randn(qo, HQ, head_dim, dtype=dtype, device="cuda")
    ks, vs = kv(sfx, head_dim, dtype)

    def prefill(k: torch.Tensor, v: torch.Tensor, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
        out = torch.empty(qo, HQ, head_dim, dtype=dtype, device="cuda")
        lse = torch.empty(qo, HQ, dtype=torch.float32, device="cuda")
        fi_ffi.single_prefill(q, k, v, out=out, lse=lse, causal=causal)
        return out, lse

    o1, s1 = prefill(kp, vp, False)
    o2, s2 = prefill(ks, vs, True)
    full_o, full_s = prefill(torch.cat([kp, ks]), torch.cat([vp, vs]), True)
    merged = fi_ffi.merge_state(o1, s1, o2, s2, v_merged=torch.empty_like(o1), s_merged=torch.empty_like(s1))
    # in place too: (o1, s1) becomes the merged state
    fi_ffi.merge_state_in_place(o1, s1, o2, s2)
    torch.cuda.synchronize()
    want_o, want_s = reference(q, torch.cat([kp, ks]), torch.cat([vp, vs]), causal=True)
    for o, s, what in (
        (merged[0], merged[1], "merge_state"),
        (o1, s1, "merge_state_in_place"),
        (full_o, full_s, "one prefill"),
    ):
        close(o, want_o, dtype, what)
        torch.testing.assert_close(s, want_s, atol=LSE_TOL, rtol=LSE_TOL)
    close(merged[0], full_o.float(), dtype, "merged vs one prefill")


@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_state_in_place_mask_leaves_masked_rows(dtype: torch.dtype) -> None:
    torch.manual_seed(2)
    n, d = 9, 128
    v, vo = (torch.randn(n, HQ, d, dtype=dtype, device="cuda") for _ in range(2))
    s, so = (torch.randn(n, HQ, dtype=torch.float32, device="cuda") * 3 for _ in range(2))
    mask = torch.tensor([True, False] * 4 + [True], device="cuda")
    v0, s0 = v.clone(), s.clone()
    fi_ffi.merge_state_in_place(v, s, vo, so, mask=mask)
    torch.cuda.synchronize()
    m = torch.maximum(s0, so)
    a, b = torch.exp2(s0 - m), torch.exp2(so - m)
    want_v = (a[..., None] * v0.float() + b[..., None] * vo.float()) / (a + b)[..., None]
    want_s = torch.log2(a + b) + m
    keep = ~mask
    assert torch.equal(v[keep], v0[keep]) and torch.equal(s[keep], s0[keep])
    close(v[mask], want_v[mask], dtype, "merged rows")
    torch.testing.assert_close(s[mask], want_s[mask], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_merge_states_of_kv_chunks_equals_full_attention(dtype: torch.dtype, head_dim: int) -> None:
    torch.manual_seed(3)
    qo, chunks = 6, [50, 1, 77, 200]
    q = torch.randn(qo, HQ, head_dim, dtype=dtype, device="cuda")
    parts = [kv(n, head_dim, dtype) for n in chunks]
    states = [reference(q, k, v) for k, v in parts]
    v_all = torch.stack([o.to(dtype) for o, _ in states], dim=1).contiguous()  # [qo, chunks, heads, d]
    s_all = torch.stack([s for _, s in states], dim=1).contiguous()  # [qo, chunks, heads]
    v_merged = torch.empty(qo, HQ, head_dim, dtype=dtype, device="cuda")
    s_merged = torch.empty(qo, HQ, dtype=torch.float32, device="cuda")
    fi_ffi.merge_states(v_all, s_all, v_merged=v_merged, s_merged=s_merged)
    torch.cuda.synchronize()
    want_o, want_s = reference(q, torch.cat([k for k, _ in parts]), torch.cat([v for _, v in parts]))
    close(v_merged, want_o, dtype, "merge_states")
    torch.testing.assert_close(s_merged, want_s, atol=LSE_TOL, rtol=LSE_TOL)
