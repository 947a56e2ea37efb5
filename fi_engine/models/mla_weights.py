"""Weight absorption of multi-head latent attention (DeepSeek MLA), in numpy.

``kv_b_proj`` ``[H * (dn + dv), R]`` expands the normalized latent ``c [R]`` of a token into every head's key part
``k_nope[h] = W_k[h] @ c`` (``W_k[h]``: the head's first ``dn`` rows) and value ``v[h] = W_v[h] @ c`` (the next
``dv`` rows). Absorbed form (what the MLA kernels compute on the cached latents directly):

- scores: ``q_nope[h] . k_nope[h] = (W_k[h]^T q_nope[h]) . c``: the query becomes ``q_abs[h] = q_nope[h] @ W_k[h]``
  ``[R]``;
- values: ``sum_j p[j] v_j[h] = W_v[h] @ (sum_j p[j] c_j)``: the kernel's output ``o[h] [R]`` (a weighted sum of
  latents) maps to the head's value ``W_v[h] @ o[h]`` ``[dv]``.

:func:`split_kv_b` returns both per-head factors in the layouts the engine's batched GEMMs read (each a row-major
Linear weight ``[n, k]``, ``y = x @ w.T``).
"""

from __future__ import annotations

import numpy as np

from ..values import arg_array, arg_int

__all__ = ["split_kv_b"]


def split_kv_b(kv_b: np.ndarray, heads: int, nope: int, v_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """``(w_uk_t, w_uv)`` of ``kv_b_proj.weight`` ``[heads * (nope + v_dim), R]``:

    - ``w_uk_t [heads, R, nope]``: ``W_k[h]^T`` (so ``q_abs[h] = q_nope[h] @ w_uk_t[h].T``);
    - ``w_uv [heads, v_dim, R]``: ``W_v[h]`` (so ``v[h] = o[h] @ w_uv[h].T``).

    Raises:
        TypeError: ``kv_b`` not a numeric numpy array, or a size not an int.
        ValueError: ``kv_b`` is not 2-D with ``heads * (nope + v_dim)`` rows, or a size < 1.
    """
    arg_array("kv_b", kv_b, 2, "[heads * (nope + v_dim), kv_lora_rank]")
    for name, value in (("heads", heads), ("nope", nope), ("v_dim", v_dim)):
        arg_int(name, value, 1, kv_b.shape[0])
    if kv_b.shape[0] != heads * (nope + v_dim):
        raise ValueError(
            f"kv_b (kv_b_proj.weight): expected [heads * (nope + v_dim), kv_lora_rank] = "
            f"[{heads} * ({nope} + {v_dim}), "
            f"kv_lora_rank], got shape {kv_b.shape}; pass the heads, nope and v_dim of the layer's config"
        )
    per_head = kv_b.reshape(heads, nope + v_dim, kv_b.shape[1])
    w_uk_t = np.ascontiguousarray(per_head[:, :nope, :].transpose(0, 2, 1))
    w_uv = np.ascontiguousarray(per_head[:, nope:, :])
    return w_uk_t, w_uv
