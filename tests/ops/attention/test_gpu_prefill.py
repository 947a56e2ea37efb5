"""Prefill attention on a real GPU against a float32 torch reference (gated by FI_FFI_RUN_GPU_TESTS=1).

Tolerances, absolute and relative, on outputs of magnitude <= ~3: float16 5e-3, bfloat16 3e-2 (probabilities
are rounded to the input dtype before P.V); log-sum-exp (base 2) 2e-2. FA3 against FA2: the same tolerances.
"""

from __future__ import annotations

import os

import pytest
from helpers.gpu import require_torch

if os.environ.get("FI_FFI_RUN_GPU_TESTS") != "1":
    pytest.skip("GPU tests run only with FI_FFI_RUN_GPU_TESTS=1 on a CUDA machine", allow_module_level=True)

from helpers.attention_reference import DTYPES, LSE_TOL, close, reference
from helpers.paged_kv import KV_LENS, QO_LENS, PagedKV, indptr

from fi_ffi.ops.attention import prefill
from fi_ffi.ops.attention.workspace import Workspace

torch = require_torch()

pytestmark = pytest.mark.gpu

GQA = [(8, 8), (32, 8), (32, 4)]  # group sizes 1, 4, 8
SM90 = torch.cuda.get_device_capability()[0] == 9


def to_layout(t, layout):
    """``[n, heads, d]`` -> the layout's order (HND: ``[heads, n, d]``, contiguous)."""
    return t if layout == "NHD" else t.transpose(0, 1).contiguous()


@pytest.fixture(scope="module")
def ws():
    with Workspace.allocate(0) as w:
        yield w


# ------------------------------------------------------------------------------------------ single prefill


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("heads", GQA)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_single_prefill_matches_reference(dtype, head_dim, heads, causal, layout):
    hq, hk = heads
    tmp = torch.empty(32 << 20, dtype=torch.uint8, device="cuda")
    for qo_len, kv_len in ((1, 1), (37, 129), (128, 128), (16, 2000)):
        q = torch.randn(qo_len, hq, head_dim, dtype=dtype, device="cuda")
        k = torch.randn(kv_len, hk, head_dim, dtype=dtype, device="cuda")
        v = torch.randn_like(k)
        out = torch.empty_like(q)
        lse = torch.empty(qo_len, hq, dtype=torch.float32, device="cuda")
        prefill.single_prefill(
            q, to_layout(k, layout), to_layout(v, layout), out=out, tmp=tmp, lse=lse, causal=causal, kv_layout=layout
        )
        torch.cuda.synchronize()
        o, lse_ref = reference(q, k, v, causal=causal)
        close(out, o, dtype, f"qo {qo_len} kv {kv_len}")
        torch.testing.assert_close(lse, lse_ref, atol=LSE_TOL, rtol=LSE_TOL)


@pytest.mark.parametrize("dtype", DTYPES)
def test_single_prefill_custom_mask(dtype):
    qo_len, kv_len, hq, hk, d = 45, 77, 32, 8, 128
    q = torch.randn(qo_len, hq, d, dtype=dtype, device="cuda")
    k = torch.randn(kv_len, hk, d, dtype=dtype, device="cuda")
    v = torch.randn_like(k)
    mask = torch.rand(qo_len, kv_len, device="cuda") < 0.3
    mask[:, 0] = True  # every row attends somewhere
    packed, _ = prefill.pack_custom_mask([mask.cpu().numpy()])
    out = torch.empty_like(q)
    prefill.single_prefill(q, k, v, out=out, packed_custom_mask=torch.from_numpy(packed).cuda())
    torch.cuda.synchronize()
    close(out, reference(q, k, v, mask=mask)[0], dtype)


def test_single_prefill_strided_q_and_kv():
    dtype, hq, hk, d = torch.float16, 16, 4, 64
    qkv = torch.randn(50, hq + 2 * hk, d, dtype=dtype, device="cuda")  # a fused QKV projection
    q, k, v = qkv[:, :hq], qkv[:, hq : hq + hk], qkv[:, hq + hk :]
    out = torch.empty(50, hq, d, dtype=dtype, device="cuda")
    prefill.single_prefill(q, k, v, out=out, causal=True, sm_scale=0.2)
    torch.cuda.synchronize()
    close(out, reference(q, k, v, causal=True, sm_scale=0.2)[0], dtype)


