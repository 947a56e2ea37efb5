"""The all-reduce as the decode graph runs it: each contender captured ``--iters`` times into a CUDA graph and the
graph replayed, 8 KiB to 4 MiB, bfloat16, hidden 4096 (8 KiB = one token's hidden state in bfloat16... 4 MiB =
512 tokens). Contenders: NCCL, vLLM's custom all-reduce (graph-registered inputs: read in place, as in a graph),
the fused kernel's plain all-reduce (kAllReduce), and the two ways the engine adds the residual and normalizes:
NCCL + ``fused_add_rmsnorm`` (fi_ffi's kernel) against the fused kARResidualRMSNorm kernel.

Run as N ranks: ``fi-ffi launch --nproc 2 -- python3 benchmarks/bench_allreduce_graph.py [--max-mib 4]``.
Each size is timed in interleaved rounds (every contender's graph once per round, CUDA events around one replay
of ``--iters`` calls); rank 0 prints the median microseconds per call. Needs torch (graphs, events) and CuPy-free
fi_ffi. Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from collections.abc import Callable

for _name, _value in (
    ("NCCL_NVLS_ENABLE", "0"),
    ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
    ("NVSHMEM_DISABLE_NVLS", "1"),
):
    os.environ[_name] = _value

import torch  # noqa: E402

import fi_ffi  # noqa: E402
from fi_ffi.comm import Communicator  # noqa: E402
from fi_ffi.comm.trtllm_ar import AllReduceFusionPattern, AllReduceFusionWorkspace  # noqa: E402
from fi_ffi.comm.vllm_ar import CustomAllReduce  # noqa: E402

HIDDEN = 4096
NAMES = ("nccl", "custom", "fused", "nccl+add_rmsnorm", "fused+add_rmsnorm")


def _contenders(
    comm: Communicator, car: CustomAllReduce, ws: AllReduceFusionWorkspace, tokens: int
) -> tuple[dict[str, Callable[[], None]], dict[str, Callable[[], None]]]:
    """The calls captured for ``tokens`` x HIDDEN bfloat16 elements (every buffer made here, before capture), and
    their eager warm-up twins (the custom kernel reads a registered input only in a graph: staged eagerly)."""
    x = torch.randn(tokens, HIDDEN, device="cuda", dtype=torch.bfloat16)
    out, norm = torch.empty_like(x), torch.empty_like(x)
    res = torch.zeros_like(x)
    gamma = torch.ones(HIDDEN, device="cuda", dtype=torch.bfloat16)

    def nccl_add_rmsnorm() -> None:
        comm.all_reduce(x, out)
        fi_ffi.fused_add_rmsnorm(out, res, gamma, eps=1e-6)

    def fused_add_rmsnorm() -> None:
        ws.allreduce_fusion(
            x,
            pattern=AllReduceFusionPattern.kARResidualRMSNorm,
            residual_in=res,
            residual_out=res,
            norm_out=norm,
            rms_gamma=gamma,
            rms_eps=1e-6,
        )

    captured: dict[str, Callable[[], None]] = {
        "nccl": lambda: comm.all_reduce(x, out),
        "custom": lambda: car.all_reduce(x, out, registered=True),
        "fused": lambda: ws.allreduce_fusion(x, allreduce_out=out),
        "nccl+add_rmsnorm": nccl_add_rmsnorm,
        "fused+add_rmsnorm": fused_add_rmsnorm,
    }
    return captured, {**captured, "custom": lambda: car.all_reduce(x, out)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--iters", type=int, default=20, help="calls captured per graph")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--max-mib", type=int, default=4)
    parser.add_argument("--json", help="write the table here (rank 0)")
    args = parser.parse_args()
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    comm = Communicator.from_env()
    sizes = [8 << 10 << i for i in range(20) if (8 << 10 << i) <= args.max_mib << 20]
    rows = []
    with (
        CustomAllReduce(comm, max_size=sizes[-1]) as car,
        AllReduceFusionWorkspace(comm, sizes[-1] // (HIDDEN * 2), HIDDEN, torch.bfloat16) as ws,
    ):
        side = torch.cuda.Stream()
        for size in sizes:
            contenders, warm_up = _contenders(comm, car, ws, size // (HIDDEN * 2))
            graphs: dict[str, torch.cuda.CUDAGraph] = {}
            with torch.cuda.stream(side):
                for fn in warm_up.values():  # modules loaded, launchers' first (checked) calls
                    fn()
            torch.cuda.synchronize()
            for name, fn in contenders.items():
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, stream=side, capture_error_mode="thread_local"):
                    for _ in range(args.iters):
                        fn()
                graphs[name] = g
            car.register_graph_buffers()  # the custom kernel's captured inputs, on every rank
            torch.cuda.synchronize()
            comm.barrier()
            times: dict[str, list[float]] = {k: [] for k in graphs}
            for g in graphs.values():
                g.replay()
            torch.cuda.synchronize()
            for _ in range(args.rounds):
                for name, g in graphs.items():
                    comm.barrier()
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    g.replay()
                    end.record()
                    end.synchronize()
                    times[name].append(start.elapsed_time(end) * 1e3 / args.iters)
            rows.append({"bytes": size, **{k: statistics.median(v) for k, v in times.items()}})
            del graphs
    if comm.rank == 0:
        print(f"all-reduce in a CUDA graph, {comm.world_size} GPUs, bfloat16 (us per call, median of {args.rounds})")
        print(f"{'size':>8} " + " ".join(f"{n:>17}" for n in NAMES) + "  custom/nccl fused/nccl")
        for r in rows:
            size = f"{r['bytes'] >> 10} KiB" if r["bytes"] < 1 << 20 else f"{r['bytes'] >> 20} MiB"
            cells = " ".join(f"{r[n]:17.1f}" for n in NAMES)
            print(f"{size:>8} {cells}  {r['custom'] / r['nccl']:11.2f} {r['fused'] / r['nccl']:10.2f}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"world_size": comm.world_size, "rows": rows}, f, indent=1)
    comm.close()


if __name__ == "__main__":
    main()
