"""MLA paged attention on a real GPU against a float32 torch reference (gated by FI_FFI_RUN_GPU_TESTS=1).

DeepSeek shapes: 128 and 16 query heads, compressed KV 512, RoPE part 64, page sizes 1, 16 and 64, FA2 and FA3,
float16 and bfloat16; decode (one row per request), causal prefill and non-causal multi-row batches. The caches
are filled with ``fi_ffi.append_paged_mla_kv_cache`` on shuffled pages (checked exactly first), so the test also
covers the page table the run reads. Whatever release the lock pins serves each module: with the 0.7.2 test
wheel in the lock, the float16 FA2 cases run its ``_planabi2`` module (the plan's staged-schedule copy included).

Reference, per request, in float32 from the same rounded inputs: ``s = sm_scale * (q_nope . ckv + q_pe . kpe)``,
causal rows aligned to the end of the KV, ``out = softmax(s) . ckv``, ``lse = logsumexp(s) / ln 2``.

Tolerances, absolute and relative, on outputs of magnitude <= ~3 (weighted means of N(0, 1) values): float16 1e-2
and bfloat16 4e-2 (the kernels round the probabilities, and split-KV partial outputs, to the input dtype: a few
units in the last place of either), log-sum-exp (magnitude ~10) 2e-2.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
from helpers.gpu import require_torch

if os.environ.get("FI_FFI_RUN_GPU_TESTS") != "1":
    pytest.skip("GPU tests run only with FI_FFI_RUN_GPU_TESTS=1 on a CUDA machine", allow_module_level=True)

import fi_ffi
from fi_ffi.ops.attention import variants as V
from fi_ffi.ops.attention.workspace import Workspace

torch = require_torch()

pytestmark = pytest.mark.gpu

CKV, KPE = 512, 64
SM_SCALE = 1.0 / math.sqrt(128 + 64)  # DeepSeek: the head dim before absorption
TOL = {torch.float16: 1e-2, torch.bfloat16: 4e-2}
LSE_TOL = 2e-2
KV_LENS = [1, 17, 64, 100, 333]  # a one-token request, uneven lengths, partially filled last pages
QO_LENS = {"decode": [1, 1, 1, 1, 1], "causal_prefill": [1, 5, 64, 17, 100], "prefill": [1, 17, 3, 100, 9]}


@pytest.fixture(scope="module")
def ws():
    with Workspace.allocate(0) as w:
        yield w


class MLACache:
    """Requests of ``kv_lens`` tokens in a paged MLA cache on shuffled pages, filled by append_paged_mla_kv_cache."""

    def __init__(self, kv_lens, page_size, dtype, spare_pages=3, seed=0):
        g = torch.Generator(device="cuda").manual_seed(seed)
        self.lens, self.page_size = list(kv_lens), page_size
        pages = [-(-n // page_size) for n in kv_lens]
        total = sum(pages) + spare_pages
        self.ckv_cache = torch.zeros(total, page_size, CKV, dtype=dtype, device="cuda")
        self.kpe_cache = torch.zeros(total, page_size, KPE, dtype=dtype, device="cuda")
        self.indptr_h = np.concatenate([[0], np.cumsum(pages)]).astype(np.int32)
        self.last_h = np.array(
            [n - (p - 1) * page_size if p else 0 for n, p in zip(kv_lens, pages, strict=True)], np.int32
        )
        self.lens_h = np.array(kv_lens, np.int32)
        self.indices = torch.randperm(total, device="cuda", generator=g)[: sum(pages)].to(torch.int32).contiguous()
        self.indptr = torch.from_numpy(self.indptr_h).cuda()
        self.last = torch.from_numpy(self.last_h).cuda()
        # every token of every request, appended in one call
        nnz = sum(kv_lens)
        self.ckv = torch.randn(nnz, CKV, dtype=dtype, device="cuda", generator=g)
        self.kpe = torch.randn(nnz, KPE, dtype=dtype, device="cuda", generator=g)
        self.offsets = np.concatenate([[0], np.cumsum(kv_lens)])
        batch_indices = (
            torch.repeat_interleave(torch.arange(len(kv_lens), dtype=torch.int32), torch.tensor(kv_lens))
            .to(torch.int32)
            .cuda()
        )
        positions = torch.cat([torch.arange(n, dtype=torch.int32) for n in kv_lens]).cuda()
        fi_ffi.append_paged_mla_kv_cache(
            self.ckv,
            self.kpe,
            batch_indices,
            positions,
            self.ckv_cache,
            self.kpe_cache,
            self.indices,
            self.indptr,
            self.last,
        )
        torch.cuda.synchronize()
        for b in range(len(kv_lens)):  # the page table holds exactly the appended tokens
            ckv, kpe = self.gather(b)
            assert torch.equal(ckv, self.tokens(b)[0]) and torch.equal(kpe, self.tokens(b)[1]), f"request {b}"

    def tokens(self, b):
        """Request ``b``'s appended tokens (ckv ``[n, 512]``, kpe ``[n, 64]``)."""
        lo, hi = self.offsets[b], self.offsets[b + 1]
        return self.ckv[lo:hi], self.kpe[lo:hi]

    def gather(self, b):
        """Request ``b``'s tokens as read back through the page table."""
        ids = self.indices[self.indptr_h[b] : self.indptr_h[b + 1]].long()
        n = self.lens[b]
        return self.ckv_cache[ids].reshape(-1, CKV)[:n], self.kpe_cache[ids].reshape(-1, KPE)[:n]