# ------------------------------------------------------------------------------------------ batch prefill, ragged


def ragged_inputs(dtype, hq, hk, d, layout, qo_lens=QO_LENS, kv_lens=KV_LENS):
    q = torch.randn(sum(qo_lens), hq, d, dtype=dtype, device="cuda")
    k = torch.randn(sum(kv_lens), hk, d, dtype=dtype, device="cuda")
    v = torch.randn_like(k)
    return q, k, v, to_layout(k, layout), to_layout(v, layout)


def check_ragged(out, q, k, v, qo_lens, kv_lens, dtype, causal, lse=None, masks=None):
    qo, kv = indptr(qo_lens), indptr(kv_lens)
    for i in range(len(qo_lens)):
        o, lse_ref = reference(
            q[qo[i] : qo[i + 1]],
            k[kv[i] : kv[i + 1]],
            v[kv[i] : kv[i + 1]],
            causal=causal,
            mask=None if masks is None else masks[i],
        )
        close(out[qo[i] : qo[i + 1]], o, dtype, f"request {i}")
        if lse is not None:
            torch.testing.assert_close(lse[qo[i] : qo[i + 1]], lse_ref, atol=LSE_TOL, rtol=LSE_TOL)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("heads", GQA)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_batch_prefill_ragged_fa2(ws, dtype, head_dim, heads, causal, layout):
    hq, hk = heads
    q, k, v, kl, vl = ragged_inputs(dtype, hq, hk, head_dim, layout)
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[0], hq, dtype=torch.float32, device="cuda")
    plan = prefill.batch_prefill_ragged_plan(
        indptr(QO_LENS),
        indptr(KV_LENS),
        hq,
        hk,
        head_dim,
        q_data_type=dtype,
        kv_layout=layout,
        causal=causal,
        backend="fa2",
        workspace=ws,
    )
    assert plan.backend == "fa2"
    prefill.batch_prefill_ragged_run(
        q,
        kl,
        vl,
        qo_indptr=torch.from_numpy(indptr(QO_LENS)).cuda(),
        kv_indptr=torch.from_numpy(indptr(KV_LENS)).cuda(),
        out=out,
        lse=lse,
        plan=plan,
    )
    torch.cuda.synchronize()
    check_ragged(out, q, k, v, QO_LENS, KV_LENS, dtype, causal, lse)


def test_batch_prefill_ragged_custom_mask(ws):
    dtype, hq, hk, d = torch.bfloat16, 32, 8, 128
    q, k, v, _, _ = ragged_inputs(dtype, hq, hk, d, "NHD")
    masks = []
    for qo_len, kv_len in zip(QO_LENS, KV_LENS, strict=True):
        m = torch.rand(qo_len, kv_len, device="cuda") < 0.4
        m[:, -1] = True
        masks.append(m)
    packed, mind = prefill.pack_custom_mask([m.cpu().numpy() for m in masks])
    plan = prefill.batch_prefill_ragged_plan(
        indptr(QO_LENS),
        indptr(KV_LENS),
        hq,
        hk,
        d,
        q_data_type=dtype,
        packed_custom_mask=torch.from_numpy(packed).cuda(),
        mask_indptr=torch.from_numpy(mind).cuda(),
        workspace=ws,
    )
    assert plan.backend == "fa2" and plan.mask_mode == 2
    out = torch.empty_like(q)
    prefill.batch_prefill_ragged_run(
        q,
        k,
        v,
        qo_indptr=torch.from_numpy(indptr(QO_LENS)).cuda(),
        kv_indptr=torch.from_numpy(indptr(KV_LENS)).cuda(),
        out=out,
        plan=plan,
    )
    torch.cuda.synchronize()
    check_ragged(out, q, k, v, QO_LENS, KV_LENS, dtype, False, masks=masks)


# ------------------------------------------------------------------------------------------ batch prefill, paged


