"""A decode step's page table over shuffled pages and the QKV GEMV's RoPE + KV-append epilogue over it, shared by
tests/engine/test_gpu_fused_decode.py and tests/engine/test_gpu_fp8_linear.py (imports CuPy: import it only from
GPU-gated test modules)."""

from __future__ import annotations

from typing import Any

import cupy as cp
import numpy as np

from fi_engine.kernels.fused_args import RopeAppend

POSITIONS = (300, 17, 0, 95, 130, 1, 64, 257)  # request r's new token sits at POSITIONS[r]


def decode_page_table(rng: np.random.Generator, rows: int, page_size: int, pages: int) -> dict[str, Any]:
    """Int32 device arrays of a decode step of ``rows`` requests: request r holds ``POSITIONS[r] + 1`` tokens on
    its own pages, drawn from a shuffled table of ``pages`` (one ``rng.permutation`` call): ``positions``,
    ``batch_indices``, ``kv_indptr``, ``kv_indices`` and ``last`` (the last page's length)."""
    positions = np.array(POSITIONS[:rows], np.int32)
    per = [int(p) // page_size + 1 for p in positions]
    order = rng.permutation(pages)[: sum(per)].astype(np.int32)
    return {
        "positions": cp.asarray(positions),
        "batch_indices": cp.arange(rows, dtype=np.int32),
        "kv_indptr": cp.asarray(np.concatenate([[0], np.cumsum(per)]).astype(np.int32)),
        "kv_indices": cp.asarray(order),
        "last": cp.asarray((positions % page_size + 1).astype(np.int32)),
    }


def rope_append(meta: dict[str, Any], rope: Any, hq: int, hk: int, d: int, kv: Any, pages: int) -> RopeAppend:
    """The RoPE (``rope``: a RopeConfig, Llama 3.1 where ``rope.llama3``) and KV append of the step ``meta``
    (:func:`decode_page_table`) into the caches ``kv`` ``[2, pages, page_size, hk, d]`` (16-bit, contiguous), as the
    QKV GEMV's epilogue takes them."""
    page_size = kv.shape[2]
    return RopeAppend(
        hq=hq, hk=hk, d=d, theta=rope.theta, scale=rope.factor if rope.llama3 else 1.0, llama3=rope.llama3,
        low_freq_factor=rope.low_freq_factor, high_freq_factor=rope.high_freq_factor,
        old_context_len=rope.original_max_position_embeddings, positions=meta["positions"].data.ptr,
        batch_indices=meta["batch_indices"].data.ptr, kv_indptr=meta["kv_indptr"].data.ptr,
        kv_indices=meta["kv_indices"].data.ptr, k_cache=kv[0].data.ptr, v_cache=kv[1].data.ptr,
        page_size=page_size, num_pages=pages, stride_page=page_size * hk * d, stride_n=hk * d, stride_h=d,
    )  # fmt: skip


def rope_config(llama3: bool) -> Any:
    """The tests' RoPE: Llama 3.1's (theta 5e5, factor 8, an original context of 64 so that positions up to 300
    cross its bands) or the plain default."""
    from fi_engine.checkpoint.config import RopeConfig

    if llama3:
        return RopeConfig(theta=5e5, llama3=True, factor=8.0, original_max_position_embeddings=64.0)
    return RopeConfig()
