"""The GDN prefill test set-up shared by tests/ops/test_gpu_gdn.py and tests/ops/test_gpu_gdn_stress.py: random
problems,
the float32 gated-delta-rule reference, the tolerance check and the call (imports torch: GPU-gated modules only).

The reference runs the recurrence token by token in float32 (torch, TF32 off)::

    S = alpha_t * S;  S = S + beta_t * outer(v_t - S k_t, k_t);  o_t = scale * S q_t

with S of shape [V, K] (k-last), per state head, and the GQA/GVA head mapping of the kernel's tile scheduler.
Tolerance (:data:`TOL`), relative to the largest reference magnitude: ``max|got - ref| <= tol * max|ref|``, 1e-2
for float16 and 3e-2 for bfloat16 (tests/ops/test_gpu_gdn.py says why and what was measured).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fi_ffi.ops import gdn
from helpers.gpu import require_torch

torch = require_torch()  # imported by GPU test modules only: a skip naming the extra without it
F = torch.nn.functional

D = 128
TOL = {torch.float16: 1e-2, torch.bfloat16: 3e-2}


@dataclass
class Problem:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    cu_seqlens: torch.Tensor
    alpha: torch.Tensor | None
    beta: torch.Tensor | None
    input_state: torch.Tensor | None
    lens: list[int]

    @property
    def heads(self) -> int:
        return max(self.q.shape[1], self.v.shape[1])

    def outputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Fresh output and output_state buffers, filled with NaN so unwritten elements show."""
        out = torch.full((self.q.shape[0], self.heads, D), float("nan"), dtype=self.q.dtype, device="cuda")
        state = torch.full((len(self.lens), self.heads, D, D), float("nan"), dtype=torch.float32, device="cuda")
        return out, state


def make_problem(
    lens: list[int],
    hq: int,
    hk: int,
    hv: int,
    dtype: torch.dtype = torch.float16,
    *,
    seed: int = 0,
    alpha: bool = True,
    beta: bool = True,
    input_state: bool = True,
) -> Problem:
    g = torch.Generator(device="cuda").manual_seed(seed)
    s, hs = sum(lens), max(hq, hv)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, device="cuda")

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=g, device="cuda")

    q = F.normalize(randn(s, hq, D), dim=-1).to(dtype)
    k = F.normalize(randn(s, hk, D), dim=-1).to(dtype)
    v = randn(s, hv, D).to(dtype)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int64, device="cuda")
    return Problem(
        q,
        k,
        v,
        cu,
        0.8 + 0.2 * rand(s, hs) if alpha else None,
        0.1 + 0.8 * rand(s, hs) if beta else None,
        0.1 * randn(len(lens), hs, D, D) if input_state else None,
        list(lens),
    )


def head_maps(hq: int, hv: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each state head: the q, k and v head it reads (the kernel's tile scheduler mapping)."""
    hs = max(hq, hv)
    h = torch.arange(hs, device="cuda")
    if hq >= hv:  # GQA
        kv = h // (hq // hv)
        return h, kv, kv
    qk = h // (hv // hq)
    return qk, qk, h


def reference(
    p: Problem, scale: float | None = None, input_state: torch.Tensor | None = None, use_input_state: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 gated delta rule, token by token: (output [S, Hs, D], final states [N, Hs, V, K])."""
    torch.backends.cuda.matmul.allow_tf32 = False
    hq, hv = p.q.shape[1], p.v.shape[1]
    qi, ki, vi = head_maps(hq, hv)
    q, k, v = p.q.float()[:, qi], p.k.float()[:, ki], p.v.float()[:, vi]  # [S, Hs, D]
    s, hs = q.shape[0], q.shape[1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    alpha = p.alpha if p.alpha is not None else torch.ones(s, hs, device="cuda")
    beta = p.beta if p.beta is not None else torch.ones(s, hs, device="cuda")
    init = input_state if input_state is not None else (p.input_state if use_input_state else None)
    out = torch.empty(s, hs, D, device="cuda")
    states = torch.empty(len(p.lens), hs, D, D, device="cuda")
    start = 0
    for n, length in enumerate(p.lens):
        st = init[n].clone() if init is not None else torch.zeros(hs, D, D, device="cuda")
        for t in range(start, start + length):
            st = alpha[t][:, None, None] * st
            u = v[t] - torch.einsum("hvk,hk->hv", st, k[t])
            st = st + beta[t][:, None, None] * u[:, :, None] * k[t][:, None, :]
            out[t] = scale * torch.einsum("hvk,hk->hv", st, q[t])
        states[n] = st
        start += length
    return out, states


def assert_close(what: str, got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    got = got.float()
    assert torch.isfinite(got).all(), f"{what}: non-finite values (unwritten elements are NaN)"
    err = (got - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= TOL[dtype] * scale, f"{what}: max error {err:.3e} > {TOL[dtype]} * max|ref| {scale:.3e}"


def workspace(device_id: int = 0) -> torch.Tensor:
    return torch.empty(gdn.gdn_workspace_size(device_id), dtype=torch.uint8, device=f"cuda:{device_id}")


def run(
    p: Problem, ws: torch.Tensor, *, scale: float | None = None, use_input_state: bool = True, stream: object = None
) -> tuple[torch.Tensor, torch.Tensor]:
    out, state = p.outputs()
    if isinstance(stream, torch.cuda.Stream):
        stream.wait_stream(torch.cuda.current_stream())  # the NaN fill above runs on the current stream
    result = gdn.gdn_prefill(
        p.q,
        p.k,
        p.v,
        cu_seqlens=p.cu_seqlens,
        output=out,
        output_state=state,
        workspace=ws,
        initial_state=p.input_state if use_input_state else None,
        g=p.alpha,
        beta=p.beta,
        scale=scale,
        stream=stream,
    )
    assert result[0] is out and result[1] is state
    return out, state
