"""The ops of the CUDA 12 test kernel wheel, run on the GPU in a process of their own (tests/ops/test_gpu_cuda12.py).

``python tests/helpers/cuda12_worker.py``, with ``FI_FFI_LOCK`` pinning the CUDA 12 wheel only (so fi_ffi loads
``libcudart.so.12``): ``fi-ffi smoke``'s checks of the ops the wheel holds (RMSNorm, fused add + RMSNorm, paged KV
append, batch decode, single prefill) plus single decode and FA2 batch prefill over ragged K/V (causal), each against
a float32 numpy reference. Prints one JSON object: the CUDA runtime fi_ffi loaded, whether ``libcudart.so.13`` is
mapped, the selected kernel wheels, and per check its name, max |error| and verdict.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from fi_ffi import loader
from fi_ffi.cli import smoke
from fi_ffi.loader import dl
from fi_ffi.ops.attention.decode import single_decode
from fi_ffi.ops.attention.prefill import batch_prefill_ragged_plan, batch_prefill_ragged_run
from fi_ffi.ops.attention.workspace import Workspace

TOLERANCE = 5e-3  # float16 outputs of magnitude ~1, against float32


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, causal: bool) -> np.ndarray:
    """Float32 reference: q ``[n_q, hq, d]``, k/v ``[n_kv, hk, d]`` (grouped heads), bottom-right causal mask."""
    q32, k32, v32 = (a.astype(np.float32) for a in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k32, v32 = np.repeat(k32, group, axis=1), np.repeat(v32, group, axis=1)
    scores = np.einsum("qhd,khd->hqk", q32, k32) / math.sqrt(q.shape[2])
    if causal:
        n_q, n_kv = q.shape[0], k.shape[0]
        allowed = np.arange(n_kv)[None, :] <= np.arange(n_q)[:, None] + (n_kv - n_q)
        scores = np.where(allowed[None], scores, -np.inf)
    scores -= scores.max(axis=-1, keepdims=True)
    weights = np.exp(scores)
    weights /= weights.sum(axis=-1, keepdims=True)
    return np.einsum("hqk,khd->qhd", weights, v32)


def check_single_decode(dev: smoke.Device) -> dict[str, Any]:
    rng = np.random.default_rng(11)
    hq, hk, d, n = 32, 8, 128, 37
    q = rng.standard_normal((hq, d)).astype(np.float16)
    k = rng.standard_normal((n, hk, d)).astype(np.float16)
    v = rng.standard_normal((n, hk, d)).astype(np.float16)
    qd, kd, vd, od = dev.upload(q), dev.upload(k), dev.upload(v), dev.upload(np.zeros_like(q))
    single_decode(qd, kd, vd, out=od, stream=dev.stream_handle)
    got = dev.download(od, np.float16).astype(np.float32)
    err = float(np.max(np.abs(got - attention(q[None], k, v, False)[0])))
    return {"name": "single_decode f16 32/8 heads d128", "max_error": err, "passed": err < TOLERANCE}


def check_batch_prefill_ragged(dev: smoke.Device) -> dict[str, Any]:
    rng = np.random.default_rng(12)
    hq, hk, d = 16, 4, 128
    q_lens, kv_lens = [5, 17], [9, 40]
    qs = [rng.standard_normal((n, hq, d)).astype(np.float16) for n in q_lens]
    ks = [rng.standard_normal((n, hk, d)).astype(np.float16) for n in kv_lens]
    vs = [rng.standard_normal((n, hk, d)).astype(np.float16) for n in kv_lens]
    qo_indptr = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    kv_indptr = np.concatenate([[0], np.cumsum(kv_lens)]).astype(np.int32)
    q, k, v = np.concatenate(qs), np.concatenate(ks), np.concatenate(vs)
    qd, kd, vd, od = dev.upload(q), dev.upload(k), dev.upload(v), dev.upload(np.zeros_like(q))
    qo_d, kv_d = dev.upload(qo_indptr), dev.upload(kv_indptr)
    with Workspace.allocate(dev.ordinal, float_bytes=64 << 20) as ws:
        plan = batch_prefill_ragged_plan(
            qo_indptr, kv_indptr, hq, hk, d, workspace=ws, causal=True, backend="fa2", stream=dev.stream_handle
        )
        batch_prefill_ragged_run(
            qd, kd, vd, plan=plan, qo_indptr=qo_d, kv_indptr=kv_d, out=od, stream=dev.stream_handle
        )
        got = dev.download(od, np.float16).astype(np.float32)
        plan.release()
    want = np.concatenate([attention(a, b, c, True) for a, b, c in zip(qs, ks, vs, strict=True)])
    err = float(np.max(np.abs(got - want)))
    return {"name": "batch_prefill ragged FA2 causal f16 16/4 heads d128", "max_error": err, "passed": err < TOLERANCE}


def main() -> None:
    checks = [
        smoke.check_rmsnorm,
        smoke.check_fused_add_rmsnorm,
        smoke.check_append_paged_kv_cache,
        smoke.check_batch_decode,
        smoke.check_single_prefill,
    ]
    dev = smoke.Device(0)
    results: list[dict[str, Any]] = []
    try:
        for check in checks:
            r = check(dev)
            results.append({"name": r.name, "max_error": r.max_error, "passed": r.passed})
        results.append(check_single_decode(dev))
        results.append(check_batch_prefill_ragged(dev))
    finally:
        dev.close()
    selection = loader.selection()
    print(
        json.dumps(
            {
                "cudart": loader.ensure_cudart(),
                "mapped13": dl.loaded_paths("libcudart.so.13", versioned=True),
                "kernels": [[p.filename, p.cuda] for p in selection.kernels],
                "modules": sorted(loader.loaded_modules()),
                "results": results,
            }
        )
    )


if __name__ == "__main__":
    main()
