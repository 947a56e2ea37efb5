"""Attention with sinks (gpt-oss) and Gemma's head_dim 256 attention on a real GPU against float32 torch
references (gated by FI_FFI_RUN_GPU_TESTS=1; modules of the model-family test wheel, staged beside the core one).

- Sinks: softmax-with-sink attention: per head ``h`` the logits ``s_j`` (scaled, masked: causal, window) get one
  extra logit ``sink[h]`` in the normalization that contributes no value
  (``o = sum_j e^{s_j} v_j / (e^{sink[h]} + sum_j e^{s_j})``); paged and ragged, FA2 and (on SM 9.x) FA3, window
  off and on (window 15: smaller than most requests), bfloat16 (the modules' dtype): tolerance 3e-2.
- Gemma: head_dim 256, sliding window and soft cap, bfloat16: batch decode and batch prefill (FA2) through the
  existing ops against ``helpers.attention_reference.reference(..., window_left, soft_cap)``: tolerance 3e-2.
"""

from __future__ import annotations

import os

import pytest
from helpers.gpu import require_torch

if os.environ.get("FI_FFI_RUN_GPU_TESTS") != "1":
    pytest.skip("GPU tests run only with FI_FFI_RUN_GPU_TESTS=1 on a CUDA machine", allow_module_level=True)

from helpers.attention_reference import close, reference
from helpers.paged_kv import KV_LENS, QO_LENS, PagedKV, indptr

import fi_ffi
from fi_ffi.ops.attention.workspace import Workspace

torch = require_torch()

# models_modules skips naming the model-family wheel when its modules are not pinned
pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("models_modules")]
SM90 = torch.cuda.get_device_capability()[0] == 9
BF16 = torch.bfloat16


@pytest.fixture(scope="module")
def ws():  # type: ignore[no-untyped-def]
    with Workspace.allocate(0) as w:
        yield w


def sink_reference(q, k, v, sink, *, causal, window_left):  # type: ignore[no-untyped-def]
    """Softmax-with-sink attention of one request in float32: o ``[qo, hq, d]``."""
    qo, hq, d = q.shape
    kv, hk = k.shape[:2]
    g = hq // hk
    kf, vf = k.float().repeat_interleave(g, 1), v.float().repeat_interleave(g, 1)
    s = torch.einsum("qhd,khd->hqk", q.float(), kf) * d**-0.5
    i = torch.arange(qo, device=q.device)[:, None]
    j = torch.arange(kv, device=q.device)[None]
    allowed = torch.ones(qo, kv, dtype=torch.bool, device=q.device)
    if causal:
        allowed &= j <= i + kv - qo
    if window_left >= 0:
        allowed &= j >= i + kv - qo - window_left
    s = s.masked_fill(~allowed, float("-inf"))
    ext = torch.cat([s, sink.float()[:, None, None].expand(hq, qo, 1)], dim=-1)  # the sink: one more logit
    p = torch.softmax(ext, -1)[..., :-1]
    return torch.einsum("hqk,khd->qhd", p, vf)


