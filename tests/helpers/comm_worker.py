"""One rank of the multi-GPU communication tests (started by tests/comm/test_gpu_comm.py through ``fi-ffi launch``).

``python tests/helpers/comm_worker.py SCENARIO``: runs the scenario's checks on GPU ``LOCAL_RANK`` against NCCL's
all-reduce of the same data (and float32 references for the fused patterns), prints one ``FAIL ...`` line per
failed check and ``rank R OK N`` at the end; exits 1 when anything failed. Uses torch for tensors and references
(fi_ffi itself is torch-free).
"""

from __future__ import annotations

import os
import sys
import traceback

for _name, _value in (
    ("NCCL_NVLS_ENABLE", "0"),
    ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
    ("NVSHMEM_DISABLE_NVLS", "1"),
):
    os.environ[_name] = _value  # NVLink multicast stays off in every rank, whoever started it

import torch  # noqa: E402

from fi_ffi.comm import Communicator  # noqa: E402

HIDDEN = 4096
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# tolerance of a kernel's sum against NCCL's sum of the same data (values ~N(0, 1), up to 4 ranks)
ATOL = {torch.bfloat16: 0.1, torch.float16: 0.02, torch.float32: 1e-4}
failures: list[str] = []
checks = 0


def check(name: str, ok: bool, detail: str = "") -> None:
    global checks
    checks += 1
    if not ok:
        failures.append(name)
        print(f"FAIL rank {RANK}: {name} {detail}", flush=True)


def close(name: str, got: torch.Tensor, want: torch.Tensor, atol: float | torch.Tensor, rtol: float = 0.02) -> None:
    """Check ``|got - want| <= atol + rtol * |want|`` elementwise (NaN counts as outside); ``atol`` may be a tensor
    of per-element bounds. A failure names the numbers: the largest difference and where, how many elements are
    outside, and the worst few (index, got, want)."""
    if tuple(got.shape) != tuple(want.shape):
        check(name, False, f"shape {tuple(got.shape)} != reference shape {tuple(want.shape)}")
        return
    got, want = got.float(), want.float()
    diff = (got - want).abs()
    allowed = atol + rtol * want.abs()
    bad = ~(diff <= allowed)  # NaN in got or want fails too
    if not bool(bad.any()):
        check(name, True)
        return
    flat_diff = torch.nan_to_num(diff.flatten(), nan=float("inf"))
    worst = int(flat_diff.argmax())
    excess = torch.nan_to_num((diff - allowed).flatten(), nan=float("inf"))
    top = excess.topk(min(4, int(bad.sum()))).indices.tolist()
    flat_got, flat_want = got.flatten(), want.flatten()
    samples = ", ".join(
        f"{_where(i, got.shape)} got {flat_got[i].item():.6g} want {flat_want[i].item():.6g}" for i in top
    )
    tol_text = "per-element atol" if isinstance(atol, torch.Tensor) else f"atol {atol:g}"
    check(
        name,
        False,
        f"max diff {flat_diff[worst].item():.4g} at {_where(worst, got.shape)} (got {flat_got[worst].item():.6g}, "
        f"want {flat_want[worst].item():.6g}); {int(bad.sum())} of {bad.numel()} outside {tol_text} + rtol {rtol:g}"
        f"*|want|; worst: {samples}",
    )


def _where(flat_index: int, shape: torch.Size) -> tuple[int, ...]:
    """The index tuple of element ``flat_index`` of a contiguous tensor of ``shape``."""
    where = []
    for extent in reversed(shape):
        flat_index, i = divmod(flat_index, extent)
        where.append(i)
    return tuple(reversed(where))


def e4m3_half_step(v: torch.Tensor) -> torch.Tensor:
    """Half the spacing of float8 e4m3 numbers around ``v`` (float32): e4m3 keeps 3 mantissa bits, so in the binade
    [2**e, 2**(e+1)) the spacing is 2**(e-3); below the smallest normal 2**-6 the subnormal spacing is 2**-9. A
    correctly rounded conversion of ``v`` lies within this of ``v``."""
    binade = (v.float().abs().clamp(min=2.0**-6).view(torch.int32) & 0x7F800000).view(torch.float32)  # 2**e, exact
    return binade * 2.0**-4


def data(tokens: int, hidden: int, dtype: torch.dtype, salt: int) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(1000 * salt + 17 * RANK + tokens)
    return torch.randn(tokens, hidden, device="cuda", generator=g, dtype=torch.float32).to(dtype)


def nccl_sum(comm: Communicator, x: torch.Tensor) -> torch.Tensor:
    out = x.clone()
    comm.all_reduce(out)
    return out


def rmsnorm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w.float()


