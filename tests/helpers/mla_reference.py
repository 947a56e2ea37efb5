"""Multi-head latent attention (DeepSeek MLA) in float64 numpy, for the CPU tests of the absorbed form and of its
split over tensor-parallel ranks (tests/engine/test_deepseek.py, tests/engine/test_deepseek_tp.py): transformers'
unabsorbed form and the engine's absorbed one (:func:`fi_engine.models.mla_weights.split_kv_b`)."""

from __future__ import annotations

import numpy as np

from fi_engine.models.mla_weights import split_kv_b


def mla_unabsorbed(q_nope, q_pe, c, k_pe, kv_b, heads, nope, v_dim, scale):  # type: ignore[no-untyped-def]
    """transformers' form: expand the latents into per-head keys and values, then causal attention (the rows are the
    request's last tokens)."""
    t, n = q_nope.shape[0], c.shape[0]
    kv = (c @ kv_b.T).reshape(n, heads, nope + v_dim)
    k_nope, v = kv[..., :nope], kv[..., nope:]
    out = np.zeros((t, heads, v_dim))
    for i in range(t):
        visible = n - t + i + 1
        for h in range(heads):
            s = (k_nope[:visible, h] @ q_nope[i, h] + k_pe[:visible] @ q_pe[i, h]) * scale
            p = np.exp(s - s.max())
            out[i, h] = (p / p.sum()) @ v[:visible, h]
    return out


def mla_absorbed(q_nope, q_pe, c, k_pe, kv_b, heads, nope, v_dim, scale):  # type: ignore[no-untyped-def]
    """The engine's form: q_abs = q_nope @ W_k per head (w_uk_t), attention over the latents themselves (what
    batch_mla_run computes), then W_v per head (w_uv)."""
    w_uk_t, w_uv = split_kv_b(kv_b, heads, nope, v_dim)
    t, n = q_nope.shape[0], c.shape[0]
    q_abs = np.einsum("thd,hrd->thr", q_nope, w_uk_t)  # y = x @ w.T per head
    o = np.zeros((t, heads, c.shape[1]))
    for i in range(t):
        visible = n - t + i + 1
        s = (np.einsum("hr,jr->hj", q_abs[i], c[:visible]) + np.einsum("hd,jd->hj", q_pe[i], k_pe[:visible])) * scale
        p = np.exp(s - s.max(axis=1, keepdims=True))
        o[i] = (p / p.sum(axis=1, keepdims=True)) @ c[:visible]
    return np.einsum("thr,hvr->thv", o, w_uv)
