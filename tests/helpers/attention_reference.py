"""The float32 attention reference and tolerances shared by the GPU attention tests (imports torch: import it
only from GPU-gated test modules).

Tolerances, absolute and relative, on outputs of magnitude <= ~3: float16 5e-3, bfloat16 3e-2 (probabilities
are rounded to the input dtype before P.V); log-sum-exp (base 2) 2e-2.
"""

from __future__ import annotations

import math

from helpers.gpu import require_torch

torch = require_torch()  # imported by GPU test modules only: a skip naming the extra without it

TOL = {torch.float16: 5e-3, torch.bfloat16: 3e-2}
LSE_TOL = 2e-2
DTYPES = [torch.float16, torch.bfloat16]


def reference(q, k, v, *, causal=False, sm_scale=None, mask=None, window_left=-1, soft_cap=0.0):
    """Attention of q ``[qo, hq, d]`` over k ``[kv, hk, d]`` / v ``[kv, hk, dv]`` in float32 (k and v of any
    dtype torch converts to float32, FP8 included: the reference dequantizes by that conversion).

    Returns (o ``[qo, hq, dv]``, lse ``[qo, hq]`` in base 2). Causal is aligned to the end of the KV;
    ``window_left >= 0`` keeps keys ``j >= i + kv - qo - window_left``; ``soft_cap > 0`` maps the scaled logits
    ``s`` to ``soft_cap * tanh(s / soft_cap)``.
    """
    qo, hq, d = q.shape
    kv, hk = k.shape[:2]
    g = hq // hk
    kf, vf = k.float().repeat_interleave(g, 1), v.float().repeat_interleave(g, 1)
    s = torch.einsum("qhd,khd->hqk", q.float(), kf) * (d**-0.5 if sm_scale is None else sm_scale)
    if soft_cap > 0:
        s = soft_cap * torch.tanh(s / soft_cap)
    allowed = torch.ones(qo, kv, dtype=torch.bool, device=q.device)
    if window_left >= 0:
        i = torch.arange(qo, device=q.device)[:, None]
        j = torch.arange(kv, device=q.device)[None]
        allowed &= j >= i + kv - qo - window_left
    if causal:
        i = torch.arange(qo, device=q.device)[:, None]
        j = torch.arange(kv, device=q.device)[None]
        allowed &= j <= i + kv - qo
    if mask is not None:
        allowed &= mask
    s = s.masked_fill(~allowed, float("-inf"))
    o = torch.einsum("hqk,khd->qhd", torch.softmax(s, -1), vf)
    return o, (torch.logsumexp(s, -1) / math.log(2)).T


def close(got, want, dtype, what="out"):
    tol = TOL[dtype]
    torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol, msg=lambda m: f"{what}: {m}")