# ---- scenarios -------------------------------------------------------------------------------------------------------


def scenario_nccl(comm: Communicator) -> None:
    x = torch.full((1000,), float(RANK + 1), device="cuda")
    comm.all_reduce(x)
    torch.cuda.synchronize()
    want = comm.world_size * (comm.world_size + 1) / 2
    check("all_reduce sum", bool((x == want).all()), f"{x[0].item()} != {want}")
    gathered = torch.empty(comm.world_size * 3, device="cuda", dtype=torch.int32)
    comm.all_gather(torch.full((3,), RANK, device="cuda", dtype=torch.int32), gathered)
    torch.cuda.synchronize()
    check(
        "all_gather", gathered.tolist() == [r for r in range(comm.world_size) for _ in range(3)], str(gathered.tolist())
    )
    b = torch.full((5,), float(RANK), device="cuda")
    comm.broadcast(b, root=comm.world_size - 1)
    torch.cuda.synchronize()
    check("broadcast", bool((b == comm.world_size - 1).all()))
    got = comm.all_gather_bytes(f"rank{RANK}".encode())
    check("all_gather_bytes", got == [f"rank{r}".encode() for r in range(comm.world_size)], repr(got))
    comm.barrier()


def _sizes(dtype: torch.dtype) -> list[int]:
    """Token counts of HIDDEN elements: 1 token (8 KiB in bf16), odd counts, up to 64 MiB."""
    top = (64 << 20) // (HIDDEN * torch.empty((), dtype=dtype).element_size())
    return [1, 3, 17, 255, 1023, top]


def scenario_custom(comm: Communicator) -> None:
    from fi_ffi.comm.vllm_ar import CustomAllReduce

    with CustomAllReduce(comm, max_size=64 << 20) as car:
        for dname, dtype in DTYPES.items():
            for tokens in _sizes(dtype):
                x = data(tokens, HIDDEN, dtype, 1)
                out = torch.empty_like(x)
                car.all_reduce(x, out)
                want = nccl_sum(comm, x)
                torch.cuda.synchronize()
                close(f"custom {dname} {tokens} tokens", out, want, ATOL[dtype])
        # CUDA graph: capture with the input read in place, register, replay with new data
        x = data(9, HIDDEN, torch.bfloat16, 2)
        out = torch.empty_like(x)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            car.all_reduce(x, out)  # warm-up (eager, staged) before capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            car.all_reduce(x, out, registered=True)
        registered = car.register_graph_buffers()
        check("graph buffers registered", registered == 1, str(registered))
        for step in range(3):
            x.copy_(data(9, HIDDEN, torch.bfloat16, 10 + step))
            graph.replay()
            want = nccl_sum(comm, x)
            torch.cuda.synchronize()
            close(f"custom graph replay {step}", out, want, ATOL[torch.bfloat16])
        del graph
    check("custom closed", car.closed)


