"""Decode attention on a real GPU against a float32 torch reference (gated by FI_FFI_RUN_GPU_TESTS=1).

Tolerances, absolute and relative, on outputs of magnitude <= ~3 (weighted means of N(0, 1) values):
float16 5e-3, bfloat16 3e-2 (8-bit mantissa, probabilities are rounded to bf16 before P.V); the log-sum-exp
(base 2, magnitude ~10) 2e-2 for both.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from helpers.gpu import require_torch

if os.environ.get("FI_FFI_RUN_GPU_TESTS") != "1":
    pytest.skip("GPU tests run only with FI_FFI_RUN_GPU_TESTS=1 on a CUDA machine", allow_module_level=True)

from helpers.attention_reference import DTYPES, LSE_TOL, close, reference

from fi_ffi.ops.attention import decode
from fi_ffi.ops.attention.workspace import Workspace

torch = require_torch()

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def ws():
    with Workspace.allocate(0) as w:
        yield w


class PagedKV:
    """A paged K/V cache with requests of given lengths on shuffled pages, and its page table."""

    def __init__(self, kv_lens, page_size, hk, d, dtype, layout, spare_pages=3, seed=0):
        g = torch.Generator(device="cuda").manual_seed(seed)
        self.page_size, self.layout, self.lens = page_size, layout, list(kv_lens)
        pages = [-(-n // page_size) for n in kv_lens]
        total = sum(pages) + spare_pages
        shape = (total, page_size, hk, d) if layout == "NHD" else (total, hk, page_size, d)
        self.k = torch.randn(shape, dtype=dtype, device="cuda", generator=g)
        self.v = torch.randn(shape, dtype=dtype, device="cuda", generator=g)
        perm = torch.randperm(total, device="cuda", generator=g)
        self.indptr_h = np.concatenate([[0], np.cumsum(pages)]).astype(np.int32)
        self.last_h = np.array(
            [n - (p - 1) * page_size if p else 0 for n, p in zip(kv_lens, pages, strict=True)], np.int32
        )
        self.indices = perm[: sum(pages)].to(torch.int32).contiguous()
        self.indptr = torch.from_numpy(self.indptr_h).cuda()
        self.last = torch.from_numpy(self.last_h).cuda()

    def gather(self, i, cache):
        """Request ``i``'s keys or values as ``[kv_len, hk, d]``."""
        ids = self.indices[self.indptr_h[i] : self.indptr_h[i + 1]].long()
        pages = cache[ids]
        if self.layout == "HND":
            pages = pages.transpose(1, 2)
        return pages.reshape(-1, *pages.shape[2:])[: self.lens[i]]


# ------------------------------------------------------------------------------------------ batch decode


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("heads", [(8, 8), (32, 8), (32, 4)])  # GQA group sizes 1, 4, 8
@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("page_size", [1, 16, 64])
def test_batch_decode_matches_reference(ws, dtype, head_dim, heads, layout, page_size):
    hq, hk = heads
    kv_lens = [1, 17, 64, 100, 333]  # one-token request, uneven lengths, partially filled last pages
    kv = PagedKV(kv_lens, page_size, hk, head_dim, dtype, layout)
    b = len(kv_lens)
    q = torch.randn(b, hq, head_dim, dtype=dtype, device="cuda")
    out = torch.empty_like(q)
    lse = torch.empty(b, hq, dtype=torch.float32, device="cuda")
    plan = decode.batch_decode_plan(
        kv.indptr_h, None, kv.last_h, hq, hk, head_dim, page_size, q_data_type=dtype, kv_layout=layout, workspace=ws
    )
    assert (
        decode.batch_decode_run(
            q,
            (kv.k, kv.v),
            kv_indptr=kv.indptr,
            kv_indices=kv.indices,
            kv_last_page_len=kv.last,
            out=out,
            lse=lse,
            plan=plan,
        )
        is out
    )
    torch.cuda.synchronize()
    for i in range(b):
        o, lse_ref = reference(q[i : i + 1], kv.gather(i, kv.k), kv.gather(i, kv.v))
        close(out[i], o[0], dtype, f"request {i}")
        torch.testing.assert_close(lse[i], lse_ref[0], atol=LSE_TOL, rtol=LSE_TOL)