def paged_case(ws, dtype, hq, hk, d, page_size, layout, causal, backend, qo_lens=QO_LENS, kv_lens=KV_LENS):
    q, k, v, _, _ = ragged_inputs(dtype, hq, hk, d, "NHD", qo_lens, kv_lens)
    kv = PagedKV(k, v, kv_lens, page_size, layout)
    plan = prefill.batch_prefill_paged_plan(
        indptr(qo_lens),
        kv.indptr_h,
        None,
        kv.last_h,
        hq,
        hk,
        d,
        page_size,
        q_data_type=dtype,
        kv_layout=layout,
        causal=causal,
        backend=backend,
        workspace=ws,
    )
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[0], hq, dtype=torch.float32, device="cuda")
    prefill.batch_prefill_paged_run(
        q,
        (kv.k, kv.v),
        qo_indptr=torch.from_numpy(indptr(qo_lens)).cuda(),
        kv_indptr=kv.indptr,
        kv_indices=kv.indices,
        kv_last_page_len=kv.last,
        out=out,
        lse=lse,
        plan=plan,
    )
    torch.cuda.synchronize()
    return plan, q, k, v, out, lse


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("page_size", [1, 16, 64])
@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("causal", [False, True])
def test_batch_prefill_paged_fa2(ws, dtype, head_dim, page_size, layout, causal):
    hq, hk = (32, 8) if page_size != 16 else (32, 4)
    plan, q, k, v, out, lse = paged_case(ws, dtype, hq, hk, head_dim, page_size, layout, causal, "fa2")
    assert plan.backend == "fa2"
    check_ragged(out, q, k, v, QO_LENS, KV_LENS, dtype, causal, lse)


def test_paged_prefill_plan_reused_then_stale(ws):
    dtype, hq, hk, d, page = torch.float16, 8, 8, 128, 16
    q, k, v, _, _ = ragged_inputs(dtype, hq, hk, d, "NHD")
    kv = PagedKV(k, v, KV_LENS, page, "NHD")
    qo_d = torch.from_numpy(indptr(QO_LENS)).cuda()
    plan = prefill.batch_prefill_paged_plan(
        indptr(QO_LENS), kv.indptr_h, None, kv.last_h, hq, hk, d, page, causal=True, backend="fa2", workspace=ws
    )
    outs = [torch.empty_like(q) for _ in range(3)]
    for out in outs:
        prefill.batch_prefill_paged_run(
            q,
            (kv.k, kv.v),
            qo_indptr=qo_d,
            kv_indptr=kv.indptr,
            kv_indices=kv.indices,
            kv_last_page_len=kv.last,
            out=out,
            plan=plan,
        )
    torch.cuda.synchronize()
    for out in outs:
        check_ragged(out, q, k, v, QO_LENS, KV_LENS, dtype, True)
    prefill.batch_prefill_ragged_plan(indptr(QO_LENS), indptr(KV_LENS), hq, hk, d, backend="fa2", workspace=ws)
    with pytest.raises(ValueError, match="stale"):
        prefill.batch_prefill_paged_run(
            q,
            (kv.k, kv.v),
            qo_indptr=qo_d,
            kv_indptr=kv.indptr,
            kv_indices=kv.indices,
            kv_last_page_len=kv.last,
            out=outs[0],
            plan=plan,
        )


# ------------------------------------------------------------------------------------------ FA3 (SM90)


