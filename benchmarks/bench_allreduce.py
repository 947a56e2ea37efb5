"""All-reduce latency on one host: NCCL vs vLLM's custom all-reduce vs the fused all-reduce (kAllReduce, and
kARResidualRMSNorm against NCCL + a separate RMSNorm), 8 KiB to 64 MiB, bfloat16, hidden 4096.

Run as N ranks (one per GPU): ``fi-ffi launch --nproc 4 -- python3 benchmarks/bench_allreduce.py``. Each size is
timed in interleaved rounds (every contender once per round, CUDA events around ``--iters`` calls on the same
stream); rank 0 prints the median microseconds per call and the ratio to NCCL. Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

for _name, _value in (
    ("NCCL_NVLS_ENABLE", "0"),
    ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
    ("NVSHMEM_DISABLE_NVLS", "1"),
):
    os.environ[_name] = _value

import torch  # noqa: E402

from fi_ffi.comm import Communicator  # noqa: E402
from fi_ffi.comm.trtllm_ar import AllReduceFusionPattern, AllReduceFusionWorkspace  # noqa: E402
from fi_ffi.comm.vllm_ar import CustomAllReduce  # noqa: E402

HIDDEN = 4096


def _contenders(
    comm: Communicator, car: CustomAllReduce, ws: AllReduceFusionWorkspace, tokens: int, gamma: torch.Tensor
) -> dict:
    """The calls timed for ``tokens`` x HIDDEN bfloat16 elements."""
    x = torch.randn(tokens, HIDDEN, device="cuda", dtype=torch.bfloat16)
    out, res_out, norm = (torch.empty_like(x) for _ in range(3))
    res = torch.zeros_like(x)

    def nccl_rmsnorm() -> None:
        comm.all_reduce(x, out)
        torch.add(out, res, out=res_out)
        torch.nn.functional.rms_norm(res_out, (HIDDEN,), gamma, 1e-6)

    def fused_rmsnorm() -> None:
        ws.allreduce_fusion(
            x,
            pattern=AllReduceFusionPattern.kARResidualRMSNorm,
            residual_in=res,
            residual_out=res_out,
            norm_out=norm,
            rms_gamma=gamma,
            rms_eps=1e-6,
        )

    return {
        "nccl": lambda: comm.all_reduce(x, out),
        "custom": lambda: car.all_reduce(x, out),
        "fused": lambda: ws.allreduce_fusion(x, allreduce_out=out),
        "nccl+rmsnorm": nccl_rmsnorm,
        "fused+rmsnorm": fused_rmsnorm,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--json", help="write the table here (rank 0)")
    args = parser.parse_args()
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    comm = Communicator.from_env()
    sizes = [8 << 10 << i for i in range(14)]  # 8 KiB .. 64 MiB
    max_tokens = sizes[-1] // (HIDDEN * 2)
    rows = []
    with (
        CustomAllReduce(comm, max_size=sizes[-1]) as car,
        AllReduceFusionWorkspace(comm, max_tokens, HIDDEN, torch.bfloat16) as ws,
    ):
        gamma = torch.ones(HIDDEN, device="cuda", dtype=torch.bfloat16)
        for size in sizes:
            contenders = _contenders(comm, car, ws, size // (HIDDEN * 2), gamma)
            times: dict[str, list[float]] = {k: [] for k in contenders}
            for fn in contenders.values():  # warm-up (and the launchers' first, checked call)
                fn()
            torch.cuda.synchronize()
            for _ in range(args.rounds):
                for name, fn in contenders.items():
                    comm.barrier()
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    for _ in range(args.iters):
                        fn()
                    end.record()
                    end.synchronize()
                    times[name].append(start.elapsed_time(end) * 1e3 / args.iters)
            rows.append({"bytes": size, **{k: statistics.median(v) for k, v in times.items()}})
    if comm.rank == 0:
        print(f"all-reduce, {comm.world_size} GPUs, bfloat16 (us per call, median of {args.rounds} rounds)")
        print(f"{'size':>8} {'nccl':>9} {'custom':>9} {'fused':>9} {'nccl+norm':>10} {'fused+norm':>11}  custom/nccl")
        for r in rows:
            size = f"{r['bytes'] >> 10} KiB" if r["bytes"] < 1 << 20 else f"{r['bytes'] >> 20} MiB"
            cells = [f"{r.get(k, float('nan')):9.1f}" for k in ("nccl", "custom", "fused")]
            cells += [f"{r.get('nccl+rmsnorm', float('nan')):10.1f}", f"{r.get('fused+rmsnorm', float('nan')):11.1f}"]
            print(f"{size:>8} {' '.join(cells)}  {r['custom'] / r['nccl']:.2f}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"world_size": comm.world_size, "rows": rows}, f, indent=1)
    comm.close()


if __name__ == "__main__":
    main()