def test_batch_decode_growing_cache_replanned_every_step(ws):
    """A decode loop: one new token per request per step, a plan per step, results exact at every step."""
    dtype, hq, hk, d, page = torch.float16, 32, 8, 128, 16
    lens = [1, 15, 30]
    max_pages = 64
    k_cache = torch.zeros(max_pages, page, hk, d, dtype=dtype, device="cuda")
    v_cache = torch.zeros_like(k_cache)
    free = list(range(max_pages))[::-1]
    tables: list[list[int]] = [[] for _ in lens]
    keys = [torch.randn(n, hk, d, dtype=dtype, device="cuda") for n in lens]
    vals = [torch.randn(n, hk, d, dtype=dtype, device="cuda") for n in lens]

    def write(i, pos, kk, vv):
        if pos % page == 0:
            tables[i].append(free.pop())
        k_cache[tables[i][pos // page], pos % page] = kk
        v_cache[tables[i][pos // page], pos % page] = vv

    for i, n in enumerate(lens):
        for pos in range(n):
            write(i, pos, keys[i][pos], vals[i][pos])
    q = torch.empty(len(lens), hq, d, dtype=dtype, device="cuda")
    out = torch.empty_like(q)
    previous = None
    for step in range(24):
        for i in range(len(lens)):  # append this step's token
            kk = torch.randn(hk, d, dtype=dtype, device="cuda")
            vv = torch.randn(hk, d, dtype=dtype, device="cuda")
            write(i, lens[i], kk, vv)
            keys[i] = torch.cat([keys[i], kk[None]])
            vals[i] = torch.cat([vals[i], vv[None]])
            lens[i] += 1
        indptr = np.concatenate([[0], np.cumsum([len(t) for t in tables])]).astype(np.int32)
        last = np.array([n - (len(t) - 1) * page for n, t in zip(lens, tables, strict=True)], np.int32)
        indices = torch.tensor([p for t in tables for p in t], dtype=torch.int32, device="cuda")
        plan = decode.batch_decode_plan(indptr, None, last, hq, hk, d, page, workspace=ws)
        if previous is not None:
            assert previous.stale
            with pytest.raises(ValueError, match="stale"):
                decode.batch_decode_run(
                    q,
                    (k_cache, v_cache),
                    kv_indptr=torch.from_numpy(indptr).cuda(),
                    kv_indices=indices,
                    kv_last_page_len=torch.from_numpy(last).cuda(),
                    out=out,
                    plan=previous,
                )
        q.normal_()
        decode.batch_decode_run(
            q,
            (k_cache, v_cache),
            kv_indptr=torch.from_numpy(indptr).cuda(),
            kv_indices=indices,
            kv_last_page_len=torch.from_numpy(last).cuda(),
            out=out,
            plan=plan,
        )
        torch.cuda.synchronize()
        for i in range(len(lens)):
            o, _ = reference(q[i : i + 1], keys[i], vals[i])
            close(out[i], o[0], dtype, f"step {step} request {i}")
        previous = plan


def test_one_plan_serves_many_layers(ws):
    dtype, hq, hk, d, page = torch.bfloat16, 32, 8, 128, 16
    layers = [PagedKV([5, 40, 16], page, hk, d, dtype, "NHD", seed=s) for s in range(3)]
    indptr_h, last_h = layers[0].indptr_h, layers[0].last_h
    for layer in layers[1:]:  # same page table for every layer (what a runtime has)
        layer.indices, layer.indptr, layer.last = layers[0].indices, layers[0].indptr, layers[0].last
    plan = decode.batch_decode_plan(indptr_h, None, last_h, hq, hk, d, page, q_data_type=dtype, workspace=ws)
    info = plan.info
    q = torch.randn(3, hq, d, dtype=dtype, device="cuda")
    outs = []
    for _ in range(2):  # every layer twice: the plan is reused, never consumed
        for layer in layers:
            out = torch.empty_like(q)
            decode.batch_decode_run(
                q,
                (layer.k, layer.v),
                kv_indptr=layer.indptr,
                kv_indices=layer.indices,
                kv_last_page_len=layer.last,
                out=out,
                plan=plan,
            )
            outs.append((layer, out))
    torch.cuda.synchronize()
    assert plan.info == info and plan.refcount == 1
    for layer, out in outs:
        for i in range(3):
            close(out[i], reference(q[i : i + 1], layer.gather(i, layer.k), layer.gather(i, layer.v))[0][0], dtype)
    plan.release()
    with pytest.raises(ValueError, match="released"):
        decode.batch_decode_run(
            q,
            (layers[0].k, layers[0].v),
            kv_indptr=layers[0].indptr,
            kv_indices=layers[0].indices,
            kv_last_page_len=layers[0].last,
            out=outs[0][1],
            plan=plan,
        )


def test_back_to_back_plans_on_one_stream_wait_for_the_previous_copy(ws):
    """Plan A, run A, plan B on a busy stream: B must not overwrite the pinned buffer before A's copy ran."""
    dtype, hq, hk, d, page = torch.float16, 32, 8, 128, 16
    stream = torch.cuda.Stream()
    kv_a = PagedKV([700, 3, 250, 64], page, hk, d, dtype, "NHD", seed=1)
    kv_b = PagedKV([20, 1000], page, hk, d, dtype, "NHD", seed=2)
    q_a = torch.randn(4, hq, d, dtype=dtype, device="cuda")
    q_b = torch.randn(2, hq, d, dtype=dtype, device="cuda")
    out_a, out_b = torch.empty_like(q_a), torch.empty_like(q_b)
    torch.cuda.synchronize()
    with torch.cuda.stream(stream):
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time: plan A's copy waits behind it
        busy = torch.cuda.Event()
        busy.record(stream)
        plan_a = decode.batch_decode_plan(
            kv_a.indptr_h, None, kv_a.last_h, hq, hk, d, page, stream=stream, workspace=ws
        )
        assert not busy.query()  # plan A did not wait for the stream
        decode.batch_decode_run(
            q_a,
            (kv_a.k, kv_a.v),
            kv_indptr=kv_a.indptr,
            kv_indices=kv_a.indices,
            kv_last_page_len=kv_a.last,
            out=out_a,
            stream=stream,
            plan=plan_a,
        )
        plan_b = decode.batch_decode_plan(
            kv_b.indptr_h, None, kv_b.last_h, hq, hk, d, page, stream=stream, workspace=ws
        )
        assert busy.query()  # plan B waited for A's copy, hence for the work before it
        decode.batch_decode_run(
            q_b,
            (kv_b.k, kv_b.v),
            kv_indptr=kv_b.indptr,
            kv_indices=kv_b.indices,
            kv_last_page_len=kv_b.last,
            out=out_b,
            stream=stream,
            plan=plan_b,
        )
    torch.cuda.synchronize()
    for kv, q, out in ((kv_a, q_a, out_a), (kv_b, q_b, out_b)):
        for i in range(q.shape[0]):
            close(out[i], reference(q[i : i + 1], kv.gather(i, kv.k), kv.gather(i, kv.v))[0][0], dtype)


def test_caller_buffers_and_strided_q(ws):
    """Workspace.from_buffers over torch tensors (pinned host buffer), and q rows with a stride."""
    f = torch.zeros(64 << 20, dtype=torch.uint8, device="cuda")
    i = torch.empty(8 << 20, dtype=torch.uint8, device="cuda")
    p = torch.empty(8 << 20, dtype=torch.uint8, pin_memory=True)
    own = Workspace.from_buffers(f, i, p)
    dtype, hq, hk, d = torch.float16, 16, 8, 64
    kv = PagedKV([9, 31], 16, hk, d, dtype, "HND")
    big = torch.randn(2, hq, 2 * d, dtype=dtype, device="cuda")
    q = big[:, :, :d]  # strides (2*hq*d, 2*d, 1)
    out = torch.empty(2, hq, d, dtype=dtype, device="cuda")
    plan = decode.batch_decode_plan(
        kv.indptr_h, None, None, hq, hk, d, 16, kv_layout="HND", sm_scale=0.3, workspace=own
    )
    decode.batch_decode_run(
        q, (kv.k, kv.v), kv_indptr=kv.indptr, kv_indices=kv.indices, kv_last_page_len=kv.last, out=out, plan=plan
    )
    torch.cuda.synchronize()
    for r in range(2):
        close(out[r], reference(q[r : r + 1], kv.gather(r, kv.k), kv.gather(r, kv.v), sm_scale=0.3)[0][0], dtype)


# ------------------------------------------------------------------------------------------ single decode


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("heads", [(8, 8), (32, 8), (32, 4)])
@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_single_decode_matches_reference(dtype, head_dim, heads, layout):
    hq, hk = heads
    tmp = torch.empty(32 << 20, dtype=torch.uint8, device="cuda")
    for kv_len, scratch in ((1, None), (300, tmp), (5000, tmp), (5000, None)):
        k = torch.randn(kv_len, hk, head_dim, dtype=dtype, device="cuda")
        v = torch.randn_like(k)
        q = torch.randn(hq, head_dim, dtype=dtype, device="cuda")
        out = torch.empty_like(q)
        lse = torch.empty(hq, dtype=torch.float32, device="cuda")
        kk, vv = (k, v) if layout == "NHD" else (k.transpose(0, 1).contiguous(), v.transpose(0, 1).contiguous())
        decode.single_decode(q, kk, vv, out=out, tmp=scratch, lse=lse, kv_layout=layout)
        torch.cuda.synchronize()
        o, lse_ref = reference(q[None], k, v)
        close(out, o[0], dtype, f"kv_len {kv_len}")
        torch.testing.assert_close(lse, lse_ref[0], atol=LSE_TOL, rtol=LSE_TOL)


# ------------------------------------------------------------------------------------------ producers per call


def test_batch_decode_with_torch_tensors_and_cupy_arrays_per_call(ws):
    """The same run with fresh torch tensors every call and with CuPy arrays (unhashable) every call."""
    cupy = pytest.importorskip("cupy")
    dtype, hq, hk, d, page = torch.float16, 32, 8, 128, 16
    kv = PagedKV([5, 40, 77], page, hk, d, dtype, "NHD", seed=3)
    b = 3
    q = torch.randn(b, hq, d, dtype=dtype, device="cuda")
    plan = decode.batch_decode_plan(kv.indptr_h, None, kv.last_h, hq, hk, d, page, workspace=ws)
    want = [reference(q[i : i + 1], kv.gather(i, kv.k), kv.gather(i, kv.v))[0][0] for i in range(b)]
    out_t = torch.empty_like(q)
    for _ in range(3):  # new tensor objects (and memory for q, indptr) at every call
        decode.batch_decode_run(
            q.clone(),
            (kv.k, kv.v),
            kv_indptr=kv.indptr.clone(),
            kv_indices=kv.indices,
            kv_last_page_len=kv.last,
            out=out_t,
            plan=plan,
        )
    torch.cuda.synchronize()
    c = cupy.asarray  # zero-copy views through the CUDA array interface
    out_c = cupy.zeros((b, hq, d), dtype=cupy.float16)
    for _ in range(3):
        decode.batch_decode_run(
            c(q),
            (c(kv.k), c(kv.v)),
            kv_indptr=c(kv.indptr),
            kv_indices=c(kv.indices),
            kv_last_page_len=c(kv.last),
            out=out_c,
            plan=plan,
        )
    cupy.cuda.runtime.deviceSynchronize()
    got_c = torch.as_tensor(out_c, device="cuda")
    for i in range(b):
        close(out_t[i], want[i], dtype, f"torch, request {i}")
        close(got_c[i], want[i], dtype, f"cupy, request {i}")


# ------------------------------------------------------------------------------------------ modules of the ext wheel


def test_batch_decode_sliding_window_and_soft_cap(ws):
    """f16, head_dim 128: the use_swa_True_use_logits_cap_True module; float32 reference, f16 tolerance."""
    dtype, hq, hk, d, page, window, cap = torch.float16, 32, 8, 128, 16, 40, 30.0
    kv = PagedKV([1, 39, 41, 300], page, hk, d, dtype, "NHD", seed=4)
    b = 4
    q = torch.randn(b, hq, d, dtype=dtype, device="cuda") * 4  # large logits: the cap matters
    out = torch.empty_like(q)
    plan = decode.batch_decode_plan(
        kv.indptr_h, None, kv.last_h, hq, hk, d, page, window_left=window, logits_soft_cap=cap, workspace=ws
    )
    assert "use_swa_True_use_logits_cap_True" in plan.uri
    decode.batch_decode_run(
        q, (kv.k, kv.v), kv_indptr=kv.indptr, kv_indices=kv.indices, kv_last_page_len=kv.last, out=out, plan=plan
    )
    torch.cuda.synchronize()
    for i in range(b):
        o, _ = reference(q[i : i + 1], kv.gather(i, kv.k), kv.gather(i, kv.v), window_left=window, soft_cap=cap)
        close(out[i], o[0], dtype, f"request {i}")


def test_batch_decode_fp8_e4m3_kv_cache(ws):
    """q/o float16, K/V float8_e4m3fn: the reference attends over the dequantized (float32) cache. Tolerance
    1e-2 (f16 outputs of magnitude <= ~3; the FP8 values themselves are exact in f16)."""
    hq, hk, d, page = 32, 8, 128, 16
    kv = PagedKV([3, 64, 200], page, hk, d, torch.float16, "NHD", seed=5)
    k8, v8 = kv.k.to(torch.float8_e4m3fn), kv.v.to(torch.float8_e4m3fn)
    b = 3
    q = torch.randn(b, hq, d, dtype=torch.float16, device="cuda")
    out = torch.empty_like(q)
    plan = decode.batch_decode_plan(
        kv.indptr_h, None, kv.last_h, hq, hk, d, page, kv_data_type="float8_e4m3fn", workspace=ws
    )
    assert "dtype_kv_e4m3" in plan.uri
    decode.batch_decode_run(
        q, (k8, v8), kv_indptr=kv.indptr, kv_indices=kv.indices, kv_last_page_len=kv.last, out=out, plan=plan
    )
    torch.cuda.synchronize()
    for i in range(b):
        fp8 = torch.float8_e4m3fn  # gathered in f16 then cast: the same values, no indexing of FP8 tensors
        o, _ = reference(q[i : i + 1], kv.gather(i, kv.k).to(fp8), kv.gather(i, kv.v).to(fp8))
        torch.testing.assert_close(out[i].float(), o[0], atol=1e-2, rtol=1e-2)


def test_prepared_decode_run_equals_the_op_call_every_step(ws):
    """``prepare_decode_run`` packed once, launched over 12 steps, each with its own plan (the cache grows a token
    per request per step, the page table rewritten in place): output and LSE equal ``batch_decode_run``'s bit for
    bit every step, and match the float32 reference; a stale plan is refused as the op refuses it."""
    dtype, hq, hk, d, page = torch.float16, 32, 8, 128, 16
    kv = PagedKV([7, 40, 100], page, hk, d, dtype, "NHD", spare_pages=16, seed=3)
    b, capacity = 3, kv.indices.numel() + 16
    indices = torch.zeros(capacity, dtype=torch.int32, device="cuda")  # page table with room to grow
    indptr = torch.zeros(b + 1, dtype=torch.int32, device="cuda")
    last = torch.zeros(b, dtype=torch.int32, device="cuda")
    q = torch.empty(b, hq, d, dtype=dtype, device="cuda")
    out, out_ref = torch.empty_like(q), torch.empty_like(q)
    lse, lse_ref = (torch.empty(b, hq, dtype=torch.float32, device="cuda") for _ in range(2))
    lens = list(kv.lens)
    pages_of = [list(kv.indices[kv.indptr_h[i] : kv.indptr_h[i + 1]].tolist()) for i in range(b)]
    spare = [p for p in range(kv.k.shape[0]) if p not in set(kv.indices.tolist())]

    def layout():
        indptr_h = np.concatenate([[0], np.cumsum([len(p) for p in pages_of])]).astype(np.int32)
        last_h = np.array([n - (len(p) - 1) * page for n, p in zip(lens, pages_of, strict=True)], np.int32)
        flat = [p for ps in pages_of for p in ps]
        indices[: len(flat)] = torch.tensor(flat, dtype=torch.int32)
        indptr.copy_(torch.from_numpy(indptr_h))
        last.copy_(torch.from_numpy(last_h))
        return indptr_h, last_h

    indptr_h, last_h = layout()
    plan = decode.batch_decode_plan(indptr_h, None, last_h, hq, hk, d, page, q_data_type=dtype, workspace=ws)
    prepared = decode.prepare_decode_run(
        q, (kv.k, kv.v), kv_indptr=indptr, kv_indices=indices, kv_last_page_len=last, out=out, plan=plan, lse=lse
    )
    for step in range(12):
        for i in range(b):  # one more token per request: a new page when the last one is full
            if lens[i] % page == 0:
                pages_of[i].append(spare.pop())
            lens[i] += 1
        indptr_h, last_h = layout()
        previous = plan
        plan = decode.batch_decode_plan(indptr_h, None, last_h, hq, hk, d, page, q_data_type=dtype, workspace=ws)
        with pytest.raises(ValueError, match="stale"):
            prepared.run(previous)
        q.normal_()
        prepared.run(plan)
        decode.batch_decode_run(
            q,
            (kv.k, kv.v),
            kv_indptr=indptr,
            kv_indices=indices,
            kv_last_page_len=last,
            out=out_ref,
            lse=lse_ref,
            plan=plan,
        )
        torch.cuda.synchronize()
        assert torch.equal(out, out_ref), f"step {step}: packed output differs from the op call's"
        assert torch.equal(lse, lse_ref), f"step {step}: packed LSE differs from the op call's"
        for i in range(b):
            ids = torch.tensor(pages_of[i], device="cuda").long()
            keys = kv.k[ids].reshape(-1, hk, d)[: lens[i]]
            vals = kv.v[ids].reshape(-1, hk, d)[: lens[i]]
            o, lse_f32 = reference(q[i : i + 1], keys, vals)
            close(out[i], o[0], dtype, f"step {step} request {i}")
            torch.testing.assert_close(lse[i], lse_f32[0], atol=LSE_TOL, rtol=LSE_TOL)