@pytest.mark.skipif(not SM90, reason="FA3 modules need an SM 9.x GPU")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", [(8, 8), (32, 4)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mode", ["ragged", "paged16", "paged1"])
def test_fa3_matches_fa2_and_reference(ws, dtype, heads, causal, mode):
    hq, hk, d = *heads, 128
    if mode == "ragged":
        q, k, v, _, _ = ragged_inputs(dtype, hq, hk, d, "NHD")
        outs = {}
        for backend in ("fa2", "fa3"):
            plan = prefill.batch_prefill_ragged_plan(
                indptr(QO_LENS),
                indptr(KV_LENS),
                hq,
                hk,
                d,
                q_data_type=dtype,
                causal=causal,
                backend=backend,
                workspace=ws,
            )
            assert plan.backend == backend
            out = torch.empty_like(q)
            prefill.batch_prefill_ragged_run(
                q,
                k,
                v,
                qo_indptr=torch.from_numpy(indptr(QO_LENS)).cuda(),
                kv_indptr=torch.from_numpy(indptr(KV_LENS)).cuda(),
                out=out,
                plan=plan,
            )
            torch.cuda.synchronize()
            outs[backend] = out
    else:
        page = 16 if mode == "paged16" else 1
        torch.manual_seed(3)
        outs = {}
        for backend in ("fa2", "fa3"):
            torch.manual_seed(3)  # same inputs for both
            plan, q, k, v, out, _ = paged_case(ws, dtype, hq, hk, d, page, "NHD", causal, backend)
            assert plan.backend == backend
            outs[backend] = out
    check_ragged(outs["fa3"], q, k, v, QO_LENS, KV_LENS, dtype, causal)
    close(outs["fa3"], outs["fa2"].float(), dtype, "fa3 vs fa2")


@pytest.mark.skipif(not SM90, reason="FA3 modules need an SM 9.x GPU")
def test_auto_picks_fa3_on_sm90_and_fa2_when_it_must(ws):
    plan = prefill.batch_prefill_ragged_plan(indptr([3]), indptr([5]), 8, 8, 128, workspace=ws)
    assert plan.backend == "fa3" and plan.uri.endswith("_sm90")
    plan = prefill.batch_prefill_ragged_plan(
        indptr([3]), indptr([5]), 8, 8, 64, workspace=ws
    )  # no hd-64 FA3 in the wheel
    assert plan.backend == "fa2"
    plan = prefill.batch_prefill_ragged_plan(indptr([3]), indptr([5]), 8, 8, 128, kv_layout="HND", workspace=ws)
    assert plan.backend == "fa2"


@pytest.mark.skipif(not SM90, reason="FA3 modules need an SM 9.x GPU")
def test_fa3_plan_info_shape_and_mixing(ws):
    hq, hk, d = 8, 8, 128
    fa3 = prefill.batch_prefill_ragged_plan(indptr(QO_LENS), indptr(KV_LENS), hq, hk, d, backend="fa3", workspace=ws)
    assert len(fa3.info) == 9
    fa2 = prefill.batch_prefill_ragged_plan(indptr(QO_LENS), indptr(KV_LENS), hq, hk, d, backend="fa2", workspace=ws)
    assert len(fa2.info) == 15
    assert fa3.stale  # the FA2 plan overwrote the schedule: the FA3 plan cannot run any more


# ------------------------------------------------------------------------------------------ producers per call


def test_single_prefill_with_torch_tensors_and_cupy_arrays_per_call():
    """Fresh torch tensors every call, then CuPy arrays (unhashable) every call; float32 reference, f16 tolerance."""
    cupy = pytest.importorskip("cupy")
    dtype, hq, hk, d = torch.float16, 32, 8, 128
    q = torch.randn(37, hq, d, dtype=dtype, device="cuda")
    k = torch.randn(129, hk, d, dtype=dtype, device="cuda")
    v = torch.randn_like(k)
    want, _ = reference(q, k, v, causal=True)
    out_t = torch.empty_like(q)
    for _ in range(3):
        prefill.single_prefill(q.clone(), k.clone(), v, out=out_t, causal=True)
    torch.cuda.synchronize()
    close(out_t, want, dtype, "torch")
    c = cupy.asarray
    out_c = cupy.zeros(q.shape, dtype=cupy.float16)
    for _ in range(3):
        prefill.single_prefill(c(q), c(k), c(v), out=out_c, causal=True)
    cupy.cuda.runtime.deviceSynchronize()
    close(torch.as_tensor(out_c, device="cuda"), want, dtype, "cupy")


# ------------------------------------------------------------------------------------------ modules of the ext wheel


