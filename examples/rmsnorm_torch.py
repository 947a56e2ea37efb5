"""RMSNorm and the fused residual form on torch tensors, with descriptors made once for the hot loop.

python examples/rmsnorm_torch.py              # exits 1 if a result differs from torch

Needs: torch with CUDA (python -m pip install torch) and an NVIDIA GPU that the pinned kernel wheels cover
(`fi-ffi doctor` says); the first run fetches the pinned wheels (1-2 GB) unless cached. Without torch or a GPU it
says which is missing and exits 2.
"""

from __future__ import annotations

import sys

try:
    import torch
except ImportError:  # said in main(), not as a traceback
    torch = None

import fi_ffi


def reference(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) * w.float()


def main() -> int:
    if torch is None:
        print(f"{sys.argv[0]}: needs torch (python -m pip install torch)", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print(
            f"{sys.argv[0]}: needs torch with CUDA and an NVIDIA GPU (torch {torch.__version__} sees none; "
            "`fi-ffi doctor` shows what this machine has)",
            file=sys.stderr,
        )
        return 2
    eps = 1e-6
    x = torch.randn(16, 2048, dtype=torch.bfloat16, device="cuda")
    w = torch.randn(2048, dtype=torch.bfloat16, device="cuda")
    out = torch.empty_like(x)
    stream = torch.cuda.current_stream()

    # Any DLPack producer works directly...
    fi_ffi.rmsnorm(x, w, out=out, eps=eps, stream=stream)
    torch.cuda.synchronize()
    err_direct = (out.float() - reference(x, w, eps)).abs().max().item()

    # ...but a runtime makes descriptors once and reuses them every step (no per-call conversion).
    h, residual = torch.randn_like(x), torch.randn_like(x)
    summed = h.float() + residual.float()
    hd, rd, wd = fi_ffi.as_tensor(h), fi_ffi.as_tensor(residual), fi_ffi.as_tensor(w)
    with fi_ffi.stream_scope(stream):
        fi_ffi.fused_add_rmsnorm(hd, rd, wd, eps=eps)  # in place: residual += h; h = rmsnorm(residual)
    torch.cuda.synchronize()
    err_fused = (h.float() - reference(summed.to(torch.bfloat16), w, eps)).abs().max().item()

    print(f"rmsnorm bf16 max |error| {err_direct:.2e}; fused_add_rmsnorm bf16 max |error| {err_fused:.2e}")
    return 0 if err_direct < 5e-2 and err_fused < 1e-1 else 1


if __name__ == "__main__":
    sys.exit(main())
