"""A batch decode step captured in a CUDA graph with cuda-python stream capture, replayed (FI_FFI_RUN_GPU_TESTS=1).

The plan (``enable_cuda_graph=True``) is made outside the capture, as upstream requires; the run is captured.
Replays must equal eager runs bit for bit (same kernels, same schedule), and, after re-planning the next step
with the same batch size into the same workspace, the replayed graph must compute the new step.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from helpers.gpu import require_torch

if os.environ.get("FI_FFI_RUN_GPU_TESTS") != "1":
    pytest.skip("GPU tests run only with FI_FFI_RUN_GPU_TESTS=1 on a CUDA machine", allow_module_level=True)

from cuda.bindings import runtime as rt

from fi_ffi.ops.attention import decode
from fi_ffi.ops.attention.workspace import Workspace

torch = require_torch()

pytestmark = pytest.mark.gpu


def ok(result):
    err = result[0] if isinstance(result, tuple) else result
    assert err == rt.cudaError_t.cudaSuccess, err
    return result[1] if isinstance(result, tuple) and len(result) == 2 else result


def reference(q, k, v):
    g = q.shape[0] // k.shape[1]
    s = torch.einsum("hd,khd->hk", q.float(), k.float().repeat_interleave(g, 1)) * q.shape[-1] ** -0.5
    return torch.einsum("hk,khd->hd", torch.softmax(s, -1), v.float().repeat_interleave(g, 1))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_captured_decode_step_replays_like_eager_runs(dtype):
    hq, hk, d, page, batch, num_pages = 32, 8, 128, 16, 4, 64
    k_cache = torch.randn(num_pages, page, hk, d, dtype=dtype, device="cuda")
    v_cache = torch.randn_like(k_cache)
    # Fixed-size device buffers the graph reads; each step only changes their contents.
    q = torch.randn(batch, hq, d, dtype=dtype, device="cuda")
    out = torch.empty_like(q)
    indptr_d = torch.zeros(batch + 1, dtype=torch.int32, device="cuda")
    last_d = torch.zeros(batch, dtype=torch.int32, device="cuda")
    indices_d = torch.zeros(num_pages, dtype=torch.int32, device="cuda")

    def step_tables(lens):
        pages = [-(-n // page) for n in lens]
        indptr = np.concatenate([[0], np.cumsum(pages)]).astype(np.int32)
        last = np.array([n - (p - 1) * page for n, p in zip(lens, pages, strict=True)], np.int32)
        ids = torch.randperm(num_pages)[: indptr[-1]].to(torch.int32)
        return indptr, last, ids

    err, stream = rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking)
    ok(err)
    s = int(stream)
    ts = torch.cuda.ExternalStream(s)
    with Workspace.allocate(0) as ws, torch.cuda.stream(ts):
        lens = [3, 40, 17, 100]
        indptr, last, ids = step_tables(lens)
        indptr_d.copy_(torch.from_numpy(indptr))
        last_d.copy_(torch.from_numpy(last))
        indices_d[: len(ids)].copy_(ids)
        plan = decode.batch_decode_plan(
            indptr, None, last, hq, hk, d, page, q_data_type=dtype, enable_cuda_graph=True, stream=s, workspace=ws
        )
        decode.batch_decode_run(
            q,
            (k_cache, v_cache),
            kv_indptr=indptr_d,
            kv_indices=indices_d,
            kv_last_page_len=last_d,
            out=out,
            stream=s,
            plan=plan,
        )
        ok(rt.cudaStreamSynchronize(stream))
        eager = out.clone()

        ok(rt.cudaStreamBeginCapture(stream, rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal))
        decode.batch_decode_run(
            q,
            (k_cache, v_cache),
            kv_indptr=indptr_d,
            kv_indices=indices_d,
            kv_last_page_len=last_d,
            out=out,
            stream=s,
            plan=plan,
        )
        err, graph = rt.cudaStreamEndCapture(stream)
        ok(err)
        err, graph_exec = rt.cudaGraphInstantiate(graph, 0)
        ok(err)

        out.zero_()
        ok(rt.cudaGraphLaunch(graph_exec, stream))
        ok(rt.cudaStreamSynchronize(stream))
        assert torch.equal(out, eager)

        # New query values, same tables: the replay reads the buffers' current contents.
        q.normal_()
        ok(rt.cudaGraphLaunch(graph_exec, stream))
        ok(rt.cudaStreamSynchronize(stream))
        replayed = out.clone()
        decode.batch_decode_run(
            q,
            (k_cache, v_cache),
            kv_indptr=indptr_d,
            kv_indices=indices_d,
            kv_last_page_len=last_d,
            out=out,
            stream=s,
            plan=plan,
        )
        ok(rt.cudaStreamSynchronize(stream))
        assert torch.equal(replayed, out)

        # Next step: one more token per request, re-planned (same batch) into the same workspace; replay.
        lens = [n + 1 for n in lens]
        indptr2, last2, ids2 = step_tables(lens)
        plan2 = decode.batch_decode_plan(
            indptr2, None, last2, hq, hk, d, page, q_data_type=dtype, enable_cuda_graph=True, stream=s, workspace=ws
        )
        assert plan.stale
        assert plan2.info == plan.info  # a CUDA-graph schedule keeps its layout for a fixed batch size
        indptr_d.copy_(torch.from_numpy(indptr2))
        last_d.copy_(torch.from_numpy(last2))
        indices_d[: len(ids2)].copy_(ids2)
        ok(rt.cudaGraphLaunch(graph_exec, stream))
        ok(rt.cudaStreamSynchronize(stream))
        tol = 5e-3 if dtype == torch.float16 else 3e-2
        for i, n in enumerate(lens):
            pids = ids2[indptr2[i] : indptr2[i + 1]].long().cuda()
            k = k_cache[pids].reshape(-1, hk, d)[:n]
            v = v_cache[pids].reshape(-1, hk, d)[:n]
            torch.testing.assert_close(out[i].float(), reference(q[i], k, v), atol=tol, rtol=tol)
        ok(rt.cudaGraphExecDestroy(graph_exec))
        ok(rt.cudaGraphDestroy(graph))
    ok(rt.cudaStreamDestroy(stream))