@pytest.mark.parametrize("mode", ["ragged", "paged"])
def test_batch_prefill_sliding_window_and_soft_cap(ws, mode):
    """f16, head_dim 128: the use_swa_True_use_logits_cap_True FA2 module (no FA3 build of it: auto picks FA2)."""
    dtype, hq, hk, d, window, cap = torch.float16, 32, 8, 128, 16, 50.0
    q, k, v, _, _ = ragged_inputs(dtype, hq, hk, d, "NHD")
    q = q * 4  # large logits: the cap matters
    out = torch.empty_like(q)
    qo = torch.from_numpy(indptr(QO_LENS)).cuda()
    if mode == "ragged":
        plan = prefill.batch_prefill_ragged_plan(
            indptr(QO_LENS),
            indptr(KV_LENS),
            hq,
            hk,
            d,
            causal=True,
            window_left=window,
            logits_soft_cap=cap,
            workspace=ws,
        )
        prefill.batch_prefill_ragged_run(
            q, k, v, qo_indptr=qo, kv_indptr=torch.from_numpy(indptr(KV_LENS)).cuda(), out=out, plan=plan
        )
    else:
        kv = PagedKV(k, v, KV_LENS, 16, "NHD")
        plan = prefill.batch_prefill_paged_plan(
            indptr(QO_LENS),
            kv.indptr_h,
            None,
            kv.last_h,
            hq,
            hk,
            d,
            16,
            causal=True,
            window_left=window,
            logits_soft_cap=cap,
            workspace=ws,
        )
        prefill.batch_prefill_paged_run(
            q,
            (kv.k, kv.v),
            qo_indptr=qo,
            kv_indptr=kv.indptr,
            kv_indices=kv.indices,
            kv_last_page_len=kv.last,
            out=out,
            plan=plan,
        )
    assert plan.backend == "fa2" and "use_swa_True_use_logits_cap_True" in plan.uri
    torch.cuda.synchronize()
    qi, ki = indptr(QO_LENS), indptr(KV_LENS)
    for i in range(len(QO_LENS)):
        o, _ = reference(
            q[qi[i] : qi[i + 1]],
            k[ki[i] : ki[i + 1]],
            v[ki[i] : ki[i + 1]],
            causal=True,
            window_left=window,
            soft_cap=cap,
        )
        close(out[qi[i] : qi[i + 1]], o, dtype, f"request {i}")


def test_batch_prefill_paged_fp8_e4m3_kv_cache(ws):
    """q/o float16, paged K/V float8_e4m3fn; the reference attends over the dequantized cache. Tolerance 1e-2."""
    hq, hk, d = 32, 8, 128
    q, k, v, _, _ = ragged_inputs(torch.float16, hq, hk, d, "NHD")
    k8, v8 = k.to(torch.float8_e4m3fn), v.to(torch.float8_e4m3fn)
    kv = PagedKV(k8.half(), v8.half(), KV_LENS, 16, "NHD")  # laid out in f16 (exact), then cast: only copies in FP8
    kc, vc = kv.k.to(torch.float8_e4m3fn), kv.v.to(torch.float8_e4m3fn)
    out = torch.empty_like(q)
    plan = prefill.batch_prefill_paged_plan(
        indptr(QO_LENS),
        kv.indptr_h,
        None,
        kv.last_h,
        hq,
        hk,
        d,
        16,
        causal=True,
        kv_data_type="float8_e4m3fn",
        workspace=ws,
    )
    assert "dtype_kv_e4m3" in plan.uri and plan.backend == "fa2"
    prefill.batch_prefill_paged_run(
        q,
        (kc, vc),
        qo_indptr=torch.from_numpy(indptr(QO_LENS)).cuda(),
        kv_indptr=kv.indptr,
        kv_indices=kv.indices,
        kv_last_page_len=kv.last,
        out=out,
        plan=plan,
    )
    torch.cuda.synchronize()
    qi, ki = indptr(QO_LENS), indptr(KV_LENS)
    for i in range(len(QO_LENS)):
        o, _ = reference(q[qi[i] : qi[i + 1]], k8[ki[i] : ki[i + 1]], v8[ki[i] : ki[i + 1]], causal=True)
        torch.testing.assert_close(out[qi[i] : qi[i + 1]].float(), o, atol=1e-2, rtol=1e-2)