def backends() -> list[str]:
    return ["fa2", "fa3"] if SM90 else ["fa2"]


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("window_left", [-1, 15])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads", [(8, 8), (64, 8)])
def test_paged_attention_with_sinks_matches_the_reference(
    ws, backend: str, window_left: int, causal: bool, heads: tuple[int, int]
) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(window_left + 7)
    hq, hk, d, page = *heads, 64, 16
    q = torch.randn(sum(QO_LENS), hq, d, dtype=BF16, device="cuda")
    k = torch.randn(sum(KV_LENS), hk, d, dtype=BF16, device="cuda")
    v = torch.randn_like(k)
    sink = torch.randn(hq, device="cuda") * 2  # some heads sink a lot, some little
    kv = PagedKV(k, v, KV_LENS, page, "NHD")
    plan = fi_ffi.batch_attention_sink_plan(
        indptr(QO_LENS),
        kv.indptr_h,
        None,
        kv.last_h,
        hq,
        hk,
        d,
        page,
        q_data_type=BF16,
        causal=causal,
        window_left=window_left,
        backend=backend,
        workspace=ws,
    )
    assert plan.backend == backend
    out = torch.full_like(q, float("nan"))
    qo_indptr = torch.from_numpy(indptr(QO_LENS)).cuda()
    got = fi_ffi.batch_attention_sink_run(
        q,
        (kv.k, kv.v),
        qo_indptr=qo_indptr,
        kv_indptr=kv.indptr,
        kv_indices=kv.indices,
        kv_last_page_len=kv.last,
        out=out,
        sinks=sink,
        plan=plan,
    )
    assert got is out
    torch.cuda.synchronize()
    qo, kvp = indptr(QO_LENS), indptr(KV_LENS)
    for i in range(len(QO_LENS)):
        want = sink_reference(
            q[qo[i] : qo[i + 1]], k[kvp[i] : kvp[i + 1]], v[kvp[i] : kvp[i + 1]], sink, causal=causal,
            window_left=window_left,
        )  # fmt: skip
        close(out[qo[i] : qo[i + 1]], want, BF16, f"request {i}")


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("window_left", [-1, 15])
def test_ragged_attention_with_sinks_matches_the_reference(ws, backend: str, window_left: int) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(3)
    hq, hk, d = 16, 4, 64
    q = torch.randn(sum(QO_LENS), hq, d, dtype=BF16, device="cuda")
    k = torch.randn(sum(KV_LENS), hk, d, dtype=BF16, device="cuda")
    v = torch.randn_like(k)
    sink = torch.randn(hq, device="cuda")
    plan = fi_ffi.batch_attention_sink_ragged_plan(
        indptr(QO_LENS),
        indptr(KV_LENS),
        hq,
        hk,
        d,
        q_data_type=BF16,
        window_left=window_left,
        backend=backend,
        workspace=ws,
    )
    out = torch.empty_like(q)
    qo_d, kv_d = torch.from_numpy(indptr(QO_LENS)).cuda(), torch.from_numpy(indptr(KV_LENS)).cuda()
    fi_ffi.batch_attention_sink_ragged_run(q, k, v, qo_indptr=qo_d, kv_indptr=kv_d, out=out, sinks=sink, plan=plan)
    torch.cuda.synchronize()
    qo, kvp = indptr(QO_LENS), indptr(KV_LENS)
    for i in range(len(QO_LENS)):
        want = sink_reference(
            q[qo[i] : qo[i + 1]], k[kvp[i] : kvp[i + 1]], v[kvp[i] : kvp[i + 1]], sink, causal=True,
            window_left=window_left,
        )  # fmt: skip
        close(out[qo[i] : qo[i + 1]], want, BF16, f"request {i}")


def test_a_very_negative_sink_is_plain_attention(ws) -> None:  # type: ignore[no-untyped-def]
    """The control: with sink = -inf-like logits the result is ordinary causal attention."""
    hq, hk, d, page = 8, 8, 64, 16
    q = torch.randn(sum(QO_LENS), hq, d, dtype=BF16, device="cuda")
    k = torch.randn(sum(KV_LENS), hk, d, dtype=BF16, device="cuda")
    v = torch.randn_like(k)
    kv = PagedKV(k, v, KV_LENS, page, "NHD")
    plan = fi_ffi.batch_attention_sink_plan(
        indptr(QO_LENS), kv.indptr_h, None, kv.last_h, hq, hk, d, page, workspace=ws
    )
    out = torch.empty_like(q)
    sink = torch.full((hq,), -1e4, device="cuda")
    qo_d = torch.from_numpy(indptr(QO_LENS)).cuda()
    fi_ffi.batch_attention_sink_run(
        q,
        (kv.k, kv.v),
        qo_indptr=qo_d,
        kv_indptr=kv.indptr,
        kv_indices=kv.indices,
        kv_last_page_len=kv.last,
        out=out,
        sinks=sink,
        plan=plan,
    )
    torch.cuda.synchronize()
    qo, kvp = indptr(QO_LENS), indptr(KV_LENS)
    for i in range(len(QO_LENS)):
        want, _ = reference(q[qo[i] : qo[i + 1]], k[kvp[i] : kvp[i + 1]], v[kvp[i] : kvp[i + 1]], causal=True)
        close(out[qo[i] : qo[i + 1]], want, BF16, f"request {i}")