def _fusion_cases(comm: Communicator, ws, dtype: torch.dtype, tokens: int, oneshot: bool, graph: bool = False) -> None:
    from fi_ffi.comm.trtllm_ar import AllReduceFusionPattern as P

    dname = str(dtype).removeprefix("torch.")
    tag = f"fusion {dname} {tokens} tokens {'oneshot' if oneshot else 'twoshot'}"
    eps = 1e-6
    x = data(tokens, HIDDEN, dtype, 3)
    residual = data(tokens, HIDDEN, dtype, 4)  # this rank's residual: each rank adds its own
    gamma = (1 + 0.1 * data(1, HIDDEN, dtype, 5)[0]).contiguous()
    # The reference sums the ranks' inputs in float32: NCCL's ring sums in the tensor's dtype and rounds every
    # partial sum (3 roundings at 4 ranks, up to ~1.5 bfloat16 steps of the partial sums' magnitude), which is
    # reference noise, not kernel error; the kernel adds in float32 (fp32_acc) and rounds once.
    total = nccl_sum(comm, x.float())
    ref_residual = total + residual.float()
    ref_norm = rmsnorm(ref_residual, gamma, eps)
    tol = ATOL[dtype]
    # kAllReduce
    out = torch.empty_like(x)
    ws.allreduce_fusion(x, pattern=P.kAllReduce, allreduce_out=out, use_oneshot=oneshot, fp32_acc=True)
    torch.cuda.synchronize()
    close(f"{tag} kAllReduce", out, total, tol)
    # kARResidualRMSNorm
    residual_out, norm_out = torch.empty_like(x), torch.empty_like(x)
    ws.allreduce_fusion(
        x,
        pattern=P.kARResidualRMSNorm,
        residual_in=residual,
        residual_out=residual_out,
        norm_out=norm_out,
        rms_gamma=gamma,
        rms_eps=eps,
        use_oneshot=oneshot,
        fp32_acc=True,
    )
    torch.cuda.synchronize()
    close(f"{tag} residual", residual_out, ref_residual, tol)
    close(f"{tag} rmsnorm", norm_out, ref_norm, 2 * tol, 0.03)
    if dtype == torch.float32:
        return
    # FP8 quantized output (kARResidualRMSNormOutFP8Quant: norm_out and quant_out). The kernel quantizes the
    # dtype-rounded norm output it also writes: quant = e4m3(norm_out * (1 / scale_factor)), round to nearest,
    # saturating at +-448, every token on every rank.
    inv_scale = 2.0
    scale = torch.tensor([1 / inv_scale], device="cuda", dtype=torch.float32)
    quant = torch.empty(tokens, HIDDEN, device="cuda", dtype=torch.float8_e4m3fn)
    norm_out2 = torch.empty_like(x)
    ws.allreduce_fusion(
        x,
        pattern=P.kARResidualRMSNormOutFP8Quant,
        residual_in=residual,
        residual_out=residual_out,
        norm_out=norm_out2,
        quant_out=quant,
        rms_gamma=gamma,
        rms_eps=eps,
        scale_factor=scale,
        use_oneshot=oneshot,
        fp32_acc=True,
    )
    torch.cuda.synchronize()
    close(f"{tag} fp8 norm_out", norm_out2, ref_norm, 2 * tol, 0.03)
    # the quantization itself, exactly: quant_out is a nearest e4m3 value of this call's norm_out / scale, i.e.
    # within half an e4m3 step of it (no slack: the product by 2 and the e4m3 grid are exact in float32)
    scaled = (norm_out2.float() * inv_scale).clamp(-448, 448)
    close(f"{tag} fp8 quant rounding", quant, scaled, e4m3_half_step(scaled), 0.0)
    # against the float32 reference, with v = norm_out / scale: |quant - want| <= |quant - v| + |v - want|. The first
    # term is e4m3's rounding, at most half a step of v: |v| / 16 for normals (3 mantissa bits), 2**-10 below 2**-6;
    # the second is norm_out's tolerance above in quantized units, (2 tol + 0.03 |ref_norm|) / scale. With
    # |v| <= |want| + that second term, the bound is (2 tol / scale) * 17/16 + 2**-10 + (0.03 * 17/16 + 1/16) |want|.
    want = (ref_norm * inv_scale).clamp(-448, 448)
    close(f"{tag} fp8 quant", quant, want, 2 * tol * inv_scale * 17 / 16 + 2.0**-10, 0.03 * 17 / 16 + 1 / 16)
    if not graph:
        return
    # CUDA graph: capture the fused call, replay with new inputs
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, stream=side):
        ws.allreduce_fusion(
            x,
            pattern=P.kARResidualRMSNorm,
            residual_in=residual,
            residual_out=residual_out,
            norm_out=norm_out,
            rms_gamma=gamma,
            rms_eps=eps,
            use_oneshot=oneshot,
            fp32_acc=True,
        )
    for step in range(3):
        x.copy_(data(tokens, HIDDEN, dtype, 20 + step))
        g.replay()
        total = nccl_sum(comm, x.float())
        torch.cuda.synchronize()
        ref_residual = total + residual.float()
        close(f"{tag} graph replay {step} residual", residual_out, ref_residual, tol)
        close(f"{tag} graph replay {step} rmsnorm", norm_out, rmsnorm(ref_residual, gamma, eps), 2 * tol, 0.03)
    del g


def scenario_fusion(comm: Communicator) -> None:
    from fi_ffi.comm.trtllm_ar import AllReduceFusionWorkspace

    for dtypes, max_tokens in (((torch.bfloat16, torch.float16), 8192), ((torch.float32,), 4096)):
        with AllReduceFusionWorkspace(comm, max_tokens, HIDDEN, dtypes[0]) as ws:
            for dtype in dtypes:
                for tokens in _sizes(dtype):
                    _fusion_cases(comm, ws, dtype, tokens, oneshot=True)
                    if tokens > comm.world_size:
                        _fusion_cases(comm, ws, dtype, tokens, oneshot=False)
            _fusion_cases(comm, ws, dtypes[0], 33, oneshot=True, graph=True)
            _fusion_cases(comm, ws, dtypes[0], 33, oneshot=False, graph=True)