def reference(q_nope, q_pe, cache, qo_lens, causal, sm_scale=SM_SCALE):
    """float32 MLA: (out ``[rows, H, 512]``, lse ``[rows, H]`` base 2)."""
    outs, lses = [], []
    start = 0
    for b, qo in enumerate(qo_lens):
        qn, qp = q_nope[start : start + qo].float(), q_pe[start : start + qo].float()
        start += qo
        ckv, kpe = (t.float() for t in cache.tokens(b))
        kv = ckv.shape[0]
        s = (torch.einsum("qhd,kd->qhk", qn, ckv) + torch.einsum("qhd,kd->qhk", qp, kpe)) * sm_scale
        if causal:
            i = torch.arange(qo, device="cuda")[:, None, None]
            j = torch.arange(kv, device="cuda")[None, None, :]
            s = s.masked_fill(j > i + kv - qo, float("-inf"))
        outs.append(torch.einsum("qhk,kd->qhd", torch.softmax(s, -1), ckv))
        lses.append(torch.logsumexp(s, -1) / math.log(2))
    return torch.cat(outs), torch.cat(lses)


def close(got, want, tol, what):
    torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol, msg=lambda m: f"{what}: {m}")


def queries(rows, heads, dtype, seed=1, fused=False):
    """q_nope, q_pe; ``fused``: both as slices of one ``[rows, H, 576]`` projection output (strided rows)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    if fused:
        q = torch.randn(rows, heads, CKV + KPE, dtype=dtype, device="cuda", generator=g)
        return q[..., :CKV], q[..., CKV:]
    return (
        torch.randn(rows, heads, CKV, dtype=dtype, device="cuda", generator=g),
        torch.randn(rows, heads, KPE, dtype=dtype, device="cuda", generator=g),
    )


@pytest.mark.parametrize("mode", ["decode", "causal_prefill", "prefill"])
@pytest.mark.parametrize("page_size", [1, 16, 64])
@pytest.mark.parametrize("heads", [128, 16])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", ["fa2", "fa3"])
def test_batch_mla_matches_reference(ws, backend, dtype, heads, page_size, mode):
    qo_lens = QO_LENS[mode]
    causal = mode == "causal_prefill"
    cache = MLACache(KV_LENS, page_size, dtype)
    rows = sum(qo_lens)
    qo_indptr = np.concatenate([[0], np.cumsum(qo_lens)]).astype(np.int32)
    q_nope, q_pe = queries(rows, heads, dtype, fused=mode == "prefill")
    out = torch.empty(rows, heads, CKV, dtype=dtype, device="cuda")
    lse = torch.empty(rows, heads, dtype=torch.float32, device="cuda")
    plan = fi_ffi.batch_mla_plan(
        qo_indptr,
        cache.indptr_h,
        None,
        cache.lens_h,
        heads,
        CKV,
        KPE,
        page_size,
        causal,
        SM_SCALE,
        dtype,
        backend=backend,
        workspace=ws,
    )
    assert plan.backend == backend and plan.uri.endswith("_sm90") == (backend == "fa3")
    where = f"{plan.uri} (FlashInfer {V.release_of(plan.uri) or '?'})"
    assert (
        fi_ffi.batch_mla_run(
            q_nope, q_pe, cache.ckv_cache, cache.kpe_cache, out=out, lse=lse, kv_indices=cache.indices, plan=plan
        )
        is out
    )
    torch.cuda.synchronize()
    want_o, want_lse = reference(q_nope, q_pe, cache, qo_lens, causal)
    close(out, want_o, TOL[dtype], f"out of {where}")
    close(lse, want_lse, LSE_TOL, f"lse of {where}")


@pytest.mark.parametrize("backend", ["fa2", "fa3"])
def test_one_plan_serves_every_layer_and_natural_log_lse(ws, backend):
    """A plan is run for several layers (new queries and caches each time, any producer: torch and descriptors),
    and ``return_lse_base_on_e`` gives the natural log-sum-exp."""
    dtype, heads, page_size = torch.float16, 16, 16
    caches = [MLACache(KV_LENS, page_size, dtype, seed=s) for s in (2, 3)]
    qo_lens = QO_LENS["decode"]
    qo_indptr = np.arange(len(KV_LENS) + 1, dtype=np.int32)
    plan = fi_ffi.batch_mla_plan(
        qo_indptr,
        caches[0].indptr_h,
        None,
        caches[0].lens_h,
        heads,
        CKV,
        KPE,
        page_size,
        False,
        SM_SCALE,
        "float16",
        backend=backend,
        workspace=ws,
    )
    for layer, cache in enumerate(caches):
        q_nope, q_pe = queries(len(KV_LENS), heads, dtype, seed=10 + layer)
        out = torch.empty(len(KV_LENS), heads, CKV, dtype=dtype, device="cuda")
        lse = torch.empty(len(KV_LENS), heads, dtype=torch.float32, device="cuda")
        args = [q_nope, q_pe, cache.ckv_cache, cache.kpe_cache, out, cache.indices]
        if layer == 1:
            args = [fi_ffi.as_tensor(a) for a in args]
        fi_ffi.batch_mla_run(
            *args[:4],
            out=args[4],
            lse=fi_ffi.as_tensor(lse) if layer else lse,
            kv_indices=args[5],
            return_lse_base_on_e=True,
            plan=plan,
        )
        torch.cuda.synchronize()
        want_o, want_lse = reference(q_nope, q_pe, cache, qo_lens, False)
        close(out, want_o, TOL[dtype], f"layer {layer} out")
        close(lse, want_lse * math.log(2), LSE_TOL, f"layer {layer} lse (base e)")


def test_back_to_back_plans_each_run_their_own_schedule(ws):
    """Two plans in a row on one workspace (the second waits for the first's pinned copy): the live one runs right,
    the first is stale."""
    dtype, heads, page_size = torch.bfloat16, 128, 16
    short = MLACache([5, 40], page_size, dtype, seed=4)
    long = MLACache(KV_LENS, page_size, dtype, seed=5)
    first = fi_ffi.batch_mla_plan(
        [0, 1, 2], short.indptr_h, None, short.lens_h, heads, CKV, KPE, page_size, False, SM_SCALE, dtype, workspace=ws
    )
    qo_indptr = np.concatenate([[0], np.cumsum(QO_LENS["causal_prefill"])]).astype(np.int32)
    second = fi_ffi.batch_mla_plan(
        qo_indptr, long.indptr_h, None, long.lens_h, heads, CKV, KPE, page_size, True, SM_SCALE, dtype, workspace=ws
    )
    assert first.stale and not second.stale
    rows = int(qo_indptr[-1])
    q_nope, q_pe = queries(rows, heads, dtype, seed=6)
    out = torch.empty(rows, heads, CKV, dtype=dtype, device="cuda")
    fi_ffi.batch_mla_run(q_nope, q_pe, long.ckv_cache, long.kpe_cache, out=out, kv_indices=long.indices, plan=second)
    torch.cuda.synchronize()
    close(out, reference(q_nope, q_pe, long, QO_LENS["causal_prefill"], True)[0], TOL[dtype], "out")
    with pytest.raises(ValueError, match="stale"):
        fi_ffi.batch_mla_run(
            *queries(2, heads, dtype),
            short.ckv_cache,
            short.kpe_cache,
            out=torch.empty(2, heads, CKV, dtype=dtype, device="cuda"),
            kv_indices=short.indices,
            plan=first,
        )