# ------------------------------------------------------------------------------------------ Gemma: head_dim 256

GEMMA = {"window_left": 31, "logits_soft_cap": 30.0}


@pytest.mark.parametrize("heads", [(8, 4), (16, 8)])
def test_gemma_head_dim_256_batch_decode(ws, heads: tuple[int, int]) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(11)
    hq, hk, d, page = *heads, 256, 16
    kv_lens = [1, 17, 64, 100]
    k = torch.randn(sum(kv_lens), hk, d, dtype=BF16, device="cuda")
    v = torch.randn_like(k)
    q = torch.randn(len(kv_lens), hq, d, dtype=BF16, device="cuda") * 2  # large logits: the cap matters
    kv = PagedKV(k, v, kv_lens, page, "NHD")
    plan = fi_ffi.batch_decode_plan(
        kv.indptr_h,
        None,
        kv.last_h,
        num_qo_heads=hq,
        num_kv_heads=hk,
        head_dim=d,
        page_size=page,
        q_data_type=BF16,
        **GEMMA,
        workspace=ws,
    )
    assert "head_dim_qk_256" in plan.uri and "use_swa_True_use_logits_cap_True" in plan.uri
    out = torch.empty_like(q)
    fi_ffi.batch_decode_run(
        q, (kv.k, kv.v), kv_indptr=kv.indptr, kv_indices=kv.indices, kv_last_page_len=kv.last, out=out, plan=plan
    )
    torch.cuda.synchronize()
    kvp = indptr(kv_lens)
    for i in range(len(kv_lens)):
        want, _ = reference(q[i : i + 1], k[kvp[i] : kvp[i + 1]], v[kvp[i] : kvp[i + 1]], window_left=31, soft_cap=30.0)
        close(out[i : i + 1], want, BF16, f"request {i}")


def test_gemma_head_dim_256_batch_prefill(ws) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(12)
    hq, hk, d, page = 8, 4, 256, 16
    q = torch.randn(sum(QO_LENS), hq, d, dtype=BF16, device="cuda") * 2
    k = torch.randn(sum(KV_LENS), hk, d, dtype=BF16, device="cuda")
    v = torch.randn_like(k)
    kv = PagedKV(k, v, KV_LENS, page, "NHD")
    plan = fi_ffi.batch_prefill_paged_plan(
        indptr(QO_LENS),
        kv.indptr_h,
        None,
        kv.last_h,
        num_qo_heads=hq,
        num_kv_heads=hk,
        head_dim_qk=d,
        page_size=page,
        q_data_type=BF16,
        causal=True,
        **GEMMA,
        workspace=ws,
    )
    assert plan.backend == "fa2" and "head_dim_qk_256" in plan.uri
    out = torch.empty_like(q)
    qo_d = torch.from_numpy(indptr(QO_LENS)).cuda()
    fi_ffi.batch_prefill_paged_run(
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
    qo, kvp = indptr(QO_LENS), indptr(KV_LENS)
    for i in range(len(QO_LENS)):
        want, _ = reference(
            q[qo[i] : qo[i + 1]], k[kvp[i] : kvp[i + 1]], v[kvp[i] : kvp[i + 1]], causal=True, window_left=31,
            soft_cap=30.0,
        )  # fmt: skip
        close(out[qo[i] : qo[i + 1]], want, BF16, f"request {i}")