def scenario_moe_finalize(comm: Communicator) -> None:
    from fi_ffi.comm.trtllm_ar import AllReduceFusionWorkspace, trtllm_moe_finalize_allreduce_fusion

    top_k, eps = 2, 1e-6
    with AllReduceFusionWorkspace(comm, 256, HIDDEN, torch.bfloat16) as ws:
        for tokens in (1, 7, 128):
            dtype = torch.bfloat16
            rows = tokens * top_k
            allreduce_in = data(rows, HIDDEN, dtype, 30)
            g = torch.Generator(device="cuda").manual_seed(7 + tokens)
            idx = torch.randperm(rows, device="cuda", generator=g).to(torch.int32).view(tokens, top_k)
            scale = (torch.rand(tokens, top_k, device="cuda", generator=g) + 0.5).to(dtype)
            shared = data(tokens, HIDDEN, dtype, 31)
            residual = data(tokens, HIDDEN, dtype, 32)
            gamma = (1 + 0.1 * data(1, HIDDEN, dtype, 33)[0]).contiguous()
            norm_out, residual_out = torch.empty_like(residual), torch.empty_like(residual)
            trtllm_moe_finalize_allreduce_fusion(
                allreduce_in,
                residual,
                gamma,
                idx,
                norm_out,
                residual_out,
                ws,
                False,
                comm.rank,
                comm.world_size,
                eps,
                shared,
                scale,
            )
            local = (allreduce_in.float()[idx.long()] * scale.float().unsqueeze(-1)).sum(1) + shared.float()
            total = nccl_sum(comm, local)
            torch.cuda.synchronize()
            ref_residual = total + residual.float()
            close(f"moe finalize {tokens} tokens residual", residual_out, ref_residual, 0.15)
            close(f"moe finalize {tokens} tokens rmsnorm", norm_out, rmsnorm(ref_residual, gamma, eps), 0.15, 0.03)


def scenario_moe_reduction(comm: Communicator) -> None:
    from fi_ffi.comm.trtllm_ar import AllReduceFusionWorkspace, trtllm_moe_allreduce_fusion

    experts, eps = 3, 1e-6
    dtype = torch.bfloat16
    with AllReduceFusionWorkspace(comm, 256, HIDDEN, dtype) as ws:
        for tokens in (1, 7, 128):
            active = data(experts * tokens, HIDDEN, dtype, 40).view(experts, tokens, HIDDEN)
            g = torch.Generator(device="cuda").manual_seed(11 + tokens + RANK)
            scales = torch.rand(experts, tokens, device="cuda", generator=g) + 0.5
            token_input = data(tokens, HIDDEN, dtype, 41)
            residual = data(tokens, HIDDEN, dtype, 42)
            gamma = (1 + 0.1 * data(1, HIDDEN, dtype, 43)[0]).contiguous()
            ar_out, residual_out, norm_out = (torch.empty_like(residual) for _ in range(3))
            trtllm_moe_allreduce_fusion(
                comm.world_size,
                comm.rank,
                tokens,
                HIDDEN,
                ws,
                False,
                residual,
                gamma,
                eps,
                1.0,
                experts,
                scales,
                active,
                token_input,
                None,
                ar_out,
                residual_out,
                norm_out,
                None,
                None,
            )
            local = (active.float() * scales.unsqueeze(-1)).sum(0) + token_input.float()
            total = nccl_sum(comm, local)
            torch.cuda.synchronize()
            ref_residual = total + residual.float()
            close(f"moe reduction {tokens} tokens all-reduce", ar_out, total, 0.15)
            close(f"moe reduction {tokens} tokens residual", residual_out, ref_residual, 0.15)
            close(f"moe reduction {tokens} tokens rmsnorm", norm_out, rmsnorm(ref_residual, gamma, eps), 0.15, 0.03)


SCENARIOS = {
    "nccl": scenario_nccl,
    "custom": scenario_custom,
    "fusion": scenario_fusion,
    "moe_finalize": scenario_moe_finalize,
    "moe_reduction": scenario_moe_reduction,
}


if __name__ == "__main__":
    RANK = int(os.environ["RANK"])
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    comm = Communicator.from_env(timeout=120)
    try:
        for name in sys.argv[1:]:
            try:
                SCENARIOS[name](comm)
            except Exception:
                failures.append(name)
                print(f"FAIL rank {RANK}: {name} raised", flush=True)
                traceback.print_exc()
                sys.stdout.flush()
                raise
        line = f"rank {RANK} OK {checks} checks ({comm.backend})" if not failures else f"rank {RANK} FAILED {failures}"
        sys.stdout.flush()
        os.write(1, (line + "\n").encode())  # one write, atomic on the pipe the ranks share: no interleaved lines
    finally:
        comm.close()
        comm.close()  # the second close does nothing
    sys.exit(1 if failures else 0)
else:
    RANK = -1
