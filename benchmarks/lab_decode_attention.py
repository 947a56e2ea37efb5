"""A lab for decode attention over a paged KV cache: FlashInfer's decode kernel against its paged-prefill kernel run
as decode (one query row a request: flashinfer-python's ``use_tensor_cores`` decode; FA2 and FA3), each planned with
``enable_cuda_graph=True`` and timed as 32 runs captured in one CUDA graph (a step's layers), us per run, with the
largest difference of each prefill kernel's output from the decode kernel's. Random bf16 caches in pages of 16,
the 8B shape's heads (32 query, 8 KV, head dim 128), every request of the batch at the same context, q contiguous
and the prefill plans ``causal=False`` (the engine's plan is ``causal=True``, the same for one query a request).
The 32 runs read one cache, which small contexts leave in L2 (a step's layers read one each). Needs a GPU, torch
(its CUDA graphs and tensors) and the test kernel wheels; not a test (nothing is asserted).

    bash tools/gpu_run.sh python3 benchmarks/lab_decode_attention.py [--batches 8,32] [--contexts 48,256,1024,4096]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

HEADS_Q, HEADS_KV, HEAD_DIM, PAGE = 32, 8, 128, 16
RUNS = 32  # runs a graph captures (a step's layers)


def graph_us(torch: Any, stream: Any, run: Any) -> float:
    """The best of 5 replays of a CUDA graph of :data:`RUNS` calls of ``run`` on ``stream``, us per call."""
    with torch.cuda.stream(stream):
        run()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            for _ in range(RUNS):
                run()
        graph.replay()
        torch.cuda.synchronize()
        best = float("inf")
        for _ in range(5):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            graph.replay()
            end.record(stream)
            end.synchronize()
            best = min(best, start.elapsed_time(end) * 1e3 / RUNS)
    return best


def one_case(batch: int, context: int, s: int, stream: Any) -> str:
    """One batch and context: each kernel's us per run and each prefill kernel's largest difference, as a line."""
    import numpy as np
    import torch

    import fi_ffi
    from fi_ffi.ops.attention.workspace import Workspace

    dtype = torch.bfloat16
    pages = -(-context // PAGE)
    num_pages = batch * pages + 8
    k_cache = torch.randn(num_pages, PAGE, HEADS_KV, HEAD_DIM, dtype=dtype, device="cuda")
    v_cache = torch.randn_like(k_cache)
    q = torch.randn(batch, HEADS_Q, HEAD_DIM, dtype=dtype, device="cuda")
    indptr = np.arange(batch + 1, dtype=np.int32) * pages
    last = np.full(batch, context - (pages - 1) * PAGE, np.int32)
    ids = torch.randperm(num_pages, device="cuda")[: batch * pages].to(torch.int32)
    indptr_d, last_d = torch.from_numpy(indptr).cuda(), torch.from_numpy(last).cuda()
    qo = np.arange(batch + 1, dtype=np.int32)
    qo_d = torch.from_numpy(qo).cuda()
    out = torch.empty_like(q)
    times: dict[str, Any] = {}
    outs: dict[str, Any] = {}
    with Workspace.allocate(0) as ws:
        plan = fi_ffi.batch_decode_plan(
            indptr, None, last, HEADS_Q, HEADS_KV, HEAD_DIM, PAGE, q_data_type=dtype, enable_cuda_graph=True,
            stream=s, workspace=ws,
        )  # fmt: skip

        def decode() -> None:
            fi_ffi.batch_decode_run(
                q, (k_cache, v_cache), kv_indptr=indptr_d, kv_indices=ids, kv_last_page_len=last_d, out=out,
                stream=s, plan=plan,
            )  # fmt: skip

        times["decode"] = graph_us(torch, stream, decode)
        outs["decode"] = out.float().clone()
    for backend in ("fa2", "fa3"):
        try:
            with Workspace.allocate(0) as ws:
                paged = fi_ffi.batch_prefill_paged_plan(
                    qo, indptr, None, last, HEADS_Q, HEADS_KV, HEAD_DIM, PAGE, q_data_type=dtype, causal=False,
                    backend=backend, enable_cuda_graph=True, stream=s, workspace=ws,
                )  # fmt: skip

                def prefill(paged: Any = paged) -> None:
                    fi_ffi.batch_prefill_paged_run(
                        q, (k_cache, v_cache), qo_indptr=qo_d, kv_indptr=indptr_d, kv_indices=ids,
                        kv_last_page_len=last_d, out=out, stream=s, plan=paged,
                    )  # fmt: skip

                times[backend] = graph_us(torch, stream, prefill)
                outs[backend] = out.float().clone()
        except Exception as exc:  # a module the wheels lack, a backend the device lacks: said, not timed
            times[backend] = f"{type(exc).__name__}: {str(exc)[:150]}"
    cells = ", ".join(f"{k} {v:.2f} us" if isinstance(v, float) else f"{k} {v}" for k, v in times.items())
    diffs = {k: float((v - outs["decode"]).abs().max()) for k, v in outs.items() if k != "decode"}
    return f"batch {batch} context {context}: {cells}; max |difference| from decode {diffs}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="8,32")
    ap.add_argument("--contexts", default="48,256,1024,4096")
    args = ap.parse_args()

    import torch
    from cuda.bindings import runtime as rt

    _, raw = rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking)
    s = int(raw)
    stream = torch.cuda.ExternalStream(s)
    for batch in (int(b) for b in args.batches.split(",")):
        for context in (int(c) for c in args.contexts.split(",")):
            print(one_case(batch, context, s, stream), flush=True)


if __name__ == "__main__":
    main()
