"""Batch decode: host time per call of fi_ffi's ``plan``/``run`` against flashinfer-python and tvm_ffi, and GPU time.

Problem (the decode hot path of a small model step, where the host is the bottleneck): batch 1, 32 query / 8 KV
heads, head_dim 128, page size 16, 16 cached tokens, float16, NHD.

Contenders, all on the same prebuilt module of the pinned kernel wheel:

- ``fi_ffi``: :func:`fi_ffi.ops.attention.decode.batch_decode_plan` / ``batch_decode_run`` with descriptors made once
  (what a runtime holds), and with torch tensors converted on every call;
- ``flashinfer``: ``BatchDecodeWithPagedKVCacheWrapper.plan`` (host indptr/last_page_len) and ``.run``;
- ``tvm_ffi``: the Cython ``tvm_ffi.load_module(...).plan`` / ``.run`` with torch tensors (no wrapper).

Host time: wall time of issuing ``--calls`` calls without synchronizing, divided by the count; the best of
``--rounds`` rounds (the GPU is drained between rounds, so no call waits on a full launch queue). GPU time: a
CUDA graph of 100 runs per contender replayed ``--replays`` times, timed with CUDA events (so launch gaps do
not count). A contender that is not installed prints "unavailable".

Run on the GPU machine from the project root (see ../shared/gpu/peer_baseline.py for installing the peers)::

    python benchmarks/bench_decode.py [--json PATH]

Goals: fi_ffi run and plan host time <= 0.5x flashinfer's; kernel time within 3%.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

B, HQ, HK, D, PAGE, TOKENS = 1, 32, 8, 128, 16, 16
PDL = False


def host_us(fn: Callable[[], Any], calls: int, rounds: int, sync: Callable[[], None]) -> float:
    for _ in range(min(200, calls)):
        fn()
    sync()
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, time.perf_counter() - t)
        sync()
    return best / calls * 1e6


def graph_us(torch: Any, make: Callable[[int], Callable[[], Any]], replays: int, per_graph: int = 100) -> float:
    """GPU time per call of ``make(stream)()`` (a call issuing work on ``stream``) from a CUDA graph of calls."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    fn = make(s.cuda_stream)
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, stream=s):
        for _ in range(per_graph):
            fn()
    g.replay()
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(replays):
        g.replay()
    e1.record()
    torch.cuda.synchronize()
    return e0.elapsed_time(e1) * 1e3 / replays / per_graph


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=500, help="calls per timed round")
    ap.add_argument("--rounds", type=int, default=20, help="timed rounds (best is reported)")
    ap.add_argument("--replays", type=int, default=50, help="CUDA graph replays for the GPU time")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = ap.parse_args(argv)

    import numpy as np
    import torch

    import fi_ffi
    import fi_ffi.abi.cdefs
    from fi_ffi.ops.attention import decode
    from fi_ffi.ops.attention.workspace import Workspace

    dev = "cuda"
    dt = torch.float16
    global PDL
    PDL = torch.cuda.get_device_capability()[0] >= 9  # flashinfer's default: programmatic dependent launch on SM90+
    torch.manual_seed(0)
    pages = -(-TOKENS // PAGE)
    kv = torch.randn(64, 2, PAGE, HK, D, dtype=dt, device=dev)
    k_cache, v_cache = kv[:, 0], kv[:, 1]  # views of one combined cache, identical strides
    q = torch.randn(B, HQ, D, dtype=dt, device=dev)
    out = torch.empty_like(q)
    indptr_h = np.array([0, pages], np.int32)
    last_h = np.array([TOKENS - (pages - 1) * PAGE], np.int32)
    indptr_d = torch.from_numpy(indptr_h).to(dev)
    indices_d = torch.arange(pages, dtype=torch.int32, device=dev)
    last_d = torch.from_numpy(last_h).to(dev)
    sync = torch.cuda.synchronize
    stream = torch.cuda.current_stream().cuda_stream
    rows: list[dict[str, Any]] = []
    outputs: dict[str, Any] = {}

    def record(
        name: str, what: str, fn: Callable[[], Any] | None, gpu: Callable[[int], Callable[[], Any]] | None = None
    ) -> None:
        row: dict[str, Any] = {"contender": name, "call": what}
        if fn is None:
            row["status"] = "unavailable"
        else:
            try:
                row["host_us"] = host_us(fn, args.calls, args.rounds, sync)
                if gpu is not None:
                    row["gpu_us"] = graph_us(torch, gpu, args.replays)
                row["status"] = "ok"
            except Exception as exc:  # report, keep going
                traceback.print_exc(limit=3)
                row["status"] = f"failed: {type(exc).__name__}: {exc}"[:200]
        rows.append(row)

    # -------------------------------------------------------------------------------------------- fi_ffi
    ws = Workspace.allocate(0)
    as_t = fi_ffi.as_tensor
    d_q, d_k, d_v, d_indptr, d_indices, d_last, d_out = (
        as_t(x) for x in (q, k_cache, v_cache, indptr_d, indices_d, last_d, out)
    )
    d_kv = (d_k, d_v)  # made once, as the descriptors: the timed calls allocate nothing of their own
    plan = decode.batch_decode_plan(
        indptr_h, None, last_h, HQ, HK, D, PAGE, q_data_type="float16", stream=stream, workspace=ws
    )
    decode.batch_decode_run(
        d_q,
        d_kv,
        kv_indptr=d_indptr,
        kv_indices=d_indices,
        kv_last_page_len=d_last,
        out=d_out,
        enable_pdl=PDL,
        stream=stream,
        plan=plan,
    )
    sync()
    outputs["fi_ffi"] = out.clone()

    def ours(s: int) -> Callable[[], Any]:
        return lambda: decode.batch_decode_run(
            d_q,
            d_kv,
            kv_indptr=d_indptr,
            kv_indices=d_indices,
            kv_last_page_len=d_last,
            out=d_out,
            enable_pdl=PDL,
            stream=s,
            plan=plan,
        )

    kv_pair = (k_cache, v_cache)

    def ours_run_torch() -> None:
        decode.batch_decode_run(
            q,
            kv_pair,
            kv_indptr=indptr_d,
            kv_indices=indices_d,
            kv_last_page_len=last_d,
            out=out,
            enable_pdl=PDL,
            stream=stream,
            plan=plan,
        )

    record("fi_ffi", "run (descriptors)", ours(stream), gpu=ours)
    record("fi_ffi", "run (torch tensors)", ours_run_torch)
    # With TVM-FFI's current stream set once on this thread, stream=None runs there with no set/restore.
    from fi_ffi.abi.runtime import api

    api().TVMFFIEnvSetStream(2, 0, stream, fi_ffi.abi.cdefs.get_ffi().NULL)
    record(
        "fi_ffi",
        "run (stream=None)",
        lambda: decode.batch_decode_run(
            d_q,
            d_kv,
            kv_indptr=d_indptr,
            kv_indices=d_indices,
            kv_last_page_len=d_last,
            out=d_out,
            enable_pdl=PDL,
            plan=plan,
        ),
    )

    def ours_plan() -> None:
        decode.batch_decode_plan(indptr_h, None, last_h, HQ, HK, D, PAGE, stream=stream, workspace=ws)

    record("fi_ffi", "plan", ours_plan)
    plan = decode.batch_decode_plan(indptr_h, None, last_h, HQ, HK, D, PAGE, stream=stream, workspace=ws)

    # -------------------------------------------------------------------------------------------- flashinfer
    try:
        import flashinfer.decode as fdec

        fws = torch.zeros(128 << 20, dtype=torch.uint8, device=dev)
        wr = fdec.BatchDecodeWithPagedKVCacheWrapper(fws, "NHD")
        indptr_c, last_c = torch.from_numpy(indptr_h), torch.from_numpy(last_h)
        wr.plan(indptr_c, indices_d, last_c, HQ, HK, D, PAGE, q_data_type=dt)
        fout = torch.empty_like(q)
        wr.run(q, (k_cache, v_cache), out=fout, enable_pdl=PDL)
        sync()
        outputs["flashinfer"] = fout.clone()
        record(
            "flashinfer",
            "run",
            lambda: wr.run(q, (k_cache, v_cache), out=fout, enable_pdl=PDL),
            gpu=lambda s: lambda: wr.run(q, (k_cache, v_cache), out=fout, enable_pdl=PDL),
        )
        record("flashinfer", "plan", lambda: wr.plan(indptr_c, indices_d, last_c, HQ, HK, D, PAGE, q_data_type=dt))
    except Exception:
        traceback.print_exc(limit=3)
        record("flashinfer", "run", None)
        record("flashinfer", "plan", None)

    # -------------------------------------------------------------------------------------------- tvm_ffi
    try:
        import tvm_ffi

        from fi_ffi import loader

        mod = tvm_ffi.load_module(str(loader.module_path(plan.uri)))
        tws = torch.zeros(128 << 20, dtype=torch.uint8, device=dev)
        tiws = torch.empty(8 << 20, dtype=torch.uint8, device=dev)
        tpin = torch.empty(8 << 20, dtype=torch.uint8, pin_memory=True)
        indptr_c = torch.from_numpy(indptr_h)
        eq, ek = torch.empty(0, dtype=dt), torch.empty(0, dtype=dt)
        sm = D**-0.5

        def t_plan() -> Any:
            return mod.plan(tws, tiws, tpin, indptr_c, B, HQ, HK, PAGE, False, -1, 0.0, D, D, eq, ek)

        info = t_plan()
        tout = torch.empty_like(q)

        def t_run() -> None:
            mod.run(
                tws,
                tiws,
                info,
                q,
                k_cache,
                v_cache,
                indptr_d,
                indices_d,
                last_d,
                tout,
                None,
                0,
                -1,
                PDL,
                None,
                0.0,
                sm,
                1.0,
                1e-4,
            )

        t_run()
        sync()
        outputs["tvm_ffi"] = tout.clone()
        record("tvm_ffi", "run", t_run, gpu=lambda s: t_run)
        record("tvm_ffi", "plan", t_plan)
    except Exception:
        traceback.print_exc(limit=3)
        record("tvm_ffi", "run", None)
        record("tvm_ffi", "plan", None)

    # -------------------------------------------------------------------------------------------- report
    ref = outputs["fi_ffi"]
    agree = {k: bool(torch.equal(v, ref)) for k, v in outputs.items()}
    base = {r["call"].split(" ")[0]: r for r in rows if r["contender"] == "flashinfer" and "host_us" in r}
    print(
        f"\nbatch decode, batch {B}, heads {HQ}/{HK}, head_dim {D}, page {PAGE}, {TOKENS} tokens, float16 "
        f"({torch.cuda.get_device_name()})"
    )
    print(f"{'contender':<11} {'call':<22} {'host us/call':>13} {'vs flashinfer':>14} {'gpu us/run':>11}")
    for r in rows:
        if r["status"] != "ok":
            print(f"{r['contender']:<11} {r['call']:<22} {r['status']:>13}")
            continue
        b = base.get(r["call"].split(" ")[0])
        ratio = f"{r['host_us'] / b['host_us']:.2f}x" if b else "-"
        r["host_vs_flashinfer"] = r["host_us"] / b["host_us"] if b else None
        gpu = f"{r['gpu_us']:.2f}" if "gpu_us" in r else ""
        print(f"{r['contender']:<11} {r['call']:<22} {r['host_us']:>13.2f} {ratio:>14} {gpu:>11}")
    ours_gpu = next((r.get("gpu_us") for r in rows if r["call"] == "run (descriptors)"), None)
    print(f"enable_pdl={PDL} for every contender")
    fi_gpu = base.get("run", {}).get("gpu_us")
    goals = {}
    if ours_gpu and fi_gpu:
        goals["kernel_time_ratio"] = ours_gpu / fi_gpu
        print(f"kernel time fi_ffi / flashinfer: {ours_gpu / fi_gpu:.3f} (goal within 3%)")
    for call in ("run", "plan"):
        ours = next(
            (r for r in rows if r["contender"] == "fi_ffi" and r["call"].startswith(call) and "host_us" in r), None
        )
        if ours and call in base:
            goals[f"{call}_host_ratio"] = ours["host_us"] / base[call]["host_us"]
            print(f"{call} host time fi_ffi / flashinfer: {goals[f'{call}_host_ratio']:.2f} (goal <= 0.5)")
    print("outputs identical to fi_ffi's:", agree)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "problem": {
                        "batch": B,
                        "num_qo_heads": HQ,
                        "num_kv_heads": HK,
                        "head_dim": D,
                        "page_size": PAGE,
                        "tokens": TOKENS,
                        "dtype": "float16",
                        "device": torch.cuda.get_device_name(),
                    },
                    "rows": rows,
                    "goals": goals,
                    "outputs_identical": agree,
                },
                f,
                indent=2,
            )
    plan.release()
    ws.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
